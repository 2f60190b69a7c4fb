import json
import logging
import re

import pytest
from click.testing import CliRunner
from conftest import TINY, make_image_folder

from xfeat.cli import cli
from xfeat.comparison import compare, parse_weights
from xfeat.comparison.verdict import build_verdict
from xfeat.report import format_comparison_table, markdown_to_html
from xfeat.report.rows import RANDOM_WEIGHTS, best_run, run_caveat, timing_rows
from xfeat.report.style import model_colors, run_styles

OPTS = dict(epochs=1, image_size=TINY, num_workers=0, n_boot=50, progress=False)
MODES = ("cached", "frozen", "full", "lp-ft")
RATIO = r"\d+\.\d+x (faster|slower)"


def _weights_file(path):
    """A state dict of torchvision's resnet18 in a file: weights of kind "file", which count
    as pretrained (only kind "random" is speed only)."""
    import torch
    import torchvision

    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), path)
    return path


def _row(model="resnet18", mode="cached", kind="file", val_auc=0.8, acc=0.8, **extra):
    """A comparison row as ``table_row`` makes it, with made-up numbers."""
    row = {
        "model": model,
        "mode": mode,
        "head": "logreg",
        "weights": kind,
        "weights_kind": kind,
        "transductive": False,
        "caveat": run_caveat(kind),
        "parameters": 11_000_000,
        "trainable_parameters": 513,
        "extract_seconds": 10.0,
        "train_seconds": 1.0,
        "evaluate_seconds": 0.5,
        "total_seconds": 11.5,
        "images_per_second": 100.0,
        "peak_memory_mib": 900.0,
        "epochs": None,
        "val_accuracy": acc,
        "val_auc": val_auc,
        "test_accuracy": acc,
        "test_accuracy_ci": [acc - 0.04, acc + 0.03],
        "balanced_accuracy": acc,
        "auc": val_auc,
        "auc_ci": [val_auc - 0.05, val_auc + 0.04],
        "sensitivity": 0.9,
        "sensitivity_ci": [0.8, 0.95],
        "specificity": 0.7,
        "specificity_ci": [0.6, 0.8],
        "threshold": 0.5,
        "run_dir": None,
    }
    if mode != "cached":
        row.update(extract_seconds=0.0, train_seconds=100.0, epochs=5, trainable_parameters=1026)
    return {**row, **extra}


def test_parse_weights():
    models = ["mobilenet_v2", "resnet18"]
    assert parse_weights("none", models) == {"mobilenet_v2": "none", "resnet18": "none"}
    assert parse_weights("mobilenet_v2=/w.pth", models) == {"mobilenet_v2": "/w.pth", "resnet18": "none"}
    with pytest.raises(ValueError, match="names model 'vgg11', which is not in --models"):
        parse_weights("vgg11=/w.pth", models)


