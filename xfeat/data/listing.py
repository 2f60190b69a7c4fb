"""A fingerprint of what a :class:`~xfeat.config.DataSpec` names, from the file system alone.

Every file behind the data (the images of a folder or a table, the table itself, an ``.npz``)
contributes its path, size and modification time: nothing is opened or decoded, so a data set
of thousands of images is fingerprinted in milliseconds. A cache entry found through this
fingerprint is reused without loading the data (``xfeat.extraction.entry``); any file added,
removed, replaced or touched changes it, and the data are then loaded and hashed in full.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Optional, Union

from xfeat.config import DataSpec, default_cache_dir
from xfeat.data import builtin
from xfeat.data.tables import read_rows, table_of


def _stat(path: Union[str, Path]) -> tuple:
    s = os.stat(path)
    return str(path), s.st_size, s.st_mtime_ns


def _folder(root: Path) -> list:
    entries = []
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            entries.append(_stat(os.path.join(folder, name)))
    return entries


def listing_fingerprint(spec: DataSpec, cache_dir=None) -> Optional[str]:
    """The sha256 of the spec and the (path, size, mtime) of every file behind it; None when
    the data cannot be listed without loading them (a built-in set not downloaded yet, a
    missing path, an unreadable table)."""
    path = Path(spec.source).expanduser()
    path = path.resolve() if path.exists() else path  # one folder has one listing, whatever the cwd
    try:
        table = table_of(path)
        if table is not None:
            _, rows = read_rows(table)
            root = table.parent
            entries = [_stat(table)]
            for row in rows:
                image = root / row.get(spec.image_col, "")
                entries.append(_stat(image) if image.is_file() else (str(image), -1, -1))
        elif path.is_dir():
            entries = _folder(path)
        elif path.is_file():
            entries = [_stat(path)]
        elif str(spec.source).lower() in builtin.names():
            file_name = builtin.BUILTIN[str(spec.source).lower()][0]
            local = Path(cache_dir or default_cache_dir()) / "datasets" / file_name
            if not local.is_file():
                return None
            entries = [_stat(local)]
        else:
            return None
    except (OSError, ValueError):
        return None
    h = hashlib.sha256(repr(sorted(spec.to_dict().items())).encode())
    for entry in entries:
        h.update(repr(entry).encode())
    return h.hexdigest()
