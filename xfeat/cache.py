"""The HDF5 feature cache: keys, incremental crash-safe writes, validated reads.

The only module that imports h5py. One file per cache key; while being written it is
``NAME.h5.partial`` and only an entry whose every row was written is renamed to ``NAME.h5``
with ``complete=True``, so a reader can never mistake a half-written file for a finished one.

Crash safety: all metadata (attributes, labels, ids) is written when the file is created;
``features``, ``ok``, ``rows_done`` and ``seconds`` are fixed-size contiguous datasets
allocated up front, so extraction only overwrites raw bytes in place. ``rows_done`` is
advanced only after the batch before it was flushed, so a SIGKILL at any moment loses at most
the batch in flight.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import h5py
import numpy as np
from filelock import FileLock, Timeout

from .errors import CacheError  # noqa: F401  (re-exported)
from .files import describe_os_error, make_dirs

logger = logging.getLogger(__name__)

FORMAT = "xfeat-features"
FORMAT_VERSION = 1
FEATURE_DTYPES = ("float32", "float16")


@dataclass
class SplitFeatures:
    """Features of one split. Rows of images that could not be read are dropped by default."""

    features: np.ndarray
    labels: np.ndarray
    ids: list
    seconds: float = 0.0

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class FeatureSet:
    """A complete cache entry read into memory."""

    path: Path
    key: str
    meta: dict
    splits: dict = field(default_factory=dict)
    skipped: dict = field(default_factory=dict)  # split -> ids of unreadable images

    @property
    def class_names(self) -> list:
        return self.meta["class_names"]

    def __getitem__(self, split: str) -> SplitFeatures:
        if split not in self.splits:
            raise KeyError(f"cache {self.path.name} has no split {split!r}; it has "
                           f"{sorted(self.splits)}")
        return self.splits[split]


def cache_key(fields: dict) -> str:
    """sha256 of the canonical JSON of everything that determines the features."""
    payload = json.dumps({"format": FORMAT, "version": FORMAT_VERSION, **fields}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def entry_path(cache_dir: Union[str, Path], label: str, key: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in label)
    return Path(cache_dir) / f"{safe}-{key[:16]}.h5"


def partial_path(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


@contextlib.contextmanager
def entry_lock(path: Path):
    """Inter-process lock for one entry: a second extractor waits instead of corrupting it.

    Only writers lock: a complete entry is read without one, so a read-only cache works.
    """
    make_dirs(path.parent)
    lock = FileLock(str(path.with_name(path.name + ".lock")))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        logger.info("another process is writing %s; waiting for it to finish", path.name)
        lock.acquire()
    except OSError as exc:
        raise CacheError(describe_os_error(exc, path.with_name(path.name + ".lock")) +
                         " (the cache folder must be writable to add an entry)") from None
    try:
        yield
    finally:
        lock.release()


def is_complete(path: Union[str, Path]) -> bool:
    path = Path(path)
    if not path.is_file():
        return False
    try:
        with h5py.File(path, "r") as f:
            return bool(f.attrs.get("complete", False)) and _all_rows_done(f)
    except OSError:
        return False


def _all_rows_done(f: h5py.File) -> bool:
    return all(int(f[s]["rows_done"][0]) == f[s]["features"].shape[0] for s in f)


def read_meta(path: Union[str, Path]) -> dict:
    """The attributes of a complete cache entry, without loading features."""
    path = _check_readable(Path(path))
    with h5py.File(path, "r") as f:
        return _meta(f)


def _meta(f: h5py.File) -> dict:
    meta = json.loads(f.attrs["meta"])
    meta["key"] = str(f.attrs["key"])
    meta["splits"] = {s: {"n": f[s]["features"].shape[0], **json.loads(f[s].attrs.get("stats", "{}"))}
                      for s in f}
    return meta


def _check_readable(path: Path) -> Path:
    if not path.is_file():
        partial = partial_path(path)
        hint = (" (an interrupted extraction left " + partial.name + "; run the same "
                "`xfeat extract` command again to resume it)") if partial.exists() else ""
        raise CacheError(f"cache file {path} does not exist{hint}")
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("format") != FORMAT:
                raise CacheError(f"{path} is not an xfeat feature cache")
            if int(f.attrs.get("format_version", 0)) > FORMAT_VERSION:
                raise CacheError(f"{path} was written by a newer xfeat (format "
                                 f"{int(f.attrs['format_version'])}); upgrade xfeat")
            if not f.attrs.get("complete", False) or not _all_rows_done(f):
                raise CacheError(f"{path} is incomplete; re-run the extraction that made it")
    except OSError as exc:
        raise CacheError(f"cannot open {path} as HDF5: {exc}") from None
    return path


def read_cache(path: Union[str, Path], splits: Optional[Sequence[str]] = None, *,
               include_skipped: bool = False) -> FeatureSet:
    """Read a complete cache entry into numpy arrays, one :class:`SplitFeatures` per split."""
    path = _check_readable(Path(path))
    with h5py.File(path, "r") as f:
        meta = _meta(f)
        result = FeatureSet(path=path, key=meta["key"], meta=meta)
        for s in splits or [s for s in ("train", "val", "test") if s in f]:
            if s not in f:
                raise CacheError(f"{path} has no split {s!r}; it has {sorted(f)}")
            g = f[s]
            ok = g["ok"][()]
            ids = [i.decode() if isinstance(i, bytes) else str(i) for i in g["ids"][()]]
            rows = slice(None) if include_skipped else np.flatnonzero(ok)
            result.splits[s] = SplitFeatures(
                features=g["features"][()][rows], labels=g["labels"][()][rows],
                ids=ids if include_skipped else [ids[i] for i in rows],
                seconds=float(g["seconds"][0]))
            if not ok.all():
                result.skipped[s] = [ids[i] for i in np.flatnonzero(~ok)]
    return result


def shard_path(path: Path, rank: int, world_size: int) -> Path:
    """Where rank ``rank`` of ``world_size`` writes its part of the entry ``path``."""
    return path.with_name(f"{path.stem}.shard{rank}of{world_size}{path.suffix}")


def merge_shards(path: Path, shard_paths: Sequence[Path], *, key: str, meta: dict, splits: dict,
                 feature_dim: int, dtype: str) -> Path:
    """Concatenate complete shard files, in order, into the complete entry ``path``.

    The shards' rows must add up to the entry's, split by split, with the same ids. Per
    split, ``seconds`` is the slowest shard's (the shards ran in parallel); each shard's own
    seconds are kept in the split's stats. The shards are deleted once the entry is in place.
    """
    shards = [read_cache(p, include_skipped=True) for p in shard_paths]
    partial_path(path).unlink(missing_ok=True)  # merging is quick: always start it afresh
    writer = CacheWriter(path, key=key, meta=meta, splits=splits, feature_dim=feature_dim,
                         dtype=dtype)
    try:
        stats = {}
        for name, (ids, _) in splits.items():
            parts = [sh.splits[name] for sh in shards]
            merged_ids = [i for part in parts for i in part.ids]
            if merged_ids != list(ids):
                raise CacheError(f"the shards of {path.name} do not add up to split {name} "
                                 f"({len(merged_ids)} rows for {len(ids)})")
            wall = max(part.seconds for part in parts)
            row, seconds = 0, wall  # the split's seconds go with its first rows
            for shard, part in zip(shards, parts):
                if not len(part):
                    continue
                skipped = set(shard.skipped.get(name, []))
                ok = np.array([i not in skipped for i in part.ids], dtype=bool)
                writer.write(name, row, part.features, ok, seconds=seconds)
                row, seconds = row + len(part), 0.0
            stats[name] = {"seconds_total": wall, "images_per_second":
                           len(ids) / wall if wall else None, "shards": len(shards),
                           "shard_seconds": [part.seconds for part in parts]}
        writer.finalize(stats)
    finally:
        writer.close()
    for p in shard_paths:
        Path(p).unlink(missing_ok=True)
        Path(p).with_name(Path(p).name + ".lock").unlink(missing_ok=True)
    return path


class CacheWriter:
    """Creates or resumes the partial file of one cache entry and fills it batch by batch.

    Use under :func:`entry_lock`. ``finalize`` renames the file into place once every row of
    every split is written.
    """

    def __init__(self, path: Path, *, key: str, meta: dict, splits: dict, feature_dim: int,
                 dtype: str = "float32"):
        if dtype not in FEATURE_DTYPES:
            raise CacheError(f"feature dtype {dtype!r} not supported; expected one of {FEATURE_DTYPES}")
        self.path, self.key, self.meta = Path(path), key, meta
        self.partial = partial_path(self.path)
        make_dirs(self.partial.parent)
        self.file = self._open_existing(splits, feature_dim, dtype)
        if self.file is None:
            _check_free_space(self.partial.parent, splits, feature_dim, dtype)
            try:
                self.file = self._create(splits, feature_dim, dtype)
            except OSError as exc:
                self._discard()
                raise CacheError(describe_os_error(exc, self.partial)) from None

    # -- set-up
    def _open_existing(self, splits: dict, feature_dim: int, dtype: str):
        """The partial file of an interrupted run, if it is intact and of this extraction;
        a damaged one (a crash or a full disk while it was created) is reported and removed."""
        if not self.partial.exists():
            return None
        f = None
        try:
            f = h5py.File(self.partial, "r+")
            layout_ok = f.attrs.get("key") == self.key and sorted(f) == sorted(splits) and all(
                f[s]["features"].shape == (len(ids), feature_dim) and
                f[s]["features"].dtype == dtype for s, (ids, _) in splits.items())
            done = {s: int(f[s]["rows_done"][0]) for s in f} if layout_ok else None
        except Exception as exc:  # h5py raises OSError, KeyError, ValueError for damage
            _close_quietly(f)
            logger.warning("%s is damaged (%s); starting the extraction again",
                           self.partial, str(exc).splitlines()[0][:160])
            self._discard()
            return None
        if not layout_ok:
            f.close()
            logger.warning("%s does not match this extraction; starting it again", self.partial.name)
            self._discard()
            return None
        logger.info("resuming %s: rows already written %s", self.partial.name, done)
        return f

    def _discard(self) -> None:
        try:
            self.partial.unlink(missing_ok=True)
        except OSError as exc:
            raise CacheError(describe_os_error(exc, self.partial)) from None

    def _create(self, splits: dict, feature_dim: int, dtype: str) -> h5py.File:
        f = h5py.File(self.partial, "w")
        f.attrs["format"] = FORMAT
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["key"] = self.key
        meta = {**self.meta, "versions": {**self.meta.get("versions", {}),
                                          "h5py": h5py.__version__}}
        f.attrs["meta"] = json.dumps(meta, sort_keys=True)
        f.attrs["complete"] = False
        for s, (ids, labels) in splits.items():
            g = f.create_group(s)
            g.create_dataset("labels", data=np.asarray(labels, dtype=np.int64))
            g.create_dataset("ids", data=np.asarray(list(ids), dtype=object),
                             dtype=h5py.string_dtype())
            n = len(ids)
            _preallocated(g, "features", (n, feature_dim), dtype, np.nan)
            _preallocated(g, "ok", (n,), np.bool_, True)
            _preallocated(g, "rows_done", (1,), np.int64, 0)
            _preallocated(g, "seconds", (1,), np.float64, 0.0)
        f.flush()
        return f

    # -- writing
    def rows_done(self, split: str) -> int:
        return int(self.file[split]["rows_done"][0])

    def n_rows(self, split: str) -> int:
        return self.file[split]["features"].shape[0]

    def write(self, split: str, start: int, features: np.ndarray, ok: np.ndarray,
              seconds: float) -> None:
        """Write rows ``start:start+len(features)``, then (after a flush) advance rows_done."""
        g = self.file[split]
        stop = start + len(features)
        if start != self.rows_done(split):
            raise RuntimeError(f"write at row {start} but {split} has {self.rows_done(split)} rows done")
        try:
            g["features"][start:stop] = features
            g["ok"][start:stop] = ok
            self.file.flush()
            g["seconds"][0] = g["seconds"][0] + seconds
            g["rows_done"][0] = stop
            self.file.flush()
        except OSError as exc:
            raise CacheError(describe_os_error(exc, self.partial) + "; the rows written so far "
                             "are kept and the same command resumes from them") from None

    def finalize(self, split_stats: dict) -> Path:
        """Record per-split stats, mark complete and atomically move the file into place."""
        for s in self.file:
            if self.rows_done(s) != self.n_rows(s):
                raise CacheError(f"cannot finalize {self.partial}: split {s} has "
                                 f"{self.rows_done(s)} of {self.n_rows(s)} rows")
            self.file[s].attrs["stats"] = json.dumps(split_stats.get(s, {}), sort_keys=True)
        self.file.attrs["complete"] = True
        self.file.close()
        os.replace(self.partial, self.path)
        return self.path

    def close(self) -> None:
        _close_quietly(self.file)


def _close_quietly(f) -> None:
    """Close an h5py file; a failure to flush (full disk) is logged, never raised from here:
    whatever was not flushed is not counted in ``rows_done`` and is redone on resume."""
    if f is None:
        return
    try:
        if f.id.valid:
            f.close()
    except Exception as exc:
        logger.warning("closing %s failed: %s", getattr(f, "filename", "the cache file"),
                       str(exc).splitlines()[0][:160])


def _check_free_space(folder: Path, splits: dict, feature_dim: int, dtype: str) -> None:
    """Refuse to start an entry that cannot fit: the arrays are allocated up front."""
    import shutil

    rows = sum(len(ids) for ids, _ in splits.values())
    ids_bytes = sum(len(str(i)) + 16 for ids, _ in splits.values() for i in ids)
    need = rows * (feature_dim * np.dtype(dtype).itemsize + 10) + ids_bytes + (1 << 20)
    free = shutil.disk_usage(folder).free
    if free < need:
        raise CacheError(f"not enough space in {folder} for the cache entry: it needs about "
                         f"{need / 2**20:.1f} MiB and {free / 2**20:.1f} MiB are free; free some "
                         "space or choose another --cache-dir")


def _preallocated(group: h5py.Group, name: str, shape: tuple, dtype, fill) -> None:
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_ALLOC)
    group.create_dataset(name, shape=shape, dtype=dtype, fillvalue=fill, dcpl=dcpl)
