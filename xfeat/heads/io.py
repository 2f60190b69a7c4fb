"""Saving and loading fitted heads, without pickle.

A head file is one ``.npz``: the head's learned arrays as plain numeric entries, plus a JSON
string under ``__meta__`` (format, head name, constructor parameters, learned scalars, the
selection record and the caller's metadata).  It is read with
``np.load(..., allow_pickle=False)``, so loading a file can run no code.
"""

from __future__ import annotations

import json
import logging
import zipfile
from pathlib import Path
from typing import Optional

import numpy as np
from sklearn.utils.validation import check_is_fitted

from xfeat.errors import ConfigError, DataError
from xfeat.files import atomic_write, dumps
from xfeat.heads.base import BaseHead
from xfeat.heads.multilabel import OneVsRestHead
from xfeat.heads.registry import HEADS

logger = logging.getLogger(__name__)

FORMAT = "xfeat-head"
# 1: the first release.  2: heads became scikit-learn estimators; LogisticHead gained the
# parameter ``solver`` and the learned ``n_iter_``, and ``classes_`` may hold any labels.
# Version-1 files load unchanged (a parameter they lack takes its default); the bump makes an
# older xfeat refuse a version-2 file with "upgrade" instead of an unknown-parameter error.
# 3: multi-label one-vs-rest heads (``head`` "ovr"); single-label files are still written as 2.
FORMAT_VERSION = 3
SINGLE_HEAD_VERSION = 2  # what a single-label head is written as (read by xfeat 0.2 too)
_OVR_PREFIX = "label{}__"  # arrays of label j's head in a one-vs-rest file


EXTRA = "extra__"  # prefix of the arrays stored beside a head (e.g. its OOD reference)


def save_head(head: BaseHead, path, *, metadata: dict, extra: Optional[dict] = None) -> Path:
    """Write a fitted head to one ``.npz`` (numeric arrays + a JSON ``__meta__``), atomically.

    ``metadata`` (threshold, class names, cache key, ...) must be JSON-serialisable; it is
    returned unchanged by :func:`load_head`. ``extra``: named numeric arrays kept beside the
    head (:func:`load_head_extra` returns them).
    """
    if isinstance(head, OneVsRestHead):
        return _save_one_vs_rest(head, path, metadata=metadata, extra=extra)
    name = next((n for n, cls in HEADS.items() if type(head) is cls), None)
    if name is None:
        raise TypeError(
            f"cannot save {type(head).__name__}; expected one of: "
            f"{', '.join(cls.__name__ for cls in HEADS.values())}."
        )
    check_is_fitted(head, "classes_")
    meta = {
        "format": FORMAT,
        "format_version": SINGLE_HEAD_VERSION,
        "head": name,
        **_parts(head),
        "metadata": metadata,
    }
    arrays = {attr: np.asarray(getattr(head, attr)) for attr in head._arrays}
    return _write(path, name, meta, arrays, extra)


def _parts(head: BaseHead) -> dict:
    return {
        "params": head.get_params(deep=False),
        # hasattr: a head loaded from an older file may lack an attribute added since
        "learned": {attr: getattr(head, attr) for attr in head._scalars if hasattr(head, attr)},
        "selection": head.selection_,
    }


def _save_one_vs_rest(head: OneVsRestHead, path, *, metadata: dict, extra) -> Path:
    """A one-vs-rest head: each label's head's arrays under ``label{j}__``, their parameters,
    learned scalars and selections in ``__meta__["labels"]``."""
    for e in head.estimators_:
        check_is_fitted(e, "classes_")
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "head": "ovr",
        "base_head": head.head,
        "params": head.params,
        "label_names": head.label_names_,
        "labels": [_parts(e) for e in head.estimators_],
        "selection": head.selection_,
        "metadata": metadata,
    }
    arrays = {
        _OVR_PREFIX.format(j) + attr: np.asarray(getattr(e, attr))
        for j, e in enumerate(head.estimators_)
        for attr in e._arrays
    }
    return _write(path, f"one-vs-rest {head.head}", meta, arrays, extra)


def _write(path, name: str, meta: dict, arrays: dict, extra) -> Path:
    try:
        meta_json = dumps(meta, indent=None)
    except (TypeError, ValueError) as exc:
        raise DataError(f"metadata for the {name} head is not JSON-serialisable: {exc}") from exc
    arrays.update({EXTRA + key: np.asarray(value) for key, value in (extra or {}).items()})
    path = atomic_write(path, lambda f: np.savez(f, __meta__=np.array(meta_json), **arrays))
    logger.info("saved %s head to %s", name, path)
    return path


def _read(path: Path) -> tuple[dict, dict]:
    """The ``__meta__`` dict and the arrays of a head file."""
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise ValueError("it holds a single array, not an .npz archive")
        with data:
            if "__meta__" not in data.files:
                raise ValueError("it has no '__meta__' entry")
            meta = json.loads(data["__meta__"].item())
            arrays = {key: data[key] for key in data.files if key != "__meta__"}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:  # text, pickle, truncated ...
        raise DataError(f"{path} is not an xfeat head file ({exc}).") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DataError(f"{path} is not an xfeat head file (format is not {FORMAT!r}).")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise DataError(
            f"{path} has format_version {version!r}; this xfeat reads versions up "
            f"to {FORMAT_VERSION}. Upgrade xfeat to load it."
        )
    return meta, arrays


def load_head(path) -> tuple:
    """Load a head written by :func:`save_head`; return ``(fitted_head, metadata)``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no xfeat head file at {path}; expected a head.npz written by fit-head")
    meta, arrays = _read(path)
    arrays = {k: v for k, v in arrays.items() if not k.startswith(EXTRA)}
    if meta.get("head") == "ovr":
        estimators = []
        for j, parts in enumerate(meta["labels"]):
            prefix = _OVR_PREFIX.format(j)
            own = {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}
            estimators.append(_build(path, meta["base_head"], parts, own))
        head = OneVsRestHead.from_estimators(
            meta["base_head"], meta["params"], estimators, meta["label_names"], meta["selection"]
        )
        return head, meta["metadata"]
    return _build(path, meta.get("head"), meta, arrays), meta["metadata"]


def _build(path: Path, name, meta: dict, arrays: dict) -> BaseHead:
    """One head of class ``HEADS[name]`` from its parameters, learned values and arrays."""
    if name not in HEADS:
        raise DataError(
            f"{path} holds unknown head {name!r}; expected one of: {', '.join(sorted(HEADS))}."
        )
    cls = HEADS[name]
    missing = [a for a in cls._arrays if a not in arrays]
    if missing:
        raise DataError(f"{path} is missing arrays {missing} for a {name} head.")
    params = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["params"].items()}
    # xfeat 0.2 recorded LogisticHead's solver; the fitted coefficients do not depend on it.
    params.pop("solver", None)
    unknown = sorted(set(params) - set(cls().get_params(deep=False)))
    if unknown:
        raise DataError(
            f"{path} has parameters {unknown} that {cls.__name__} does not take; "
            "it was written by another version of xfeat."
        )
    head = cls(**params)
    for attr, value in {**meta["learned"], "selection_": meta["selection"], **arrays}.items():
        setattr(head, attr, value)
    return head


def load_head_extra(path) -> dict:
    """The arrays saved beside a head with ``save_head(extra=...)``; ``{}`` when there are none."""
    _, arrays = _read(Path(path))
    return {k[len(EXTRA) :]: v for k, v in arrays.items() if k.startswith(EXTRA)}
