import copy
import dataclasses
import json

import numpy as np
import pytest
from conftest import TINY, make_image_folder, make_npz

import xfeat
from xfeat.cache import CacheError, WeightsRecord, read_cache
from xfeat.errors import DataError
from xfeat.fitting import check_head_matches, fit_head
from xfeat.heads import load_head
from xfeat.runs.results import SCHEMA, load_result

EXTRACT = dict(image_size=TINY, num_workers=0, progress=False)


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    root = make_image_folder(tmp_path_factory.mktemp("d") / "xray", n_train=40, n_test=12)
    path = xfeat.extract(root, "resnet18", cache_dir=tmp_path_factory.mktemp("c"), **EXTRACT)
    return read_cache(path)


def test_results_schema_and_files(features, tmp_path):
    result = fit_head(cache=features, out_dir=tmp_path / "run", n_boot=200)
    record = json.loads((tmp_path / "run" / "results.json").read_text())
    for key in (
        "schema",
        "model",
        "weights",
        "mode",
        "head",
        "threshold",
        "metrics",
        "timing",
        "cache",
        "selection",
        "ci",
        "metrics_at_0.5",
        "dataset",
        "history",
    ):
        assert key in record, key
    assert record["schema"] == SCHEMA and record["mode"] == "cached" and record["head"] == "logreg"
    assert set(record["metrics"]) == {"train", "val", "test"}
    for name in (
        "accuracy",
        "balanced_accuracy",
        "roc_auc",
        "sensitivity",
        "specificity",
        "ppv",
        "npv",
        "f1",
        "confusion_matrix",
        "log_loss",
        "brier",
        "ece",
    ):
        assert name in record["metrics"]["test"], name
    assert set(record["ci"]["test"]) == {"accuracy", "roc_auc", "sensitivity", "specificity"}
    assert record["threshold"]["chosen_on"] == "val" and 0 <= record["threshold"]["value"] <= 1
    assert record["timing"]["fit_seconds"] > 0 and record["cache"]["key"] == features.key
    assert "C" in record["selection"] and record["selection"]["sweep"]
    loaded = load_result(tmp_path / "run")
    np.testing.assert_allclose(loaded.predictions["test"][2], result.predictions["test"][2], rtol=1e-6)
    head, meta = load_head(tmp_path / "run" / "head.npz")
    assert meta["threshold"] == record["threshold"]["value"] and meta["model"] == "resnet18"
    np.testing.assert_allclose(
        head.predict_proba(features["test"].features), result.predictions["test"][2], rtol=1e-5
    )
    assert "accuracy" in result.table() and "chosen on val: C=" in result.table()


@pytest.mark.parametrize("head, params", [("logreg", {}), ("linear", {"epochs": 4}), ("knn", {})])
def test_test_labels_influence_no_choice(features, head, params):
    """Permuting the test labels changes no chosen value and no train/val number."""
    shuffled = copy.deepcopy(features)
    rng = np.random.default_rng(0)
    shuffled.splits["test"].labels = rng.permutation(features["test"].labels)
    a = fit_head(cache=features, head=head, head_params=params, save=False, n_boot=50)
    b = fit_head(cache=shuffled, head=head, head_params=params, save=False, n_boot=50)
    assert a.record.selection == b.record.selection
    assert a.record.threshold == b.record.threshold
    assert a.record.metrics["train"] == b.record.metrics["train"]
    assert a.record.metrics["val"] == b.record.metrics["val"]

    def no_timing(history):
        return [{k: v for k, v in epoch.items() if k != "seconds"} for epoch in history]

    assert no_timing(a.record.history) == no_timing(b.record.history)
    # The permutation is real: test numbers do move.
    assert a.record.metrics["test"]["confusion_matrix"] != b.record.metrics["test"]["confusion_matrix"]


def test_threshold_rules(features):
    sens = fit_head(cache=features, threshold="sensitivity:0.95", save=False, n_boot=0)
    assert sens.record.metrics["val"]["sensitivity"] >= 0.95
    fixed = fit_head(cache=features, threshold=0.5, save=False, n_boot=0)
    assert fixed.record.threshold.value == 0.5
    assert fixed.record.metrics["test"] == fixed.record.metrics_at_half["test"]
    with pytest.raises(ValueError, match="threshold rule 'best' not understood"):
        fit_head(cache=features, threshold="best", save=False)


def test_multiclass(tmp_path):
    path = make_npz(tmp_path / "three.npz", n=(60, 60, 30), n_classes=3)
    result = fit_head(
        path,
        "resnet18",
        extract_options=dict(cache_dir=tmp_path / "c", **EXTRACT),
        save=False,
        n_boot=50,
    )
    assert result.record.threshold.value is None
    assert len(result.record.metrics["test"]["confusion_matrix"]) == 3
    assert 0 <= result.record.metrics["test"]["roc_auc"] <= 1


def test_cache_from_other_data_is_refused(tmp_path):
    a = make_image_folder(tmp_path / "a", n_train=8, n_test=2, seed=0)
    b = make_image_folder(tmp_path / "b", n_train=8, n_test=2, seed=1)
    path = xfeat.extract(a, "resnet18", cache_dir=tmp_path / "c", **EXTRACT)
    fit_head(a, cache=path, save=False, n_boot=0)  # the right data is fine
    with pytest.raises(CacheError, match="made from different data"):
        fit_head(b, cache=path, save=False, n_boot=0)


def test_head_from_other_backbone_is_refused(features, tmp_path):
    fit_head(cache=features, out_dir=tmp_path / "run", n_boot=0)
    _, head_meta = load_head(tmp_path / "run" / "head.npz")
    check_head_matches(head_meta, features.meta)
    other = features.meta.with_(model="resnet34")
    with pytest.raises(ValueError, match="trained on backbone 'resnet18'.*'resnet34'"):
        check_head_matches(head_meta, other)
    other = features.meta.with_(preprocessing={**features.meta.preprocessing, "crop_size": 64})
    with pytest.raises(ValueError, match="trained on preprocessing"):
        check_head_matches(head_meta, other)
    other = features.meta.with_(weights=WeightsRecord("random", "random(seed=1)"))
    with pytest.raises(ValueError, match="weights random\\(seed=0\\)"):
        check_head_matches(head_meta, other)


def test_refit_on_val_chooses_the_threshold_out_of_sample(features):
    plain = fit_head(cache=features, save=False, n_boot=0)
    refit = fit_head(cache=features, head_params={"refit_on_val": True}, save=False, n_boot=0)
    assert refit.record.selection["C"] == plain.record.selection["C"]
    assert refit.record.threshold == plain.record.threshold  # from the train-only model's val scores
    assert any("in-sample" in note for note in refit.record.notes)
    assert refit.record.metrics["test"] != plain.record.metrics["test"]  # the model did change


def test_every_class_must_occur_in_train(features):
    """A head's probability columns are the classes it saw; a class absent from train would
    shift every later column, so fit_head refuses before fitting."""
    three = dataclasses.replace(
        features, meta=features.meta.with_(class_names=(*features.class_names, "COVID"))
    )
    with pytest.raises(DataError, match=r"no images of class\(es\) \['COVID'\]"):
        fit_head(cache=three, save=False, n_boot=0)
