"""What xfeat writes: strict JSON (undefined numbers are null), the user's umask, and a
process left as it was (no backend switched, nothing patched, torch not loaded for --help)."""

import json
import os
import stat
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, TINY, child_env, make_image_folder, make_npz

from xfeat.comparison import compare
from xfeat.errors import BackboneError, ConfigError
from xfeat.fitting import fit_head


def _strict(text: str):
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """Every kind of run on tiny data, in one folder."""
    root = tmp_path_factory.mktemp("outputs")
    data = make_image_folder(root / "xray", n_train=16, n_test=6)
    old = os.umask(0o022)
    try:
        compare(
            data,
            ["resnet18"],
            modes=["cached", "frozen"],
            epochs=1,
            image_size=TINY,
            num_workers=0,
            n_boot=20,
            progress=False,
            out_dir=root / "cmp",
            cache_dir=root / "c",
            analyze=True,
        )
    finally:
        os.umask(old)
    return root


def test_every_json_is_strict(outputs):
    files = sorted(outputs.rglob("*.json"))
    kinds = {p.name for p in files}
    assert {"results.json", "comparison.json", "analysis.json", "history.json"} <= kinds, kinds
    for path in files:
        _strict(path.read_text())


def test_files_follow_the_umask(outputs):
    names = (
        "results.json",
        "head.npz",
        "model.pt",
        "report.html",
        "comparison.csv",
        "predictions.npz",
        "roc.png",
    )
    found = {}
    for path in outputs.rglob("*"):
        if path.name in names:
            found[path.name] = stat.S_IMODE(path.stat().st_mode)
    assert set(found) == set(names), found
    assert all(mode == 0o644 for mode in found.values()), {k: oct(v) for k, v in found.items()}


def test_analyses_are_linked_as_pages_a_browser_shows(outputs):
    """report.html links analysis.html (a browser shows a .md as raw text); report.md the .md."""
    cmp = outputs / "cmp"
    page = (cmp / "analysis" / "resnet18" / "analysis.html").read_text()
    assert page.startswith("<!doctype html>") and "<h1>Data analysis: xray</h1>" in page
    assert "<strong>" in page and "**" not in page
    assert 'href="analysis/resnet18/analysis.html"' in (cmp / "report.html").read_text()
    assert "](analysis/resnet18/analysis.md)" in (cmp / "report.md").read_text()


def test_undefined_metrics_are_null(tmp_path):
    """PPV when no image is predicted positive, AUC with one class in test: null, not NaN."""
    arrays = dict(np.load(make_npz(tmp_path / "tiny.npz")))
    arrays["test_labels"][:] = 0  # test holds one class only
    np.savez(tmp_path / "one_class_test.npz", **arrays)
    data = tmp_path / "one_class_test.npz"
    result = fit_head(
        data,
        "resnet18",
        out_dir=tmp_path / "run",
        n_boot=20,
        extract_options=dict(cache_dir=tmp_path / "c", image_size=TINY, num_workers=0, progress=False),
    )
    record = _strict((tmp_path / "run" / "results.json").read_text())
    assert record["metrics"]["test"]["roc_auc"] is None
    assert np.isnan(result.record.metrics["test"]["roc_auc"])  # in memory it stays a float


def test_compare_checks_every_model_before_computing(tmp_path):
    data = make_image_folder(tmp_path / "xray", n_train=8, n_test=4)
    with pytest.raises(BackboneError, match="no such file"):
        compare(
            data,
            ["resnet18", "mobilenet_v2"],
            weights="mobilenet_v2=/nowhere/w.pth",
            out_dir=tmp_path / "cmp",
            cache_dir=tmp_path / "c",
            progress=False,
        )
    with pytest.raises(ConfigError, match="threshold rule 'median'"):
        compare(
            data,
            ["resnet18"],
            threshold="median",
            out_dir=tmp_path / "cmp",
            cache_dir=tmp_path / "c",
            progress=False,
        )
    assert not (tmp_path / "c").exists() and not (tmp_path / "cmp").exists()


