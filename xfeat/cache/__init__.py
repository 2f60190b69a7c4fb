"""The HDF5 feature cache: the only package that imports h5py.

``read`` validates and loads complete entries; ``write`` keys, locks and fills them
incrementally so that no crash leaves a file that could be mistaken for a complete one.
"""

from xfeat.cache.meta import CacheMeta, DatasetRecord, SourceRecord, ViewsRecord, WeightsRecord
from xfeat.cache.read import (
    BASE_SPLITS,
    FEATURE_DTYPES,
    FORMAT,
    FORMAT_VERSION,
    PENULTIMATE,
    FeatureSet,
    SplitFeatures,
    is_complete,
    partial_path,
    read_cache,
    read_meta,
)
from xfeat.cache.write import (
    CacheWriter,
    cache_key,
    entry_index_path,
    entry_lock,
    entry_path,
    merge_shards,
    shard_path,
)
from xfeat.errors import CacheError

__all__ = [
    "BASE_SPLITS",
    "CacheError",
    "CacheMeta",
    "DatasetRecord",
    "SourceRecord",
    "ViewsRecord",
    "WeightsRecord",
    "CacheWriter",
    "FEATURE_DTYPES",
    "FORMAT",
    "FORMAT_VERSION",
    "FeatureSet",
    "PENULTIMATE",
    "SplitFeatures",
    "cache_key",
    "entry_index_path",
    "entry_lock",
    "entry_path",
    "is_complete",
    "merge_shards",
    "partial_path",
    "read_cache",
    "read_meta",
    "shard_path",
]
