"""The validation split: carved out of train, stratified by class, whole patients only, seeded.

Test is never touched. File names that carry a patient id keep each patient's images on one
side (``group_pattern``); the recipe is recorded in the dataset's ``split_info`` and so in the
cache key.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from xfeat.config import DEFAULT_GROUP_PATTERN, DataSpec
from xfeat.data.dataset import SPLITS, Dataset, Split, strata
from xfeat.data.dicom import is_dicom, read_tag
from xfeat.errors import DataError

logger = logging.getLogger(__name__)

TINY_VAL_SIZE = 50  # a given val split smaller than this is merged into train and re-carved


def patient_groups(ids: Sequence[str], pattern: Optional[str]) -> list:
    """Group key per sample: the pattern's first group on the file name, else the id itself."""
    if not pattern:
        return list(ids)
    rx = re.compile(pattern)
    groups = []
    for sample_id in ids:
        m = rx.match(Path(sample_id).name)
        groups.append(m.group(1) if m else sample_id)
    return groups


def split_patients(split: Split, spec: Optional[DataSpec]) -> Optional[list]:
    """The patient of each sample (a table's patient column, a DICOM tag, or the patient id in
    the file names by ``spec.group_pattern``, a name it does not match being its own patient),
    or None when nothing names a patient."""
    if split.groups is not None:
        return list(split.groups)
    pattern = spec.group_pattern if spec is not None else None
    groups = patient_groups(split.ids, pattern)
    return groups if pattern and groups != list(split.ids) else None


def attach_dicom_groups(dataset: Dataset, spec: DataSpec) -> None:
    """Give the splits of DICOM files their patients from the tags (``spec.dicom_group``:
    ``PatientID`` or ``StudyInstanceUID``), where neither a table's patient column nor the
    group pattern on the file name names one. Other files keep their pattern group (or id)."""
    splits = [sp for sp in dataset.splits.values() if sp.paths is not None and sp.groups is None]
    found = False
    for sp in splits:
        groups = patient_groups(sp.ids, spec.group_pattern)
        for i, path in enumerate(sp.paths):
            if groups[i] == sp.ids[i] and is_dicom(path):
                value = read_tag(path, spec.dicom_group)
                if value is not None:
                    groups[i], found = f"{spec.dicom_group}:{value}", True
        sp.groups = groups
    if not found:
        for sp in splits:
            sp.groups = None
    else:
        dataset.dicom_group = spec.dicom_group


def carve_validation(
    labels: np.ndarray, groups: Sequence[str], fraction: float, seed: int
) -> np.ndarray:
    """Boolean mask of samples moved to val: stratified by class, whole groups only, seeded.

    Groups are visited in a seeded random order; a group joins val while its class (the
    majority label of the group) is below ``fraction`` of that class's count.
    """
    labels = np.asarray(labels)
    group_names, group_index = np.unique(
        np.asarray(groups, dtype=object).astype(str), return_inverse=True
    )
    n_classes = int(labels.max()) + 1
    class_count = np.bincount(labels, minlength=n_classes)
    # At least one val image for every class that can spare one: thresholds need both classes.
    target = np.where(class_count >= 2, np.maximum(1, np.round(fraction * class_count)), 0)
    taken = np.zeros(n_classes, dtype=int)
    members = [[] for _ in group_names]
    for i, g in enumerate(group_index):
        members[g].append(i)
    in_val = np.zeros(len(labels), dtype=bool)
    for g in np.random.default_rng(seed).permutation(len(group_names)):
        rows = members[g]
        cls = int(np.bincount(labels[rows], minlength=n_classes).argmax())
        # Never move a class's last training images to val.
        if taken[cls] < target[cls] and taken[cls] + len(rows) < class_count[cls]:
            in_val[rows] = True
            taken += np.bincount(labels[rows], minlength=n_classes)
    return in_val