def test_threshold_is_checked_before_extraction(tmp_path):
    data = make_image_folder(tmp_path / "xray", n_train=8, n_test=4)
    with pytest.raises(ConfigError, match="threshold rule 'bogus'"):
        fit_head(data, "resnet18", threshold="bogus", extract_options=dict(cache_dir=tmp_path / "c"))
    from xfeat.finetuning import finetune

    with pytest.raises(ConfigError, match="threshold rule 'bogus'"):
        finetune(data, "resnet18", threshold="bogus", cache_dir=tmp_path / "c")
    assert not (tmp_path / "c").exists()


_HYGIENE = """
import sys, matplotlib
matplotlib.use("svg")
import torch.nn.init as init
before = {n: getattr(init, n) for n in dir(init)}
register = torch_module = None
import torch
register = torch.nn.Module.register_parameter
import xfeat
from xfeat.backbones import describe_backbones, feature_dim
from xfeat.report import plot_training_curves
feature_dim("regnet_y_400mf"); describe_backbones()
plot_training_curves([{"epoch": 1, "train_accuracy": .5, "val_accuracy": .5, "train_loss": 1,
                       "val_loss": 1}], sys.argv[1])
assert matplotlib.get_backend() == "svg", matplotlib.get_backend()
assert {n: getattr(init, n) for n in dir(init)} == before
assert torch.nn.Module.register_parameter is register
import matplotlib.pyplot
assert matplotlib.pyplot.get_fignums() == []
print("ok")
"""


def test_importing_and_using_xfeat_changes_nothing_in_the_process(tmp_path):
    out = subprocess.run(
        [sys.executable, "-c", _HYGIENE, str(tmp_path / "c.png")],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_help_does_not_import_torch():
    code = (
        "import sys\nfrom xfeat.cli import cli\n"
        "for args in (['--help'], ['finetune', '--help'], ['fit-head', '--help']):\n"
        "    try:\n        cli(args)\n    except SystemExit:\n        pass\n"
        "print(sorted(m for m in ('torch', 'sklearn', 'numpy', 'matplotlib') "
        "if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_public_functions_and_subpackages_never_shadow_each_other():
    """Functions are verbs, packages nouns: after every submodule is imported, ``xfeat.compare``
    is still the function and ``xfeat.comparison`` its package (and so for every API name)."""
    code = (
        "import importlib, pkgutil, types, xfeat\n"
        "for m in pkgutil.walk_packages(xfeat.__path__, 'xfeat.'):\n"
        "    importlib.import_module(m.name)\n"
        "names = {m.name.split('.')[1] for m in pkgutil.iter_modules(xfeat.__path__, 'xfeat.')}\n"
        "assert not names & set(xfeat.__all__), names & set(xfeat.__all__)\n"
        "assert all(not isinstance(getattr(xfeat, n), types.ModuleType) for n in xfeat.__all__)\n"
        "assert callable(xfeat.compare) and isinstance(xfeat.comparison, types.ModuleType)\n"
        "assert xfeat.compare is xfeat.comparison.compare\n"
        "assert xfeat.analyze is xfeat.analysis.analyze\n"
        "assert xfeat.finetune is xfeat.finetuning.finetune\n"
        "assert xfeat.predict is xfeat.prediction.predict\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=child_env())
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_a_model_named_by_a_deep_path_gets_a_short_distinct_folder_name():
    from xfeat.files import safe_name
    from xfeat.runs.folders import default_run_dir

    deep = "/" + "/".join(["a_rather_long_folder_name"] * 12)
    one, other = f"hf:{deep}/rad-dino:pool=mean", f"hf:{deep}x/rad-dino:pool=mean"
    names = [
        default_run_dir("chest", m, {"kind": "hf", "id": "DEFAULT"}, "cached-logreg").parent.name
        for m in (one, other)
    ]
    assert names[0] != names[1] and all(len(n) <= 120 for n in names)
    assert "rad-dino_pool_mean" in names[0]
    assert safe_name("resnet50") == "resnet50"  # short names as before
