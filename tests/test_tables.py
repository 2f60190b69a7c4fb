"""Label tables: CSV, TSV, JSONL and a folder's metadata.csv; splits, patients, and one-line
errors that name the row and the value."""

import csv
import json
import re

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import CHEST, TINY, make_image_folder

import xfeat
from xfeat.cli import cli
from xfeat.config import DataSpec
from xfeat.data import load_dataset
from xfeat.errors import ConfigError, DataError

EXTRACT = dict(image_size=TINY, num_workers=0, progress=False)


def _rows_of(folder):
    """One row per image of a class-folder data set: file_name, label, split, patient."""
    rows = []
    for p in sorted(folder.rglob("*")):
        if p.suffix not in (".png", ".jpeg") or p.name.startswith("."):
            continue
        split, label = p.relative_to(folder).parts[:2]
        rows.append(
            {
                "file_name": p.relative_to(folder).as_posix(),
                "label": label,
                "split": split,
                "patient": p.stem[:6],
            }
        )
    return rows


def _write(path, rows, columns=None, delimiter=","):
    columns = columns or list(rows[0])
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, columns, delimiter=delimiter, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture
def folder(tmp_path):
    return make_image_folder(tmp_path / "images", n_train=12, n_test=4)


def test_csv_tsv_jsonl_and_metadata_csv_read_the_same_data(folder, tmp_path):
    rows = _rows_of(folder)
    csv_path = _write(folder / "labels.csv", rows)
    tsv_path = _write(folder / "labels.tsv", rows, delimiter="\t")
    jsonl = folder / "labels.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    _write(folder / "metadata.csv", rows)
    sets = [load_dataset(p) for p in (csv_path, tsv_path, jsonl, folder)]
    ref = load_dataset(DataSpec(csv_path))
    for ds in sets:
        assert ds.class_names == ["NORMAL", "PNEUMONIA"]
        assert {s: len(sp) for s, sp in ds.splits.items()} == {
            s: len(sp) for s, sp in ref.splits.items()
        }
        assert ds.splits["test"].ids == ref.splits["test"].ids
        np.testing.assert_array_equal(ds.splits["train"].labels, ref.splits["train"].labels)
    assert sets[3].name == "images" and sets[0].name == "labels"
    assert ref.splits["test"].ids[0].startswith("test/")  # ids are the paths as the table gives them


