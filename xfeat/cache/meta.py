"""What a cache entry records about how its features were made, as typed, versioned records.

:class:`CacheMeta` is written as JSON into the entry's ``meta`` attribute when extraction
starts and read back by :func:`xfeat.cache.read_meta` / :func:`xfeat.cache.read_cache`, which
add the entry's ``key`` and per-split statistics (``splits``). ``to_dict`` and ``from_dict``
are each other's inverse; ``from_dict`` reads the records of every earlier xfeat (a record
without ``meta_version`` is version 1) and refuses newer ones with a clear message.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Optional

from xfeat.config import DataSpec
from xfeat.errors import CacheError

META_VERSION = 2  # 2: adds ``data`` (the DataSpec) and ``meta_version`` itself


@dataclass(frozen=True)
class DatasetRecord:
    """The data set the features were made from: its name, where it was read, and the content
    fingerprint (content digest plus split recipe) that keys the cache."""

    name: str
    source: str
    fingerprint: str
    content_digest: str = ""
    counts: dict = field(default_factory=dict)  # split -> images per class


@dataclass(frozen=True)
class WeightsRecord:
    """Which weights made the features: ``kind`` (random, torchvision, timm, file,
    torchscript), ``id`` (a weights name or a file path), the file's ``sha256``, the ``url``
    it came from and, for random weights, their ``seed``."""

    kind: str
    id: Optional[str]
    sha256: Optional[str] = None
    url: Optional[str] = None
    seed: Optional[int] = None

    @property
    def is_random(self) -> bool:
        return self.kind == "random"

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ViewsRecord:
    """Augmented train views (``train`` of them) and test-time views (``tta``), seeded."""

    train: int = 0
    tta: tuple = ()
    seed: int = 0


@dataclass(frozen=True)
class SourceRecord:
    """One backbone of a merged feature set (several backbones side by side)."""

    model: str
    weights: WeightsRecord
    preprocessing: dict
    blocks: tuple
    key: str

    def to_dict(self) -> dict:
        return {**asdict(self), "blocks": [list(b) for b in self.blocks]}


@dataclass(frozen=True)
class CacheMeta:
    """Everything that made one cache entry's features, and what reading it found.

    ``blocks`` is ``((name, dim), ...)`` in column order, ``feature_dim`` their sum;
    ``preprocessing`` is :meth:`xfeat.backbones.Preprocessing.to_dict`; ``split`` says how
    val was obtained (given, or carved from train with its recipe and group count); ``data``
    is the :class:`~xfeat.config.DataSpec` the data were loaded with (None in caches written
    before it was recorded). ``key`` and ``splits`` (per split: ``n`` rows and the timing
    statistics of the pass) come from the file when it is read; ``sources`` lists the
    backbones of a merged feature set.
    """

    dataset: DatasetRecord
    class_names: tuple
    model: str
    feature_dim: int
    blocks: tuple
    weights: WeightsRecord
    preprocessing: dict
    split: dict = field(default_factory=dict)
    data: Optional[DataSpec] = None
    layers: tuple = ("penultimate",)
    views: ViewsRecord = field(default_factory=ViewsRecord)
    precision: str = "fp32"
    feature_dtype: str = "float32"
    versions: dict = field(default_factory=dict)
    created: str = ""
    key: str = ""
    splits: dict = field(default_factory=dict)
    sources: Optional[tuple] = None

    @property
    def block_names(self) -> list:
        return [name for name, _ in self.blocks]

    def data_spec(self) -> DataSpec:
        """The spec to reload the data with: the recorded one, or (older caches) one rebuilt
        from the recorded source and split recipe."""
        if self.data is not None:
            return self.data
        carved = self.split.get("val") == "carved from train"
        recipe = (
            {
                "val_fraction": self.split["val_fraction"],
                "split_seed": self.split["seed"],
                "group_pattern": self.split["group_pattern"],
            }
            if carved
            else {}
        )
        return DataSpec(self.dataset.source, **recipe)

    def merged_sources(self) -> list:
        """The backbones whose features these are: ``sources``, or this entry's own."""
        if self.sources:
            return list(self.sources)
        return [SourceRecord(self.model, self.weights, self.preprocessing, self.blocks, self.key)]

    def with_(self, **changes) -> CacheMeta:
        return replace(self, **changes)

    def to_dict(self) -> dict:
        record = {
            "meta_version": META_VERSION,
            "dataset": asdict(self.dataset),
            "class_names": list(self.class_names),
            "model": self.model,
            "feature_dim": self.feature_dim,
            "blocks": [list(b) for b in self.blocks],
            "weights": self.weights.to_dict(),
            "preprocessing": self.preprocessing,
            "split": self.split,
            "data": self.data.to_dict() if self.data is not None else None,
            "layers": list(self.layers),
            "views": {"train": self.views.train, "tta": list(self.views.tta), "seed": self.views.seed},
            "precision": self.precision,
            "feature_dtype": self.feature_dtype,
            "versions": self.versions,
            "created": self.created,
        }
        if self.key:
            record["key"] = self.key
        if self.splits:
            record["splits"] = self.splits
        if self.sources:
            record["sources"] = [s.to_dict() for s in self.sources]
        return record

    @classmethod
    def from_dict(cls, record: dict) -> CacheMeta:
        version = int(record.get("meta_version", 1))
        if version > META_VERSION:
            raise CacheError(
                f"cache metadata of version {version} was written by a newer xfeat (this one "
                f"reads up to {META_VERSION}); upgrade xfeat or extract again with --force"
            )
        try:
            views = record.get("views") or {}
            return cls(
                dataset=DatasetRecord(**_known(DatasetRecord, record["dataset"])),
                class_names=tuple(record["class_names"]),
                model=record["model"],
                feature_dim=int(record["feature_dim"]),
                blocks=tuple((str(n), int(d)) for n, d in record["blocks"]),
                weights=_weights(record["weights"]),
                preprocessing=record["preprocessing"],
                split=record.get("split") or {},
                data=DataSpec.from_dict(record["data"]) if record.get("data") else None,
                layers=tuple(record.get("layers") or ("penultimate",)),
                views=ViewsRecord(
                    views.get("train", 0), tuple(views.get("tta", ())), views.get("seed", 0)
                ),
                precision=record.get("precision", "fp32"),
                feature_dtype=record.get("feature_dtype", "float32"),
                versions=record.get("versions") or {},
                created=record.get("created", ""),
                key=record.get("key", ""),
                splits=record.get("splits") or {},
                sources=tuple(_source(s) for s in record["sources"]) if record.get("sources") else None,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CacheError(
                f"cache metadata is damaged or incomplete ({type(exc).__name__}: {exc}); "
                "extract again with --force"
            ) from None


def _known(cls, record: dict) -> dict:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in record.items() if k in names}


def _weights(record: dict) -> WeightsRecord:
    return WeightsRecord(**_known(WeightsRecord, record))


def _source(record: dict) -> SourceRecord:
    return SourceRecord(
        model=record["model"],
        weights=_weights(record["weights"]),
        preprocessing=record["preprocessing"],
        blocks=tuple((str(n), int(d)) for n, d in record["blocks"]),
        key=record["key"],
    )
