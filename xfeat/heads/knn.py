"""``KNNHead``: cosine k-nearest neighbours on L2-normalised features, k chosen on val."""

from __future__ import annotations

import logging
import numbers
import time

import numpy as np

from xfeat.errors import ConfigError, DataError
from xfeat.heads.base import BaseHead, check_choice, check_fit_inputs, need_val

logger = logging.getLogger(__name__)

_SMOOTHING = 1e-3
WEIGHTS = ("uniform", "distance")


def _l2_normalize(X: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    return (X / np.maximum(norms, np.finfo(np.float32).tiny)).astype(np.float32)


def _top_k(queries: np.ndarray, memory: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and cosine similarities of the k most similar memory rows, most similar first.

    Similarities are computed for blocks of queries so that a block holds at most ~16M floats.
    """
    rows = max(1, (1 << 24) // len(memory))
    idx = np.empty((len(queries), k), dtype=np.int64)
    sim = np.empty((len(queries), k), dtype=np.float32)
    for i in range(0, len(queries), rows):
        S = queries[i : i + rows] @ memory.T
        part = np.argpartition(-S, k - 1, axis=1)[:, :k]
        part_sim = np.take_along_axis(S, part, axis=1)
        order = np.argsort(-part_sim, axis=1, kind="stable")
        idx[i : i + rows] = np.take_along_axis(part, order, axis=1)
        sim[i : i + rows] = np.take_along_axis(part_sim, order, axis=1)
    return idx, sim


class KNNHead(BaseHead):
    """Cosine k-nearest neighbours on L2-normalised features; k chosen on val by accuracy.

    predict_proba is the (weighted) vote fraction ``f`` per class, smoothed as
    ``(f + 1e-3) / (1 + 1e-3 * C)`` so that no probability is 0 and log loss stays finite
    (at most ~6.9 per sample).  ``weights="distance"`` weighs a neighbour by
    ``1 / (1 - cos + 1e-6)``.  Ties in val accuracy go to the smaller k.  With a single
    value in ``ks``, no val is needed.

    Attributes
    ----------
    k_, X_fit_ (normalised float32 train features), y_fit_ (their indices into classes_),
    classes_, n_features_in_, selection_, fit_seconds_.
    """

    _arrays = ("classes_", "X_fit_", "y_fit_")
    _scalars = ("k_", "n_features_in_", "fit_seconds_")

    def __init__(self, *, ks=(1, 3, 5, 7, 9, 15, 21, 31), weights="uniform"):
        self.ks = ks
        self.weights = weights

    def _checked_ks(self) -> list[int]:
        values = np.atleast_1d(np.asarray(self.ks, dtype=object))
        if (
            values.ndim != 1
            or not values.size
            or not all(
                isinstance(k, numbers.Integral) and not isinstance(k, bool) and k >= 1 for k in values
            )
        ):
            raise ConfigError(f"ks={self.ks!r}; expected one positive integer or a sequence of them.")
        return sorted({int(k) for k in values})

    def _votes(self, idx: np.ndarray, sim: np.ndarray) -> np.ndarray:
        labels = self.y_fit_[idx]
        sim = sim.astype(np.float64)
        w = np.ones_like(sim) if self.weights == "uniform" else 1.0 / (1.0 - sim + 1e-6)
        n_classes = len(self.classes_)
        votes = np.zeros((len(idx), n_classes))
        np.add.at(votes, (np.arange(len(idx))[:, None], labels), w)
        frac = votes / votes.sum(axis=1, keepdims=True)
        return (frac + _SMOOTHING) / (1.0 + _SMOOTHING * n_classes)

    def fit(self, X, y, *, X_val=None, y_val=None) -> KNNHead:
        """Choose k on val by accuracy; the training split is the neighbour memory; return self."""
        t0 = time.perf_counter()
        check_choice("weights", self.weights, WEIGHTS)
        ks = self._checked_ks()
        X, y, Xv, yv, classes = check_fit_inputs(X, y, X_val, y_val)
        usable = [k for k in ks if k <= len(X)]
        if not usable:
            raise DataError(f"ks={self.ks!r}: every k exceeds the {len(X)} training rows.")
        if Xv is None and len(usable) > 1:
            raise need_val(f"KNNHead's k (among {usable})", "fix k, e.g. KNNHead(ks=(5,))")
        self._set_common(classes, X.shape[1])
        self.X_fit_, self.y_fit_ = _l2_normalize(X), y
        sweep = []
        if Xv is not None:
            idx, sim = _top_k(_l2_normalize(Xv), self.X_fit_, usable[-1])
            for k in usable:
                proba = self._votes(idx[:, :k], sim[:, :k])
                sweep.append({"k": k, "val_accuracy": float(np.mean(proba.argmax(axis=1) == yv))})
            best = max(sweep, key=lambda s: (s["val_accuracy"], -s["k"]))
        else:
            best = {"k": usable[0], "val_accuracy": None}
        self.k_ = best["k"]
        self.selection_ = {
            "k": self.k_,
            "criterion": "val_accuracy",
            "weights": self.weights,
            "sweep": sweep,
        }
        self.fit_seconds_ = time.perf_counter() - t0
        logger.info(
            "KNNHead: k=%d (val_acc=%s); fit in %.2f s", self.k_, best["val_accuracy"], self.fit_seconds_
        )
        return self

    def _proba(self, X: np.ndarray) -> np.ndarray:
        idx, sim = _top_k(_l2_normalize(X), self.X_fit_, self.k_)
        return self._votes(idx, sim)
