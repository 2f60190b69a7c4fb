"""Label tables: a CSV, TSV or JSONL file of image paths and labels beside a folder of images,
or a folder with a ``metadata.csv`` / ``metadata.jsonl`` at its root (the Hugging Face
ImageFolder convention).

Columns, as the :class:`~xfeat.config.DataSpec` names them: ``image_col`` (default
``file_name``; paths relative to the table), ``label_col`` (default ``label``; class names),
``split_col`` (default ``split``, used when the table has it: ``train``, ``val`` (or
``validation``, ``valid``), ``test``; without it every row is train) and ``patient_col``
(optional: the patient of each image, which keeps a patient's images on one side of a carved
validation split). Every problem is one :class:`~xfeat.errors.DataError` that names the table,
the row (1-based, the header not counted) and the value.
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
        name, label = row.get(image_col, ""), row.get(label_col, "")
        if not name:
            raise DataError(f"{table} row {n}: no image path in column {image_col!r}")
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
    class_names = sorted({label for _, _, label, _ in by_split["train"]})
    if len(class_names) < 2:
        raise DataError(
            f"{table}: every train row has the label {class_names[0]!r}; a classifier needs at "
            "least two classes in train"
        )
    index = {c: i for i, c in enumerate(class_names)}
    digest = hashlib.sha256(json.dumps(spec.table_fields()).encode())
    splits = {}
    for split in SPLITS:
        items = by_split.get(split)
        if not items:
            continue
        unknown = sorted({label for _, _, label, _ in items} - set(index))
        if unknown:
            raise DataError(
                f"{table}: the {split} rows have labels {unknown} that no train row has; every "
                "class must occur in train"
            )
        for name, path, label, _ in items:
            digest.update(f"{split}\0{label}\0{name}\0".encode())
            p = Path(path)
            digest.update(hashlib.sha256(p.read_bytes()).digest() if p.is_file() else b"missing")
        splits[split] = Split(
            split,
            [name for name, *_ in items],
            np.asarray([index[label] for _, _, label, _ in items], dtype=np.int64),
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
