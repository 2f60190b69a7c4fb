"""Features for this data: the one prologue of every command that reads a feature cache.

``load_features`` extracts (or reuses) the cache of ``data`` with ``model`` and ``weights``, or
reads the cache it is given, checks that it holds the splits the caller needs and, when data
is given too, that the cache was made from exactly that data. ``load_matching_dataset`` finds
the images behind a cache (for the analyses that read pixels).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from xfeat import cache as cache_io
from xfeat.config import DataSpec
from xfeat.data import Dataset, load_dataset
from xfeat.errors import ConfigError, DataError

logger = logging.getLogger(__name__)


@dataclass
class Features:
    """A feature cache read into memory, whether it was a cache hit, and its dataset."""

    features: cache_io.FeatureSet
    cache_hit: bool
    dataset: Optional[Dataset] = None


def load_features(
    data=None,
    model: str = "resnet18",
    *,
    weights="none",
    cache=None,
    extract_options: Optional[dict] = None,
    need: Sequence[str] = ("train", "val"),
    blocks: Optional[Sequence[str]] = None,
    with_dataset: bool = False,
    command: str = "this command",
) -> Features:
    """The features of ``data`` (extracted or reused) or of ``cache`` (a file or FeatureSet).

    Several backbones at once: ``model="a+b"`` (``weights`` one value for all, or
    ``"a=W,b=W"``) or ``cache=[A.h5, B.h5]``: the caches must hold the same images, split by
    split; their blocks are put side by side, named ``MODEL:BLOCK``.

    ``need``: splits that must be there. ``blocks``: the blocks to use (default all).
    ``with_dataset``: also return the dataset behind the cache (reloaded from its recorded
    source when only ``cache`` is given). A ``cache`` given together with ``data`` must have
    been made from that data.
    """
    options = dict(extract_options or {})
    caches = list(cache) if isinstance(cache, (list, tuple)) else [cache]
    dataset, hit, listed = None, True, False
    if cache is None:
        if data is None:
            raise ConfigError(f"{command} needs data= (to build or reuse a cache) or cache=")
        caches, hit, dataset = _extract_all(data, model, weights, options)
        listed = dataset is None  # every entry found by the data's listing: the same files
    sets = [
        c
        if isinstance(c, cache_io.FeatureSet)
        else cache_io.read_cache(c, blocks=None if len(caches) > 1 else blocks)
        for c in caches
    ]
    if len(sets) > 1:
        features = merge_feature_sets(sets, blocks)
    else:
        features = select_blocks(sets[0], blocks) if blocks else sets[0]
    missing = [s for s in need if s not in features.splits]
    if missing:
        raise cache_io.CacheError(
            f"{features.path} has no {missing[0]!r} split; {command} needs {', '.join(need)}"
        )
    if dataset is None and (with_dataset or (data is not None and not listed)):
        dataset = load_matching_dataset(
            features.meta,
            data,
            ids={s: sp.ids + features.skipped.get(s, []) for s, sp in features.splits.items()},
            cache_dir=options.get("cache_dir"),
        )
    return Features(features, hit, dataset if with_dataset else None)


def _extract_all(data, model: str, weights, options: dict):
    """Extract (or reuse) the cache of every backbone in ``model`` ("a+b"): ``(paths, hit,
    dataset)``, the dataset None when every entry was found by the data's listing."""
    from xfeat.config import parse_weights
    from xfeat.extraction.entry import find_entry, remember, request_signature
    from xfeat.extraction.options import split_extract_options

    models = [m for m in str(model).split("+") if m]
    weights_by_model = (
        parse_weights(weights, models)
        if isinstance(weights, dict) or "=" in str(weights)
        else {m: weights for m in models}
    )
    plan_options, run_options = split_extract_options(options)
    paths, hit, dataset = [], True, None
    for m in models:
        signature = None
        if dataset is None and not run_options.get("force"):
            signature = request_signature(
                data,
                m,
                weights_by_model[m],
                {**options, "batch_size": run_options.get("batch_size", 64)},
            )
            found = find_entry(signature, options.get("cache_dir"))
            if found is not None:  # answered from the cache index: no torch, no image read
                paths.append(found)
                continue
        from xfeat.extraction.pipeline import extract, plan_extraction

        plan = plan_extraction(
            data if dataset is None else dataset,
            m,
            weights=weights_by_model[m],
            batch_size=run_options.get("batch_size"),
            skip_bad=run_options.get("skip_bad", False),
            **plan_options,
        )
        hit = hit and cache_io.is_complete(plan.path)
        paths.append(extract(plan=plan, **run_options))
        remember(signature, paths[-1], options.get("cache_dir"))
        dataset = plan.dataset
    return paths, hit, dataset


def select_blocks(features, blocks: Sequence[str]):
    """A FeatureSet with only ``blocks`` (in that order) of one already in memory."""
    have = [b for b, _ in features.blocks]
    if list(blocks) == have:
        return features
    missing = [b for b in blocks if b not in have]
    if missing:
        raise cache_io.CacheError(
            f"{features.path} has no feature block {missing[0]!r}; it has "
            f"{have} (extract again with --layers to add blocks)"
        )
    starts = dict(zip(have, np.cumsum([0] + [d for _, d in features.blocks])))
    dims = dict(features.blocks)

    def part(p):
        cols = np.concatenate([np.arange(starts[b], starts[b] + dims[b]) for b in blocks])
        return cache_io.SplitFeatures(
            p.features[:, cols], p.labels, p.ids, p.seconds, [(b, dims[b]) for b in blocks]
        )

    result = cache_io.FeatureSet(features.path, features.key, features.meta, skipped=features.skipped)
    result.splits = {s: part(p) for s, p in features.splits.items()}
    result.views = {b: {v: part(p) for v, p in views.items()} for b, views in features.views.items()}
    return result