def test_compare_reports_and_reuses(tmp_path, caplog):
    data = make_image_folder(tmp_path / "xray", n_train=20, n_test=8)
    weights = f"resnet18={_weights_file(tmp_path / 'r18.pt')}"
    out = tmp_path / "cmp"
    first = compare(data, ["resnet18"], weights=weights, out_dir=out, cache_dir=tmp_path / "c", **OPTS)
    assert [(r["model"], r["mode"]) for r in first.rows] == [("resnet18", m) for m in MODES]
    for name in (
        "report.md",
        "report.html",
        "comparison.csv",
        "comparison.json",
        "pareto.png",
        "roc.png",
        "confusion.png",
    ):
        assert (out / name).is_file(), name
    report = (out / "report.md").read_text()
    assert "| model | mode | weights | note |" in report and "![Pareto plot](pareto.png)" in report
    assert re.search(r"runs/resnet18-r18-full-1ep-[0-9a-f]{8}/curves\.png", report)
    cached, frozen = first.rows[0], first.rows[1]
    assert cached["weights_kind"] == "file" and cached["caveat"] == ""
    assert cached["trainable_parameters"] == 513 and frozen["trainable_parameters"] == 1026
    assert frozen["parameters"] > 1e7 and cached["extract_seconds"] > 0
    assert first.tests[0]["chosen_by"].startswith("val AUC") and len(first.tests) == 4
    assert all(0 <= t["accuracy_p_value"] <= 1 for t in first.tests[1:])
    timing = first.timings[0]
    assert timing["model"] == "resnet18" and timing["frozen_epochs"] == 1
    for key in ("cached_vs_frozen", "cache_built_vs_frozen", "cached_vs_full"):
        assert re.fullmatch(RATIO, timing[key]), timing[key]

    # The verdict: in comparison.json, first in the report, in plain words.
    saved = json.loads((out / "comparison.json").read_text())
    verdict = saved["verdict"]
    assert list(saved)[0] == "verdict" and verdict["best"]["model"] == "resnet18"
    assert verdict["best"]["run"] == first.tests[0]["best"]
    headings = [line for line in report.splitlines() if line.startswith("## ")]
    assert headings[:3] == ["## Verdict", "## Time", "## Results"]
    assert verdict["sentences"][0].startswith("Best run by val AUC, among runs from pretrained")
    assert re.search(
        r"accuracy [01]\.\d{3}( \[[01]\.\d{3}–[01]\.\d{3}\])?, AUC", verdict["sentences"][0]
    )
    assert re.search(
        rf"resnet18: the cached path .* is {RATIO} than the frozen baseline", verdict["sentences"][1]
    )
    # never "0.8x faster", "p 0" or a near tie rounded to "1.0x"
    assert not re.search(r"(?<![\d.])0(\.\d+)?x faster|p 0(\.0+)?[;) ]|\b1\.0x", report)
    assert report.index(verdict["sentences"][0]) < report.index("| model | mode |")
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/results.json")}

    with caplog.at_level(logging.INFO, logger="xfeat"):
        second = compare(
            data,
            ["resnet18", "mobilenet_v3_small"],
            weights=weights,
            modes=["cached", "frozen"],
            out_dir=out,
            cache_dir=tmp_path / "c",
            **OPTS,
        )
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing recomputed
    assert caplog.text.count("reusing") == 2
    assert [r["model"] for r in second.rows] == ["resnet18"] * 2 + ["mobilenet_v3_small"] * 2
    saved = json.loads((out / "comparison.json").read_text())
    assert len(saved["rows"]) == 4
    # Random weights: marked everywhere, timed, never the best.
    assert saved["verdict"]["best"]["model"] == "resnet18"
    assert saved["verdict"]["random_weights_models"] == ["mobilenet_v3_small"]
    report = (out / "report.md").read_text()
    random_rows = [line for line in report.splitlines() if line.startswith("| mobilenet_v3_small |")]
    assert len(random_rows) == 2 and all(RANDOM_WEIGHTS in line for line in random_rows)
    assert all(r["caveat"] == RANDOM_WEIGHTS for r in saved["rows"][2:])
    assert f"mobilenet_v3_small ({RANDOM_WEIGHTS}): the cached path" in report
    assert RANDOM_WEIGHTS in second.table() and RANDOM_WEIGHTS in second.summary()


