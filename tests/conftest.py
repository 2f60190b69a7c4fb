"""Tiny datasets made on the fly: image folders in every mode, MedMNIST-style npz files, and
feature sets built from arrays (for the analyses that need no backbone)."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from xfeat.cache import CacheMeta, DatasetRecord, FeatureSet, SplitFeatures, WeightsRecord

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("XFEAT_SHARED", REPO.parent / "shared"))
CHEST = SHARED / "data" / "chest_xray224"
MOBILENET_WEIGHTS = SHARED / "weights" / "mobilenet_v2_imagenet_features.pth"

# Tests run with tiny inputs: fast, and identical across machines.
TINY = 32

# The kill harness: runs the xfeat CLI in a child process whose TARGET (``module:Class.attr``
# or ``module:function``) sends SIGKILL to its own process when called for the AT-th time.
# The kill lands at an exact point of the real code path, so no test waits on a clock.
_KILL_AT = """
import importlib, os, signal, sys

target, at = sys.argv[1], int(sys.argv[2])
module, _, path = target.partition(":")
*owners, name = path.split(".")
owner = importlib.import_module(module)
for part in owners:
    owner = getattr(owner, part)
original, calls = getattr(owner, name), [0]


def killing(*args, **kwargs):
    calls[0] += 1
    if calls[0] == at:
        os.kill(os.getpid(), signal.SIGKILL)
    return original(*args, **kwargs)


setattr(owner, name, killing)
from xfeat.cli import cli

cli(sys.argv[3:], prog_name="xfeat")
"""


def pytest_configure(config):
    """torch.compile's build files (gigabytes over a full run) go to a folder removed at the
    end, for this process and every child it starts; the precompiled headers inductor keeps
    in its fixed folder (``$TMPDIR/torchinductor_USER/precompiled_headers``, 150 MB each)
    are removed too when this run made them."""
    if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
        folder = tempfile.mkdtemp(prefix="xfeat-test-inductor-")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = folder
        config.add_cleanup(lambda: shutil.rmtree(folder, ignore_errors=True))
    headers = Path(tempfile.gettempdir()) / f"torchinductor_{_user()}" / "precompiled_headers"
    before = set(headers.iterdir()) if headers.is_dir() else set()

    def remove_new_headers():
        for path in set(headers.iterdir()) - before if headers.is_dir() else ():
            if path.is_file():
                path.unlink(missing_ok=True)

    config.add_cleanup(remove_new_headers)


def _user() -> str:
    import getpass

    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid_{os.getuid()}"


def child_env(**extra) -> dict:
    """The environment of a child xfeat process: this checkout first, one thread."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **extra}


def run_killed_at(target: str, at: int, args, *, timeout: float = 300) -> None:
    """Run ``xfeat ARGS`` and SIGKILL it on the ``at``-th call of ``target``; fail unless it
    was killed there (a run that finishes first means ``at`` is past the work)."""
    child = subprocess.run(
        [sys.executable, "-c", _KILL_AT, target, str(at), *map(str, args)],
        env=child_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        timeout=timeout,
    )
    assert child.returncode == -signal.SIGKILL, (
        f"xfeat {args[0]} was not killed at call {at} of {target} "
        f"(exit {child.returncode}): {child.stderr[-2000:]}"
    )


def _blob_image(rng, label: int, size=(40, 48)) -> np.ndarray:
    """Noise plus a class-dependent bright square, so classes are learnable."""
    img = rng.integers(0, 120, size=size, dtype=np.uint8)
    y0 = 4 if label == 0 else size[0] // 2
    img[y0 : y0 + 12, 8:20] = 230
    return img