def cover_every_label(
    labels: np.ndarray, groups: Sequence[str], in_val: np.ndarray, seed: int
) -> np.ndarray:
    """``in_val`` (a carve-out of (N, L) multi-label targets, -1 unknown) with whole groups
    moved from train to val until every label has a known positive and a known negative on
    both sides, where the groups allow it: for each label that lacks one in val, the smallest
    train group that holds it and whose move leaves train every value it had (ties in a seeded
    order). Stratifying by each image's rarest label cannot promise that by itself."""
    labels, in_val = np.asarray(labels), np.array(in_val, dtype=bool)
    _, index = np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)
    n_groups = int(index.max()) + 1
    # counts[v][g, l]: rows of group g whose label l is v; sizes[g]: its rows
    counts = [np.zeros((n_groups, labels.shape[1]), dtype=np.int64) for _ in (0, 1)]
    for v in (0, 1):
        np.add.at(counts[v], index, (labels == v).astype(np.int64))
    sizes = np.bincount(index, minlength=n_groups)
    rank = np.empty(n_groups, dtype=int)
    rank[np.random.default_rng(seed).permutation(n_groups)] = np.arange(n_groups)
    in_val_group = np.zeros(n_groups, dtype=bool)
    in_val_group[index[in_val]] = True
    for _ in range(2):  # a move for one label may serve another: a second pass finds none left
        for label in range(labels.shape[1]):
            for value in (1, 0):
                if counts[value][in_val_group, label].any():
                    continue
                candidates = np.flatnonzero(~in_val_group & (counts[value][:, label] > 0))
                train = [c[~in_val_group].sum(axis=0) for c in counts]  # per value, per label
                keeps = np.ones(len(candidates), dtype=bool)
                for v in (0, 1):
                    left = train[v][None, :] - counts[v][candidates]
                    keeps &= ((left > 0) | (train[v] == 0)[None, :]).all(axis=1)
                if keeps.any():
                    ok = candidates[keeps]
                    in_val_group[ok[np.lexsort((rank[ok], sizes[ok]))[0]]] = True
    return in_val_group[index]


def ensure_validation_split(dataset: Dataset, spec: DataSpec) -> None:
    val = dataset.splits.get("val")
    if val is not None and len(val) >= TINY_VAL_SIZE:
        dataset.split_info = {"val": "given"}
        # what names the patients (the cache's patients, the bootstrap) is part of the
        # fingerprint too; the defaults are left out, so that older caches keep their keys
        if dataset.dicom_group:
            dataset.split_info["dicom_group"] = dataset.dicom_group
        if spec.group_pattern != DEFAULT_GROUP_PATTERN:
            dataset.split_info["group_pattern"] = spec.group_pattern
        return
    train = dataset.splits["train"]
    merged_val = 0
    if val is not None:
        logger.warning(
            "val split has only %d images (< %d): merging it into train and carving "
            "a %.0f%% stratified validation split instead",
            len(val),
            TINY_VAL_SIZE,
            100 * spec.val_fraction,
        )
        merged_val = len(val)
        train = concat(train, val, "train")
    # a table's patient column, else the patient id in the file names
    groups = train.groups if train.groups is not None else patient_groups(train.ids, spec.group_pattern)
    in_val = carve_validation(strata(train.labels), groups, spec.val_fraction, spec.split_seed)
    if np.ndim(train.labels) == 2 and in_val.any():
        in_val = cover_every_label(train.labels, groups, in_val, spec.split_seed)
    if not in_val.any() or in_val.all():
        n_groups = len(set(groups))
        why = ""
        if n_groups < len(train):  # whole patients move to val: too few of them
            named = (
                f"the DICOM tag {dataset.dicom_group}"
                if dataset.dicom_group
                else "the patient column"
                if train.groups is not None
                else f"--group-pattern {spec.group_pattern!r}"
            )
            why = (
                f" ({n_groups} patient group(s) by {named}, each kept on one side; "
                "group by another tag or pattern if that is not a patient)"
            )
        raise DataError(
            f"cannot carve a validation split of {spec.val_fraction:.0%} from "
            f"{len(train)} training images{why}; add a val/ split or change val_fraction"
        )
    dataset.splits["train"] = train.subset(np.flatnonzero(~in_val), "train")
    dataset.splits["val"] = train.subset(np.flatnonzero(in_val), "val")
    dataset.splits = {s: dataset.splits[s] for s in SPLITS if s in dataset.splits}
    n_groups = len(set(groups))
    dataset.split_info = {
        "val": "carved from train",
        "val_fraction": spec.val_fraction,
        "seed": spec.split_seed,
        "group_pattern": spec.group_pattern,
        "groups": n_groups,
        "merged_tiny_val": merged_val,
    }
    if dataset.dicom_group:  # some groups are the DICOM files' tags
        dataset.split_info["dicom_group"] = dataset.dicom_group
    elif train.groups is not None:  # grouped by a table's patient column, not the file names
        dataset.split_info["patient_col"] = spec.patient_col
    logger.info(
        "carved val split: %d of %d training images (%d patient groups, seed %d)",
        int(in_val.sum()),
        len(train),
        n_groups,
        spec.split_seed,
    )


def concat(a: Split, b: Split, name: str) -> Split:
    labels = np.concatenate([a.labels, b.labels])
    if a.paths is not None:
        groups = a.groups + b.groups if a.groups is not None and b.groups is not None else None
        return Split(name, a.ids + b.ids, labels, paths=a.paths + b.paths, groups=groups)
    arrays = np.concatenate([a.arrays[a.array_rows], b.arrays[b.array_rows]])
    return Split(name, a.ids + b.ids, labels, arrays=arrays, array_rows=np.arange(len(arrays)))
