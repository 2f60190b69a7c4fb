"""The data model: a :class:`Dataset` of named :class:`Split` s, each with ids, labels and pixels.

Every source (folders, npz, built-ins) builds one; its ``fingerprint`` (content digest plus
split recipe) keys every cache made from it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from xfeat.config import DataSpec
from xfeat.data.dicom import DEFAULT_DICOM, DicomOptions
from xfeat.data.images import array_to_rgb, read_image_with_header
from xfeat.errors import DataError

SPLITS = ("train", "val", "test")


@dataclass
class Split:
    """The samples of one split: stable ids, integer labels and where the pixels come from."""

    name: str
    ids: list
    labels: np.ndarray  # (N,) class indices, or (N, L) 1/0/-1 (unknown) for multi-label data
    paths: Optional[list] = None  # folder datasets: absolute file paths
    arrays: Optional[np.ndarray] = None  # npz datasets: (N, H, W[, C]) images
    array_rows: Optional[np.ndarray] = None  # npz datasets: row of each sample in ``arrays``
    groups: Optional[list] = None  # label tables with a patient column: the patient of each sample

    def __len__(self) -> int:
        return len(self.ids)

    def read_image(
        self,
        i: int,
        draft_size: Optional[int] = None,
        exif_transpose: bool = True,
        dicom: DicomOptions = DEFAULT_DICOM,
    ) -> Image.Image:
        """Decode sample ``i`` as an RGB PIL image, or ``F`` for a grayscale DICOM file
        (raises :class:`ImageReadError`)."""
        return self.read_image_with_header(i, draft_size, exif_transpose, dicom)[0]

    def read_image_with_header(
        self,
        i: int,
        draft_size: Optional[int] = None,
        exif_transpose: bool = True,
        dicom: DicomOptions = DEFAULT_DICOM,
    ) -> tuple:
        """``(image, (width, height, mode, bit depth))`` of sample ``i``; an array's mode
        is L or RGB by its channels, its bit depth that of its dtype."""
        if self.paths is not None:
            return read_image_with_header(
                self.paths[i], draft_size=draft_size, exif_transpose=exif_transpose, dicom=dicom
            )
        array = self.arrays[self.array_rows[i]]
        mode = "RGB" if array.ndim == 3 and array.shape[-1] == 3 else "L"
        header = (array.shape[1], array.shape[0], mode, 8 * array.dtype.itemsize)
        return array_to_rgb(array), header

    def subset(self, rows: Sequence[int], name: Optional[str] = None) -> Split:
        rows = np.asarray(rows, dtype=np.int64)
        return Split(
            name=name or self.name,
            ids=[self.ids[r] for r in rows],
            labels=self.labels[rows],
            paths=None if self.paths is None else [self.paths[r] for r in rows],
            arrays=self.arrays,
            array_rows=None if self.array_rows is None else self.array_rows[rows],
            groups=None if self.groups is None else [self.groups[r] for r in rows],
        )


@dataclass
class Dataset:
    """A labelled dataset with train, val and (optionally) test splits."""

    name: str
    source: str
    class_names: list
    splits: dict
    content_digest: str  # sha256 over every sample's split, label, id and bytes
    split_info: dict = field(default_factory=dict)  # how val was obtained (given or carved)
    spec: Optional[DataSpec] = None  # what was asked for (set by load_dataset)
    dicom_group: Optional[str] = None  # the DICOM tag that grouped patients, if any did

    @property
    def fingerprint(self) -> str:
        """Content digest plus the split recipe: any change gives a different fingerprint."""
        payload = json.dumps({"content": self.content_digest, "split": self.split_info}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()

    @property
    def multilabel(self) -> bool:
        """Several labels per image: ``labels`` are (N, L) with -1 for unknown entries."""
        return self.splits["train"].labels.ndim == 2

    def counts(self) -> dict:
        """Images per class in each split; multi-label: positives per label."""
        if self.multilabel:
            return {s: (sp.labels == 1).sum(axis=0).tolist() for s, sp in self.splits.items()}
        return {
            s: np.bincount(sp.labels, minlength=len(self.class_names)).tolist()
            for s, sp in self.splits.items()
        }

    def subsample(self, sizes: dict, seed: int = 0) -> Dataset:
        """A stratified, seeded subset: at most ``sizes[split]`` samples per split.

        Quick runs use it; the subset has its own fingerprint (and so its own caches).
        """
        splits, chosen = {}, {}
        for name, split in self.splits.items():
            n = sizes.get(name)
            if n is None or n >= len(split):
                splits[name] = split
                continue
            if n < len(self.class_names):
                kind = "labels" if self.multilabel else "classes"
                raise DataError(
                    f"cannot subsample {name} to {n} images: fewer than the "
                    f"{len(self.class_names)} {kind}"
                )
            rows = stratified_rows(strata(split.labels), n, [seed, SPLITS.index(name)])
            splits[name] = split.subset(rows)
            chosen[name] = len(rows)
        digest = hashlib.sha256(
            json.dumps([self.content_digest, {s: sp.ids for s, sp in splits.items()}]).encode()
        )
        return Dataset(
            name=f"{self.name}-subset",
            source=self.source,
            class_names=self.class_names,
            splits=splits,
            content_digest=digest.hexdigest(),
            split_info={**self.split_info, "subsample": {"sizes": chosen, "seed": seed}},
            spec=self.spec,
        )


def strata(labels: np.ndarray) -> np.ndarray:
    """One stratum per sample for stratified sampling: the class, or for (N, L) multi-label
    targets the rarest label the sample is positive for (L when it has none)."""
    labels = np.asarray(labels)
    if labels.ndim == 1:
        return labels
    positive = labels == 1
    prevalence = np.where(positive, positive.sum(axis=0)[None, :], np.iinfo(np.int64).max)
    return np.where(positive.any(axis=1), prevalence.argmin(axis=1), labels.shape[1])


def stratified_rows(labels: np.ndarray, n: int, seed) -> np.ndarray:
    """About ``n`` sorted row indices with the class proportions of ``labels`` (at least one
    per class), drawn with ``numpy.random.default_rng(seed)``."""
    rng = np.random.default_rng(seed)
    rows = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        k = min(len(members), max(1, round(n * len(members) / len(labels))))
        rows.extend(rng.choice(members, size=k, replace=False))
    return np.sort(np.asarray(rows, dtype=np.int64))
