"""Datasets: image folders, MedMNIST-style ``.npz`` files and built-in names.

This module owns everything about *which* images belong to *which* split with *which* label:
scanning folders, reading arrays, decoding any image mode into RGB, carving a stratified,
patient-grouped validation split out of train, and the content fingerprint that keys the cache.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
from PIL import Image

from . import datasets_builtin
from .errors import DataError, ImageReadError  # noqa: F401  (re-exported)
from .images import (IMAGE_EXTENSIONS, array_to_rgb, check_utf8_names,  # noqa: F401
                     read_image_file, scan_image_files, warn_skipped)

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
# Kermany file names: person123_bacteria_456.jpeg, IM-0115-0001.jpeg, NORMAL2-IM-0381-0001.jpeg.
DEFAULT_GROUP_PATTERN = r"^(person\d+|(?:NORMAL\d+-)?IM-\d+)[_-]"
TINY_VAL_SIZE = 50  # a given val split smaller than this is merged into train and re-carved


@dataclass(frozen=True)
class SplitRecipe:
    """How the validation split is obtained when the dataset has none (or a tiny one)."""

    val_fraction: float = 0.1
    seed: int = 0
    group_pattern: Optional[str] = DEFAULT_GROUP_PATTERN

    @classmethod
    def from_split_info(cls, info: dict) -> "SplitRecipe":
        """The recipe recorded in a cache's ``split`` metadata (default when val was given)."""
        if info.get("val") != "carved from train":
            return cls()
        return cls(info["val_fraction"], info["seed"], info["group_pattern"])

    def __post_init__(self):
        if not 0.0 < self.val_fraction < 1.0:
            raise DataError(f"val_fraction={self.val_fraction!r} must be strictly between 0 and 1")
        if self.group_pattern:
            try:
                re.compile(self.group_pattern)
            except re.error as exc:
                raise DataError(f"group pattern {self.group_pattern!r} is not a valid regular "
                                f"expression: {exc}") from None


@dataclass
class Split:
    """The samples of one split: stable ids, integer labels and where the pixels come from."""

    name: str
    ids: list
    labels: np.ndarray
    paths: Optional[list] = None  # folder datasets: absolute file paths
    arrays: Optional[np.ndarray] = None  # npz datasets: (N, H, W[, C]) images
    array_rows: Optional[np.ndarray] = None  # npz datasets: row of each sample in ``arrays``

    def __len__(self) -> int:
        return len(self.ids)

    def read_image(self, i: int, draft_size: Optional[int] = None,
                   exif_transpose: bool = True) -> Image.Image:
        """Decode sample ``i`` as an RGB PIL image (raises :class:`ImageReadError`)."""
        if self.paths is not None:
            return read_image_file(self.paths[i], draft_size=draft_size,
                                   exif_transpose=exif_transpose)
        return array_to_rgb(self.arrays[self.array_rows[i]])

    def subset(self, rows: Sequence[int], name: Optional[str] = None) -> "Split":
        rows = np.asarray(rows, dtype=np.int64)
        return Split(
            name=name or self.name,
            ids=[self.ids[r] for r in rows],
            labels=self.labels[rows],
            paths=None if self.paths is None else [self.paths[r] for r in rows],
            arrays=self.arrays,
            array_rows=None if self.array_rows is None else self.array_rows[rows],
        )


