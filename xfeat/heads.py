"""Heads: classifiers trained on cached (N, D) feature arrays, and their safe persistence.

Every head follows scikit-learn's conventions: ``__init__`` stores parameters only,
``fit(X_train, y_train, X_val, y_val)`` validates, learns and returns ``self``, learned
attributes end in ``_``.  The validation split is the only data a head uses to make a
choice (C, k, best epoch); the test split never reaches a head.

Heads are saved as one ``.npz`` of plain numeric arrays plus a JSON string under
``__meta__``; loading uses ``np.load(..., allow_pickle=False)``, so no pickle is involved.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import math
import numbers
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import minimize
from scipy.special import expit, log_softmax, softmax
from sklearn.exceptions import NotFittedError
from sklearn.metrics import accuracy_score, balanced_accuracy_score, log_loss, roc_auc_score
from threadpoolctl import threadpool_limits

from .files import atomic_write, dumps

logger = logging.getLogger(__name__)

FORMAT = "xfeat-head"
FORMAT_VERSION = 1

# Coarse grid for C = 1 / (lambda * n) on standardised features: one value per decade from
# "weights ~ 0" to "almost unregularised"; then three halvings of the step around the best
# value, down to 1/8 decade, as in CLIP's linear-probe protocol (Radford et al. 2021, App. A.3).
_LOG10_C_GRID = tuple(range(-6, 3))
_REFINE_STEPS = 3
_SCORINGS = ("accuracy", "balanced_accuracy", "log_loss", "roc_auc")
_ROWS_PER_CHUNK = 256  # rows per block when a float64 temporary of a slice is needed
_KNN_SMOOTHING = 1e-3


# --------------------------------------------------------------------------- validation


def _check_X(X: Any, name: str) -> np.ndarray:
    """Return ``X`` as a C-contiguous float32 2-D array (no copy if it already is one)."""
    X = np.asarray(X)
    if X.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (n_samples, n_features); got shape {X.shape}.")
    if X.dtype.kind not in "fiu":
        raise ValueError(f"{name} has dtype {X.dtype}; expected real-valued (float) features.")
    if X.shape[0] == 0 or X.shape[1] == 0:
        raise ValueError(f"{name} has shape {X.shape}; expected at least one row and one feature.")
    X = np.ascontiguousarray(X, dtype=np.float32)
    # A float64 sum is NaN/inf iff some entry is, and needs no n x D boolean temporary.
    if not np.isfinite(X.sum(dtype=np.float64)):
        raise ValueError(f"{name} contains NaN or infinite values; expected finite features.")
    return X


def _check_y(y: Any, name: str, n_rows: int) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of class indices; got shape {y.shape}.")
    if y.dtype.kind not in "iu":
        raise ValueError(f"{name} has dtype {y.dtype}; expected integer class indices 0..C-1.")
    if len(y) != n_rows:
        raise ValueError(f"{name} has {len(y)} labels but its X has {n_rows} rows; "
                         "expected one label per row.")
    if len(y) and y.min() < 0:
        raise ValueError(f"{name} contains label {int(y.min())}; expected class indices >= 0.")
    return y.astype(np.int64)


def _check_fit_inputs(X_train, y_train, X_val, y_val):
    """Validate both splits; return float32 X's, int64 y's and the number of classes."""
    X = _check_X(X_train, "X_train")
    Xv = _check_X(X_val, "X_val")
    y = _check_y(y_train, "y_train", len(X))
    yv = _check_y(y_val, "y_val", len(Xv))
    if Xv.shape[1] != X.shape[1]:
        raise ValueError(
            f"X_val has {Xv.shape[1]} features, but X_train has {X.shape[1]}; "
            "expected the same features in both splits."
        )
    n_classes = int(max(y.max(), yv.max())) + 1
    if n_classes < 2:
        raise ValueError("y_train and y_val hold only class 0; expected at least two classes.")
    missing = np.flatnonzero(np.bincount(y, minlength=n_classes) == 0).tolist()
    if missing:
        raise ValueError(
            f"y_train has no samples of class(es) {missing}; the labels imply classes "
            f"0..{n_classes - 1}, and every class must occur in the training split."
        )
    return X, y, Xv, yv, n_classes


# --------------------------------------------------------------------------- base class


class _Head:
    """Shared plumbing: parameters, fitted checks, prediction and the persisted state."""

    _arrays: tuple[str, ...] = ()  # learned ndarrays saved as npz entries
    _scalars: tuple[str, ...] = ()  # learned JSON-able attributes saved in __meta__ (+ selection_)

    def get_params(self) -> dict[str, Any]:
        """Constructor parameters, as scikit-learn's ``get_params(deep=False)``."""
        names = inspect.signature(type(self).__init__).parameters
        return {name: getattr(self, name) for name in names if name != "self"}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"

    def _check_fitted(self) -> None:
        if not hasattr(self, "classes_"):
            raise NotFittedError(
                f"This {type(self).__name__} instance is not fitted yet; "
                "call fit(X_train, y_train, X_val, y_val) first."
            )

    def _check_predict_X(self, X: Any) -> np.ndarray:
        self._check_fitted()
        X = _check_X(X, "X")
        if X.shape[1] != self.n_features_in_:
            raise ValueError(
                f"X has {X.shape[1]} features, but {type(self).__name__} is expecting "
                f"{self.n_features_in_} features as input."
            )
        return X

    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities, shape (N, C), float64."""
        return self._proba(self._check_predict_X(X))

    def predict(self, X) -> np.ndarray:
        """Most probable class index per row (the smallest index on ties)."""
        proba = self.predict_proba(X)
        return self.classes_[np.argmax(proba, axis=1)]

    def _proba(self, X: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def _set_common(self, n_classes: int, n_features: int) -> None:
        self.classes_ = np.arange(n_classes)
        self.n_features_in_ = int(n_features)


@contextlib.contextmanager
def _single_thread():
    """Run BLAS and torch single-threaded inside the block, restoring the settings after.

    The heads' inner loops are matrix-vector products and 32-row mini-batches: memory- or
    overhead-bound, so a second thread gains little, while with another process holding one
    of two cores, thread hand-offs made a LogisticHead fit ~8x and a LinearHead epoch ~70x
    slower (measured). One thread is fast whatever else the machine is doing.
    """
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1, user_api="blas"):
            yield
    finally:
        torch.set_num_threads(torch_threads)


def _proba_from_logits(logits: np.ndarray) -> np.ndarray:
    """(N, 1) binary logits -> sigmoid; (N, C) -> softmax; always (N, C) float64."""
    logits = np.asarray(logits, dtype=np.float64)
    if logits.shape[1] == 1:
        p1 = expit(logits[:, 0])
        return np.column_stack([1.0 - p1, p1])
    return softmax(logits, axis=1)


# --------------------------------------------------------------------------- logistic regression


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
    """Stack ``(block - mean) / scale`` into one new float32 array, in place (no temporaries)."""
    mean32, scale32 = mean.astype(np.float32), scale.astype(np.float32)
    out = np.empty((sum(len(b) for b in blocks), len(mean)), dtype=np.float32)
    row = 0
    for b in blocks:
        np.subtract(b, mean32, out=out[row : row + len(b)])
        out[row : row + len(b)] /= scale32
        row += len(b)
    return out


class _LogisticObjective:
    """Mean weighted cross-entropy + L2 on standardised float32 features, for L-BFGS.

    With ``alpha = 1 / (C * n)`` this is scikit-learn's objective divided by ``n``, so ``C``
    means what it means there.  Binary problems use one logit (sigmoid), like scikit-learn.
    """

    def __init__(self, Z: np.ndarray, y: np.ndarray, n_classes: int, sample_weight: np.ndarray):
        self.Z, self.y, self.sw = Z, y, sample_weight
        self.K = 1 if n_classes == 2 else n_classes
        self.target = y.astype(np.float64) if self.K == 1 else np.eye(self.K)[y]

    def unpack(self, params: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        D = self.Z.shape[1]
        return params[: self.K * D].reshape(self.K, D), params[self.K * D :]

    def __call__(self, params: np.ndarray, alpha: float) -> tuple[float, np.ndarray]:
        W, b = self.unpack(params)
        n = len(self.y)
        logits = (self.Z @ W.T.astype(np.float32)).astype(np.float64) + b
        if self.K == 1:
            z = logits[:, 0]
            loss = self.sw @ (np.logaddexp(0.0, z) - self.target * z)
            resid = (self.sw * (expit(z) - self.target))[:, None]
        else:
            logp = log_softmax(logits, axis=1)
            loss = -(self.sw @ logp[np.arange(n), self.y])
            resid = self.sw[:, None] * (np.exp(logp) - self.target)
        value = loss / n + 0.5 * alpha * float(np.vdot(W, W))
        grad_W = (resid.T.astype(np.float32) @ self.Z).astype(np.float64) / n + alpha * W
        return value, np.concatenate([grad_W.ravel(), resid.sum(axis=0) / n])

    def solve(self, C: float, start: np.ndarray, max_iter: int, tol: float):
        """Minimise from ``start`` with L-BFGS; return (params, iterations, converged)."""
        alpha = 1.0 / (C * len(self.y))
        with _single_thread():
            res = minimize(
                self, start, args=(alpha,), jac=True, method="L-BFGS-B",
                options={"maxiter": max_iter, "gtol": tol, "ftol": 64 * np.finfo(float).eps},
            )
        # A line-search stop before max_iter means float32 gradients cannot resolve a smaller
        # step: the optimum is reached to the data's precision, so count it as converged.
        return res.x, int(res.nit), bool(res.success or res.nit < max_iter)


def _balanced_weights(y: np.ndarray, n_classes: int) -> np.ndarray:
    counts = np.bincount(y, minlength=n_classes)
    return (len(y) / (n_classes * counts))[y]


def _score(scoring: str, y: np.ndarray, proba: np.ndarray) -> float:
    labels = np.arange(proba.shape[1])
    if scoring == "log_loss":
        return float(log_loss(y, proba, labels=labels))
    if scoring == "accuracy":
        return float(accuracy_score(y, proba.argmax(axis=1)))
    if scoring == "balanced_accuracy":
        return float(balanced_accuracy_score(y, proba.argmax(axis=1)))
    if len(np.unique(y)) < len(labels):
        raise ValueError(f"scoring='roc_auc' needs every class in y_val; "
                         f"got classes {np.unique(y).tolist()}.")
    if proba.shape[1] == 2:
        return float(roc_auc_score(y, proba[:, 1]))
    return float(roc_auc_score(y, proba, multi_class="ovr", labels=labels))


class LogisticHead(_Head):
    """Standardised features + L2 logistic regression, C chosen on val (CLIP probe protocol).

    If ``C`` is None, a coarse sweep C = 10**-6 .. 10**2 (one value per decade) is scored on
    val, then the step is halved three times around the best value (down to 1/8 decade),
    warm-starting every L-BFGS fit from the nearest solution already found.  The model at
    the chosen C is kept (fit on train), or refit on train+val if ``refit_on_val``.  Ties in
    the val score go to the smaller C (stronger regularisation).

    Parameters
    ----------
    C : float or None
        Inverse L2 strength in scikit-learn's convention; None chooses it on val.
    class_weight : {"balanced", None, "none"}
        "balanced" weighs each sample by ``n / (n_classes * count(class))``.
    scoring : {"log_loss", "accuracy", "balanced_accuracy", "roc_auc"}
        Val score used to choose C (log_loss: lower is better; others: higher).
    refit_on_val : bool
        Refit the final model on train+val (standardisation statistics included).
    max_iter, tol : int, float
        L-BFGS iteration limit and projected-gradient tolerance per fit.

    Attributes
    ----------
    C_, coef_ (K, D) in standardised space (K = 1 for binary), intercept_ (K,), mean_, scale_,
    classes_, n_features_in_, selection_, fit_seconds_.
    """

    _arrays = ("classes_", "coef_", "intercept_", "mean_", "scale_")
    _scalars = ("C_", "n_features_in_", "fit_seconds_")

    def __init__(self, *, C=None, class_weight="balanced", scoring="log_loss", refit_on_val=False,
                 max_iter=1000, tol=1e-4):
        self.C = C
        self.class_weight = class_weight
        self.scoring = scoring
        self.refit_on_val = refit_on_val
        self.max_iter = max_iter
        self.tol = tol

    def _check_params(self) -> None:
        if self.scoring not in _SCORINGS:
            raise ValueError(f"scoring={self.scoring!r} is not supported; "
                             f"expected one of: {', '.join(_SCORINGS)}.")
        if self.class_weight not in ("balanced", None, "none"):
            raise ValueError(f"class_weight={self.class_weight!r}; expected 'balanced', None or 'none'.")
        if self.C is not None and not (isinstance(self.C, numbers.Real) and 0 < self.C < math.inf):
            raise ValueError(f"C={self.C!r}; expected a positive finite number or None (choose on val).")
        if not (isinstance(self.max_iter, numbers.Integral) and self.max_iter >= 1):
            raise ValueError(f"max_iter={self.max_iter!r}; expected a positive integer.")
        if not self.tol > 0:
            raise ValueError(f"tol={self.tol!r}; expected a positive number.")

    def _objective(self, blocks, labels, n_classes):
        mean, scale = _column_stats(blocks)
        y = np.concatenate(labels)
        sw = _balanced_weights(y, n_classes) if self.class_weight == "balanced" else np.ones(len(y))
        return _LogisticObjective(_standardize(blocks, mean, scale), y, n_classes, sw), mean, scale

    def fit(self, X_train, y_train, X_val, y_val) -> "LogisticHead":
        """Choose C on (X_val, y_val), fit on train (or train+val); return self."""
        t0 = time.perf_counter()
        self._check_params()
        X, y, Xv, yv, n_classes = _check_fit_inputs(X_train, y_train, X_val, y_val)
        obj, mean, scale = self._objective([X], [y], n_classes)
        Zv = _standardize([Xv], mean, scale)
        fits: dict[float, dict[str, Any]] = {}  # log10(C) -> parameters, val score, diagnostics

        def evaluate(log_c: float) -> None:
            nearest = min(fits, key=lambda s: (abs(s - log_c), s), default=None)
            start = fits[nearest]["params"] if fits else np.zeros(obj.K * (X.shape[1] + 1))
            params, n_iter, converged = obj.solve(10.0**log_c, start, self.max_iter, self.tol)
            W, b = obj.unpack(params)
            score = _score(self.scoring, yv, _proba_from_logits(Zv @ W.T.astype(np.float32) + b))
            fits[log_c] = {"C": 10.0**log_c, "val_score": score, "n_iter": n_iter,
                           "converged": converged, "params": params}

        def best() -> float:  # lowest loss (or highest score); ties -> smaller C
            sign = 1.0 if self.scoring == "log_loss" else -1.0
            return min(fits, key=lambda s: (sign * fits[s]["val_score"], s))

        if self.C is None:
            for log_c in _LOG10_C_GRID:  # strong -> weak regularisation, each fit warm-started
                evaluate(float(log_c))
            step = 1.0
            for _ in range(_REFINE_STEPS):
                step /= 2
                center = best()
                for log_c in (center - step, center + step):
                    if _LOG10_C_GRID[0] <= log_c <= _LOG10_C_GRID[-1] and log_c not in fits:
                        evaluate(log_c)
            log_c = best()
            self.C_ = float(10.0**log_c)
        else:
            log_c = math.log10(self.C)
            evaluate(log_c)
            self.C_ = fits[log_c]["C"] = float(self.C)

        params = fits[log_c]["params"]
        n_iter, converged = fits[log_c]["n_iter"], fits[log_c]["converged"]
        if self.refit_on_val:
            del obj  # free the standardised train copy before building train+val
            obj, mean, scale = self._objective([X, Xv], [y, yv], n_classes)
            params, n_iter, converged = obj.solve(self.C_, params, self.max_iter, self.tol)
        if not converged:
            logger.warning("LogisticHead: L-BFGS stopped after %d iterations without converging at "
                           "C=%.3g; consider raising max_iter.", n_iter, self.C_)
        W, b = obj.unpack(params)
        self._set_common(n_classes, X.shape[1])
        self.coef_, self.intercept_ = W.copy(), b.copy()
        self.mean_, self.scale_ = mean, scale
        self.selection_ = {
            "C": self.C_,
            "scoring": self.scoring,
            "sweep": [{k: v for k, v in fits[s].items() if k != "params"} for s in sorted(fits)],
            "refit_on_val": bool(self.refit_on_val),
        }
        self.fit_seconds_ = time.perf_counter() - t0
        logger.info("LogisticHead: C=%.3g chosen on val from %d values (%s); fit in %.2f s",
                    self.C_, len(fits), self.scoring, self.fit_seconds_)
        return self

    def _proba(self, X: np.ndarray) -> np.ndarray:
        Z = _standardize([X], self.mean_, self.scale_)
        return _proba_from_logits(Z @ self.coef_.T.astype(np.float32) + self.intercept_)


# --------------------------------------------------------------------------- linear layer (torch)


class LinearHead(_Head):
    """``nn.Linear(D, C)`` on raw features, trained as in PyTorch's transfer-learning tutorial.

    SGD with momentum, StepLR, cross-entropy on shuffled mini-batches (seeded generator),
    ``epochs`` epochs.  After every epoch the loss and accuracy on the full train and val
    splits are recorded; the weights of the best epoch by val accuracy are kept (the first
    one on ties).  Features are not standardised, as when training a frozen network's last
    layer.

    Attributes
    ----------
    coef_ (C, D), intercept_ (C,), best_epoch_ (1-based), history_ (one dict per epoch),
    classes_, n_features_in_, selection_, fit_seconds_.
    """

    _arrays = ("classes_", "coef_", "intercept_")
    _scalars = ("best_epoch_", "history_", "n_features_in_", "fit_seconds_")

    def __init__(self, *, epochs=25, lr=1e-3, momentum=0.9, step_size=7, gamma=0.1, batch_size=32,
                 weight_decay=0.0, seed=0):
        self.epochs = epochs
        self.lr = lr
        self.momentum = momentum
        self.step_size = step_size
        self.gamma = gamma
        self.batch_size = batch_size
        self.weight_decay = weight_decay
        self.seed = seed

    def _check_params(self) -> None:
        for name in ("epochs", "step_size", "batch_size"):
            value = getattr(self, name)
            if not (isinstance(value, numbers.Integral) and value >= 1):
                raise ValueError(f"{name}={value!r}; expected a positive integer.")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr!r}; expected a positive number.")

    def _train(self, X, y, Xv, yv, n_classes):
        """The training loop; returns (history, (best_epoch, val_acc, weight, bias))."""
        Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
        Xvt, yvt = torch.from_numpy(Xv), torch.from_numpy(yv)
        gen = torch.Generator().manual_seed(int(self.seed))
        layer = torch.nn.Linear(X.shape[1], n_classes)
        bound = 1.0 / math.sqrt(X.shape[1])  # nn.Linear's default init, from our own generator
        with torch.no_grad():
            layer.weight.uniform_(-bound, bound, generator=gen)
            layer.bias.uniform_(-bound, bound, generator=gen)
        opt = torch.optim.SGD(layer.parameters(), lr=self.lr, momentum=self.momentum,
                              weight_decay=self.weight_decay)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=self.step_size, gamma=self.gamma)

        def evaluate(inputs, targets) -> tuple[float, float]:
            with torch.no_grad():
                logits = layer(inputs)
                return (float(F.cross_entropy(logits, targets)),
                        float((logits.argmax(dim=1) == targets).double().mean()))

        history, best = [], None
        for epoch in range(1, self.epochs + 1):
            t_epoch = time.perf_counter()
            lr = opt.param_groups[0]["lr"]
            order = torch.randperm(len(X), generator=gen)
            for i in range(0, len(X), self.batch_size):
                idx = order[i : i + self.batch_size]
                loss = F.cross_entropy(layer(Xt[idx]), yt[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            sched.step()
            train_loss, train_acc = evaluate(Xt, yt)
            val_loss, val_acc = evaluate(Xvt, yvt)
            history.append({
                "epoch": epoch, "train_loss": train_loss, "train_accuracy": train_acc,
                "val_loss": val_loss, "val_accuracy": val_acc,
                "seconds": time.perf_counter() - t_epoch, "lr": lr,
            })
            logger.debug("LinearHead epoch %d/%d: val_acc=%.4f val_loss=%.4f (%.0f ms)", epoch,
                         self.epochs, val_acc, val_loss, 1e3 * history[-1]["seconds"])
            if best is None or val_acc > best[1]:
                best = (epoch, val_acc, layer.weight.detach().clone(), layer.bias.detach().clone())
        return history, best

    def fit(self, X_train, y_train, X_val, y_val) -> "LinearHead":
        """Train for ``epochs`` epochs, keep the best epoch by val accuracy; return self."""
        t0 = time.perf_counter()
        self._check_params()
        X, y, Xv, yv, n_classes = _check_fit_inputs(X_train, y_train, X_val, y_val)
        with _single_thread():
            history, best = self._train(X, y, Xv, yv, n_classes)
        self._set_common(n_classes, X.shape[1])
        self.best_epoch_ = best[0]
        self.coef_, self.intercept_ = best[2].numpy(), best[3].numpy()
        self.history_ = history
        self.selection_ = {"best_epoch": self.best_epoch_, "criterion": "val_accuracy",
                           "val_accuracy": best[1], "epochs": self.epochs}
        self.fit_seconds_ = time.perf_counter() - t0
        logger.info("LinearHead: best epoch %d/%d (val_acc=%.4f); fit in %.2f s",
                    self.best_epoch_, self.epochs, best[1], self.fit_seconds_)
        return self

    def _proba(self, X: np.ndarray) -> np.ndarray:
        logits = X.astype(np.float64) @ self.coef_.T.astype(np.float64) + self.intercept_
        return _proba_from_logits(logits)


# --------------------------------------------------------------------------- k nearest neighbours


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


class KNNHead(_Head):
    """Cosine k-nearest neighbours on L2-normalised features; k chosen on val by accuracy.

    predict_proba is the (weighted) vote fraction ``f`` per class, smoothed as
    ``(f + 1e-3) / (1 + 1e-3 * C)`` so that no probability is 0 and log loss stays finite
    (at most ~6.9 per sample).  ``weights="distance"`` weighs a neighbour by
    ``1 / (1 - cos + 1e-6)``.  Ties in val accuracy go to the smaller k.

    Attributes
    ----------
    k_, X_fit_ (normalised float32 train features), y_fit_, classes_, n_features_in_,
    selection_, fit_seconds_.
    """

    _arrays = ("classes_", "X_fit_", "y_fit_")
    _scalars = ("k_", "n_features_in_", "fit_seconds_")

    def __init__(self, *, ks=(1, 3, 5, 7, 9, 15, 21, 31), weights="uniform"):
        self.ks = ks
        self.weights = weights

    def _votes(self, idx: np.ndarray, sim: np.ndarray) -> np.ndarray:
        labels = self.y_fit_[idx]
        sim = sim.astype(np.float64)
        w = np.ones_like(sim) if self.weights == "uniform" else 1.0 / (1.0 - sim + 1e-6)
        n_classes = len(self.classes_)
        votes = np.zeros((len(idx), n_classes))
        np.add.at(votes, (np.arange(len(idx))[:, None], labels), w)
        frac = votes / votes.sum(axis=1, keepdims=True)
        return (frac + _KNN_SMOOTHING) / (1.0 + _KNN_SMOOTHING * n_classes)

    def fit(self, X_train, y_train, X_val, y_val) -> "KNNHead":
        """Choose k on val by accuracy; the train split is the neighbour memory; return self."""
        t0 = time.perf_counter()
        if self.weights not in ("uniform", "distance"):
            raise ValueError(f"weights={self.weights!r}; expected 'uniform' or 'distance'.")
        ks = sorted({int(k) for k in np.atleast_1d(self.ks)})
        if not ks or ks[0] < 1:
            raise ValueError(f"ks={self.ks!r}; expected positive integers.")
        X, y, Xv, yv, n_classes = _check_fit_inputs(X_train, y_train, X_val, y_val)
        usable = [k for k in ks if k <= len(X)]
        if not usable:
            raise ValueError(f"ks={self.ks!r}: every k exceeds the {len(X)} training rows.")
        self._set_common(n_classes, X.shape[1])
        self.X_fit_, self.y_fit_ = _l2_normalize(X), y
        idx, sim = _top_k(_l2_normalize(Xv), self.X_fit_, usable[-1])
        sweep = []
        for k in usable:
            proba = self._votes(idx[:, :k], sim[:, :k])
            sweep.append({"k": k, "val_accuracy": float(np.mean(proba.argmax(axis=1) == yv))})
        best = max(sweep, key=lambda s: (s["val_accuracy"], -s["k"]))
        self.k_ = best["k"]
        self.selection_ = {"k": self.k_, "criterion": "val_accuracy", "weights": self.weights,
                           "sweep": sweep}
        self.fit_seconds_ = time.perf_counter() - t0
        logger.info("KNNHead: k=%d chosen on val (val_acc=%.4f); fit in %.2f s",
                    self.k_, best["val_accuracy"], self.fit_seconds_)
        return self

    def _proba(self, X: np.ndarray) -> np.ndarray:
        idx, sim = _top_k(_l2_normalize(X), self.X_fit_, self.k_)
        return self._votes(idx, sim)


# --------------------------------------------------------------------------- factory and persistence

HEADS: dict[str, type[_Head]] = {"logreg": LogisticHead, "linear": LinearHead, "knn": KNNHead}


def create_head(name: str, **params) -> _Head:
    """Instantiate a registered head by name, e.g. ``create_head("logreg", scoring="accuracy")``."""
    if name not in HEADS:
        raise ValueError(f"unknown head {name!r}; expected one of: {', '.join(sorted(HEADS))}")
    return HEADS[name](**params)


def save_head(head: _Head, path, *, metadata: dict) -> Path:
    """Write a fitted head to one ``.npz`` (numeric arrays + a JSON ``__meta__``), atomically.

    ``metadata`` (threshold, class names, cache key, ...) must be JSON-serialisable; it is
    returned unchanged by :func:`load_head`.
    """
    name = next((n for n, cls in HEADS.items() if type(head) is cls), None)
    if name is None:
        raise ValueError(f"cannot save {type(head).__name__}; expected one of: "
                         f"{', '.join(sorted(HEADS))}.")
    head._check_fitted()
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "head": name,
        "params": head.get_params(),
        "learned": {attr: getattr(head, attr) for attr in head._scalars},
        "selection": head.selection_,
        "metadata": metadata,
    }
    try:
        meta_json = dumps(meta, indent=None)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"metadata for {name} head is not JSON-serialisable: {exc}") from exc
    arrays = {attr: np.asarray(getattr(head, attr)) for attr in head._arrays}
    path = atomic_write(path, lambda f: np.savez(f, __meta__=np.array(meta_json), **arrays))
    logger.info("saved %s head to %s", name, path)
    return path


def load_head(path) -> tuple[_Head, dict]:
    """Load a head written by :func:`save_head`; return ``(fitted_head, metadata)``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no xfeat head file at {path}")
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
        raise ValueError(f"{path} is not an xfeat head file ({exc}).") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not an xfeat head file (format is not {FORMAT!r}).")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(f"{path} has format_version {version!r}; this xfeat reads versions up to "
                         f"{FORMAT_VERSION}. Upgrade xfeat to load it.")
    if meta.get("head") not in HEADS:
        raise ValueError(f"{path} holds unknown head {meta.get('head')!r}; expected one of: "
                         f"{', '.join(sorted(HEADS))}.")
    cls = HEADS[meta["head"]]
    missing = [a for a in cls._arrays if a not in arrays]
    if missing:
        raise ValueError(f"{path} is missing arrays {missing} for a {meta['head']} head.")
    params = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["params"].items()}
    try:
        head = cls(**params)
    except TypeError as exc:
        raise ValueError(f"{path} has parameters {sorted(params)} that {cls.__name__} "
                         f"does not take ({exc}).") from exc
    for attr, value in {**meta["learned"], "selection_": meta["selection"], **arrays}.items():
        setattr(head, attr, value)
    return head, meta["metadata"]


def head_options() -> dict:
    """``{head name: [parameter names]}``, read from each head's constructor."""
    return {name: sorted(cls().get_params()) for name, cls in HEADS.items()}
