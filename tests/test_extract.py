import importlib
import logging
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch
from conftest import TINY, child_env, make_image_folder, run_killed_at
from PIL import Image

import xfeat
from xfeat.backbones import create_backbone
from xfeat.cache import CacheError, partial_path, read_cache
from xfeat.data import load_dataset
from xfeat.errors import ImageReadError

extract_module = importlib.import_module("xfeat.extraction.pipeline")

FAST = dict(model="resnet18", image_size=TINY, num_workers=0, progress=False)


def test_extract_writes_every_split_in_dataset_order(image_folder, cache_dir):
    path = xfeat.extract(image_folder, cache_dir=cache_dir, **FAST)
    fs = read_cache(path)
    ds = load_dataset(image_folder)
    assert list(fs.splits) == ["train", "val", "test"]
    for name, split in ds.splits.items():
        assert fs[name].features.shape == (len(split), 512)
        assert fs[name].ids == split.ids
        np.testing.assert_array_equal(fs[name].labels, split.labels)
    meta = fs.meta
    assert meta.model == "resnet18" and meta.preprocessing["crop_size"] == TINY
    assert meta.weights.id == "random(seed=0)" and meta.split["val"] == "carved from train"
    assert meta.data == xfeat.DataSpec(str(image_folder))
    assert meta.versions["torch"] == torch.__version__
    assert meta.splits["train"]["images_per_second"] > 0
    assert xfeat.cache.CacheMeta.from_dict(meta.to_dict()) == meta


def test_features_equal_a_direct_forward(image_folder, cache_dir):
    path = xfeat.extract(image_folder, cache_dir=cache_dir, **FAST)
    backbone = create_backbone("resnet18", "none", image_size=TINY)
    split = load_dataset(image_folder).splits["test"]
    batch = torch.stack(
        [
            torch.from_numpy(backbone.preprocessing.resize_and_crop(split.read_image(i))).permute(
                2, 0, 1
            )
            for i in range(len(split))
        ]
    )
    with torch.inference_mode():
        expected = backbone.model(backbone.preprocessing.normalize(batch)).numpy()
    np.testing.assert_allclose(read_cache(path)["test"].features, expected, rtol=1e-4, atol=1e-5)


def test_second_run_reuses_cache_without_the_backbone(image_folder, cache_dir, monkeypatch, caplog):
    first = xfeat.extract(image_folder, cache_dir=cache_dir, **FAST)
    mtime = first.stat().st_mtime_ns

    def no_backbone(*args, **kwargs):
        raise AssertionError("the backbone must not be built on a cache hit")

    monkeypatch.setattr(extract_module, "create_backbone", no_backbone)
    with caplog.at_level(logging.INFO, logger="xfeat"):
        second = xfeat.extract(image_folder, cache_dir=cache_dir, **FAST)
    assert second == first and first.stat().st_mtime_ns == mtime
    assert "cache hit" in caplog.text


@pytest.mark.parametrize("change", ["content", "image_size", "split", "seed", "dtype", "model"])
def test_anything_that_changes_features_gives_a_new_entry(tmp_path, change):
    root = make_image_folder(tmp_path / "d", n_train=8, n_test=2)
    cache_dir = tmp_path / "cache"
    base = xfeat.plan_extraction(root, "resnet18", cache_dir=cache_dir, image_size=TINY)
    kwargs = dict(cache_dir=cache_dir, image_size=TINY)
    model, data = "resnet18", root
    if change == "content":
        Image.fromarray(np.full((40, 48), 7, np.uint8)).save(
            next((root / "train" / "NORMAL").glob("*.png"))
        )
    elif change == "image_size":
        kwargs["image_size"] = TINY + 8
    elif change == "split":
        data = xfeat.DataSpec(root, val_fraction=0.3)
    elif change == "seed":
        kwargs["seed"] = 1
    elif change == "dtype":
        kwargs["feature_dtype"] = "float16"
    else:
        model = "resnet34"
    other = xfeat.plan_extraction(data, model, **kwargs)
    assert other.key != base.key and other.path != base.path


def test_npz_dataset(npz_file, cache_dir):
    fs = read_cache(xfeat.extract(npz_file, cache_dir=cache_dir, **FAST))
    assert fs["test"].ids[0] == "test/000000" and fs["train"].features.shape[1] == 512


def test_float16_cache(image_folder, cache_dir):
    fs = read_cache(xfeat.extract(image_folder, cache_dir=cache_dir, feature_dtype="float16", **FAST))
    assert fs["train"].features.dtype == np.float16