@dataclass
class Dataset:
    """A labelled dataset with train, val and (optionally) test splits."""

    name: str
    source: str
    class_names: list
    splits: dict
    content_digest: str  # sha256 over every sample's split, label, id and bytes
    split_info: dict = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        """Content digest plus the split recipe: any change gives a different fingerprint."""
        payload = json.dumps({"content": self.content_digest, "split": self.split_info},
                             sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()

    def counts(self) -> dict:
        return {s: np.bincount(sp.labels, minlength=len(self.class_names)).tolist()
                for s, sp in self.splits.items()}

    def subsample(self, sizes: dict, seed: int = 0) -> "Dataset":
        """A stratified, seeded subset: at most ``sizes[split]`` samples per split.

        Quick runs use it; the subset has its own fingerprint (and so its own caches).
        """
        splits, chosen = {}, {}
        for name, split in self.splits.items():
            n = sizes.get(name)
            if n is None or n >= len(split):
                splits[name] = split
                continue
            if n < len(self.class_names):
                raise DataError(f"cannot subsample {name} to {n} images: fewer than the "
                                f"{len(self.class_names)} classes")
            rows = stratified_rows(split.labels, n, [seed, SPLITS.index(name)])
            splits[name] = split.subset(rows)
            chosen[name] = len(rows)
        digest = hashlib.sha256(json.dumps([self.content_digest, {s: sp.ids for s, sp in
                                                                  splits.items()}]).encode())
        return Dataset(name=f"{self.name}-subset", source=self.source,
                       class_names=self.class_names, splits=splits,
                       content_digest=digest.hexdigest(),
                       split_info={**self.split_info, "subsample": {"sizes": chosen,
                                                                    "seed": seed}})


def stratified_rows(labels: np.ndarray, n: int, seed) -> np.ndarray:
    """About ``n`` sorted row indices with the class proportions of ``labels`` (at least one
    per class), drawn with ``numpy.random.default_rng(seed)``."""
    rng = np.random.default_rng(seed)
    rows = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        k = min(len(members), max(1, round(n * len(members) / len(labels))))
        rows.extend(rng.choice(members, size=k, replace=False))
    return np.sort(np.asarray(rows, dtype=np.int64))


# --------------------------------------------------------------------------- loading

def load_dataset(data: Union[str, Path], *, recipe: Optional[SplitRecipe] = None,
                 cache_dir: Union[str, Path, None] = None) -> Dataset:
    """Load a folder, an ``.npz`` file or a built-in dataset name, with a validation split.

    A missing or tiny val split (fewer than ``TINY_VAL_SIZE`` images) is carved out of train
    by ``recipe``: stratified by class, seeded, and with every patient group on one side.
    Test is never touched.
    """
    recipe = recipe or SplitRecipe()
    path = Path(data).expanduser()
    if path.is_dir():
        dataset = _load_folder(path)
    elif path.is_file():
        if path.suffix.lower() != ".npz":
            raise DataError(f"--data {str(data)!r} is a file but not an .npz; expected a folder "
                            "ROOT/{train,val,test}/CLASS/*.jpg, an .npz file or a built-in name "
                            f"({', '.join(datasets_builtin.names())})")
        dataset = _load_npz(path)
    elif str(data).lower() in datasets_builtin.names():
        npz_path = datasets_builtin.download(str(data).lower(), cache_dir=cache_dir)
        dataset = _load_npz(npz_path, name=str(data).lower(),
                            class_names=datasets_builtin.class_names(str(data).lower()))
    else:
        raise DataError(f"--data {str(data)!r}: no such folder or .npz file, and not a built-in "
                        f"dataset (built-in: {', '.join(datasets_builtin.names())})")
    _ensure_validation_split(dataset, recipe)
    return dataset


def _load_folder(root: Path) -> Dataset:
    root = root.resolve()
    present = [s for s in SPLITS if (root / s).is_dir()]
    if "train" not in present:
        subdirs = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise DataError(f"{root} has no train/ folder (found: {subdirs or 'nothing'}); expected "
                        "ROOT/train/CLASS/*.jpg with optional ROOT/val and ROOT/test")
    per_split_classes = {s: sorted(p.name for p in (root / s).iterdir()
                                   if p.is_dir() and not p.name.startswith("."))
                         for s in present}
    class_names = per_split_classes["train"]
    if not class_names:
        raise DataError(f"{root / 'train'} has no class folders; expected train/CLASS/*.jpg")
    for s in present:
        if per_split_classes[s] != class_names:
            extra = sorted(set(per_split_classes[s]) - set(class_names))
            missing = sorted(set(class_names) - set(per_split_classes[s]))
            raise DataError(f"split {s!r} in {root} has different classes from train: "
                            f"missing {missing}, extra {extra}; every split needs the same "
                            "class folders")
    digest = hashlib.sha256()
    splits, skipped = {}, []
    for s in present:
        ids, labels, paths = [], [], []
        for label, cls in enumerate(class_names):
            files, bad = scan_image_files(root / s / cls)
            skipped += bad
            check_utf8_names(files, root / s / cls)
            if not files:
                raise DataError(f"class folder {root / s / cls} has no images; accepted "
                                f"extensions: {', '.join(IMAGE_EXTENSIONS)}")
            for p in files:
                rel = p.relative_to(root).as_posix()
                ids.append(rel)
                labels.append(label)
                paths.append(str(p))
                digest.update(f"{s}\0{label}\0{rel}\0".encode())
                digest.update(hashlib.sha256(p.read_bytes()).digest())
        splits[s] = Split(s, ids, np.asarray(labels, dtype=np.int64), paths=paths)
    warn_skipped(skipped, str(root))
    return Dataset(name=root.name, source=str(root), class_names=class_names, splits=splits,
                   content_digest=digest.hexdigest())


def _load_npz(path: Path, name: Optional[str] = None,
              class_names: Optional[Sequence[str]] = None) -> Dataset:
    path = path.resolve()
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {path} as an .npz file: {exc}") from None
    with npz:
        keys = set(npz.files)
        if "train_images" not in keys or "train_labels" not in keys:
            raise DataError(f"{path} has keys {sorted(keys)}; expected at least train_images and "
                            "train_labels (and optionally val_* / test_*), as in MedMNIST")
        if class_names is None and "class_names" in keys:
            class_names = [str(c) for c in npz["class_names"]]
        raw = {}
        for s in SPLITS:
            if f"{s}_images" in keys:
                if f"{s}_labels" not in keys:
                    raise DataError(f"{path} has {s}_images but no {s}_labels")
                images, labels = npz[f"{s}_images"], npz[f"{s}_labels"]
                if len(images) == 0:
                    if s == "train":
                        raise DataError(f"{path}: train_images has no rows; expected training "
                                        "images")
                    logger.warning("%s: %s_images has no rows; treating the dataset as having "
                                   "no %s split", path, s, s)
                    continue
                _check_finite(path, s, images)
                raw[s] = (images, _npz_labels(path, s, labels, len(images)))
    n_classes = len(class_names) if class_names is not None else \
        int(max(lab.max() for _, lab in raw.values())) + 1
    if class_names is None:
        class_names = [str(i) for i in range(n_classes)]
    digest = hashlib.sha256()
    splits = {}
    for s, (images, labels) in raw.items():
        if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] not in (1, 3)):
            raise DataError(f"{path}: {s}_images has shape {images.shape}; expected (N, H, W) "
                            "or (N, H, W, 1|3)")
        if labels.max() >= n_classes:
            raise DataError(f"{path}: {s}_labels contains {int(labels.max())}, out of range for "
                            f"{n_classes} classes {list(class_names)}; expected labels in "
                            f"[0, {n_classes - 1}]")
        counts = np.bincount(labels, minlength=n_classes)
        if s == "train" and (counts == 0).any():
            empty = [class_names[i] for i in np.flatnonzero(counts == 0)]
            raise DataError(f"{path}: classes {empty} have no training images")
        digest.update(f"{s}\0".encode())
        digest.update(np.ascontiguousarray(images).tobytes())
        digest.update(labels.tobytes())
        ids = [f"{s}/{i:06d}" for i in range(len(images))]
        splits[s] = Split(s, ids, labels, arrays=images, array_rows=np.arange(len(images)))
    return Dataset(name=name or path.stem, source=str(path), class_names=list(class_names),
                   splits=splits, content_digest=digest.hexdigest())


