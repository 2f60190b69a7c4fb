"""What the analysis reads: a feature cache (built or reused) and the images behind it, verified."""
from __future__ import annotations

import logging
from typing import Optional

from .. import cache as cache_io
from ..data import DataError, Dataset, SplitRecipe, load_dataset
from ..errors import ConfigError
from ..extract import extract, plan_extraction, split_extract_options

logger = logging.getLogger(__name__)


def load_inputs(data, model: str, *, weights, cache, options: dict):
    """``(features, dataset)``: the cache (extracted or reused as ``fit_head`` does, or the
    one given) and the dataset it was made from."""
    dataset = None
    if cache is None:
        if data is None:
            raise ConfigError("analyze needs data= (to build or reuse a cache) or cache=")
        plan_options, run_options = split_extract_options(options)
        plan = plan_extraction(data, model, weights=weights, **plan_options)
        cache = extract(plan=plan, **run_options)
        dataset = plan.dataset
    features = cache if isinstance(cache, cache_io.FeatureSet) else cache_io.read_cache(cache)
    for split in ("train", "val"):
        if split not in features.splits:
            raise cache_io.CacheError(f"{features.path} has no {split!r} split; analyze needs "
                                      "train and val")
    if dataset is None:
        dataset = load_matching_dataset(
            features.meta, data, ids={s: sp.ids + features.skipped.get(s, [])
                                      for s, sp in features.splits.items()},
            cache_dir=options.get("cache_dir"))
    return features, dataset


def load_matching_dataset(meta: dict, data=None, *, ids: Optional[dict] = None,
                          cache_dir=None) -> Dataset:
    """The dataset a cache was made from (``data``, else its recorded source), verified.

    ``data`` may be a path, a built-in name or a :class:`~xfeat.data.Dataset`. The split
    recipe is rebuilt from the cache's metadata, as ``fit.check_cache_matches_data`` does; a
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
        "(its content or split changed); analyse without cache= to extract a fresh one")


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
                "analyse without cache= to extract a fresh one")
        splits[name] = split.subset([index[i] for i in wanted])
    logger.warning("the cache is a subsample of %s: its images were matched by id, and their "
                   "content cannot be verified against the cache's fingerprint", dataset.source)
    return Dataset(name=meta["dataset"]["name"], source=dataset.source,
                   class_names=dataset.class_names, splits=splits,
                   content_digest=meta["dataset"].get("content_digest", ""),
                   split_info=meta["split"])
