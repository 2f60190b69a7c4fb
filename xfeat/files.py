"""Writing outputs: atomic, with the user's umask, strict JSON; clear errors when it fails.

Every file xfeat writes for a user (results, heads, reports, CSVs, checkpoints) goes through
:func:`atomic_write`: a reader sees the old file or the complete new one, never a half-written
one, even if the process is killed or the disk fills up.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import io
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Optional

from xfeat.errors import OutputError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def describe_os_error(exc: OSError, path) -> str:
    """One line that names ``path`` and says what to do about ``exc``."""
    path = str(path)
    if exc.errno == errno.ENOSPC:
        return f"no space left on the device while writing {path}; free some space and run again"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return (
            f"cannot write {path}: permission denied (read-only folder?); choose a writable "
            "folder (--out / --cache-dir)"
        )
    if exc.errno in (errno.ENOTDIR, errno.EEXIST) or isinstance(
        exc, (NotADirectoryError, FileExistsError)
    ):
        return (
            f"cannot write {path}: a parent of it is a regular file, not a folder; choose another path"
        )
    if exc.errno == errno.EISDIR:
        return f"cannot write {path}: it is a folder; give a file name"
    return f"cannot write {path}: {exc.strerror or exc}"


def safe_name(name: str, limit: int = 96) -> str:
    """``name`` usable as one file or folder name: letters, digits and ``-_.`` kept. A longer
    one (a model named by the full path of its folder, say) keeps its last ``limit`` - 9
    characters and a digest of the whole, so that names stay distinct and far below the file
    systems' 255-byte limit."""
    clean = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(name))
    if len(clean) <= limit:
        return clean
    digest = hashlib.sha256(str(name).encode()).hexdigest()[:8]
    return f"{clean[len(clean) - limit + 9 :].lstrip('_')}-{digest}"


def file_mode() -> int:
    """The permissions ``open(path, "w")`` would give a new file: 0666 minus the umask."""
    return 0o666 & ~_umask()


def make_dirs(path) -> Path:
    """``mkdir -p`` that fails with an :class:`OutputError` naming the folder."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(describe_os_error(exc, path)) from None
    if not path.is_dir():
        raise OutputError(f"cannot use {path} as a folder: it is a file")
    return path


def atomic_write(path, write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write(f)`` on a temporary file beside ``path``, then rename it into place.

    The file gets the permissions a plain ``open(path, "w")`` would (0666 minus the umask),
    so colleagues can read results. On any failure the temporary file is removed; a full disk
    or a read-only folder becomes an :class:`OutputError` naming ``path``.
    """
    path = Path(path)
    make_dirs(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise OutputError(describe_os_error(exc, path)) from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise OutputError(describe_os_error(exc, path)) from None
    except RuntimeError as exc:  # torch.save wraps the OSError of a full disk in a RuntimeError
        Path(tmp).unlink(missing_ok=True)
        cause = exc.__cause__ or exc.__context__
        if isinstance(cause, OSError):
            raise OutputError(describe_os_error(cause, path)) from None
        if "write" in str(exc).lower():
            free = free_bytes(path.parent)
            raise OutputError(
                f"cannot write {path} ({str(exc).splitlines()[0][:120]}); "
                f"{-1 if free is None else free >> 20} MiB free on its disk: free some space and "
                "run again"
            ) from None
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def free_bytes(folder) -> Optional[int]:
    """Free bytes on the disk holding ``folder`` (or its nearest existing parent); None when
    that cannot be known."""
    folder = Path(folder)
    for candidate in (folder, *folder.resolve().parents):
        if candidate.exists():
            try:
                return shutil.disk_usage(candidate).free
            except OSError:
                return None
    return None


def write_text(path, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def jsonable(obj):
    """Plain JSON types, recursively; NaN and infinities become ``None`` (strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if obj is None or isinstance(obj, (str, bool)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    # numpy without importing it: scalars have .item(), arrays .tolist()
    if hasattr(obj, "tolist") and hasattr(obj, "dtype"):
        return jsonable(obj.tolist())
    raise TypeError(f"object of type {type(obj).__name__} is not JSON-serialisable")


def dumps(obj, indent: Optional[int] = 2) -> str:
    """Strict JSON text (``allow_nan=False``): undefined numbers are ``null``."""
    return json.dumps(jsonable(obj), indent=indent, allow_nan=False)


def write_json(path, obj, indent: Optional[int] = 2) -> Path:
    return write_text(path, dumps(obj, indent=indent) + "\n")


def write_csv(path, rows: Iterable[dict], columns: list) -> Path:
    """A CSV with a header, written atomically; cells that are lists become JSON."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow(
            {
                k: json.dumps(jsonable(v))
                if isinstance(v, (list, tuple, dict))
                else ("" if isinstance(v, float) and not math.isfinite(v) else v)
                for k, v in row.items()
            }
        )
    return write_text(path, buf.getvalue())


def read_json(path) -> object:
    """Parse a JSON file xfeat wrote; a damaged file is an :class:`OutputError` naming it."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise OutputError(f"{path} is not valid JSON ({exc}); delete it and run again") from None


def save_figure(figure, path, dpi: int = 110) -> Path:
    """A matplotlib figure as a PNG at ``path``, atomically (no pyplot involved)."""
    return atomic_write(path, lambda f: figure.savefig(f, format="png", dpi=dpi))


def sha256_file(path, memo_dir=None) -> str:
    """The SHA-256 of a file's bytes, read in 1 MiB chunks.

    ``memo_dir``: remember digests in ``memo_dir/digests.json`` by resolved path, size and
    modification time, so that an unchanged 100 MB weights file is hashed once (a file
    rewritten in place with the same size and time would not be noticed, as with make).
    """
    if memo_dir is not None:
        return _remembered_sha256(Path(path), Path(memo_dir) / "digests.json")
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _remembered_sha256(path: Path, memo_file: Path) -> str:
    stat = path.stat()
    key = str(path.resolve())
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        memo = {}
    known = memo.get(key) if isinstance(memo, dict) else None
    if isinstance(known, list) and known[:2] == [stat.st_size, stat.st_mtime_ns]:
        return known[2]
    digest = sha256_file(path)
    memo = memo if isinstance(memo, dict) else {}
    memo[key] = [stat.st_size, stat.st_mtime_ns, digest]
    try:
        make_dirs(memo_file.parent)
        write_json(memo_file, memo)
    except OutputError:  # a read-only cache folder only loses the memo
        pass
    return digest
