import json

import h5py
import numpy as np
import pytest
from conftest import make_cache_meta

from xfeat.cache import (
    CacheError,
    CacheWriter,
    cache_key,
    entry_path,
    is_complete,
    partial_path,
    read_cache,
    read_meta,
)
from xfeat.config import DataSpec

# The metadata a format-1 entry (xfeat 0.1) carried: no blocks, layers, views, data spec.
FORMAT_1_META = {
    "dataset": {
        "name": "d",
        "source": "/d",
        "fingerprint": "f" * 64,
        "content_digest": "c" * 64,
        "counts": {"train": [1, 1]},
    },
    "split": {"val": "given"},
    "class_names": ["x", "y"],
    "model": "resnet18",
    "feature_dim": 4,
    "feature_dtype": "float32",
    "weights": {"kind": "random", "id": "random(seed=0)", "sha256": None, "url": None, "seed": 0},
    "preprocessing": {"resize_size": 256, "crop_size": 224},
    "versions": {"xfeat": "0.1.0"},
    "created": "2026-01-01T00:00:00+0000",
}


def _writer(path, n=(5, 3), dim=4, dtype="float32", key="k1"):
    splits = {
        "train": ([f"t{i}" for i in range(n[0])], np.arange(n[0]) % 2),
        "val": ([f"v{i}" for i in range(n[1])], np.arange(n[1]) % 2),
    }
    return CacheWriter(
        path,
        key=key,
        meta=make_cache_meta(("a", "b"), (("penultimate", dim),)),
        splits=splits,
        blocks=[("penultimate", dim)],
        dtype=dtype,
    )


def _fill(writer, split, rows, dim=4, batch=2, start=0):
    for s in range(start, rows, batch):
        n = min(batch, rows - s)
        feats = np.arange(s * dim, (s + n) * dim, dtype=np.float32).reshape(n, dim)
        writer.write(split, s, {"penultimate": feats}, np.ones(n, bool), seconds=0.1)


def test_key_is_canonical_and_sensitive():
    a = cache_key({"model": "resnet18", "preprocessing": {"crop": 224, "resize": 256}})
    b = cache_key({"preprocessing": {"resize": 256, "crop": 224}, "model": "resnet18"})
    c = cache_key({"model": "resnet18", "preprocessing": {"crop": 224, "resize": 232}})
    assert a == b != c and len(a) == 64
    assert entry_path("/c", "ds-resnet18-random", a).name == f"ds-resnet18-random-{a[:16]}.h5"


def test_write_finalize_read_roundtrip(tmp_path):
    path = tmp_path / "e.h5"
    w = _writer(path)
    _fill(w, "train", 5)
    _fill(w, "val", 3)
    assert not path.exists() and partial_path(path).exists()
    w.finalize({"train": {"images_per_second": 10.0}})
    assert is_complete(path) and not partial_path(path).exists()
    fs = read_cache(path)
    assert fs.key == "k1" and fs.class_names == ["a", "b"]
    np.testing.assert_array_equal(fs["train"].features[4], [16, 17, 18, 19])
    assert fs["val"].ids == ["v0", "v1", "v2"] and fs["train"].labels.tolist() == [0, 1, 0, 1, 0]
    assert fs["train"].seconds == pytest.approx(0.3)
    assert read_meta(path).splits["train"]["images_per_second"] == 10.0


def test_incomplete_files_are_refused(tmp_path):
    path = tmp_path / "e.h5"
    w = _writer(path)
    _fill(w, "train", 4)
    with pytest.raises(CacheError, match="cannot finalize"):
        w.finalize({})
    w.close()
    with pytest.raises(CacheError, match="interrupted extraction left e.h5.partial"):
        read_cache(path)
    with pytest.raises(CacheError, match="incomplete"):
        read_cache(partial_path(path))
    assert not is_complete(partial_path(path))


def test_resume_continues_where_it_stopped(tmp_path):
    path = tmp_path / "e.h5"
    w = _writer(path)
    _fill(w, "train", 4)
    w.close()  # as if killed after two batches
    w = _writer(path)
    assert w.rows_done("train") == 4 and w.rows_done("val") == 0
    _fill(w, "train", 5, start=4)
    _fill(w, "val", 3)
    w.finalize({})
    np.testing.assert_array_equal(read_cache(path)["train"].features[:, 0], [0, 4, 8, 12, 16])


