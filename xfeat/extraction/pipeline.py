"""The one pass: images -> backbone -> HDF5 cache, resumable, timed per stage.

``plan_extraction`` resolves everything that determines the features (dataset content and
split, model, weights, preprocessing, blocks, views, precision, dtype) into a cache key
without building the model; ``extract`` reuses a complete entry for that key or fills it
batch by batch (see :mod:`xfeat.extraction.forward` for the pass itself).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from xfeat import __version__, cache
from xfeat.backbones import (
    Preprocessing,
    WeightsInfo,
    create_backbone,
    default_preprocessing,
    normalize_name,
    resolve_weights,
)
from xfeat.config import (
    INT8_CALIBRATION_IMAGES,
    PRECISIONS,
    ExtractConfig,
    default_cache_dir,
)
from xfeat.data import Dataset, load_dataset, split_patients
from xfeat.errors import ConfigError
from xfeat.extraction import distributed
from xfeat.extraction.allocator import freed_memory_kept
from xfeat.extraction.blocks import parse_layers, resolve_blocks
from xfeat.extraction.options import split_extract_options  # noqa: F401  (re-exported)
from xfeat.extraction.runtime import (
    FOUNDATION_PREFIXES,
    check_compile,
    decode_ahead,
    inference_batches,
    resolve_device,
    should_compile,
    stop_decoding,
)
from xfeat.extraction.view_names import parse_tta, train_views, tta_views

logger = logging.getLogger(__name__)


@dataclass
class ExtractionPlan:
    """Everything that determines a cache entry, resolved before any model is built."""

    dataset: Dataset
    model: str
    weights: WeightsInfo
    weights_arg: str
    preprocessing: Preprocessing
    blocks: list  # [(name, dim)]
    feature_dtype: str
    seed: int
    key: str
    path: Path
    views: int = 0
    tta: tuple = ()
    precision: str = "fp32"
    layers: tuple = ("penultimate",)
    groups: dict = field(default_factory=dict)  # cache group -> (base split, view or None)

    @property
    def feature_dim(self) -> int:
        return sum(dim for _, dim in self.blocks)

    def meta(self, weights_sha256: Optional[str] = None) -> cache.CacheMeta:
        """The entry's metadata; ``weights_sha256`` as the built backbone reports it."""
        import torchvision

        ds = self.dataset
        return cache.CacheMeta(
            dataset=cache.DatasetRecord(
                name=ds.name,
                source=ds.source,
                fingerprint=ds.fingerprint,
                content_digest=ds.content_digest,
                counts=ds.counts(),
            ),
            split=ds.split_info,
            data=ds.spec,
            class_names=tuple(ds.class_names),
            model=self.model,
            feature_dim=self.feature_dim,
            blocks=tuple(tuple(b) for b in self.blocks),
            layers=tuple(self.layers),
            views=cache.ViewsRecord(self.views, tuple(self.tta), self.seed),
            precision=self.precision,
            feature_dtype=self.feature_dtype,
            weights=cache.WeightsRecord(
                kind=self.weights.kind,
                id=self.weights.id,
                sha256=weights_sha256 or self.weights.sha256,
                url=self.weights.url,
                seed=self.seed if self.weights.kind == "random" else None,
            ),
            preprocessing=self.preprocessing.to_dict(),
            versions={
                "xfeat": __version__,
                "torch": torch.__version__,
                "torchvision": torchvision.__version__,
                "numpy": np.__version__,
                **foundation_versions(self.model),
            },
            created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        )


def foundation_versions(model: str) -> dict:
    """The versions of transformers / open_clip for their models (they shape the features)."""
    from importlib import metadata

    package = {"hf:": "transformers", "open_clip:": "open_clip_torch"}
    for prefix, name in package.items():
        if model.startswith(prefix):
            try:
                return {name: metadata.version(name)}
            except metadata.PackageNotFoundError:
                return {}
    return {}


