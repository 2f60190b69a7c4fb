"""Label tables: a CSV, TSV or JSONL file of image paths and labels beside a folder of images,
or a folder with a ``metadata.csv`` / ``metadata.jsonl`` at its root (the Hugging Face
ImageFolder convention).

Columns, as the :class:`~xfeat.config.DataSpec` names them: ``image_col`` (default
``file_name``; paths relative to the table), ``label_col`` (default ``label``; class names),
``split_col`` (default ``split``, used when the table has it: ``train``, ``val`` (or
``validation``, ``valid``), ``test``; without it every row is train) and ``patient_col``
(optional: the patient of each image, which keeps a patient's images on one side of a carved
validation split).

Several labels per image: ``label_sep`` splits ``label_col`` (NIH's pipe-joined ``Finding
Labels``, with ``negative_label`` for none; a blank cell is every label unknown), or
``label_cols`` names one column per label holding 1 / 0 / -1 (uncertain, mapped by
``uncertain``) / blank (unknown), as CheXpert's. The split's labels are then an (N, L) int8
matrix with -1 where unknown. Every problem is one :class:`~xfeat.errors.DataError` that names
the table, the row (1-based, the header not counted) and the value.
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np

from xfeat.config import DataSpec
from xfeat.data.dataset import SPLITS, Dataset, Split
from xfeat.errors import DataError

TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl")
METADATA_FILES = ("metadata.csv", "metadata.jsonl")
_SPLIT_NAMES = {"train": "train", "val": "val", "validation": "val", "valid": "val", "test": "test"}
_SHOWN = 3  # rows named in an error before "and N more"


def table_of(path: Path):
    """The label table ``path`` is, or holds at its root (``metadata.csv``/``.jsonl``); None."""
    if path.is_file() and path.suffix.lower() in TABLE_SUFFIXES:
        return path
    if path.is_dir():
        return next((path / name for name in METADATA_FILES if (path / name).is_file()), None)
    return None


def read_rows(table: Path) -> tuple:
    """``(columns, rows)``: the table's column names and its rows as dicts of strings."""
    try:
        text = table.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read the label table {table}: {exc}") from None
    if table.suffix.lower() == ".jsonl":
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                raise DataError(f"{table} line {n} is not valid JSON ({exc})") from None
            if not isinstance(row, dict):
                raise DataError(f"{table} line {n} is not a JSON object; expected one object a line")
            rows.append({k: "" if v is None else str(v) for k, v in row.items()})
        columns = list(dict.fromkeys(k for row in rows for k in row))
        return columns, rows
    delimiter = "\t" if table.suffix.lower() == ".tsv" else ","
    reader = csv.DictReader(text.splitlines(), delimiter=delimiter)
    rows = [{k: (v or "").strip() for k, v in row.items() if k is not None} for row in reader]
    return list(reader.fieldnames or []), rows


def _column(table: Path, columns: list, name: str, option: str) -> str:
    if name not in columns:
        raise DataError(
            f"{table} has no column {name!r} (the {option}); its columns are "
            f"{', '.join(map(repr, columns)) or 'none'}: pass {option} with one of them"
        )
    return name


def _rows_named(rows: list) -> str:
    shown = ", ".join(str(r) for r in rows[:_SHOWN])
    return shown + (f" and {len(rows) - _SHOWN} more" if len(rows) > _SHOWN else "")


def load_table(table: Path, spec: DataSpec, *, allow_missing: bool = False) -> Dataset:
    """The data set a label table describes (see the module docstring).

    ``allow_missing``: keep rows whose image file is missing (extraction then records them as
    unreadable, as ``--skip-bad`` does for damaged files) instead of refusing the table.
    """
    table = table.resolve()
    columns, rows = read_rows(table)
    if not rows:
        raise DataError(f"the label table {table} has no rows; expected one row per image")
    image_col = _column(table, columns, spec.image_col, "--image-col")
    if spec.label_cols is not None:
        for col in spec.label_cols:
            _column(table, columns, col, "--label-cols")
        label_col = None
    else:
        label_col = _column(table, columns, spec.label_col, "--label-col")
    split_col = spec.split_col if spec.split_col in columns else None
    if spec.split_col != DataSpec.split_col and split_col is None:
        _column(table, columns, spec.split_col, "--split-col")  # asked for by name: must exist
    patient_col = (
        _column(table, columns, spec.patient_col, "--patient-col") if spec.patient_col else None
    )
    root = table.parent
    by_split, seen, missing, blank = {}, {}, [], []
    for n, row in enumerate(rows, 1):
        name = row.get(image_col, "")
        if not name:
            raise DataError(f"{table} row {n}: no image path in column {image_col!r}")
        if spec.label_cols is not None:
            label = tuple(
                _entry(table, n, col, row.get(col, ""), spec.uncertain) for col in spec.label_cols
            )
        elif spec.label_sep is not None:
            label = _joined_labels(row.get(label_col, ""), spec)
        else:
            label = row.get(label_col, "")
            if not label:
                blank.append(n)
                continue
        split = "train"
        if split_col:
            value = row.get(split_col, "").lower()
            split = _SPLIT_NAMES.get(value)
            if split is None:
                raise DataError(
                    f"{table} row {n}: split {row.get(split_col)!r} in column {split_col!r}; "
                    "expected train, val (or validation) or test"
                )
        path = (root / name).resolve()
        if name in seen:
            raise DataError(
                f"{table} rows {seen[name]} and {n} both name the image {name!r}; each image "
                "may appear once"
            )
        seen[name] = n
        if not path.is_file():
            missing.append((n, name))
        group = row.get(patient_col, "") if patient_col else None
        by_split.setdefault(split, []).append((name, str(path), label, group or f"row{n}"))
    if blank:
        raise DataError(
            f"{table}: rows {_rows_named(blank)} have no label in column {label_col!r}; "
            "give every image its class"
        )
    if missing and not allow_missing:
        named = [f"{n} ({name})" for n, name in missing]
        raise DataError(
            f"{table}: the image files of rows {_rows_named(named)} do not exist (paths are "
            f"relative to {root}); fix the paths, or pass --skip-bad to skip and record them"
        )
    if "train" not in by_split:
        raise DataError(f"{table} has no train rows; expected rows with split 'train'")
    if spec.multilabel:
        class_names, encode = _multilabel_encoder(table, spec, by_split)
    else:
        class_names, encode = _class_encoder(table, by_split)
    digest = hashlib.sha256(json.dumps(spec.table_fields()).encode())
    splits = {}
    for split in SPLITS:
        items = by_split.get(split)
        if not items:
            continue
        labels = encode(split, [label for _, _, label, _ in items])
        for (name, path, label, _), target in zip(items, labels):
            # single-label: the class name, as since the first label tables (their caches keep keys)
            shown = target.tolist() if spec.multilabel else label
            digest.update(f"{split}\0{shown}\0{name}\0".encode())
            p = Path(path)
            digest.update(hashlib.sha256(p.read_bytes()).digest() if p.is_file() else b"missing")
        splits[split] = Split(
            split,
            [name for name, *_ in items],
            labels,
            paths=[path for _, path, _, _ in items],
            groups=[group for *_, group in items] if patient_col else None,
        )
    name = table.parent.name if table.name in METADATA_FILES else table.stem
    return Dataset(
        name=name,
        source=str(table),
        class_names=class_names,
        splits=splits,
        content_digest=digest.hexdigest(),
    )