def merge_feature_sets(sets: list, blocks: Optional[Sequence[str]] = None):
    """Several caches of the same images as one FeatureSet, blocks side by side."""
    first = sets[0]
    for other in sets[1:]:
        if other.meta.dataset.fingerprint != first.meta.dataset.fingerprint:
            raise cache_io.CacheError(
                f"{other.path.name} and {first.path.name} do not hold the same images (their "
                "data or split differ); extract both from the same data and split"
            )
        for split, part in first.splits.items():
            theirs = other.splits.get(split)
            if theirs is None or theirs.ids != part.ids:
                raise cache_io.CacheError(
                    f"{other.path.name} and {first.path.name} do not hold the same {split} "
                    "images (ids differ); extract both from the same data and split"
                )
    models = [fs.meta.model for fs in sets]
    if len(set(models)) != len(models):
        raise ConfigError(
            f"the caches come from models {models}: each backbone may appear once "
            "(their blocks are named MODEL:BLOCK)"
        )
    names = [f"{fs.meta.model}:{b}" for fs in sets for b, _ in fs.blocks]
    chosen = list(blocks) if blocks else names
    unknown = [b for b in chosen if b not in names]
    if unknown:
        raise ConfigError(f"no block {unknown[0]!r} among {names}")

    def merged(parts: list) -> cache_io.SplitFeatures:
        columns, dims = {}, []
        for fs_part, fs in zip(parts, sets):
            start = 0
            for b, d in fs_part.blocks:
                columns[f"{fs.meta.model}:{b}"] = fs_part.features[:, start : start + d]
                start += d
        dims = [(b, columns[b].shape[1]) for b in chosen]
        return cache_io.SplitFeatures(
            np.concatenate([columns[b] for b in chosen], axis=1),
            parts[0].labels,
            parts[0].ids,
            max(p.seconds for p in parts),
            dims,
        )

    splits = {s: merged([fs.splits[s] for fs in sets]) for s in first.splits}
    merged_blocks = tuple(tuple(b) for b in next(iter(splits.values())).blocks)
    meta = first.meta.with_(
        model="+".join(fs.meta.model for fs in sets),
        sources=tuple(
            cache_io.SourceRecord(
                fs.meta.model, fs.meta.weights, fs.meta.preprocessing, fs.meta.blocks, fs.key
            )
            for fs in sets
        ),
        blocks=merged_blocks,
        feature_dim=sum(d for _, d in merged_blocks),
    )
    result = cache_io.FeatureSet(
        first.path, "+".join(fs.key for fs in sets), meta, skipped=first.skipped
    )
    result.splits = splits
    for base, views in first.views.items():
        common = [v for v in views if all(v in fs.views.get(base, {}) for fs in sets)]
        result.views[base] = {v: merged([fs.views[base][v] for fs in sets]) for v in common}
    return result


def load_matching_dataset(
    meta: cache_io.CacheMeta, data=None, *, ids: Optional[dict] = None, cache_dir=None
) -> Dataset:
    """The dataset a cache was made from (``data``, else its recorded source), verified.

    ``data`` may be a path, a built-in name, a :class:`~xfeat.config.DataSpec` or a
    :class:`~xfeat.data.Dataset`. A path or name is loaded with the cache's recorded data
    spec (its validation carve-out), and a different content or split fingerprint is refused.
    A cache of a subsample (``--quick``) reloaded from its source cannot be fingerprinted
    again: its images are then picked from the source by the cache's ``ids`` ({split: ids}),
    and every id must be there.
    """
    if isinstance(data, Dataset):
        dataset, source = data, data.source
    else:
        recorded = meta.data_spec()
        if data is None:
            spec = recorded.with_source(meta.dataset.source)
        elif isinstance(data, DataSpec):
            spec = data
        else:
            spec = recorded.with_source(data)
        source = spec.source
        try:
            dataset = load_dataset(spec, cache_dir=cache_dir)
        except DataError as exc:
            if data is not None:
                raise
            raise DataError(
                f"the cache was made from {source}, which cannot be loaded now "
                f"({exc}); pass data= with the images it was made from"
            ) from None
    if dataset.fingerprint == meta.dataset.fingerprint:
        return dataset
    if "subsample" in meta.split and ids is not None and not isinstance(data, Dataset):
        return _select_ids(dataset, meta, ids)
    raise cache_io.CacheError(
        f"the cache {meta.key[:16]} was made from different data than {source} "
        "(its content or split changed); run without cache= (--cache) to extract a fresh one"
    )


def _select_ids(dataset: Dataset, meta: cache_io.CacheMeta, ids: dict) -> Dataset:
    splits = {}
    for name, wanted in ids.items():
        split = dataset.splits.get(name)
        index = {i: k for k, i in enumerate(split.ids)} if split is not None else {}
        missing = [i for i in wanted if i not in index]
        if missing:
            raise cache_io.CacheError(
                f"the cache {meta.key[:16]} is a subsample of {dataset.source}, but "
                f"{len(missing)} of its {name} images are not there now (e.g. {missing[0]}); "
                "run without cache= (--cache) to extract a fresh one"
            )
        splits[name] = split.subset([index[i] for i in wanted])
    logger.warning(
        "the cache is a subsample of %s: its images were matched by id, and their "
        "content cannot be verified against the cache's fingerprint",
        dataset.source,
    )
    return Dataset(
        name=meta.dataset.name,
        source=dataset.source,
        class_names=dataset.class_names,
        splits=splits,
        content_digest=meta.dataset.content_digest,
        split_info=meta.split,
        spec=dataset.spec,
    )