def plan_extraction(
    data,
    model: str = "resnet18",
    *,
    weights: Union[str, Path, None] = "none",
    cache_dir: Union[str, Path, None] = None,
    image_size: Optional[int] = None,
    feature_dtype: str = "float32",
    seed: int = 0,
    dataset: Optional[Dataset] = None,
    resize_size: Optional[int] = None,
    mean: Optional[tuple] = None,
    std: Optional[tuple] = None,
    resize_mode: Optional[str] = None,
    dicom_window: Optional[str] = None,
    dicom_frame: Optional[int] = None,
    skip_bad: bool = False,
    layers="penultimate",
    views: int = 0,
    tta=None,
    precision: str = "fp32",
    batch_size: Optional[int] = None,
) -> ExtractionPlan:
    """Resolve the dataset, weights, preprocessing and blocks into a cache key and path.

    ``image_size`` (the crop), ``resize_size``, ``mean``, ``std`` and ``resize_mode``
    (``crop``, ``stretch`` or ``pad``, see :data:`xfeat.backbones.preprocessing.RESIZE_MODES`)
    override the weights' own preprocessing (e.g. for a ``torchscript:PATH`` model without a
    sidecar JSON, or for data that were squashed to a square: ``stretch``).
    ``dicom_window`` (``file``, ``minmax``, ``none``) and ``dicom_frame`` say how DICOM files
    are shown (:class:`xfeat.data.dicom.DicomOptions`); both are part of the preprocessing.
    ``batch_size`` matters only to int8, whose calibration batches are that size.
    ``skip_bad``: a label table may name missing files (extraction records them as unreadable).
    """
    if feature_dtype not in cache.FEATURE_DTYPES:
        raise ConfigError(
            f"feature dtype {feature_dtype!r} not supported; expected one of {cache.FEATURE_DTYPES}"
        )
    if precision not in PRECISIONS:
        raise ConfigError(f"precision={precision!r}: expected one of {', '.join(PRECISIONS)}")
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    model = normalize_name(model)
    info, tv_weights = resolve_weights(model, weights, seed=seed, digest_memo=cache_dir)
    preprocessing = (
        default_preprocessing(model, tv_weights)
        .with_size(image_size, resize_size)
        .with_normalization(mean, std)
        .with_resize_mode(resize_mode)
        .with_dicom(dicom_window, dicom_frame)
    )
    layers, tta = parse_layers(layers), parse_tta(tta)
    blocks = resolve_blocks(model, layers, preprocessing.crop_size)
    view_names = train_views(views)
    if dataset is None:
        dataset = (
            data
            if isinstance(data, Dataset)
            else load_dataset(data, cache_dir=cache_dir, allow_missing=skip_bad)
        )
    groups = {s: (s, None) for s in dataset.splits}
    groups.update({f"train.{v}": ("train", v) for v in view_names})
    groups.update(
        {f"{s}.{v}": (s, v) for s in ("val", "test") if s in dataset.splits for v in tta_views(tta)}
    )
    fields = {
        "dataset": dataset.fingerprint,
        "model": model,
        "weights": info.key(),
        "preprocessing": preprocessing.to_dict(),
        "feature_dtype": feature_dtype,
        "blocks": [name for name, _ in blocks],
        "views": view_names,
        "tta": list(tta),
    }
    if views:
        fields["view_seed"] = seed
    if precision != "fp32":
        fields["precision"] = {
            "kind": precision,
            "calibration": INT8_CALIBRATION_IMAGES,
            "batch_size": batch_size or ExtractConfig().batch_size,
        }
    key = cache.cache_key(fields)
    path = cache.entry_path(cache_dir, f"{dataset.name}-{model}-{info.tag}", key)
    return ExtractionPlan(
        dataset,
        model,
        info,
        str(weights),
        preprocessing,
        blocks,
        feature_dtype,
        seed,
        key,
        path,
        views=views,
        tta=tta,
        precision=precision,
        layers=layers,
        groups=groups,
    )