def test_partial_of_another_key_is_restarted(tmp_path):
    path = tmp_path / "e.h5"
    w = _writer(path, key="old")
    _fill(w, "train", 4)
    w.close()
    w = _writer(path, key="new")
    assert w.rows_done("train") == 0
    w.close()


def test_unreadable_partial_is_restarted(tmp_path):
    path = tmp_path / "e.h5"
    partial_path(path).write_bytes(b"truncated garbage")
    w = _writer(path)
    assert w.rows_done("train") == 0
    w.close()


def test_skipped_rows_are_dropped_unless_asked(tmp_path):
    path = tmp_path / "e.h5"
    w = _writer(path, n=(3, 1))
    w.write(
        "train",
        0,
        {"penultimate": np.ones((3, 4), np.float32)},
        np.array([True, False, True]),
        seconds=0,
    )
    w.write("val", 0, {"penultimate": np.ones((1, 4), np.float32)}, np.array([True]), seconds=0)
    w.finalize({})
    fs = read_cache(path)
    assert fs["train"].ids == ["t0", "t2"] and fs.skipped == {"train": ["t1"]}
    assert len(read_cache(path, include_skipped=True)["train"]) == 3


def test_float16_and_bad_dtype(tmp_path):
    w = _writer(tmp_path / "h.h5", dtype="float16")
    assert w.file["train"]["features"]["penultimate"].dtype == np.float16
    w.close()
    with pytest.raises(CacheError, match="'float64' not supported"):
        _writer(tmp_path / "x.h5", dtype="float64")


def test_foreign_hdf5_is_rejected(tmp_path):
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(CacheError, match="not an xfeat feature cache"):
        read_cache(path)
    (tmp_path / "text.h5").write_text("hello")
    with pytest.raises(CacheError, match="cannot open"):
        read_cache(tmp_path / "text.h5")


def test_blocks_views_and_format_1_files(tmp_path):
    """Blocks are side by side in the order asked; views are read with their base split; a
    format-1 file (one ``features`` dataset) reads as its penultimate block."""
    splits = {"train": (["a", "b"], np.array([0, 1])), "train.view1": (["a", "b"], np.array([0, 1]))}
    w = CacheWriter(
        tmp_path / "b.h5",
        key="kb",
        meta=make_cache_meta(("x", "y"), (("layer3", 2), ("penultimate", 3))),
        splits=splits,
        blocks=[("layer3", 2), ("penultimate", 3)],
    )
    for group, base in (("train", 0.0), ("train.view1", 10.0)):
        w.write(
            group,
            0,
            {
                "layer3": np.full((2, 2), base, np.float32),
                "penultimate": np.full((2, 3), base + 1, np.float32),
            },
            np.ones(2, bool),
            seconds=0.1,
        )
    w.finalize({})
    fs = read_cache(tmp_path / "b.h5")
    assert fs.blocks == [("layer3", 2), ("penultimate", 3)]
    np.testing.assert_array_equal(fs["train"].features[0], [0, 0, 1, 1, 1])
    np.testing.assert_array_equal(fs.views["train"]["view1"].features[0], [10, 10, 11, 11, 11])
    only = read_cache(tmp_path / "b.h5", blocks=["penultimate"], views=False)
    assert only["train"].features.shape == (2, 3) and not only.views
    with pytest.raises(CacheError, match="no feature block 'layer9'"):
        read_cache(tmp_path / "b.h5", blocks=["layer9"])
    assert read_meta(tmp_path / "b.h5").blocks == (("layer3", 2), ("penultimate", 3))

    old = tmp_path / "v1.h5"
    with h5py.File(old, "w") as f:
        f.attrs.update(
            format="xfeat-features",
            format_version=1,
            key="k1",
            complete=True,
            meta=json.dumps(FORMAT_1_META),
        )
        g = f.create_group("train")
        g["features"] = np.ones((2, 4), np.float32)
        g["labels"], g["ok"] = np.array([0, 1]), np.ones(2, bool)
        g["ids"] = np.array([b"a", b"b"])
        g["rows_done"], g["seconds"] = np.array([2]), np.array([0.5])
    assert read_cache(old).blocks == [("penultimate", 4)]
    meta = read_meta(old)
    assert meta.data is None and meta.layers == ("penultimate",) and meta.class_names == ("x", "y")
    assert meta.data_spec() == DataSpec("/d")  # val was given: the default recipe
