"""Reading a feature cache entry: validity, metadata and arrays.

An entry is one HDF5 file ``NAME.h5``; only a file marked complete, whose every row was
written, is read. Per split group (``train``, ``val``, ``test``, and augmented views such as
``train.view1`` or ``test.flip``) it holds one ``(N, D_block)`` dataset per feature block
(``features/penultimate``, ``features/layer3``, ...), plus ``labels``, ``ids`` and ``ok``.
Format 1 files (one ``features`` dataset) read as a single ``penultimate`` block.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import h5py
import numpy as np

from xfeat.cache.meta import CacheMeta
from xfeat.config import FEATURE_DTYPES  # noqa: F401  (re-exported)
from xfeat.data.profile import summarize as summarize_profile
from xfeat.errors import CacheError

logger = logging.getLogger(__name__)

FORMAT = "xfeat-features"
FORMAT_VERSION = 2
BASE_SPLITS = ("train", "val", "test")
PENULTIMATE = "penultimate"


@dataclass
class SplitFeatures:
    """Features of one split (the chosen blocks side by side). Rows of images that could not
    be read are dropped by default."""

    features: np.ndarray
    labels: np.ndarray
    ids: list
    seconds: float = 0.0
    blocks: list = field(default_factory=list)  # [(name, dim)] in column order
    stats: Optional[np.ndarray] = None  # (N, 6) image facts (xfeat.data.profile.STAT_COLUMNS)
    patients: Optional[list] = None  # the patient of each row (caches since xfeat 0.3)

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class FeatureSet:
    """A complete cache entry read into memory.

    ``splits``: train/val/test; ``views``: ``{base split: {view: SplitFeatures}}`` for the
    augmented train views (``view1`` ...) and the test-time views of val/test (``flip``,
    ``crop_tl`` ...), row for row the base split's images.
    """

    path: Path
    key: str
    meta: CacheMeta
    splits: dict = field(default_factory=dict)
    skipped: dict = field(default_factory=dict)  # split -> ids of unreadable images
    views: dict = field(default_factory=dict)

    @property
    def class_names(self) -> list:
        return list(self.meta.class_names)

    def patient_groups(self, split: str) -> Optional[list]:
        """The patient of each row of ``split`` (bootstrap intervals resample whole patients),
        or None when the cache does not know them (each image is then its own group)."""
        return self.splits[split].patients if split in self.splits else None

    @property
    def multilabel(self) -> bool:
        """Several labels per image: each split's ``labels`` are (N, L), -1 where unknown."""
        return bool(self.splits) and next(iter(self.splits.values())).labels.ndim == 2

    @property
    def blocks(self) -> list:
        """``[(name, dim)]`` of the blocks read, in column order."""
        return next(iter(self.splits.values())).blocks if self.splits else []

    def __getitem__(self, split: str) -> SplitFeatures:
        if split not in self.splits:
            raise KeyError(
                f"cache {self.path.name} has no split {split!r}; it has {sorted(self.splits)}"
            )
        return self.splits[split]


def text_digest(text) -> str:
    """The SHA-256 kept beside a cache's text that HDF5 does not checksum (the metadata JSON,
    the ids, the patients): a flipped bit there is an error, not another class name or id."""
    if isinstance(text, bytes):
        text = text.decode()
    elif not isinstance(text, str):
        text = json.dumps([str(t) for t in text])
    return hashlib.sha256(text.encode()).hexdigest()


def _check_digest(obj, name: str, text, path) -> None:
    stored = obj.attrs.get(f"{name}_sha256")  # caches before xfeat 0.3 have none
    if stored is not None and str(stored) != text_digest(text):
        raise CacheError(
            f"{path} is damaged (its {name} do not match their checksum); its features are not "
            "used: extract again with --force"
        )


