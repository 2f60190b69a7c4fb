"""MedMNIST-style ``.npz`` datasets: ``train_images``, ``train_labels``, ``val_*``, ``test_*``."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from xfeat.data.dataset import SPLITS, Dataset, Split
from xfeat.errors import DataError

logger = logging.getLogger(__name__)


def load_npz(
    path: Path, name: Optional[str] = None, class_names: Optional[Sequence[str]] = None
) -> Dataset:
    path = path.resolve()
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {path} as an .npz file: {exc}") from None
    with npz:
        keys = set(npz.files)
        if "train_images" not in keys or "train_labels" not in keys:
            raise DataError(
                f"{path} has keys {sorted(keys)}; expected at least train_images and "
                "train_labels (and optionally val_* / test_*), as in MedMNIST"
            )
        if class_names is None and "class_names" in keys:
            class_names = [str(c) for c in _array(npz, path, "class_names")]
        raw = {}
        for s in SPLITS:
            if f"{s}_images" in keys:
                if f"{s}_labels" not in keys:
                    raise DataError(f"{path} has {s}_images but no {s}_labels")
                images, labels = _array(npz, path, f"{s}_images"), _array(npz, path, f"{s}_labels")
                if len(images) == 0:
                    if s == "train":
                        raise DataError(f"{path}: train_images has no rows; expected training images")
                    logger.warning(
                        "%s: %s_images has no rows; treating the dataset as having no %s split",
                        path,
                        s,
                        s,
                    )
                    continue
                _check_finite(path, s, images)
                raw[s] = (images, _npz_labels(path, s, labels, len(images)))
    n_classes = (
        len(class_names)
        if class_names is not None
        else int(max(lab.max() for _, lab in raw.values())) + 1
    )
    if class_names is None:
        class_names = [str(i) for i in range(n_classes)]
    digest = hashlib.sha256()
    splits = {}
    for s, (images, labels) in raw.items():
        if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] not in (1, 3)):
            raise DataError(
                f"{path}: {s}_images has shape {images.shape}; expected (N, H, W) or (N, H, W, 1|3)"
            )
        if labels.max() >= n_classes:
            raise DataError(
                f"{path}: {s}_labels contains {int(labels.max())}, out of range for "
                f"{n_classes} classes {list(class_names)}; expected labels in "
                f"[0, {n_classes - 1}]"
            )
        counts = np.bincount(labels, minlength=n_classes)
        if s == "train" and (counts == 0).any():
            empty = [class_names[i] for i in np.flatnonzero(counts == 0)]
            raise DataError(f"{path}: classes {empty} have no training images")
        digest.update(f"{s}\0".encode())
        digest.update(np.ascontiguousarray(images).tobytes())
        digest.update(labels.tobytes())
        ids = [f"{s}/{i:06d}" for i in range(len(images))]
        splits[s] = Split(s, ids, labels, arrays=images, array_rows=np.arange(len(images)))
    return Dataset(
        name=name or path.stem,
        source=str(path),
        class_names=list(class_names),
        splits=splits,
        content_digest=digest.hexdigest(),
    )


def _check_finite(path: Path, split: str, images: np.ndarray) -> None:
    if images.dtype.kind != "f":
        return
    bad = np.flatnonzero(~np.isfinite(images.reshape(len(images), -1)).all(axis=1))
    if len(bad):
        raise DataError(
            f"{path}: {split}_images holds NaN or infinite pixels in {len(bad)} "
            f"image(s), e.g. index {int(bad[0])}; expected finite values (fix or "
            "drop those rows)"
        )


def _npz_labels(path: Path, split: str, labels: np.ndarray, n: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1 or len(labels) != n:
        raise DataError(
            f"{path}: {split}_labels has shape {labels.shape}; expected ({n},) or "
            f"({n}, 1) to match {split}_images"
        )
    if not np.issubdtype(labels.dtype, np.integer):
        if not np.all(np.mod(labels, 1) == 0):
            raise DataError(f"{path}: {split}_labels are not integers (dtype {labels.dtype})")
    labels = labels.astype(np.int64)
    if labels.min() < 0:
        raise DataError(f"{path}: {split}_labels contains {int(labels.min())}; labels must be >= 0")
    return labels


def _array(npz, path: Path, key: str) -> np.ndarray:
    """``npz[key]``; an array of Python objects (which only pickle could load, and loading a
    pickle can run code) or a damaged member is a one-line error naming the key."""
    try:
        return npz[key]
    except ValueError as exc:
        raise DataError(
            f"{path}: {key} is an array of Python objects ({exc}); xfeat reads numeric arrays "
            "only: save it with a numeric dtype (uint8 images, integer labels, str class names)"
        ) from None
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: {key} cannot be read ({exc}); the file is damaged") from None
