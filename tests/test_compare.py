import json
import logging
import re

import pytest
from click.testing import CliRunner

from xfeat.cli import cli
from xfeat.compare import compare, parse_weights

from conftest import TINY, make_image_folder

OPTS = dict(epochs=1, image_size=TINY, num_workers=0, n_boot=50, progress=False)


def test_parse_weights():
    models = ["mobilenet_v2", "resnet18"]
    assert parse_weights("none", models) == {"mobilenet_v2": "none", "resnet18": "none"}
    assert parse_weights("mobilenet_v2=/w.pth", models) == {"mobilenet_v2": "/w.pth",
                                                             "resnet18": "none"}
    with pytest.raises(ValueError, match="names model 'vgg11', which is not in --models"):
        parse_weights("vgg11=/w.pth", models)


def test_compare_reports_and_reuses(tmp_path, caplog):
    data = make_image_folder(tmp_path / "xray", n_train=20, n_test=8)
    out = tmp_path / "cmp"
    first = compare(data, ["resnet18"], out_dir=out, cache_dir=tmp_path / "c", **OPTS)
    assert [(r["model"], r["mode"]) for r in first.rows] == [
        ("resnet18", m) for m in ("cached", "frozen", "full", "lp-ft")]
    for name in ("report.md", "report.html", "comparison.csv", "comparison.json", "pareto.png",
                 "roc.png", "confusion.png"):
        assert (out / name).is_file(), name
    report = (out / "report.md").read_text()
    assert "| model | mode | params |" in report and "![Pareto plot](pareto.png)" in report
    assert re.search(r"runs/resnet18-random-full-1ep-[0-9a-f]{8}/curves\.png", report)
    cached, frozen = first.rows[0], first.rows[1]
    assert cached["trainable_parameters"] == 513 and frozen["trainable_parameters"] == 1026
    assert frozen["parameters"] > 1e7 and cached["extract_seconds"] > 0
    assert first.tests[0]["chosen_by"] == "val AUC" and len(first.tests) == 4
    assert all(0 <= t["accuracy_p_value"] <= 1 for t in first.tests[1:])
    assert first.savings and "frozen-backbone baseline" in first.savings[0]
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/results.json")}

    with caplog.at_level(logging.INFO, logger="xfeat"):
        second = compare(data, ["resnet18", "mobilenet_v3_small"], modes=["cached", "frozen"],
                         out_dir=out, cache_dir=tmp_path / "c", **OPTS)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing recomputed
    assert caplog.text.count("reusing") == 2
    assert [r["model"] for r in second.rows] == ["resnet18"] * 2 + ["mobilenet_v3_small"] * 2
    saved = json.loads((out / "comparison.json").read_text())
    assert len(saved["rows"]) == 4


def test_compare_cli_quick_note(tmp_path):
    data = make_image_folder(tmp_path / "xray", n_train=12, n_test=4)
    result = CliRunner().invoke(cli, ["-q", "compare", "--data", str(data), "--models",
                                      "resnet18", "--modes", "cached,frozen", "--quick",
                                      "--image-size", str(TINY), "--num-workers", "0",
                                      "--n-boot", "20", "--out", str(tmp_path / "cmp"),
                                      "--cache-dir", str(tmp_path / "c")])
    assert result.exit_code == 0, result.output
    assert "note: --quick" in result.output and "2 epochs instead of 25" in result.output
    assert "report:" in result.output