def test_compare_cli_quick_note(tmp_path):
    data = make_image_folder(tmp_path / "xray", n_train=12, n_test=4)
    result = CliRunner().invoke(
        cli,
        [
            "-q",
            "compare",
            "--data",
            str(data),
            "--models",
            "resnet18",
            "--weights",
            "none",
            "--modes",
            "cached,frozen",
            "--quick",
            "--image-size",
            str(TINY),
            "--num-workers",
            "0",
            "--n-boot",
            "20",
            "--out",
            str(tmp_path / "cmp"),
            "--cache-dir",
            str(tmp_path / "c"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "note: --quick" in result.output and "2 epoch(s) instead of 25" in result.output
    assert "report:" in result.output


def test_best_run_is_never_from_random_weights():
    rows = [
        _row("resnet18", "full", "random", val_auc=0.99),
        _row("resnet50", "cached", "file", val_auc=0.70),
        _row("resnet50", "full", "torchvision", val_auc=0.80),
    ]
    assert best_run(rows) == 2
    assert best_run(rows[:1]) is None
    # Ties on val AUC: val accuracy decides; an undefined AUC loses.
    tied = [_row(val_auc=0.8, acc=0.7), _row(val_auc=0.8, acc=0.9), _row(val_auc=float("nan"))]
    assert best_run(tied) == 1


def test_verdict_without_a_pretrained_run_still_reports_speed():
    rows = [_row("resnet18", mode, "random") for mode in ("cached", "frozen", "full")]
    verdict = build_verdict(rows, [], timing_rows(rows, {}), best_run(rows))
    assert verdict["best"] is None
    assert verdict["sentences"][0].startswith("No meaningful best run")
    speed = verdict["sentences"][1]
    assert speed.startswith(f"resnet18 ({RANDOM_WEIGHTS}): the cached path (extraction 10 s")
    assert "9.1x faster than the frozen baseline (100 s, 5 epochs)" in speed
    assert "Accuracies from random weights are not compared" in speed
    assert verdict["speed"][0]["against"][0]["accuracy_diff"] is None


def test_verdict_words_speed_accuracy_and_p_values():
    rows = [
        _row("resnet18", "cached", acc=0.80, val_auc=0.90, extract_seconds=150.0),
        _row("resnet18", "frozen", acc=0.85, val_auc=0.80),
        _row("resnet18", "full", acc=0.70, val_auc=0.70, train_seconds=50.0),
    ]
    tests = [
        {"best": "resnet18 cached", "chosen_by": "val AUC"},
        {
            "model": "resnet18",
            "mode": "frozen",
            "caveat": "",
            "auc_diff": -0.1,
            "auc_p_value": 0.0,
            "accuracy_diff": 0.05,
            "accuracy_p_value": 0.0,
            "n_boot": 2000,
            "significant": True,
        },
        {
            "model": "resnet18",
            "mode": "full",
            "caveat": "",
            "auc_diff": -0.01,
            "auc_p_value": 0.4,
            "accuracy_diff": -0.1,
            "accuracy_p_value": 0.3,
            "n_boot": 2000,
            "significant": False,
        },
    ]
    verdict = build_verdict(rows, tests, timing_rows(rows, {}), best_run(rows))
    best, speed, significant, not_significant = verdict["sentences"]
    assert best.startswith(
        "Best run by val AUC, among runs from pretrained weights: resnet18 cached (val AUC 0.900)"
    )
    assert "accuracy 0.800 [0.760–0.830], AUC 0.900 [0.850–0.940] (95% bootstrap CIs)" in best
    # 100 s frozen vs 150 + 1 s cached: slower, said so, never "0.66x faster".
    assert (
        "is 1.51x slower than the frozen baseline (100 s, 5 epochs), losing 0.050 test "
        "accuracy (0.800 vs 0.850)" in speed
    )
    assert (
        "3.02x slower than full fine-tuning (50 s, 5 epochs), gaining 0.100 test accuracy "
        "(0.800 vs 0.700)" in speed
    )
    assert "Once the cache exists: 100.0x faster than the frozen baseline." in speed
    assert significant.startswith(
        "Against resnet18 cached (DeLong test for AUC, paired "
        "bootstrap for accuracy, p < 0.05), significantly different"
    )
    assert "resnet18 frozen (AUC -0.100, p < 1e-16; accuracy +0.050, p < 0.0005)" in significant
    assert (
        not_significant == "Not significantly different: resnet18 full (AUC p 0.400; accuracy p 0.300)."
    )


def test_transductive_runs_are_labelled():
    row = _row("resnet18", "full", transductive=True, caveat=run_caveat("file", True))
    assert row["caveat"] == "transductive"
    assert run_caveat("random", True) == f"{RANDOM_WEIGHTS}; transductive"
    table = format_comparison_table([row], markdown=True)
    assert "| resnet18 | full | file | transductive |" in table
    assert "0.800 [0.760–0.830]" in table
    verdict = build_verdict([row], [], [], 0)
    assert verdict["best"]["transductive"] and "It is transductive" in verdict["sentences"][0]


def test_styles_one_colour_per_model_one_marker_per_mode():
    rows = [
        _row(model, mode, "random" if model == "vgg11" else "file")
        for model in ("resnet18", "resnet50", "vgg11")
        for mode in MODES
    ]
    styles = run_styles(rows)
    assert len(styles) == 12
    assert len({(s.color, s.marker) for s in styles.values()}) == 12
    assert len({(s.color, s.linestyle) for s in styles.values()}) == 12
    for model in ("resnet18", "resnet50", "vgg11"):
        assert len({styles[(model, mode)].color for mode in MODES}) == 1
    for mode in MODES:
        assert len({styles[(model, mode)].marker for model in ("resnet18", "vgg11")}) == 1
    assert all(s.hollow == (model == "vgg11") for (model, _), s in styles.items())
    # Many models stay distinct, and a model keeps its colour when another is added after it.
    many = [f"m{i}" for i in range(25)]
    assert len(set(model_colors(many[:12]).values())) == 12
    assert len(set(model_colors(many).values())) == 25
    assert model_colors(many[:3]) == {m: c for m, c in model_colors(many[:4]).items() if m in many[:3]}


def test_markdown_to_html_lists_bold_tables():
    page = markdown_to_html(
        "# T\n\n- a **b**\n- c\n\n| x | y |\n|---|---|\n| r18.pt | 0.843 [0.81–0.87] |\n"
    )
    assert "<ul><li>a <strong>b</strong></li><li>c</li></ul>" in page and "<h1>T</h1>" in page
    # Numbers right-aligned on one line, text left-aligned.
    assert "<th>x</th><th class='n'>y</th>" in page
    assert "<td>r18.pt</td><td class='n'>0.843 [0.81–0.87]</td>" in page


def test_speed_ratios_read_the_right_way_round():
    from xfeat.report.rows import speed_ratio

    assert speed_ratio(104, 100) == "1.04x faster" and speed_ratio(100, 100) == "1.00x faster"
    assert speed_ratio(250, 100) == "2.5x faster" and speed_ratio(100, 125) == "1.25x slower"
    assert speed_ratio(0, 1) == "n/a"