def test_corrupt_image_stops_with_its_name_or_is_skipped(tmp_path):
    root = make_image_folder(tmp_path / "d", n_train=6, n_test=3)
    bad = root / "test" / "PNEUMONIA" / "person9_bacteria_99.jpeg"
    bad.write_bytes(b"\xff\xd8\xffnot really a jpeg")
    cache_dir = tmp_path / "cache"
    with pytest.raises(ImageReadError, match="person9_bacteria_99.jpeg"):
        xfeat.extract(root, cache_dir=cache_dir, **FAST)
    path = xfeat.extract(root, cache_dir=cache_dir, skip_bad=True, **FAST)
    fs = read_cache(path)
    assert fs.skipped == {"test": ["test/PNEUMONIA/person9_bacteria_99.jpeg"]}
    assert len(fs["test"]) == 6 and np.isfinite(fs["test"].features).all()


def test_data_loader_workers_give_identical_features(image_folder, tmp_path):
    a = read_cache(xfeat.extract(image_folder, cache_dir=tmp_path / "a", **FAST))
    b = read_cache(xfeat.extract(image_folder, cache_dir=tmp_path / "b", **{**FAST, "num_workers": 2}))
    np.testing.assert_allclose(a["train"].features, b["train"].features, rtol=1e-5, atol=1e-6)


def _cli(root, cache_dir, *extra):
    return [
        sys.executable,
        "-m",
        "xfeat",
        "extract",
        "--data",
        str(root),
        "--model",
        "resnet18",
        "--weights",
        "none",
        "--image-size",
        "64",
        "--batch-size",
        "4",
        "--num-workers",
        "0",
        "--cache-dir",
        str(cache_dir),
        *extra,
    ]


def _rows_done(partial):
    try:
        with h5py.File(partial, "r", locking=False) as f:
            return int(f["train"]["rows_done"][0])
    except (OSError, KeyError):
        return 0


def test_sigkill_mid_run_then_resume_equals_uninterrupted(tmp_path, caplog):
    root = make_image_folder(tmp_path / "d", n_train=120, n_test=4)
    cache_dir = tmp_path / "cache"
    plan = xfeat.plan_extraction(root, "resnet18", cache_dir=cache_dir, image_size=64)
    partial = partial_path(plan.path)
    # SIGKILL as the 11th batch of 4 is about to be written: 40 train rows are on disk.
    run_killed_at("xfeat.cache.write:CacheWriter.write", 11, _cli(root, cache_dir)[3:])
    killed_at = _rows_done(partial)
    assert killed_at == 40
    with pytest.raises(CacheError, match="interrupted"):
        read_cache(plan.path)

    with caplog.at_level(logging.INFO, logger="xfeat"):
        resumed = xfeat.extract(
            root,
            "resnet18",
            cache_dir=cache_dir,
            image_size=64,
            batch_size=4,
            num_workers=0,
            progress=False,
        )
    assert "resuming" in caplog.text
    reference = xfeat.extract(
        root,
        "resnet18",
        cache_dir=tmp_path / "ref",
        image_size=64,
        batch_size=4,
        num_workers=0,
        progress=False,
    )
    a, b = read_cache(resumed), read_cache(reference)
    for split in a.splits:
        assert a[split].ids == b[split].ids
        np.testing.assert_allclose(a[split].features, b[split].features, rtol=1e-4, atol=1e-5)
    assert a.meta.splits["train"]["resumed_from_row"] >= killed_at - 4


def test_two_processes_on_one_entry_do_not_corrupt_it(tmp_path):
    root = make_image_folder(tmp_path / "d", n_train=40, n_test=4)
    cache_dir = tmp_path / "cache"
    procs = [
        subprocess.Popen(
            _cli(root, cache_dir),
            env=child_env(),
            stderr=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    logs = "".join(err for _, err in outputs)
    assert "waiting" in logs or "cache hit" in logs
    path = xfeat.plan_extraction(root, "resnet18", cache_dir=cache_dir, image_size=64).path
    reference = xfeat.extract(
        root,
        "resnet18",
        cache_dir=tmp_path / "ref",
        image_size=64,
        batch_size=4,
        num_workers=0,
        progress=False,
    )
    np.testing.assert_allclose(
        read_cache(path)["train"].features, read_cache(reference)["train"].features, rtol=1e-4, atol=1e-5
    )
