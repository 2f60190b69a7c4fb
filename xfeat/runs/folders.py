"""Run folders: one naming scheme for every command, and a lock so two runs never share one.

``runs/DATASET/MODEL-WEIGHTS/KIND`` by default (``KIND``: ``cached-logreg``, ``full-linear``,
``analysis``, ...); ``compare`` adds a hash of the run's configuration so a changed option
never reuses an old run.
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Optional, Union

from xfeat.config import DEFAULT_RUNS_DIR
from xfeat.errors import OutputError
from xfeat.files import describe_os_error, make_dirs, safe_name


def weights_tag(weights: dict) -> str:
    """Short name of a weights record (``{kind, id}``), as :func:`xfeat.backbones.weights_tag`."""
    from xfeat.backbones.weights import weights_tag as tag

    return tag(weights["kind"], weights["id"])


def default_run_dir(
    dataset: str, model: str, weights: dict, kind: str, root: Union[str, Path] = DEFAULT_RUNS_DIR
) -> Path:
    """``root/DATASET/MODEL-WEIGHTS/KIND``."""
    return Path(root) / dataset / f"{safe_name(model)}-{safe_name(weights_tag(weights))}" / kind


def config_run_name(model: str, weights: dict, kind: str, config: dict) -> str:
    """A readable folder name unique per configuration: ``MODEL-WEIGHTS-KIND-HASH8``."""
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    return f"{safe_name(model)}-{safe_name(weights_tag(weights))}-{kind}-{digest.hexdigest()[:8]}"


@contextmanager
def run_lock(run_dir: Union[str, Path], what: str = "run"):
    """Hold ``run_dir/.lock`` while a run writes there; a second writer fails at once.

    The lock is an ``flock`` on a file, so a killed process releases it; the message names the
    folder and what to do.
    """
    from filelock import FileLock, Timeout

    run_dir = make_dirs(run_dir)
    lock = FileLock(str(run_dir / ".lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise OutputError(
            f"another xfeat process is writing a {what} to {run_dir}; wait for it "
            "to finish or choose another --out"
        ) from None
    except OSError as exc:
        raise OutputError(describe_os_error(exc, run_dir / ".lock")) from None
    try:
        _remove_stray_temporaries(run_dir)
        yield run_dir
    finally:
        lock.release()


def _remove_stray_temporaries(run_dir: Path) -> None:
    """Temporary files of :func:`xfeat.files.atomic_write` left by a killed process: with the
    folder's lock held no writer is using them."""
    for tmp in run_dir.glob(".*.tmp"):
        try:
            tmp.unlink()
        except OSError:
            pass


def _exists(p: Path, path: Path) -> bool:
    """``p.exists()``; a parent that cannot be searched (EACCES) is an error naming ``path``."""
    try:
        return p.exists()
    except OSError as exc:
        raise OutputError(describe_os_error(exc, path)) from None


def check_writable(path: Optional[Union[str, Path]]) -> None:
    """Fail before any work when ``path`` (a folder to be) cannot be written."""
    if path is None:
        return
    path = Path(path)
    existing = next((p for p in [path, *path.parents] if _exists(p, path)), None)
    if existing is not None and not existing.is_dir():
        raise OutputError(
            f"cannot write to {path}: {existing} is a file, not a folder; choose another path"
        )
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(
            f"cannot write to {path}: {existing} is not writable; choose a writable folder"
        )