def make_image_folder(
    root: Path, *, n_train=16, n_test=6, n_val=0, classes=("NORMAL", "PNEUMONIA"), seed=0, modes=("L",)
) -> Path:
    """ROOT/{train,test[,val]}/CLASS/*.{png,jpeg} with Kermany-style names; non-images too."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        if n == 0:
            continue
        for label, cls in enumerate(classes):
            d = root / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                arr = _blob_image(rng, label)
                mode = modes[i % len(modes)]
                name = f"person{i // 2}_bacteria_{i}" if label else f"IM-{i // 2:04d}-{i:04d}"
                _save(arr, d / name, mode)
    (root / "train" / ".DS_Store").write_bytes(b"\x00\x01 not an image")
    (root / "train" / classes[0] / "notes.txt").write_text("not an image")
    return root


def _save(arr: np.ndarray, stem: Path, mode: str) -> None:
    if mode == "L":
        Image.fromarray(arr, "L").save(stem.with_suffix(".png"))
    elif mode == "JPEG":
        Image.fromarray(np.stack([arr] * 3, -1), "RGB").save(stem.with_suffix(".jpeg"), quality=95)
    elif mode == "RGBA":
        rgba = np.dstack([arr, arr, arr, np.full_like(arr, 255)])
        Image.fromarray(rgba, "RGBA").save(stem.with_suffix(".png"))
    elif mode == "P":
        Image.fromarray(arr, "L").convert("P").save(stem.with_suffix(".png"))
    elif mode == "I;16":
        Image.fromarray(arr.astype(np.uint16) * 257).save(stem.with_suffix(".png"))
    else:
        raise ValueError(mode)


def make_feature_set(splits: dict, class_names=("NORMAL", "PNEUMONIA"), name="synthetic") -> FeatureSet:
    """A :class:`~xfeat.cache.FeatureSet` from ``{split: (features, labels[, ids])}``.

    Ids default to ``SPLIT/NNNNNN``; the key is the sha256 of the arrays, so two sets differ
    in key exactly when their contents differ.
    """
    out, digest = {}, hashlib.sha256()
    for split, (X, y, *ids) in splits.items():
        X, y = np.asarray(X, dtype=np.float32), np.asarray(y, dtype=np.int64)
        ids = list(ids[0]) if ids else [f"{split}/{i:06d}" for i in range(len(y))]
        out[split] = SplitFeatures(X, y, ids)
        digest.update(X.tobytes() + y.tobytes())
    dim = next(iter(out.values())).features.shape[1]
    meta = make_cache_meta(class_names, (("penultimate", dim),), name=name, key=digest.hexdigest())
    return FeatureSet(path=Path(f"{name}.h5"), key=digest.hexdigest(), meta=meta, splits=out)


def make_cache_meta(
    class_names=("NORMAL", "PNEUMONIA"), blocks=(("penultimate", 4),), *, name="synthetic", key=""
):
    """The metadata of a synthetic cache entry: random weights of a model named 'synthetic'."""
    return CacheMeta(
        dataset=DatasetRecord(name=name, source=f"{name}.npz", fingerprint=key or "0" * 64),
        class_names=tuple(class_names),
        model="synthetic",
        feature_dim=sum(d for _, d in blocks),
        blocks=tuple(blocks),
        weights=WeightsRecord("random", "random(seed=0)", seed=0),
        preprocessing={},
        key=key,
    )


def make_npz(path: Path, *, n=(20, 8, 8), channels=1, seed=0, n_classes=2) -> Path:
    rng = np.random.default_rng(seed)
    out = {}
    for split, count in zip(("train", "val", "test"), n):
        if count == 0:
            continue
        labels = np.arange(count) % n_classes
        imgs = np.stack([_blob_image(rng, int(y) % 2, size=(28, 28)) for y in labels])
        if channels == 3:
            imgs = np.stack([imgs] * 3, -1)
        out[f"{split}_images"] = imgs
        out[f"{split}_labels"] = labels.reshape(-1, 1)  # MedMNIST stores (N, 1)
    np.savez(path, **out)
    return path


@pytest.fixture
def image_folder(tmp_path) -> Path:
    return make_image_folder(tmp_path / "xray", modes=("L", "JPEG", "RGBA", "P", "I;16"))


@pytest.fixture
def npz_file(tmp_path) -> Path:
    return make_npz(tmp_path / "tiny.npz")


@pytest.fixture
def cache_dir(tmp_path) -> Path:
    return tmp_path / "cache"


def chest_subset(dst: Path, n_per_class: int, splits=("train", "test")) -> Path:
    """A small real subset of the shared chest X-rays, as symlinks (nothing is copied)."""
    if not CHEST.is_dir():
        pytest.fail(f"the shared chest X-ray data is missing at {CHEST}; see ../shared/README.md")
    for split in splits:
        for cls in ("NORMAL", "PNEUMONIA"):
            (dst / split / cls).mkdir(parents=True, exist_ok=True)
            files = sorted(p for p in (CHEST / split / cls).iterdir() if p.suffix == ".jpeg")
            step = max(1, len(files) // n_per_class)
            for p in files[::step][:n_per_class]:
                os.symlink(p, dst / split / cls / p.name)
    return dst
