"""Writing a feature cache entry: keys, locks, incremental crash-safe writes, shard merging.

While being written an entry is ``NAME.h5.partial``; only an entry whose every row was
written is renamed to ``NAME.h5`` with ``complete=True``. All metadata (attributes, labels,
ids) is written when the file is created and the arrays are allocated up front, so
extraction only overwrites raw bytes in place; ``rows_done`` advances only after the batch
before it was flushed, so a SIGKILL at any moment loses at most the batch in flight.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Optional, Sequence, Union

import h5py
import numpy as np
from filelock import FileLock, Timeout

from xfeat.cache.meta import CacheMeta
from xfeat.cache.read import (
    FEATURE_DTYPES,
    FORMAT,
    FORMAT_VERSION,
    partial_path,
    read_cache,
    text_digest,
)
from xfeat.data.profile import STAT_COLUMNS
from xfeat.errors import CacheError
from xfeat.files import describe_os_error, file_mode, make_dirs, safe_name

logger = logging.getLogger(__name__)


def cache_key(fields: dict) -> str:
    """sha256 of the canonical JSON of everything that determines the features."""
    payload = json.dumps({"format": FORMAT, "version": FORMAT_VERSION, **fields}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def entry_path(cache_dir: Union[str, Path], label: str, key: str) -> Path:
    return Path(cache_dir) / f"{safe_name(label)}-{key[:16]}.h5"


def entry_index_path(cache_dir: Union[str, Path], signature: str) -> Path:
    """Where the entry that answers a request signature is remembered
    (:mod:`xfeat.extraction.entry`)."""
    return Path(cache_dir) / "index" / f"{signature}.json"


def shard_path(path: Path, rank: int, world_size: int) -> Path:
    """Where rank ``rank`` of ``world_size`` writes its part of the entry ``path``."""
    return path.with_name(f"{path.stem}.shard{rank}of{world_size}{path.suffix}")


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
        raise CacheError(
            describe_os_error(exc, path.with_name(path.name + ".lock"))
            + " (the cache folder must be writable to add an entry)"
        ) from None
    try:
        yield
    finally:
        lock.release()


class CacheWriter:
    """Creates or resumes the partial file of one entry and fills it batch by batch.

    ``splits``: ``{group: (ids, labels[, patients])}`` (patients: the patient of each row,
    used for patient-level bootstrap intervals); ``blocks``: ``[(name, dim)]``. Use under
    :func:`entry_lock`; ``finalize`` renames the file into place once every row is written.
    """

    def __init__(
        self,
        path: Path,
        *,
        key: str,
        meta: CacheMeta,
        splits: dict,
        blocks: list,
        dtype: str = "float32",
    ):
        if dtype not in FEATURE_DTYPES:
            raise CacheError(f"feature dtype {dtype!r} not supported; expected one of {FEATURE_DTYPES}")
        self.path, self.key, self.meta = Path(path), key, meta
        self.blocks = [(str(name), int(dim)) for name, dim in blocks]
        self.partial = partial_path(self.path)
        make_dirs(self.partial.parent)
        self.file = self._open_existing(splits, dtype)
        if self.file is None:
            _check_free_space(self.partial.parent, splits, self.blocks, dtype)
            try:
                self.file = self._create(splits, dtype)
            except OSError as exc:
                self._discard()
                raise CacheError(describe_os_error(exc, self.partial)) from None

    def _layout_matches(self, f: h5py.File, splits: dict, dtype: str) -> bool:
        if f.attrs.get("key") != self.key or sorted(f) != sorted(splits):
            return False
        for s, (ids, *_) in splits.items():
            feats = f[s]["features"]
            for name, dim in self.blocks:
                if (
                    name not in feats
                    or feats[name].shape != (len(ids), dim)
                    or feats[name].dtype != dtype
                ):
                    return False
        return True

    def _open_existing(self, splits: dict, dtype: str):
        """The partial file of an interrupted run, if it is intact and of this extraction;
        a damaged one (a crash or a full disk while it was created) is reported and removed."""
        if not self.partial.exists():
            return None
        f = None
        try:
            f = h5py.File(self.partial, "r+", locking=False)
            layout_ok = self._layout_matches(f, splits, dtype)
            done = {s: int(f[s]["rows_done"][0]) for s in f} if layout_ok else None
        except Exception as exc:  # h5py raises OSError, KeyError, ValueError for damage
            _close_quietly(f)
            logger.warning(
                "%s is damaged (%s); starting the extraction again",
                self.partial,
                str(exc).splitlines()[0][:160],
            )
            self._discard()
            return None
        if not layout_ok:
            f.close()
            logger.warning("%s does not match this extraction; starting it again", self.partial.name)
            self._discard()
            return None
        logger.info("resuming %s: rows already written %s", self.partial.name, done)
        for s in f:  # a partial started by xfeat 0.2 has no image facts: they start from here
            if "image_stats" not in f[s]:
                _preallocated(
                    f[s], "image_stats", (f[s]["ok"].shape[0], len(STAT_COLUMNS)), np.float32, np.nan
                )
        return f

    def _discard(self) -> None:
        try:
            self.partial.unlink(missing_ok=True)
        except OSError as exc:
            raise CacheError(describe_os_error(exc, self.partial)) from None

    def _create(self, splits: dict, dtype: str) -> h5py.File:
        f = h5py.File(self.partial, "w", locking=False)
        f.attrs["format"] = FORMAT
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["key"] = self.key
        meta = self.meta.with_(
            blocks=tuple((name, dim) for name, dim in self.blocks),
            versions={**self.meta.versions, "h5py": h5py.__version__},
        )
        f.attrs["meta"] = json.dumps(meta.to_dict(), sort_keys=True)
        f.attrs["meta_sha256"] = text_digest(f.attrs["meta"])
        f.attrs["complete"] = False
        for s, (ids, labels, *patients) in splits.items():
            g = f.create_group(s)
            g.attrs["blocks"] = json.dumps([name for name, _ in self.blocks])
            labels = np.asarray(labels, dtype=np.int64)
            g.create_dataset("labels", data=labels, fletcher32=len(ids) > 0)
            if labels.ndim == 2:  # multi-label: (N, L) 1/0 with -1 where unknown, and its mask
                g.create_dataset("label_mask", data=labels >= 0, fletcher32=len(ids) > 0)
            g.create_dataset("ids", data=np.asarray(list(ids), dtype=object), dtype=h5py.string_dtype())
            g.attrs["ids_sha256"] = text_digest(ids)
            if patients and patients[0] is not None:
                g.create_dataset(
                    "patients",
                    data=np.asarray(list(patients[0]), dtype=object),
                    dtype=h5py.string_dtype(),
                )
                g.attrs["patients_sha256"] = text_digest(patients[0])
            feats = g.create_group("features")
            for name, dim in self.blocks:
                _preallocated(feats, name, (len(ids), dim), dtype, np.nan)
            _preallocated(g, "ok", (len(ids),), np.bool_, True)
            _preallocated(g, "image_stats", (len(ids), len(STAT_COLUMNS)), np.float32, np.nan)
            _preallocated(g, "rows_done", (1,), np.int64, 0, checksum=False)
            _preallocated(g, "seconds", (1,), np.float64, 0.0, checksum=False)
        f.flush()
        return f

    def rows_done(self, split: str) -> int:
        return int(self.file[split]["rows_done"][0])

    def n_rows(self, split: str) -> int:
        return self.file[split]["ok"].shape[0]

    def write(
        self,
        split: str,
        start: int,
        features: dict,
        ok: np.ndarray,
        seconds: float,
        stats: Optional[np.ndarray] = None,
    ) -> None:
        """Write rows ``start:start+n`` of every block (``{block: (n, dim)}``) and their image
        facts (``stats``, ``(n, 6)``), then, after a flush, advance ``rows_done``."""
        g = self.file[split]
        n = len(ok)
        if start != self.rows_done(split):
            raise RuntimeError(f"write at row {start} but {split} has {self.rows_done(split)} rows done")
        try:
            for name, _ in self.blocks:
                g["features"][name][start : start + n] = features[name]
            g["ok"][start : start + n] = ok
            if stats is not None:
                g["image_stats"][start : start + n] = stats
            self.file.flush()
            g["seconds"][0] = g["seconds"][0] + seconds
            g["rows_done"][0] = start + n
            self.file.flush()
        except OSError as exc:
            raise CacheError(
                describe_os_error(exc, self.partial) + "; the rows written so far "
                "are kept and the same command resumes from them"
            ) from None

    def finalize(self, split_stats: dict) -> Path:
        """Record per-split stats, mark complete and atomically move the file into place."""
        for s in self.file:
            if self.rows_done(s) != self.n_rows(s):
                raise CacheError(
                    f"cannot finalize {self.partial}: split {s} has "
                    f"{self.rows_done(s)} of {self.n_rows(s)} rows"
                )
            self.file[s].attrs["stats"] = json.dumps(split_stats.get(s, {}), sort_keys=True)
        self.file.attrs["complete"] = True
        self.file.close()
        os.chmod(self.partial, file_mode())
        os.replace(self.partial, self.path)
        return self.path

    def close(self) -> None:
        _close_quietly(self.file)


def merge_shards(
    path: Path,
    shard_paths: Sequence[Path],
    *,
    key: str,
    meta: CacheMeta,
    splits: dict,
    blocks: list,
    dtype: str,
) -> Path:
    """Concatenate complete shard files, in order, into the complete entry ``path``.

    The shards' rows must add up to the entry's, split by split, with the same ids. Per
    split, ``seconds`` is the slowest shard's (the shards ran in parallel); each shard's own
    seconds are kept in the split's stats. The shards are deleted once the entry is in place.
    """
    names = [name for name, _ in blocks]
    shards = [_read_all_groups(p, names) for p in shard_paths]
    partial_path(path).unlink(missing_ok=True)  # merging is quick: always start it afresh
    writer = CacheWriter(path, key=key, meta=meta, splits=splits, blocks=blocks, dtype=dtype)
    try:
        stats = {}
        for name, (ids, *_) in splits.items():
            parts = [sh[name] for sh in shards]
            if [i for part in parts for i in part["ids"]] != list(ids):
                raise CacheError(f"the shards of {path.name} do not add up to split {name}")
            wall = max(part["seconds"] for part in parts)
            row, seconds = 0, wall  # the split's seconds go with its first rows
            for part in parts:
                if len(part["ids"]):
                    writer.write(
                        name, row, part["blocks"], part["ok"], seconds=seconds, stats=part["stats"]
                    )
                    row, seconds = row + len(part["ids"]), 0.0
            stats[name] = {
                "seconds_total": wall,
                "images_per_second": len(ids) / wall if wall else None,
                "shards": len(shards),
                "shard_seconds": [part["seconds"] for part in parts],
            }
        writer.finalize(stats)
    finally:
        writer.close()
    for p in shard_paths:
        Path(p).unlink(missing_ok=True)
        Path(p).with_name(Path(p).name + ".lock").unlink(missing_ok=True)
    return path


def _read_all_groups(path: Path, blocks: list) -> dict:
    """Every group of a complete shard, unreadable rows included: ids, ok, blocks, seconds."""
    fs = read_cache(path, blocks=blocks, include_skipped=True)
    groups = {}
    for base, part in fs.splits.items():
        groups[base] = part
        for view, vpart in fs.views.get(base, {}).items():
            groups[f"{base}.{view}"] = vpart
    out = {}
    for name, part in groups.items():
        skipped = set(fs.skipped.get(name.partition(".")[0], []))
        cols = np.cumsum([0] + [d for _, d in part.blocks])
        out[name] = {
            "ids": part.ids,
            "seconds": part.seconds,
            "ok": np.array([i not in skipped for i in part.ids], dtype=bool),
            "stats": part.stats,
            "blocks": {
                b: part.features[:, cols[k] : cols[k + 1]] for k, (b, _) in enumerate(part.blocks)
            },
        }
    return out


def _close_quietly(f) -> None:
    """Close an h5py file; a failure to flush (full disk) is logged, never raised from here:
    whatever was not flushed is not counted in ``rows_done`` and is redone on resume."""
    if f is None:
        return
    try:
        if f.id.valid:
            f.close()
    except Exception as exc:
        logger.warning(
            "closing %s failed: %s",
            getattr(f, "filename", "the cache file"),
            str(exc).splitlines()[0][:160],
        )


def _check_free_space(folder: Path, splits: dict, blocks: list, dtype: str) -> None:
    """Refuse to start an entry that cannot fit: the arrays are allocated up front."""
    rows = sum(len(ids) for ids, *_ in splits.values())
    ids_bytes = sum(len(str(i)) + 16 for ids, *_ in splits.values() for i in ids)
    width = sum(dim for _, dim in blocks) * np.dtype(dtype).itemsize
    need = rows * (width + 10) + ids_bytes + (1 << 20)
    free = shutil.disk_usage(folder).free
    if free < need:
        raise CacheError(
            f"not enough space in {folder} for the cache entry: it needs about "
            f"{need / 2**20:.1f} MiB and {free / 2**20:.1f} MiB are free; free some "
            "space or choose another --cache-dir"
        )


def _preallocated(
    group: h5py.Group, name: str, shape: tuple, dtype, fill, checksum: bool = True
) -> None:
    """A dataset whose space is allocated (and filled) now, so a full disk shows at once;
    ``checksum``: stored in chunks of about 1 MiB, each with a Fletcher-32 checksum that
    HDF5 verifies on every read (a flipped bit is an error, never a value)."""
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    if checksum and all(shape):
        row_bytes = np.dtype(dtype).itemsize * int(np.prod(shape[1:], dtype=np.int64))
        dcpl.set_chunk((max(1, min(shape[0], (1 << 20) // max(1, row_bytes))), *shape[1:]))
        dcpl.set_fletcher32()
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_ALLOC)
    group.create_dataset(name, shape=shape, dtype=dtype, fillvalue=fill, dcpl=dcpl)
