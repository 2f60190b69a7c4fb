"""Write label tables over the shared Kermany chest X-rays, with labels from the file names.

The file names say more than the class folders: ``person123_bacteria_456.jpeg`` is a
bacterial pneumonia of patient 123, ``person45_virus_78.jpeg`` a viral one. Three tables:

* ``nih.csv``: NIH ChestX-ray14 style: ``Image Index``, pipe-joined ``Finding Labels``
  (``Pneumonia|Bacterial``, ``Pneumonia|Viral`` or ``No Finding``), ``Patient ID``, ``split``;
* ``chexpert.csv``: CheXpert style: ``Path``, one 1/0 column per label (``Pneumonia``,
  ``Bacterial``, ``Viral``), ``Patient ID``, ``split``;
* ``three_class.csv``: ``file_name``, ``label`` (normal / bacterial / viral), ``split``.

Paths in the tables are absolute, so the tables can live anywhere (nothing is copied).

    python scripts/kermany_tables.py OUT_DIR [--data ../shared/data/chest_xray224] [--per-class N]
"""

from __future__ import annotations

import argparse
import csv
import re
from pathlib import Path

LABELS = ("Pneumonia", "Bacterial", "Viral")
_PATIENT = re.compile(r"^(person\d+|(?:NORMAL\d+-)?IM-\d+)[_-]")


def kind_of(path: Path) -> str:
    """normal, bacterial or viral, from the class folder and the file name."""
    if path.parent.name == "NORMAL":
        return "normal"
    if "_bacteria_" in path.name:
        return "bacterial"
    if "_virus_" in path.name:
        return "viral"
    raise ValueError(f"{path}: a PNEUMONIA file name without _bacteria_ or _virus_")


def images(data: Path, per_class=None) -> list:
    """``[(split, path)]`` of the data set's JPEGs, sorted; at most ``per_class`` of each kind
    (normal, bacterial, viral) per split when given."""
    rows = []
    for split in ("train", "val", "test"):
        taken = {}
        for path in sorted((data / split).glob("*/*.jpeg")):
            kind = kind_of(path)
            if per_class is not None and taken.get(kind, 0) >= per_class:
                continue
            taken[kind] = taken.get(kind, 0) + 1
            rows.append((split, path))
    return rows


def patient_of(path: Path) -> str:
    m = _PATIENT.match(path.name)
    return m.group(1) if m else path.stem


def write_tables(out_dir, data, per_class=None) -> dict:
    """Write the three tables into ``out_dir``; return ``{name: path}``."""
    out_dir, data = Path(out_dir), Path(data)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = images(data, per_class)
    paths = {name: out_dir / f"{name}.csv" for name in ("nih", "chexpert", "three_class")}
    with open(paths["nih"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Image Index", "Finding Labels", "Patient ID", "split"])
        for split, path in rows:
            kind = kind_of(path)
            finding = "No Finding" if kind == "normal" else f"Pneumonia|{kind.capitalize()}"
            w.writerow([str(path), finding, patient_of(path), split])
    with open(paths["chexpert"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Path", *LABELS, "Patient ID", "split"])
        for split, path in rows:
            kind = kind_of(path)
            values = [int(kind != "normal"), int(kind == "bacterial"), int(kind == "viral")]
            w.writerow([str(path), *(f"{v}.0" for v in values), patient_of(path), split])
    with open(paths["three_class"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file_name", "label", "split"])
        for split, path in rows:
            w.writerow([str(path), kind_of(path), split])
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument(
        "--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/chest_xray224")
    )
    parser.add_argument(
        "--per-class", type=int, default=None, help="at most N images per kind per split"
    )
    args = parser.parse_args()
    for name, path in write_tables(args.out_dir, args.data, args.per_class).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