def _check_finite(path: Path, split: str, images: np.ndarray) -> None:
    if images.dtype.kind != "f":
        return
    bad = np.flatnonzero(~np.isfinite(images.reshape(len(images), -1)).all(axis=1))
    if len(bad):
        raise DataError(f"{path}: {split}_images holds NaN or infinite pixels in {len(bad)} "
                        f"image(s), e.g. index {int(bad[0])}; expected finite values (fix or "
                        "drop those rows)")


def _npz_labels(path: Path, split: str, labels: np.ndarray, n: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1 or len(labels) != n:
        raise DataError(f"{path}: {split}_labels has shape {labels.shape}; expected ({n},) or "
                        f"({n}, 1) to match {split}_images")
    if not np.issubdtype(labels.dtype, np.integer):
        if not np.all(np.mod(labels, 1) == 0):
            raise DataError(f"{path}: {split}_labels are not integers (dtype {labels.dtype})")
    labels = labels.astype(np.int64)
    if labels.min() < 0:
        raise DataError(f"{path}: {split}_labels contains {int(labels.min())}; labels must be >= 0")
    return labels


# --------------------------------------------------------------------------- val carve-out

def patient_groups(ids: Sequence[str], pattern: Optional[str]) -> list:
    """Group key per sample: the pattern's first group on the file name, else the id itself."""
    if not pattern:
        return list(ids)
    rx = re.compile(pattern)
    groups = []
    for sample_id in ids:
        m = rx.match(Path(sample_id).name)
        groups.append(m.group(1) if m else sample_id)
    return groups


def carve_validation(labels: np.ndarray, groups: Sequence[str], fraction: float,
                     seed: int) -> np.ndarray:
    """Boolean mask of samples moved to val: stratified by class, whole groups only, seeded.

    Groups are visited in a seeded random order; a group joins val while its class (the
    majority label of the group) is below ``fraction`` of that class's count.
    """
    labels = np.asarray(labels)
    group_names, group_index = np.unique(np.asarray(groups, dtype=object).astype(str),
                                         return_inverse=True)
    n_classes = int(labels.max()) + 1
    class_count = np.bincount(labels, minlength=n_classes)
    # At least one val image for every class that can spare one: thresholds need both classes.
    target = np.where(class_count >= 2, np.maximum(1, np.round(fraction * class_count)), 0)
    taken = np.zeros(n_classes, dtype=int)
    members = [[] for _ in group_names]
    for i, g in enumerate(group_index):
        members[g].append(i)
    in_val = np.zeros(len(labels), dtype=bool)
    for g in np.random.default_rng(seed).permutation(len(group_names)):
        rows = members[g]
        cls = int(np.bincount(labels[rows], minlength=n_classes).argmax())
        # Never move a class's last training images to val.
        if taken[cls] < target[cls] and taken[cls] + len(rows) < class_count[cls]:
            in_val[rows] = True
            taken += np.bincount(labels[rows], minlength=n_classes)
    return in_val


def _ensure_validation_split(dataset: Dataset, recipe: SplitRecipe) -> None:
    val = dataset.splits.get("val")
    if val is not None and len(val) >= TINY_VAL_SIZE:
        dataset.split_info = {"val": "given"}
        return
    train = dataset.splits["train"]
    merged_val = 0
    if val is not None:
        logger.warning("val split has only %d images (< %d): merging it into train and carving "
                       "a %.0f%% stratified validation split instead", len(val), TINY_VAL_SIZE,
                       100 * recipe.val_fraction)
        merged_val = len(val)
        train = _concat(train, val, "train")
    groups = patient_groups(train.ids, recipe.group_pattern)
    in_val = carve_validation(train.labels, groups, recipe.val_fraction, recipe.seed)
    if not in_val.any() or in_val.all():
        raise DataError(f"cannot carve a validation split of {recipe.val_fraction:.0%} from "
                        f"{len(train)} training images; add a val/ split or change val_fraction")
    dataset.splits["train"] = train.subset(np.flatnonzero(~in_val), "train")
    dataset.splits["val"] = train.subset(np.flatnonzero(in_val), "val")
    dataset.splits = {s: dataset.splits[s] for s in SPLITS if s in dataset.splits}
    n_groups = len(set(groups))
    dataset.split_info = {
        "val": "carved from train",
        "val_fraction": recipe.val_fraction,
        "seed": recipe.seed,
        "group_pattern": recipe.group_pattern,
        "groups": n_groups,
        "merged_tiny_val": merged_val,
    }
    logger.info("carved val split: %d of %d training images (%d patient groups, seed %d)",
                int(in_val.sum()), len(train), n_groups, recipe.seed)


def _concat(a: Split, b: Split, name: str) -> Split:
    labels = np.concatenate([a.labels, b.labels])
    if a.paths is not None:
        return Split(name, a.ids + b.ids, labels, paths=a.paths + b.paths)
    arrays = np.concatenate([a.arrays[a.array_rows], b.arrays[b.array_rows]])
    return Split(name, a.ids + b.ids, labels, arrays=arrays, array_rows=np.arange(len(arrays)))