def partial_path(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


def group_order(f: h5py.File) -> list:
    """Groups in reading order: train, val, test, then each split's views as stored."""
    names = list(f)
    base = [s for s in BASE_SPLITS if s in names] + [
        s for s in names if "." not in s and s not in BASE_SPLITS
    ]
    return base + [n for b in base for n in names if n.startswith(b + ".")]


def block_datasets(group: h5py.Group) -> dict:
    """``{block name: dataset}`` of one split group, in stored order (format 1 or 2)."""
    feats = group["features"]
    if isinstance(feats, h5py.Dataset):
        return {PENULTIMATE: feats}
    order = json.loads(group.attrs.get("blocks", "[]")) or sorted(feats)
    return {name: feats[name] for name in order}


def rows_of(group: h5py.Group) -> int:
    return next(iter(block_datasets(group).values())).shape[0]


def all_rows_done(f: h5py.File) -> bool:
    return all(int(f[s]["rows_done"][0]) == rows_of(f[s]) for s in f)


def is_complete(path: Union[str, Path]) -> bool:
    path = Path(path)
    if not path.is_file():
        return False
    try:
        with h5py.File(path, "r", locking=False) as f:
            return bool(f.attrs.get("complete", False)) and all_rows_done(f)
    except (OSError, KeyError):
        return False


def read_meta(path: Union[str, Path]) -> CacheMeta:
    """The metadata of a complete cache entry, without loading features."""
    path = _check_readable(Path(path))
    with h5py.File(path, "r", locking=False) as f:
        return _meta(f)


def _meta(f: h5py.File) -> CacheMeta:
    try:
        _check_digest(f, "meta", f.attrs["meta"], f.filename)
        meta = json.loads(f.attrs["meta"])
    except (KeyError, ValueError) as exc:
        raise CacheError(
            f"{f.filename}: its metadata cannot be read ({exc}); extract again with --force"
        ) from None
    meta["key"] = str(f.attrs["key"])
    meta["splits"] = {
        s: {"n": rows_of(f[s]), **json.loads(f[s].attrs.get("stats", "{}"))} for s in group_order(f)
    }
    for s in BASE_SPLITS:  # what the images of each split looked like (predict checks these)
        if s in f and "image_stats" in f[s]:
            rows = f[s]["image_stats"][()][f[s]["ok"][()]]
            meta["splits"][s]["input_profile"] = summarize_profile(rows)
    first = f[next(iter(f))]
    meta.setdefault("blocks", [[name, ds.shape[1]] for name, ds in block_datasets(first).items()])
    return CacheMeta.from_dict(meta)


def _check_readable(path: Path) -> Path:
    if not path.is_file():
        partial = partial_path(path)
        hint = (
            (
                " (an interrupted extraction left " + partial.name + "; run the same "
                "`xfeat extract` command again to resume it)"
            )
            if partial.exists()
            else ""
        )
        raise CacheError(f"cache file {path} does not exist{hint}")
    try:
        with h5py.File(path, "r", locking=False) as f:
            if f.attrs.get("format") != FORMAT:
                raise CacheError(f"{path} is not an xfeat feature cache")
            if int(f.attrs.get("format_version", 0)) > FORMAT_VERSION:
                raise CacheError(
                    f"{path} was written by a newer xfeat (format "
                    f"{int(f.attrs['format_version'])}); upgrade xfeat"
                )
            if not f.attrs.get("complete", False) or not all_rows_done(f):
                raise CacheError(f"{path} is incomplete; re-run the extraction that made it")
    except (OSError, KeyError, ValueError) as exc:  # not HDF5, or a damaged object header
        raise CacheError(
            f"cannot open {path} as an xfeat cache ({exc}); if xfeat wrote it, it is damaged: "
            "extract again with --force"
        ) from None
    return path


def read_cache(
    path: Union[str, Path],
    splits: Optional[Sequence[str]] = None,
    *,
    blocks: Optional[Sequence[str]] = None,
    views: bool = True,
    include_skipped: bool = False,
) -> FeatureSet:
    """Read a complete cache entry into numpy arrays.

    ``splits``: base splits to read (default all of train/val/test present); ``blocks``:
    feature blocks to put side by side, in that order (default every stored block);
    ``views``: also read the augmented and test-time views of those splits.
    """
    path = _check_readable(Path(path))
    try:
        return _read(path, splits, blocks, views, include_skipped)
    except (OSError, KeyError, ValueError) as exc:  # a checksum that fails, a broken object
        raise CacheError(
            f"{path} is damaged ({str(exc).splitlines()[0][:120] or type(exc).__name__}); its "
            "features are not used: extract again with --force"
        ) from None


def _read(path: Path, splits, blocks, views: bool, include_skipped: bool) -> FeatureSet:
    with h5py.File(path, "r", locking=False) as f:
        meta = _meta(f)
        result = FeatureSet(path=path, key=meta.key, meta=meta)
        wanted = list(splits) if splits else [s for s in BASE_SPLITS if s in f]
        for s in wanted:
            if s not in f:
                raise CacheError(f"{path} has no split {s!r}; it has {sorted(f)}")
        for name in group_order(f):
            base, _, view = name.partition(".")
            if base not in wanted or (view and not views):
                continue
            part, skipped = _read_group(f[name], path, blocks, include_skipped)
            if view:
                result.views.setdefault(base, {})[view] = part
            else:
                result.splits[base] = part
                if skipped:
                    result.skipped[base] = skipped
    return result


def _read_group(g: h5py.Group, path: Path, blocks, include_skipped: bool):
    stored = block_datasets(g)
    names = list(blocks) if blocks else list(stored)
    missing = [b for b in names if b not in stored]
    if missing:
        raise CacheError(
            f"{path} has no feature block {missing[0]!r}; it has {list(stored)} "
            "(extract again with --layers to add blocks)"
        )
    ok = g["ok"][()]
    ids = [i.decode() if isinstance(i, bytes) else str(i) for i in g["ids"][()]]
    _check_digest(g, "ids", ids, path)
    if "patients" in g:
        patients = [p.decode() if isinstance(p, bytes) else str(p) for p in g["patients"][()]]
        _check_digest(g, "patients", patients, path)
    every_row = include_skipped or bool(ok.all())  # then a slice: no copy of the features
    rows = slice(None) if every_row else np.flatnonzero(ok)
    arrays = [stored[b][()][rows] for b in names]
    features = arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=1)
    part = SplitFeatures(
        features=features,
        labels=g["labels"][()][rows],
        ids=ids if every_row else [ids[i] for i in rows],
        seconds=float(g["seconds"][0]),
        blocks=[(b, int(stored[b].shape[1])) for b in names],
        stats=g["image_stats"][()][rows] if "image_stats" in g else None,
        patients=None if "patients" not in g else patients if every_row else [patients[i] for i in rows],
    )
    return part, [ids[i] for i in np.flatnonzero(~ok)]