def _class_encoder(table: Path, by_split: dict) -> tuple:
    """Single-label: the sorted train classes, and a function giving each split's class indices."""
    class_names = sorted({label for _, _, label, _ in by_split["train"]})
    if len(class_names) < 2:
        raise DataError(
            f"{table}: every train row has the label {class_names[0]!r}; a classifier needs at "
            "least two classes in train"
        )
    index = {c: i for i, c in enumerate(class_names)}

    def encode(split: str, labels: list) -> np.ndarray:
        unknown = sorted(set(labels) - set(index))
        if unknown:
            raise DataError(
                f"{table}: the {split} rows have labels {unknown} that no train row has; every "
                "class must occur in train"
            )
        return np.asarray([index[label] for label in labels], dtype=np.int64)

    return class_names, encode


# Multi-label targets are (N, L) int8 matrices: 1 positive, 0 negative, UNKNOWN (-1) for a
# blank entry or an uncertain one under --uncertain ignore. Unknown entries are masked.
UNKNOWN = -1
_ENTRY_VALUES = {"1": 1, "1.0": 1, "0": 0, "0.0": 0, "-1": -1, "-1.0": -1, "": None}
_UNCERTAIN = {"ignore": UNKNOWN, "zeros": 0, "ones": 1}


def _entry(table: Path, n: int, col: str, value: str, uncertain: str):
    """One label column's entry: 1, 0, UNKNOWN (blank), or the uncertain policy's value for -1."""
    if value.strip().lower() in ("true", "false"):
        return int(value.strip().lower() == "true")
    if value.strip() not in _ENTRY_VALUES:
        raise DataError(
            f"{table} row {n}: {value!r} in column {col!r}; expected 1, 0, -1 (uncertain) or blank"
        )
    entry = _ENTRY_VALUES[value.strip()]
    if entry is None:
        return UNKNOWN
    return _UNCERTAIN[uncertain] if entry == -1 else entry


def _joined_labels(value: str, spec: DataSpec):
    """The set of labels a joined cell names (split on the separator, never substring-matched);
    None for a blank cell (every label unknown)."""
    parts = [p.strip() for p in value.split(spec.label_sep)]
    parts = [p for p in parts if p]
    if not parts:
        return None
    return frozenset(p for p in parts if p != spec.negative_label)


def _multilabel_encoder(table: Path, spec: DataSpec, by_split: dict) -> tuple:
    """Multi-label: the label names in order, and a function giving each split's (N, L) matrix."""
    if spec.label_cols is not None:
        names = list(spec.label_cols)
    else:
        names = sorted({x for _, _, label, _ in by_split["train"] if label for x in label})
        if not names:
            raise DataError(
                f"{table}: no train row names a label in column {spec.label_col!r} (split on "
                f"{spec.label_sep!r}); check --label-col and --label-sep"
            )

    def encode(split: str, labels: list) -> np.ndarray:
        if spec.label_cols is not None:
            return np.asarray(labels, dtype=np.int8).reshape(len(labels), len(names))
        unknown = sorted({x for label in labels if label for x in label} - set(names))
        if unknown:
            raise DataError(
                f"{table}: the {split} rows have labels {unknown} that no train row has; every "
                "label must occur in train"
            )
        matrix = np.zeros((len(labels), len(names)), dtype=np.int8)
        for i, label in enumerate(labels):
            if label is None:
                matrix[i] = UNKNOWN
            else:
                matrix[i, [names.index(x) for x in label]] = 1
        return matrix

    train = encode("train", [label for _, _, label, _ in by_split["train"]])
    for j, name in enumerate(names):
        known = train[:, j][train[:, j] != UNKNOWN]
        if len(np.unique(known)) < 2:
            state = "no known entry" if not len(known) else f"only the value {int(known[0])}"
            raise DataError(
                f"{table}: the label {name!r} has {state} in train; every label needs positive "
                "and negative train rows (drop it from --label-cols or fix its column)"
            )
    return names, encode