def extract(
    data=None,
    model: str = "resnet18",
    *,
    weights: Union[str, Path, None] = "none",
    batch_size: int = 64,
    num_workers: Optional[int] = None,
    device: Optional[str] = None,
    skip_bad: bool = False,
    force: bool = False,
    compile="auto",
    channels_last: Optional[bool] = None,
    progress: bool = True,
    plan: Optional[ExtractionPlan] = None,
    **plan_options,
) -> Path:
    """Extract features of every split into the cache; return the entry's path.

    A complete entry with the same key (dataset content and split, model, weights,
    preprocessing, blocks, views, precision, dtype) is reused without building the model. An
    interrupted run resumes from its last written batch. Concurrent runs for one entry wait
    for each other.

    Parameters
    ----------
    data : a :class:`~xfeat.config.DataSpec` (the source and its validation carve-out), or
        its source alone: a folder ``ROOT/{train,val,test}/CLASS/*``, a MedMNIST-style
        ``.npz``, a built-in name,
        or a :class:`~xfeat.data.dataset.Dataset` already loaded (e.g. a ``subsample``).
    model : a torchvision classifier (``xfeat.list_backbones()``), ``timm:NAME``,
        ``torchscript:PATH`` or ``inception_v3_fid``.
    weights : ``"none"``, ``"DEFAULT"``, a torchvision weights name, or a state-dict file.
    layers : ``"penultimate"`` (default), ``"stages"``, or ``"node,node,..."``: the feature
        blocks cached, each global-average-pooled (see :mod:`xfeat.extraction.blocks`).
    views : augmented views cached per train image (the fine-tuning augmentation, seeded).
    tta : ``"flip"``, ``"crops"`` or ``"flip,crops"``: test-time views of val and test.
    precision : ``"fp32"`` or ``"int8"`` (CPU; quantized after calibration on train images).
    compile : ``"auto"`` (compile when there are enough images to amortise it), ``"on"``,
        ``"off"``. ``channels_last``: None picks the faster layout for the model family.
    skip_bad : record unreadable images (dropped by readers) instead of stopping.
    plan : a :class:`ExtractionPlan` from :func:`plan_extraction`; it then replaces ``data``,
        ``model``, ``weights`` and every option of ``plan_options``.
    **plan_options : cache_dir, image_size, resize_size, mean, std, resize_mode, feature_dtype, layers,
        views, tta, precision, seed.
    """
    if plan is None:
        plan = plan_extraction(
            data, model, weights=weights, batch_size=batch_size, skip_bad=skip_bad, **plan_options
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size={batch_size!r}: expected an integer >= 1")
    should_compile(compile, 0)  # a bad value fails now, not after the dataset is read
    check_compile(plan.model, compile)
    if plan.precision == "int8":
        from xfeat.extraction.quantize import check_int8

        check_int8(plan.model, resolve_device(device))
    run = dict(
        batch_size=batch_size,
        num_workers=num_workers,
        skip_bad=skip_bad,
        compile=compile,
        channels_last=channels_last,
        progress=progress,
    )
    if distributed.is_distributed():
        if plan.precision == "int8":
            raise ConfigError(
                "--precision int8 calibrates on one process's train images; run "
                "it without torchrun (or extract fp32 under torchrun)"
            )
        return _extract_sharded(plan, device=device, force=force, **run)
    if not force and cache.is_complete(plan.path):  # no lock: a read-only cache is usable
        logger.info("cache hit: %s (backbone not run)", plan.path)
        return plan.path
    with cache.entry_lock(plan.path):
        if force:  # recompute: neither a complete entry nor an interrupted one is reused
            plan.path.unlink(missing_ok=True)
            cache.partial_path(plan.path).unlink(missing_ok=True)
        if cache.is_complete(plan.path):
            logger.info("cache hit: %s (backbone not run)", plan.path)
            return plan.path
        _run(plan, device=device, **run)
        return plan.path


def _extract_sharded(plan: ExtractionPlan, *, device, force, **run) -> Path:
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
    rows = {
        name: distributed.shard_bounds(len(split), world.rank, world.size)
        for name, split in plan.dataset.splits.items()
    }
    shard_dataset = Dataset(
        name=plan.dataset.name,
        source=plan.dataset.source,
        class_names=plan.dataset.class_names,
        content_digest=plan.dataset.content_digest,
        split_info={**plan.dataset.split_info, "shard": [world.rank, world.size]},
        splits={name: split.subset(range(*rows[name])) for name, split in plan.dataset.splits.items()},
    )
    shard = dataclasses.replace(
        plan,
        dataset=shard_dataset,
        path=shard_paths[world.rank],
        key=f"{plan.key}/shard{world.rank}of{world.size}",
    )
    with cache.entry_lock(shard.path):
        if not cache.is_complete(shard.path):
            _run(shard, device=str(dev), **{**run, "progress": run["progress"] and world.is_main})
    distributed.barrier()
    if world.is_main:
        with cache.entry_lock(plan.path):
            if not cache.is_complete(plan.path):
                t0 = time.perf_counter()
                cache.merge_shards(
                    plan.path,
                    shard_paths,
                    key=plan.key,
                    meta=plan.meta(),
                    splits=_group_rows(plan),
                    blocks=plan.blocks,
                    dtype=plan.feature_dtype,
                )
                logger.info(
                    "merged %d shards into %s in %.2f s",
                    world.size,
                    plan.path.name,
                    time.perf_counter() - t0,
                )
    distributed.barrier()
    return plan.path


def _group_rows(plan: ExtractionPlan) -> dict:
    """``{cache group: (ids, labels, patients)}``: every view holds its base split's images."""
    splits, spec = plan.dataset.splits, plan.dataset.spec
    patients = {s: split_patients(split, spec) for s, split in splits.items()}
    return {
        g: (splits[base].ids, splits[base].labels, patients[base])
        for g, (base, _) in plan.groups.items()
    }


@freed_memory_kept()  # every batch reuses the previous one's memory
def _run(
    plan: ExtractionPlan,
    *,
    batch_size: int,
    num_workers: Optional[int],
    device: Optional[str],
    skip_bad: bool,
    compile,
    channels_last: Optional[bool],
    progress: bool,
) -> None:
    from xfeat.extraction.forward import Runner, extract_group
    from xfeat.extraction.views import ViewImages

    dev = resolve_device(device)
    # Build (and download) first, so a failure here leaves no partial file behind.
    backbone = create_backbone(plan.model, plan.weights_arg, seed=plan.seed)
    backbone.preprocessing = plan.preprocessing
    if plan.weights.kind in ("file", "torchscript") and backbone.weights.sha256 != plan.weights.sha256:
        raise cache.CacheError(f"weights file {plan.weights.id} changed while extracting")
    writer = cache.CacheWriter(
        plan.path,
        key=plan.key,
        meta=plan.meta(backbone.weights.sha256),
        splits=_group_rows(plan),
        blocks=plan.blocks,
        dtype=plan.feature_dtype,
    )
    todo = {}  # {group: the loader of its images still to do}
    try:
        # decoded ahead from here on: the first batches while the model is made ready, each
        # next split's (or view's) while the last batch of the one before runs
        for group, (base, view) in plan.groups.items():
            start, split = writer.rows_done(group), plan.dataset.splits[base]
            if start < len(split):
                images = ViewImages(split, plan.preprocessing, view, seed=plan.seed, start=start)
                todo[group] = inference_batches(
                    images, batch_size=batch_size, num_workers=num_workers, device=dev
                )
        decode_ahead(list(todo.values()))
        # Decided on the whole entry, so that a resumed run computes the rest the same way.
        total = sum(writer.n_rows(g) for g in plan.groups)
        compiled = should_compile(compile, total) or plan.precision == "int8"
        compiled = compiled and not plan.model.startswith(FOUNDATION_PREFIXES)
        if compiled and compile == "auto":
            logger.info("compiling the model: %d images in the entry (--compile off to skip)", total)
        runner = Runner(
            backbone,
            plan.blocks,
            dev,
            batch_size=batch_size,
            channels_last=channels_last,
            compile=compiled,
            cache_dir=plan.path.parent,
            precision=plan.precision,
            calibration=_calibration_images(plan) if plan.precision == "int8" else None,
        )
        stats = {}
        for group, (base, _) in plan.groups.items():
            start, split = writer.rows_done(group), plan.dataset.splits[base]
            stats[group] = {"resumed_from_row": start, "images": 0}
            if group in todo:
                stats[group] = extract_group(
                    runner,
                    todo[group],
                    writer,
                    group,
                    start=start,
                    batch_size=batch_size,
                    skip_bad=skip_bad,
                    progress=progress,
                )
            total = float(writer.file[group]["seconds"][0])
            stats[group].update(
                seconds_total=total, images_per_second=len(split) / total if total else None
            )
        writer.finalize(stats)
    finally:
        stop_decoding(todo.values())
        writer.close()


def _calibration_images(plan: ExtractionPlan):
    """The first train images (centre crops), uint8 NCHW, for int8 calibration."""
    from xfeat.extraction.views import ViewImages

    split = plan.dataset.splits["train"]
    n = min(INT8_CALIBRATION_IMAGES, len(split))
    images = ViewImages(split.subset(range(n)), plan.preprocessing)
    return torch.stack([images[i][0] for i in range(n)])  # (crop, error, stats)[0]
