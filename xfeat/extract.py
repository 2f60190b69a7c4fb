"""The one pass: images -> backbone -> HDF5 cache, resumable, timed per stage.

``plan_extraction`` resolves everything that determines the features (dataset content and
split, model, weights, preprocessing, dtype) into a cache key without building the model;
``extract`` reuses a complete entry for that key or fills it batch by batch.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from . import __version__, cache, distributed
from .config import default_cache_dir
from .errors import ConfigError
from .runtime import make_loader, resolve_device
from .backbones import (Backbone, Preprocessing, WeightsInfo, create_backbone,
                        default_preprocessing, feature_dim, resolve_weights)
from .data import DEFAULT_GROUP_PATTERN, Dataset, ImageReadError, Split, SplitRecipe, load_dataset

logger = logging.getLogger(__name__)


@dataclass
class ExtractionPlan:
    """Everything that determines a cache entry, resolved before any model is built."""

    dataset: Dataset
    model: str
    weights: WeightsInfo
    weights_arg: str
    preprocessing: Preprocessing
    feature_dim: int
    feature_dtype: str
    seed: int
    key: str
    path: Path

    @property
    def meta(self) -> dict:
        import torchvision

        ds = self.dataset
        return {
            "dataset": {"name": ds.name, "source": ds.source, "fingerprint": ds.fingerprint,
                        "content_digest": ds.content_digest, "counts": ds.counts()},
            "split": ds.split_info,
            "class_names": ds.class_names,
            "model": self.model,
            "feature_dim": self.feature_dim,
            "feature_dtype": self.feature_dtype,
            "weights": {"kind": self.weights.kind, "id": self.weights.id,
                        "sha256": self.weights.sha256, "url": self.weights.url,
                        "seed": self.seed if self.weights.kind == "random" else None},
            "preprocessing": self.preprocessing.to_dict(),
            "versions": {"xfeat": __version__, "torch": torch.__version__,
                         "torchvision": torchvision.__version__, "numpy": np.__version__},
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }


def plan_extraction(data, model: str = "resnet18", *, weights: Union[str, Path, None] = "none",
                    cache_dir: Union[str, Path, None] = None, image_size: Optional[int] = None,
                    feature_dtype: str = "float32", val_fraction: float = 0.1,
                    split_seed: int = 0, group_pattern: Optional[str] = DEFAULT_GROUP_PATTERN,
                    seed: int = 0, dataset: Optional[Dataset] = None) -> ExtractionPlan:
    """Resolve the dataset, weights and preprocessing into a cache key and path."""
    if feature_dtype not in cache.FEATURE_DTYPES:
        raise ConfigError(f"feature dtype {feature_dtype!r} not supported; expected one of "
                         f"{cache.FEATURE_DTYPES}")
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    info, tv_weights = resolve_weights(model, weights, seed=seed)
    preprocessing = default_preprocessing(model, tv_weights).with_size(image_size)
    if dataset is None and isinstance(data, Dataset):
        dataset = data
    if dataset is None:
        dataset = load_dataset(data, recipe=SplitRecipe(val_fraction, split_seed, group_pattern),
                               cache_dir=cache_dir)
    key = cache.cache_key({"dataset": dataset.fingerprint, "model": model,
                           "weights": info.key(), "preprocessing": preprocessing.to_dict(),
                           "feature_dtype": feature_dtype})
    path = cache.entry_path(cache_dir, f"{dataset.name}-{model}-{info.tag}", key)
    return ExtractionPlan(dataset, model, info, str(weights), preprocessing, feature_dim(model),
                          feature_dtype, seed, key, path)


_PLAN_OPTIONS = ("cache_dir", "image_size", "feature_dtype", "val_fraction", "split_seed",
                 "group_pattern", "seed")
_RUN_OPTIONS = ("batch_size", "num_workers", "device", "skip_bad", "force", "progress")


def split_extract_options(options: dict) -> tuple:
    """``extract`` keyword options -> (those of ``plan_extraction``, those of the run)."""
    unknown = set(options) - set(_PLAN_OPTIONS) - set(_RUN_OPTIONS)
    if unknown:
        raise ConfigError(f"unknown extract options {sorted(unknown)}; expected some of "
                         f"{sorted(_PLAN_OPTIONS + _RUN_OPTIONS)}")
    return ({k: v for k, v in options.items() if k in _PLAN_OPTIONS},
            {k: v for k, v in options.items() if k in _RUN_OPTIONS})


def extract(data=None, model: str = "resnet18", *, weights: Union[str, Path, None] = "none",
            cache_dir: Union[str, Path, None] = None, image_size: Optional[int] = None,
            batch_size: int = 64, num_workers: Optional[int] = None, device: Optional[str] = None,
            feature_dtype: str = "float32", val_fraction: float = 0.1, split_seed: int = 0,
            group_pattern: Optional[str] = DEFAULT_GROUP_PATTERN, seed: int = 0,
            skip_bad: bool = False, force: bool = False, progress: bool = True,
            plan: Optional[ExtractionPlan] = None) -> Path:
    """Extract penultimate features of every split into the cache; return the entry's path.

    A complete entry with the same key (dataset content and split, model, weights,
    preprocessing, dtype) is reused without building the model. An interrupted run resumes
    from its last written batch. Concurrent runs for one entry wait for each other.

    Parameters
    ----------
    data : folder ``ROOT/{train,val,test}/CLASS/*``, MedMNIST-style ``.npz``, a built-in name,
        or a :class:`~xfeat.data.Dataset` already loaded (e.g. a ``subsample``).
    model : any torchvision classifier (``xfeat.list_backbones()``).
    weights : ``"none"``, ``"DEFAULT"``, a torchvision weights name, or a state-dict file.
    image_size : crop size override (tiny inputs for tests; default: the weights' own).
    num_workers : data-loader processes; default ``min(4, cpus - 1)``.
    skip_bad : record unreadable images (dropped by readers) instead of stopping.
    plan : a :class:`ExtractionPlan` from :func:`plan_extraction`; it then replaces ``data``,
        ``model``, ``weights`` and every other option that determines the features.
    """
    if plan is None:
        plan = plan_extraction(data, model, weights=weights, cache_dir=cache_dir,
                               image_size=image_size, feature_dtype=feature_dtype,
                               val_fraction=val_fraction, split_seed=split_seed,
                               group_pattern=group_pattern, seed=seed)
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size!r}: expected an integer >= 1")
    if distributed.is_distributed():
        return _extract_sharded(plan, batch_size=batch_size, num_workers=num_workers,
                                device=device, skip_bad=skip_bad, force=force,
                                progress=progress)
    if not force and cache.is_complete(plan.path):  # no lock: a read-only cache is usable
        logger.info("cache hit: %s (backbone not run)", plan.path)
        return plan.path
    with cache.entry_lock(plan.path):
        if force and plan.path.exists():
            plan.path.unlink()
        if cache.is_complete(plan.path):
            logger.info("cache hit: %s (backbone not run)", plan.path)
            return plan.path
        _run(plan, batch_size=batch_size, num_workers=num_workers, device=device,
             skip_bad=skip_bad, progress=progress)
        return plan.path


def _extract_sharded(plan: ExtractionPlan, *, batch_size, num_workers, device, skip_bad, force,
                     progress) -> Path:
    """Under torchrun: each rank extracts a contiguous block of every split into its own
    shard file (resumable like any entry); rank 0 then merges the shards, in order, into the
    entry a single process would have written, and marks it complete."""
    world = distributed.current_world()
    dev = distributed.init_process_group(resolve_device(device))
    if force and world.is_main and plan.path.exists():
        plan.path.unlink()
    distributed.barrier()
    if cache.is_complete(plan.path):
        logger.info("cache hit: %s (backbone not run)", plan.path)
        return plan.path
    shard_paths = [cache.shard_path(plan.path, r, world.size) for r in range(world.size)]
    rows = {name: distributed.shard_bounds(len(split), world.rank, world.size)
            for name, split in plan.dataset.splits.items()}
    shard_dataset = Dataset(
        name=plan.dataset.name, source=plan.dataset.source,
        class_names=plan.dataset.class_names, content_digest=plan.dataset.content_digest,
        split_info={**plan.dataset.split_info, "shard": [world.rank, world.size]},
        splits={name: split.subset(range(*rows[name])) for name, split in
                plan.dataset.splits.items()})
    shard = dataclasses.replace(plan, dataset=shard_dataset, path=shard_paths[world.rank],
                                key=f"{plan.key}/shard{world.rank}of{world.size}")
    with cache.entry_lock(shard.path):
        if not cache.is_complete(shard.path):
            _run(shard, batch_size=batch_size, num_workers=num_workers, device=str(dev),
                 skip_bad=skip_bad, progress=progress and world.is_main)
    distributed.barrier()
    if world.is_main:
        with cache.entry_lock(plan.path):
            if not cache.is_complete(plan.path):
                t0 = time.perf_counter()
                splits = {s: (sp.ids, sp.labels) for s, sp in plan.dataset.splits.items()}
                cache.merge_shards(plan.path, shard_paths, key=plan.key, meta=plan.meta,
                                   splits=splits, feature_dim=plan.feature_dim,
                                   dtype=plan.feature_dtype)
                logger.info("merged %d shards into %s in %.2f s", world.size, plan.path.name,
                            time.perf_counter() - t0)
    distributed.barrier()
    return plan.path


def _run(plan: ExtractionPlan, *, batch_size: int, num_workers: Optional[int],
         device: Optional[str], skip_bad: bool, progress: bool) -> None:
    dev = resolve_device(device)
    # Build (and download) first, so a failure here leaves no partial file behind.
    backbone = create_backbone(plan.model, plan.weights_arg, seed=plan.seed)
    backbone.preprocessing = plan.preprocessing
    if plan.weights.kind == "file" and backbone.weights.sha256 != plan.weights.sha256:
        raise cache.CacheError(f"weights file {plan.weights.id} changed while extracting")
    meta = plan.meta
    meta["weights"]["sha256"] = backbone.weights.sha256
    backbone.model.to(dev)
    if dev.type == "cuda":
        backbone.model.to(memory_format=torch.channels_last)
    splits = plan.dataset.splits
    writer = cache.CacheWriter(plan.path, key=plan.key, meta=meta,
                               splits={s: (sp.ids, sp.labels) for s, sp in splits.items()},
                               feature_dim=plan.feature_dim, dtype=plan.feature_dtype)
    try:
        stats = {}
        for name, split in splits.items():
            start = writer.rows_done(name)
            if start < len(split):
                stats[name] = _extract_split(backbone, split, writer, start=start, device=dev,
                                             batch_size=batch_size, num_workers=num_workers,
                                             skip_bad=skip_bad, progress=progress)
            else:
                stats[name] = {"resumed_from_row": start, "images": 0}
            total = float(writer.file[name]["seconds"][0])
            stats[name]["seconds_total"] = total
            stats[name]["images_per_second"] = len(split) / total if total else None
        writer.finalize(stats)
    finally:
        writer.close()


class _SplitImages(torch.utils.data.Dataset):
    """Decoded, resized and cropped uint8 images of one split, from row ``start`` on."""

    def __init__(self, split: Split, preprocessing: Preprocessing, start: int = 0):
        self.split, self.preprocessing, self.start = split, preprocessing, start

    def __len__(self) -> int:
        return len(self.split) - self.start

    def __getitem__(self, i: int):
        row = self.start + i
        size = self.preprocessing.crop_size
        try:
            image = self.split.read_image(row, draft_size=self.preprocessing.resize_size,
                                          exif_transpose=self.preprocessing.exif_transpose)
            array = self.preprocessing.resize_and_crop(image)
            error = ""
        except ImageReadError as exc:
            array, error = np.zeros((size, size, 3), dtype=np.uint8), exc.reason
        return torch.from_numpy(array).permute(2, 0, 1), error


@torch.inference_mode()
def _extract_split(backbone: Backbone, split: Split, writer: cache.CacheWriter, *, start: int,
                   device: torch.device, batch_size: int, num_workers: Optional[int],
                   skip_bad: bool, progress: bool) -> dict:
    loader = make_loader(_SplitImages(split, backbone.preprocessing, start),
                         batch_size=batch_size, num_workers=num_workers, device=device)
    wait = forward = write = 0.0
    row = start
    t_start = time.perf_counter()
    bar = tqdm(total=len(split), initial=start, unit="img", desc=f"{backbone.name} {split.name}",
               disable=not progress, dynamic_ncols=True)
    t0 = time.perf_counter()
    for images, errors in loader:
        t1 = time.perf_counter()
        ok = np.array([not e for e in errors])
        if not ok.all() and not skip_bad:
            raise ImageReadError(*_first_error(split, row, errors))
        for i in np.flatnonzero(~ok):
            logger.warning("skipping unreadable image %s: %s", _sample_path(split, row + i),
                           errors[i])
        x = backbone.preprocessing.normalize(images.to(device, non_blocking=True))
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        features = backbone.model(x).float().cpu().numpy()
        t2 = time.perf_counter()
        features[~ok] = np.nan
        writer.write(split.name, row, features, ok, seconds=t2 - t0 + (time.perf_counter() - t2))
        t3 = time.perf_counter()
        wait, forward, write = wait + (t1 - t0), forward + (t2 - t1), write + (t3 - t2)
        row += len(features)
        bar.update(len(features))
        t0 = t3
    bar.close()
    elapsed = time.perf_counter() - t_start
    n = len(split) - start
    logger.info("%s: %d images in %.1f s (%.1f img/s; waiting for data %.1f s, forward %.1f s, "
                "write %.1f s)", split.name, n, elapsed, n / elapsed if elapsed else 0, wait,
                forward, write)
    return {"resumed_from_row": start, "images": n, "seconds": elapsed,
            "data_wait_seconds": wait, "forward_seconds": forward, "write_seconds": write,
            "device": str(device), "batch_size": batch_size}


def _first_error(split: Split, row: int, errors) -> tuple:
    i = next(i for i, e in enumerate(errors) if e)
    return _sample_path(split, row + i), errors[i]


def _sample_path(split: Split, row: int) -> str:
    return split.paths[row] if split.paths is not None else split.ids[row]


@torch.inference_mode()
def embed_files(backbone: Backbone, paths, *, batch_size: int = 32,
                num_workers: Optional[int] = None, device: Optional[str] = None,
                progress: bool = True):
    """Outputs of ``backbone.model`` for image files: ``(array (N, D) with NaN rows, errors)``.

    An unreadable file gives a NaN row and its error message instead of stopping the rest.
    """
    dev = resolve_device(device)
    backbone.model.to(dev).eval()
    split = Split("files", [str(p) for p in paths], np.zeros(len(paths), dtype=np.int64),
                  paths=[str(p) for p in paths])
    loader = make_loader(_SplitImages(split, backbone.preprocessing), batch_size=batch_size,
                         num_workers=num_workers, device=dev)
    features, errors = [], []
    with tqdm(total=len(split), unit="img", desc=backbone.name, disable=not progress) as bar:
        for images, errs in loader:
            out = backbone.model(backbone.preprocessing.normalize(images.to(dev))).float().cpu()
            out = out.numpy()
            out[[bool(e) for e in errs]] = np.nan
            features.append(out)
            base = len(errors)
            errors += [f"cannot read image {split.paths[base + i]}: {e}" if e else ""
                       for i, e in enumerate(errs)]
            bar.update(len(errs))
    return (np.concatenate(features) if features else np.zeros((0, 0), np.float32)), errors
