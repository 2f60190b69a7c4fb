"""End-to-end runs on a small real subset of the shared chest X-rays (marked `integration`)."""

import numpy as np
import pytest
from conftest import MOBILENET_WEIGHTS, chest_subset
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

import xfeat
from xfeat.cache import read_cache

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def chest(tmp_path_factory):
    return chest_subset(tmp_path_factory.mktemp("chest"), n_per_class=40)


@pytest.fixture(scope="module")
def mobilenet_cache(chest, tmp_path_factory):
    return xfeat.extract(
        chest,
        "mobilenet_v2",
        weights=MOBILENET_WEIGHTS,
        batch_size=32,
        cache_dir=tmp_path_factory.mktemp("cache"),
        progress=False,
    )


def test_pretrained_extraction_on_real_xrays(mobilenet_cache):
    fs = read_cache(mobilenet_cache)
    assert fs.meta.weights.sha256.startswith("3e26d31c")
    assert fs.meta.preprocessing["crop_size"] == 224
    assert {s: len(fs[s]) for s in fs.splits} == {"train": 72, "val": 8, "test": 80}
    assert all(np.isfinite(fs[s].features).all() and fs[s].features.shape[1] == 1280 for s in fs.splits)
    # Patients never straddle train and val.
    pattern = fs.meta.data.group_pattern
    assert fs.meta.split["group_pattern"] == pattern
    from xfeat.data import patient_groups

    assert not set(patient_groups(fs["train"].ids, pattern)) & set(
        patient_groups(fs["val"].ids, pattern)
    )


def test_pretrained_features_separate_the_classes(mobilenet_cache):
    fs = read_cache(mobilenet_cache)
    clf = LogisticRegression(C=0.1, max_iter=2000).fit(fs["train"].features, fs["train"].labels)
    auc = roc_auc_score(fs["test"].labels, clf.predict_proba(fs["test"].features)[:, 1])
    assert auc > 0.8, f"ImageNet MobileNetV2 features should separate NORMAL/PNEUMONIA, AUC {auc}"


def test_closing_the_gap_on_real_xrays(chest, tmp_path):
    """Stages, views, TTA and a transductive adaptation, end to end on real images."""
    from xfeat.fitting import fit_head

    path = xfeat.extract(
        chest,
        "mobilenet_v2",
        weights=MOBILENET_WEIGHTS,
        image_size=96,
        layers="stages",
        views=1,
        tta="flip",
        batch_size=32,
        cache_dir=tmp_path,
        progress=False,
    )
    fs = read_cache(path)
    assert [b for b, _ in fs.blocks] == ["features.3", "features.6", "features.13", "penultimate"]
    assert set(fs.views["train"]) == {"view1"} and set(fs.views["test"]) == {"flip"}
    result = fit_head(cache=path, tta="flip", adapt="standardize", n_boot=50, out_dir=tmp_path / "run")
    assert result.record.transductive and result.record.params["train_views"] == 1
    assert result.record.metrics["test"]["roc_auc"] > 0.8
    rows = xfeat.predict(
        tmp_path / "run" / "head.npz", [chest / "test" / "NORMAL"], num_workers=0, progress=False
    )  # the head's own TTA by default
    assert len(rows) == 40 and all(r["predicted"] for r in rows)
