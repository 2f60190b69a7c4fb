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

from . import cache as cache_io
from .data import DataError, Dataset, SplitRecipe, load_dataset
from .errors import ConfigError

logger = logging.getLogger(__name__)


@dataclass
class Features:
    """A feature cache read into memory, whether it was a cache hit, and its dataset."""

    features: cache_io.FeatureSet
    cache_hit: bool
    dataset: Optional[Dataset] = None


def load_features(data=None, model: str = "resnet18", *, weights="none", cache=None,
                  extract_options: Optional[dict] = None, need: Sequence[str] = ("train", "val"),
                  with_dataset: bool = False, command: str = "this command") -> Features:
    """The features of ``data`` (extracted or reused) or of ``cache`` (a file or FeatureSet).

    ``need``: splits that must be there. ``with_dataset``: also return the dataset behind the
    cache (reloaded from its recorded source when only ``cache`` is given). A ``cache`` given
    together with ``data`` must have been made from that data.
    """
    from .extract import extract, plan_extraction, split_extract_options

    options = dict(extract_options or {})
    dataset, hit = None, True
    if cache is None:
        if data is None:
            raise ConfigError(f"{command} needs data= (to build or reuse a cache) or cache=")
        plan_options, run_options = split_extract_options(options)
        plan = plan_extraction(data, model, weights=weights, **plan_options)
        hit = cache_io.is_complete(plan.path)
        cache = extract(plan=plan, **run_options)
        dataset = plan.dataset
    features = cache if isinstance(cache, cache_io.FeatureSet) else cache_io.read_cache(cache)
    missing = [s for s in need if s not in features.splits]
    if missing:
        raise cache_io.CacheError(f"{features.path} has no {missing[0]!r} split; {command} "
                                  f"needs {', '.join(need)}")
    if dataset is None and (with_dataset or data is not None):
        dataset = load_matching_dataset(
            features.meta, data, ids={s: sp.ids + features.skipped.get(s, [])
                                      for s, sp in features.splits.items()},
            cache_dir=options.get("cache_dir"))
    return Features(features, hit, dataset if with_dataset else None)


def load_matching_dataset(meta: dict, data=None, *, ids: Optional[dict] = None,
                          cache_dir=None) -> Dataset:
    """The dataset a cache was made from (``data``, else its recorded source), verified.

    ``data`` may be a path, a built-in name or a :class:`~xfeat.data.Dataset`. The split
    recipe is rebuilt from the cache's metadata, and a
    different content or split fingerprint is refused. A cache of a subsample (``--quick``)
    reloaded from its source cannot be fingerprinted again: its images are then picked from
    the source by the cache's ``ids`` ({split: ids}), and every id must be there.
    """
    if isinstance(data, Dataset):
        dataset, source = data, data.source
    else:
        recipe = SplitRecipe.from_split_info(meta["split"])
        source = data if data is not None else meta["dataset"]["source"]
        try:
            dataset = load_dataset(source, recipe=recipe, cache_dir=cache_dir)
        except DataError as exc:
            if data is not None:
                raise
            raise DataError(f"the cache was made from {source}, which cannot be loaded now "
                            f"({exc}); pass data= with the images it was made from") from None
    if dataset.fingerprint == meta["dataset"]["fingerprint"]:
        return dataset
    if "subsample" in meta["split"] and ids is not None and not isinstance(data, Dataset):
        return _select_ids(dataset, meta, ids)
    raise cache_io.CacheError(
        f"the cache {meta.get('key', '')[:16]} was made from different data than {source} "
        "(its content or split changed); run without cache= (--cache) to extract a fresh one")


def _select_ids(dataset: Dataset, meta: dict, ids: dict) -> Dataset:
    splits = {}
    for name, wanted in ids.items():
        split = dataset.splits.get(name)
        index = {i: k for k, i in enumerate(split.ids)} if split is not None else {}
        missing = [i for i in wanted if i not in index]
        if missing:
            raise cache_io.CacheError(
                f"the cache {meta.get('key', '')[:16]} is a subsample of {dataset.source}, but "
                f"{len(missing)} of its {name} images are not there now (e.g. {missing[0]}); "
                "run without cache= (--cache) to extract a fresh one")
        splits[name] = split.subset([index[i] for i in wanted])
    logger.warning("the cache is a subsample of %s: its images were matched by id, and their "
                   "content cannot be verified against the cache's fingerprint", dataset.source)
    return Dataset(name=meta["dataset"]["name"], source=dataset.source,
                   class_names=dataset.class_names, splits=splits,
                   content_digest=meta["dataset"].get("content_digest", ""),
                   split_info=meta["split"])