def test_a_table_extracts_and_records_its_columns(folder, tmp_path):
    rows = _rows_of(folder)
    for r in rows:
        r["path"], r["diagnosis"] = r.pop("file_name"), r.pop("label")
    table = _write(tmp_path / "t.csv", [{**r, "path": "images/" + r["path"]} for r in rows])
    spec = DataSpec(table, image_col="path", label_col="diagnosis")
    path = xfeat.extract(spec, "resnet18", cache_dir=tmp_path / "c", **EXTRACT)
    meta = xfeat.read_meta(path)
    assert meta.data == spec and meta.class_names == ("NORMAL", "PNEUMONIA")
    # a command given the cache alone reloads the same data through the recorded spec
    from xfeat.extraction.features import load_matching_dataset

    assert load_matching_dataset(meta).fingerprint == meta.dataset.fingerprint
    result = CliRunner().invoke(
        cli,
        [
            "-q",
            "extract",
            "--data",
            str(table),
            "--weights",
            "none",
            "--image-col",
            "path",
            "--label-col",
            "diagnosis",
            "--image-size",
            str(TINY),
            "--num-workers",
            "0",
            "--cache-dir",
            str(tmp_path / "c"),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["path"] == str(path)  # the same entry: reused


def test_a_patient_column_keeps_each_patient_on_one_side(folder, tmp_path):
    rows = [r for r in _rows_of(folder) if r["split"] == "train"]
    for i, r in enumerate(rows):
        r["file_name"] = "images/" + r["file_name"]
        r["patient"] = f"P{i // 3}"  # three images a patient, whatever the file names say
    table = _write(tmp_path / "t.csv", rows, ["file_name", "label", "patient"])
    ds = load_dataset(DataSpec(table, patient_col="patient", val_fraction=0.3))
    train, val = ds.splits["train"], ds.splits["val"]
    assert set(train.groups).isdisjoint(val.groups) and len(val) % 3 == 0
    assert ds.split_info["patient_col"] == "patient" and "test" not in ds.splits


def test_patients_across_splits_come_from_the_patient_column():
    from xfeat.analysis.duplicates import patients_across_splits

    images = {
        "id": ["a.png", "b.png", "c.png", "d.png"],
        "split": ["train", "test", "train", "val"],
        "label": ["NORMAL"] * 4,
        "patient": ["P1", "P1", "P2", "P3"],
    }
    summary, rows = patients_across_splits(images, None, [], [])
    assert summary["patients_from"] == "patient column" and summary["n_patients"] == 3
    assert summary["n_across_splits"] == 1 and {r["id"] for r in rows} == {"a.png", "b.png"}


@pytest.mark.parametrize(
    "edit, options, message",
    [
        (
            lambda rows: rows,
            {"label_col": "diagnosis"},
            "no column 'diagnosis' (the --label-col); its columns are 'file_name', 'label', "
            "'split', 'patient'",
        ),
        (lambda rows: rows, {"split_col": "fold"}, "no column 'fold' (the --split-col)"),
        (
            lambda rows: [{**rows[0], "split": "holdout"}] + rows[1:],
            {},
            "row 1: split 'holdout' in column 'split'; expected train, val",
        ),
        (
            lambda rows: [{**rows[0], "file_name": "nowhere.png"}] + rows[1:],
            {},
            "the image files of rows 1 (nowhere.png) do not exist",
        ),
        (lambda rows: rows + [rows[0]], {}, "both name the image"),
        (lambda rows: [], {}, "has no rows"),
        (
            lambda rows: [{**r, "label": "NORMAL"} for r in rows],
            {},
            "every train row has the label 'NORMAL'",
        ),
        (
            lambda rows: [{**r, "label": "COVID"} if r["split"] == "test" else r for r in rows],
            {},
            "test rows have labels ['COVID'] that no train row has",
        ),
        (lambda rows: [{**rows[0], "label": ""}] + rows[1:], {}, "rows 1 have no label"),
    ],
)
def test_table_errors_name_the_row_and_value(folder, edit, options, message):
    rows = _rows_of(folder)
    table = folder / "t.csv"
    edited = edit(rows)
    _write(table, edited, list(rows[0])) if edited else table.write_text("file_name,label,split\n")
    with pytest.raises(DataError, match=re.escape(message)):
        load_dataset(DataSpec(table, **options))


def test_missing_files_skipped_and_recorded_with_skip_bad(folder, tmp_path):
    rows = _rows_of(folder)
    rows[0]["file_name"] = "gone.png"
    table = _write(folder / "t.csv", rows)
    with pytest.raises(DataError, match="pass --skip-bad"):
        xfeat.extract(table, "resnet18", cache_dir=tmp_path / "c", **EXTRACT)
    path = xfeat.extract(table, "resnet18", cache_dir=tmp_path / "c", skip_bad=True, **EXTRACT)
    features = xfeat.read_cache(path)
    skipped = [i for ids in features.skipped.values() for i in ids]
    assert skipped == ["gone.png"]
    with pytest.raises(ConfigError, match="image_col=''"):
        DataSpec(table, image_col="")


@pytest.mark.integration
def test_a_three_class_table_over_the_shared_xrays(tmp_path):
    """normal / bacterial / viral from the file names, patients from them too: fit-head gives
    a 3-class head, its metrics are macro averages, and no patient straddles train and val."""
    rows = []
    for split in ("train", "test"):
        for cls in ("NORMAL", "PNEUMONIA"):
            files = sorted((CHEST / split / cls).glob("*.jpeg"))[:: 20 if split == "train" else 8]
            for p in files:
                kind = "normal" if cls == "NORMAL" else ("viral" if "_virus_" in p.name else "bacterial")
                patient = p.name.split("_")[0] if cls == "PNEUMONIA" else p.stem
                rows.append({"file_name": str(p), "label": kind, "split": split, "patient": patient})
    table = _write(tmp_path / "three.csv", rows)
    spec = DataSpec(table, patient_col="patient")
    result = xfeat.fit_head(
        spec,
        "mobilenet_v2",
        weights=str(CHEST.parents[1] / "weights" / "mobilenet_v2_imagenet_features.pth"),
        save=False,
        n_boot=0,
        extract_options=dict(cache_dir=tmp_path / "c", num_workers=0, progress=False),
    )
    record = result.record
    assert record.dataset.class_names == ("bacterial", "normal", "viral")
    assert record.threshold.rule == "argmax" and record.metrics["test"]["accuracy"] > 0.5
    assert record.metrics["test"]["roc_auc"] > 0.7
    ds = load_dataset(spec)
    assert set(ds.splits["train"].groups).isdisjoint(ds.splits["val"].groups)
