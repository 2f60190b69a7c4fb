"""Multi-stage blocks, augmented views, test-time views, several backbones, and the
transductive site adaptations: each from the CLI and the API, keyed in the cache, honest."""

import copy
import json

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import TINY, make_image_folder

import xfeat
from xfeat.cache import read_cache, read_meta
from xfeat.cli import cli
from xfeat.errors import CacheError, DataError
from xfeat.fitting import fit_head
from xfeat.prediction import predict

RUN = dict(num_workers=0, progress=False)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("gap") / "xray", n_train=30, n_test=12)


@pytest.fixture(scope="module")
def rich(data, tmp_path_factory):
    """One cache with stages, two augmented views per train image and flip + corner views."""
    cache_dir = tmp_path_factory.mktemp("cache")
    path = xfeat.extract(
        data,
        "resnet18",
        cache_dir=cache_dir,
        image_size=48,
        layers="stages",
        views=2,
        tta="flip,crops",
        **RUN,
    )
    return path, cache_dir


def test_stages_are_blocks_of_one_pass(data, rich):
    path, cache_dir = rich
    meta = read_meta(path)
    assert meta.blocks == (("layer1", 64), ("layer2", 128), ("layer3", 256), ("penultimate", 512))
    plain = xfeat.extract(data, "resnet18", cache_dir=cache_dir, image_size=48, **RUN)
    assert plain != path  # blocks, views and TTA are part of the key
    np.testing.assert_allclose(
        read_cache(path, blocks=["penultimate"])["test"].features,
        read_cache(plain)["test"].features,
        rtol=1e-5,
        atol=1e-6,
    )
    info = CliRunner().invoke(cli, ["info", str(path)])
    assert (
        "blocks: layer1 (D=64), layer2 (D=128), layer3 (D=256), penultimate (D=512)" in info.output
        and "train.view2" in info.output
        and "test.flip_crop_br" in info.output
    )


def test_views_are_seeded_and_differ_from_the_centre_crop(data, rich):
    path, cache_dir = rich
    fs = read_cache(path, blocks=["penultimate"])
    v1, v2 = fs.views["train"]["view1"].features, fs.views["train"]["view2"].features
    assert not np.allclose(v1, fs["train"].features) and not np.allclose(v1, v2)
    again = xfeat.extract(
        data,
        "resnet18",
        cache_dir=cache_dir / "again",
        image_size=48,
        layers="stages",
        views=2,
        tta="flip,crops",
        **RUN,
    )
    np.testing.assert_array_equal(
        read_cache(again).views["train"]["view2"].features,
        read_cache(path).views["train"]["view2"].features,
    )


def test_an_interrupted_extraction_with_views_resumes_to_the_same_entry(
    data, rich, tmp_path, monkeypatch
):
    from xfeat.extraction.forward import Runner

    calls, original = {"n": 0}, Runner.__call__

    def crash_on_the_fourth_batch(self, images):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt  # a crash in the middle of the views
        return original(self, images)

    monkeypatch.setattr(Runner, "__call__", crash_on_the_fourth_batch)
    options = dict(
        cache_dir=tmp_path,
        image_size=48,
        layers="stages",
        views=2,
        tta="flip,crops",
        batch_size=16,
        **RUN,
    )
    with pytest.raises(KeyboardInterrupt):
        xfeat.extract(data, "resnet18", **options)
    assert list(tmp_path.glob("*.h5.partial"))
    monkeypatch.setattr(Runner, "__call__", original)
    resumed = read_cache(xfeat.extract(data, "resnet18", **options))
    reference = read_cache(rich[0])
    for base, views in reference.views.items():
        for view, part in views.items():
            np.testing.assert_allclose(
                resumed.views[base][view].features, part.features, rtol=1e-5, atol=1e-6
            )


def test_fit_head_picks_blocks_trains_on_views_and_averages_tta(rich):
    path, _ = rich
    base = fit_head(cache=path, blocks=["penultimate"], use_views=False, save=False, n_boot=0)
    with_views = fit_head(cache=path, blocks=["penultimate"], save=False, n_boot=0)
    assert base.record.params["train_views"] == 0 and with_views.record.params["train_views"] == 2
    assert base.head.n_features_in_ == 512
    in_memory = fit_head(
        cache=read_cache(path), blocks=["penultimate"], use_views=False, save=False, n_boot=0
    )  # a FeatureSet already read: same selection
    np.testing.assert_array_equal(in_memory.predictions["test"][2], base.predictions["test"][2])
    assert not np.allclose(base.predictions["test"][2], with_views.predictions["test"][2])
    stages = fit_head(cache=path, save=False, n_boot=0)
    assert stages.head.n_features_in_ == 64 + 128 + 256 + 512
    tta = fit_head(cache=path, blocks=["penultimate"], use_views=False, tta="flip", save=False, n_boot=0)
    fs = read_cache(path, blocks=["penultimate"])
    mean = (fs["test"].features + fs.views["test"]["flip"].features) / 2
    np.testing.assert_allclose(tta.predictions["test"][2], tta.head.predict_proba(mean), atol=1e-6)
    with pytest.raises(CacheError, match="extract with --blocks|no feature block 'layer9'"):
        fit_head(cache=path, blocks=["layer9"], save=False)


def test_tta_that_was_not_cached_is_a_clear_error(data, tmp_path):
    path = xfeat.extract(data, "resnet18", cache_dir=tmp_path, image_size=TINY, **RUN)
    with pytest.raises(CacheError, match="no val views.*extract with --tta flip"):
        fit_head(cache=path, tta="flip", save=False)


