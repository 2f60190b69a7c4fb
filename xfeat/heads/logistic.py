"""``LogisticHead``: standardised features + L2 logistic regression, C chosen on val."""

from __future__ import annotations

import logging
import math
import numbers
import time
import warnings
from typing import Any

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, balanced_accuracy_score, log_loss, roc_auc_score

from xfeat.errors import ConfigError, DataError
from xfeat.heads.base import (
    BaseHead,
    check_choice,
    check_fit_inputs,
    check_positive_int,
    need_val,
    proba_from_logits,
    single_blas_thread,
)

logger = logging.getLogger(__name__)

# Coarse grid for C on standardised features: one value per decade from "weights ~ 0" to
# "almost unregularised"; then three halvings of the step around the best value, down to
# 1/8 decade, as in CLIP's linear-probe protocol (Radford et al. 2021, App. A.3).
_LOG10_C_GRID = tuple(range(-6, 3))
_REFINE_STEPS = 3
SCORINGS = ("log_loss", "accuracy", "balanced_accuracy", "roc_auc")
_ROWS_PER_CHUNK = 256  # rows per block when a float64 temporary of a slice is needed


def _column_stats(blocks: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std (float64) over the rows of several arrays, in bounded memory."""
    n = sum(len(b) for b in blocks)
    mean = sum(b.sum(axis=0, dtype=np.float64) for b in blocks) / n
    ssd = np.zeros_like(mean)
    for b in blocks:
        for i in range(0, len(b), _ROWS_PER_CHUNK):
            d = b[i : i + _ROWS_PER_CHUNK] - mean
            ssd += np.einsum("ij,ij->j", d, d)
    scale = np.sqrt(ssd / n)
    # As scikit-learn's StandardScaler: a constant feature is left unscaled.
    scale[scale < 10 * np.finfo(np.float64).eps * np.maximum(1.0, np.abs(mean))] = 1.0
    return mean, scale


def _standardize(blocks: list[np.ndarray], mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Stack ``(block - mean) / scale`` into one new float32 array, in place (no temporaries).

    StandardScaler would need a float64 copy of the stacked blocks; this needs none.
    """
    mean32, scale32 = mean.astype(np.float32), scale.astype(np.float32)
    out = np.empty((sum(len(b) for b in blocks), len(mean)), dtype=np.float32)
    row = 0
    for b in blocks:
        np.subtract(b, mean32, out=out[row : row + len(b)])
        out[row : row + len(b)] /= scale32
        row += len(b)
    return out


class _SklearnSolver:
    """scikit-learn's ``LogisticRegression`` (L-BFGS) at one C, warm-started on request."""

    def __init__(
        self, Z: np.ndarray, y: np.ndarray, n_classes: int, *, sample_weight, max_iter: int, tol: float
    ):
        self.Z, self.y, self.sample_weight = Z, y, sample_weight
        self.params = {"max_iter": max_iter, "tol": tol}

    def solve(self, C: float, start=None):
        """Fit at ``C`` from ``start`` = (coef, intercept) or zeros.

        Returns ``(coef (K, D), intercept (K,), iterations, converged)``.
        """
        clf = LogisticRegression(C=C, warm_start=start is not None, **self.params)
        if start is not None:
            # warm_start makes fit start from coef_ / intercept_: the nearest solution on the
            # C path, which is not always the previous fit.
            clf.coef_, clf.intercept_ = (np.array(a, dtype=self.Z.dtype) for a in start)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # LogisticHead logs it once
            clf.fit(self.Z, self.y, sample_weight=self.sample_weight)
        n_iter = int(np.max(clf.n_iter_))
        return (
            clf.coef_.astype(np.float64),
            clf.intercept_.astype(np.float64),
            n_iter,
            n_iter < self.params["max_iter"],
        )


def _score(scoring: str, y: np.ndarray, proba: np.ndarray) -> float:
    labels = np.arange(proba.shape[1])
    if scoring == "log_loss":
        return float(log_loss(y, proba, labels=labels))
    if scoring == "accuracy":
        return float(accuracy_score(y, proba.argmax(axis=1)))
    if scoring == "balanced_accuracy":
        return float(balanced_accuracy_score(y, proba.argmax(axis=1)))
    if len(np.unique(y)) < len(labels):
        raise DataError(
            f"scoring='roc_auc' needs every class in y_val; got classes {np.unique(y).tolist()}."
        )
    if proba.shape[1] == 2:
        return float(roc_auc_score(y, proba[:, 1]))
    return float(roc_auc_score(y, proba, multi_class="ovr", labels=labels))


class LogisticHead(BaseHead):
    """Standardised features + L2 logistic regression, C chosen on val (CLIP probe protocol).

    If ``C`` is None, a coarse sweep C = 10**-6 .. 10**2 (one value per decade) is scored on
    val, then the step is halved three times around the best value (down to 1/8 decade),
    warm-starting every fit from the nearest solution already found.  The model at the
    chosen C is kept (fit on train), or refit on train+val if ``refit_on_val``.  Ties in the
    val score go to the smaller C (stronger regularisation).  With ``C`` fixed, no val is
    needed (e.g. inside ``cross_val_predict``).

    Parameters
    ----------
    C : float or None
        Inverse L2 strength in scikit-learn's convention, on standardised features; None
        chooses it on val.
    class_weight : "balanced", None, "none" or dict
        "balanced" weighs each sample by ``n / (n_classes * count(class))``; a dict maps a
        class label to its weight (1 if absent); None and "none" weigh samples equally.
    scoring : {"log_loss", "accuracy", "balanced_accuracy", "roc_auc"}
        Val score used to choose C (log_loss: lower is better; others: higher).
    refit_on_val : bool
        Refit the final model on train+val (standardisation statistics included).
    max_iter, tol : int, float
        L-BFGS iteration limit and gradient tolerance per fit.

    Attributes
    ----------
    C_, coef_ (K, D) in standardised space (K = 1 for binary: the logit of ``classes_[1]``),
    intercept_ (K,), mean_, scale_, n_iter_ (of the final fit), classes_, n_features_in_,
    selection_, fit_seconds_.
    """

    _arrays = ("classes_", "coef_", "intercept_", "mean_", "scale_")
    _scalars = ("C_", "n_features_in_", "fit_seconds_", "n_iter_")

    def __init__(
        self,
        *,
        C=None,
        class_weight="balanced",
        scoring="log_loss",
        refit_on_val=False,
        max_iter=1000,
        tol=1e-4,
    ):
        self.C = C
        self.class_weight = class_weight
        self.scoring = scoring
        self.refit_on_val = refit_on_val
        self.max_iter = max_iter
        self.tol = tol

    def _check_params(self) -> None:
        check_choice("scoring", self.scoring, SCORINGS)
        if not isinstance(self.class_weight, dict):
            check_choice("class_weight", self.class_weight, ("balanced", None, "none"))
        elif not all(isinstance(w, numbers.Real) and w >= 0 for w in self.class_weight.values()):
            raise ConfigError(
                f"class_weight={self.class_weight!r}; expected non-negative weights per class."
            )
        if self.C is not None and not (
            isinstance(self.C, numbers.Real) and not isinstance(self.C, bool) and 0 < self.C < math.inf
        ):
            raise ConfigError(
                f"C={self.C!r}; expected a positive finite number, or None to choose C on val."
            )
        check_positive_int("max_iter", self.max_iter)
        if not (isinstance(self.tol, numbers.Real) and self.tol > 0):
            raise ConfigError(f"tol={self.tol!r}; expected a positive number.")

    def _sample_weight(self, y: np.ndarray, classes: np.ndarray):
        """Per-sample weights from ``class_weight`` (``y`` indexes ``classes``), or None."""
        if self.class_weight in (None, "none"):
            return None
        if self.class_weight == "balanced":  # n / (n_classes * count), as scikit-learn's
            return (len(y) / (len(classes) * np.bincount(y, minlength=len(classes))))[y]
        return np.array([float(self.class_weight.get(c, 1.0)) for c in classes.tolist()])[y]

    def _solver(self, blocks, labels, classes):
        """A solver on the standardised rows of ``blocks``; returns (solver, mean, scale)."""
        mean, scale = _column_stats(blocks)
        y = np.concatenate(labels)
        solver = _SklearnSolver(
            _standardize(blocks, mean, scale),
            y,
            len(classes),
            sample_weight=self._sample_weight(y, classes),
            max_iter=self.max_iter,
            tol=self.tol,
        )
        return solver, mean, scale

    def fit(self, X, y, *, X_val=None, y_val=None) -> LogisticHead:
        """Choose C on (X_val, y_val) unless it is fixed, fit on X (or X + X_val); return self."""
        t0 = time.perf_counter()
        self._check_params()
        X, y, Xv, yv, classes = check_fit_inputs(X, y, X_val, y_val)
        if Xv is None and self.C is None:
            raise need_val("LogisticHead(C=None): C", "fix C, e.g. LogisticHead(C=0.1)")
        if Xv is None and self.refit_on_val:
            raise ConfigError(
                "refit_on_val=True refits on train+val, but fit got no val: pass "
                "X_val= and y_val= to fit, or set refit_on_val=False."
            )
        with single_blas_thread():
            solver, mean, scale = self._solver([X], [y], classes)
            fits = self._fit_path(solver, mean, scale, Xv, yv)
            chosen = fits[self._best(fits)]
            coef, intercept, n_iter, converged = (
                chosen[k] for k in ("coef", "intercept", "n_iter", "converged")
            )
            if self.refit_on_val:
                del solver  # free the standardised train copy before building train+val
                solver, mean, scale = self._solver([X, Xv], [y, yv], classes)
                coef, intercept, n_iter, converged = solver.solve(chosen["C"], (coef, intercept))
        if not converged:
            logger.warning(
                "LogisticHead: the solver stopped after %d iterations without "
                "converging at C=%.3g; consider raising max_iter.",
                n_iter,
                chosen["C"],
            )
        self._set_common(classes, X.shape[1])
        self.C_ = float(chosen["C"])
        self.n_iter_ = n_iter
        self.coef_, self.intercept_ = coef, intercept
        self.mean_, self.scale_ = mean, scale
        self.selection_ = {
            "C": self.C_,
            "scoring": self.scoring,
            "sweep": [
                {k: v for k, v in fits[s].items() if k not in ("coef", "intercept")}
                for s in sorted(fits)
            ],
            "refit_on_val": bool(self.refit_on_val),
        }
        self.fit_seconds_ = time.perf_counter() - t0
        logger.info(
            "LogisticHead: C=%.3g from %d value(s) (%s on val); fit in %.2f s",
            self.C_,
            len(fits),
            self.scoring,
            self.fit_seconds_,
        )
        return self

    def _fit_path(self, solver, mean, scale, Xv, yv) -> dict[float, dict[str, Any]]:
        """Fit at the fixed C, or along the C sweep; ``{log10(C): fit record}``."""
        Zv = None if Xv is None else _standardize([Xv], mean, scale)
        fits: dict[float, dict[str, Any]] = {}

        def evaluate(log_c: float, C: float) -> None:
            nearest = min(fits, key=lambda s: (abs(s - log_c), s), default=None)
            start = None if nearest is None else (fits[nearest]["coef"], fits[nearest]["intercept"])
            coef, intercept, n_iter, converged = solver.solve(C, start)
            score = None
            if Zv is not None:
                logits = Zv @ coef.T.astype(np.float32) + intercept
                score = _score(self.scoring, yv, proba_from_logits(logits))
            fits[log_c] = {
                "C": C,
                "val_score": score,
                "n_iter": n_iter,
                "converged": converged,
                "coef": coef,
                "intercept": intercept,
            }

        if self.C is not None:
            evaluate(math.log10(self.C), float(self.C))
            return fits
        for log_c in _LOG10_C_GRID:  # strong -> weak regularisation, each fit warm-started
            evaluate(float(log_c), 10.0**log_c)
        step = 1.0
        for _ in range(_REFINE_STEPS):
            step /= 2
            center = self._best(fits)
            for log_c in (center - step, center + step):
                if _LOG10_C_GRID[0] <= log_c <= _LOG10_C_GRID[-1] and log_c not in fits:
                    evaluate(log_c, 10.0**log_c)
        return fits

    def _best(self, fits) -> float:
        """log10 of the best C: lowest loss (or highest score); ties -> smaller C."""
        if len(fits) == 1:
            return next(iter(fits))
        sign = 1.0 if self.scoring == "log_loss" else -1.0
        return min(fits, key=lambda s: (sign * fits[s]["val_score"], s))

    def _proba(self, X: np.ndarray) -> np.ndarray:
        Z = _standardize([X], self.mean_, self.scale_)
        return proba_from_logits(Z @ self.coef_.T.astype(np.float32) + self.intercept_)
