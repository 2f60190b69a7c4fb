"""``load_dataset``: the data a :class:`~xfeat.config.DataSpec` names, with its validation split."""

from __future__ import annotations

from pathlib import Path
from typing import Union

from xfeat.config import DataSpec
from xfeat.data import builtin as datasets_builtin
from xfeat.data.dataset import Dataset
from xfeat.data.folders import load_folder
from xfeat.data.npz import load_npz
from xfeat.data.splits import attach_dicom_groups, ensure_validation_split
from xfeat.data.tables import load_table, table_of
from xfeat.errors import DataError


def load_dataset(
    data: Union[DataSpec, str, Path],
    *,
    cache_dir: Union[str, Path, None] = None,
    allow_missing: bool = False,
) -> Dataset:
    """Load the label table, folder, ``.npz`` file or built-in data set that ``data`` names.

    ``data`` is a :class:`~xfeat.config.DataSpec`, or a path or name (the spec's defaults).
    A missing or tiny val split (fewer than ``TINY_VAL_SIZE`` images) is carved out of train
    as the spec says: stratified by class, seeded, and with every patient group on one side.
    Test is never touched. Built-in data sets are downloaded into ``cache_dir/datasets``.
    ``allow_missing``: a table row whose image file is missing is kept (and recorded as
    unreadable when extracted, as ``--skip-bad`` does) instead of being an error.
    """
    spec = DataSpec.coerce(data)
    data = spec.source
    path = Path(data).expanduser()
    table = table_of(path)
    if table is not None:
        dataset = load_table(table, spec, allow_missing=allow_missing)
    elif path.is_dir():
        dataset = load_folder(path)
    elif path.is_file():
        if path.suffix.lower() != ".npz":
            raise DataError(
                f"--data {str(data)!r} is a file but neither a label table (.csv, .tsv, .jsonl) "
                "nor an .npz; expected a folder ROOT/{train,val,test}/CLASS/*.jpg, a table, an "
                f".npz file or a built-in name ({', '.join(datasets_builtin.names())})"
            )
        dataset = load_npz(path)
    elif str(data).lower() in datasets_builtin.names():
        npz_path = datasets_builtin.download(str(data).lower(), cache_dir=cache_dir)
        dataset = load_npz(
            npz_path, name=str(data).lower(), class_names=datasets_builtin.class_names(str(data).lower())
        )
    else:
        raise DataError(
            f"--data {str(data)!r}: no such folder or .npz file, and not a built-in "
            f"dataset (built-in: {', '.join(datasets_builtin.names())})"
        )
    attach_dicom_groups(dataset, spec)
    ensure_validation_split(dataset, spec)
    dataset.spec = spec
    return dataset