@pytest.mark.parametrize("adapt", ["standardize", "coral", "em"])
def test_adaptation_is_transductive_and_honest(rich, adapt):
    """Every adaptation uses the test images only: permuting the test labels moves no choice
    and no train/val number, and the records say transductive."""
    features = read_cache(rich[0], blocks=["penultimate"])
    shuffled = copy.deepcopy(features)
    shuffled.splits["test"].labels = np.random.default_rng(0).permutation(features["test"].labels)
    plain = fit_head(cache=features, save=False, n_boot=20)
    a = fit_head(cache=features, adapt=adapt, save=False, n_boot=20)
    b = fit_head(cache=shuffled, adapt=adapt, save=False, n_boot=20)
    assert a.record.selection == b.record.selection == plain.record.selection
    assert a.record.threshold == b.record.threshold
    for split in ("train", "val"):
        assert a.record.metrics[split] == b.record.metrics[split]
    if adapt != "em":  # em's train/val are temperature-scaled (BCTS on val), its threshold too
        assert a.record.threshold == plain.record.threshold
        assert a.record.metrics["val"] == plain.record.metrics["val"]
    else:
        assert a.record.metrics["val"]["roc_auc"] == pytest.approx(
            plain.record.metrics["val"]["roc_auc"]
        )
    np.testing.assert_array_equal(a.predictions["test"][2], b.predictions["test"][2])
    assert not np.array_equal(a.predictions["test"][2], plain.predictions["test"][2])
    assert a.record.transductive is True and a.record.adaptation["method"] == adapt
    assert "labels not read" in a.record.adaptation["target"]
    if adapt == "em":
        prior = a.record.adaptation["target_prior"]
        assert len(prior) == 2 and abs(sum(prior) - 1) < 1e-9
        assert set(a.record.adaptation["within_class_shift_auc"]) <= {"NORMAL", "PNEUMONIA"}


def test_several_backbones_side_by_side(data, tmp_path):
    a = xfeat.extract(data, "resnet18", cache_dir=tmp_path, image_size=TINY, **RUN)
    b = xfeat.extract(data, "mobilenet_v3_small", cache_dir=tmp_path, image_size=TINY, **RUN)
    both = fit_head(cache=[a, b], save=False, n_boot=0)
    assert both.head.n_features_in_ == 512 + 1024
    assert both.record.model == "resnet18+mobilenet_v3_small"
    by_name = fit_head(
        data,
        "resnet18+mobilenet_v3_small",
        out_dir=tmp_path / "run",
        n_boot=0,
        extract_options=dict(cache_dir=tmp_path, image_size=TINY, **RUN),
    )
    np.testing.assert_allclose(by_name.predictions["test"][2], both.predictions["test"][2])
    rows = predict(tmp_path / "run" / "head.npz", [data / "test"], **RUN)
    got = {r["path"].split("/test/", 1)[1]: r["p_PNEUMONIA"] for r in rows}
    ids, _, proba = by_name.predictions["test"]
    for i, p in zip(ids, proba[:, 1]):
        assert got[i.split("test/", 1)[1]] == pytest.approx(p, abs=1e-5)
    other = make_image_folder(tmp_path / "other", n_train=30, n_test=12, seed=5)
    c = xfeat.extract(other, "resnet18", cache_dir=tmp_path, image_size=TINY, **RUN)
    with pytest.raises(CacheError, match="do not hold the same images"):
        fit_head(cache=[a, c], save=False)


def test_predict_with_tta_and_adaptation(data, rich, tmp_path):
    fit_head(cache=rich[0], blocks=["penultimate"], tta="flip", out_dir=tmp_path / "run", n_boot=0)
    head = tmp_path / "run" / "head.npz"
    plain = predict(head, [data / "test"], tta=(), **RUN)  # without the head's own views
    flipped = predict(head, [data / "test"], **RUN)  # the head was fitted with TTA flip
    adapted = predict(head, [data / "test"], tta=(), adapt="standardize", **RUN)
    p = [[r["p_PNEUMONIA"] for r in rows] for rows in (plain, flipped, adapted)]
    assert p[0] != p[1] and p[0] != p[2]
    with pytest.raises(DataError, match="at least 20 target images"):
        predict(head, [data / "test" / "NORMAL"], adapt="em", **RUN)
    result = CliRunner().invoke(
        cli, ["predict", "--head", str(head), "--adapt", "coral", str(data / "test")]
    )
    assert result.exit_code == 2 and "'coral' is not one of" in result.output


def test_cli_fit_head_with_stages_views_tta_and_adapt(data, tmp_path):
    result = CliRunner().invoke(
        cli,
        [
            "-q",
            "fit-head",
            "--data",
            str(data),
            "--weights",
            "none",
            "--image-size",
            "48",
            "--num-workers",
            "0",
            "--cache-dir",
            str(tmp_path / "c"),
            "--layers",
            "stages",
            "--views",
            "1",
            "--tta",
            "flip",
            "--adapt",
            "standardize",
            "--n-boot",
            "0",
            "--out",
            str(tmp_path / "r"),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["transductive"] is True and record["params"]["train_views"] == 1
    assert record["params"]["tta"] == ["flip"] and record["params"]["blocks"][-1] == "penultimate"


def test_finetune_adabn_changes_test_only(data, tmp_path):
    from xfeat.finetuning import finetune

    common = dict(epochs=1, image_size=TINY, n_boot=0, cache_dir=tmp_path / "c", **RUN)
    plain = finetune(data, "resnet18", out_dir=tmp_path / "a", **common)
    adapted = finetune(data, "resnet18", out_dir=tmp_path / "b", adapt="adabn", **common)
    assert plain.record.metrics["val"] == adapted.record.metrics["val"]
    assert not np.allclose(plain.predictions["test"][2], adapted.predictions["test"][2])
    assert adapted.record.transductive is True and adapted.record.adaptation["method"] == "adabn"
