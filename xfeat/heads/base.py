"""What every head shares: input validation, the base estimator, probabilities from logits.

A head is a scikit-learn classifier on an (N, D) feature array: ``classes_`` holds the sorted
labels of ``y`` and column ``j`` of ``predict_proba`` is ``classes_[j]`` (with xfeat's labels
0..C-1, all present in train, column ``c`` is class ``c``).  ``fit(X, y, *, X_val=None,
y_val=None)``: the validation split, when given, is the only data a head uses to make a choice
(C, k, best epoch); the test split never reaches a head.
"""

from __future__ import annotations

import contextlib
import numbers
from typing import Any

import numpy as np
from scipy.special import expit, softmax
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_array, check_is_fitted, column_or_1d
from threadpoolctl import threadpool_limits

from xfeat.errors import ConfigError, DataError


def check_X(X: Any, name: str) -> np.ndarray:
    """``X`` as a finite, C-contiguous float32 2-D array (no copy if it already is one).

    scikit-learn's ``check_array`` does the work (its finiteness test needs no N x D
    temporary); its ValueErrors become :class:`~xfeat.errors.DataError`.
    """
    try:
        return check_array(X, dtype=np.float32, order="C", input_name=name)
    except DataError:
        raise
    except ValueError as exc:
        raise DataError(str(exc)) from None


def _check_labels(y: Any, name: str, n_rows: int) -> np.ndarray:
    if y is None:
        raise DataError(f"fit requires {name} to be passed, but the target {name} is None.")
    try:
        y = column_or_1d(y, warn=True)
        check_classification_targets(y)  # "Unknown label type: continuous" for a regression target
    except ValueError as exc:
        raise DataError(f"{name}: {exc}") from None
    if len(y) != n_rows:
        raise DataError(
            f"{name} has {len(y)} labels but its X has {n_rows} rows; expected one label per row."
        )
    return y


def check_fit_inputs(X, y, X_val=None, y_val=None):
    """Validate the training split and the optional val split.

    Returns float32 ``X``, ``y`` as indices into ``classes``, ``X_val`` and ``y_val`` (the same
    way; both None without val) and ``classes`` (the sorted labels of ``y``).  Every label of
    ``y_val`` must occur in ``y``.
    """
    if (X_val is None) != (y_val is None):
        given, missing = ("X_val", "y_val") if y_val is None else ("y_val", "X_val")
        raise ConfigError(f"{given} was given without {missing}; pass both or neither.")
    X = check_X(X, "X")
    classes, y = np.unique(_check_labels(y, "y", len(X)), return_inverse=True)
    if len(classes) < 2:
        raise DataError(f"y holds 1 class ({classes.tolist()[0]!r}); expected at least two classes.")
    Xv = yv = None
    if X_val is not None:
        Xv = check_X(X_val, "X_val")
        yv = _check_labels(y_val, "y_val", len(Xv))
        if Xv.shape[1] != X.shape[1]:
            raise DataError(
                f"X_val has {Xv.shape[1]} features, but X has {X.shape[1]}; "
                "expected the same features in both splits."
            )
        unseen = np.setdiff1d(yv, classes)
        if unseen.size:
            raise DataError(
                f"y_val has class(es) {unseen.tolist()} that y lacks; every class "
                "must occur in the training split."
            )
        yv = np.searchsorted(classes, yv)
    return X, y.astype(np.int64), Xv, yv, classes


def check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not (isinstance(value, numbers.Integral) and value >= 1):
        raise ConfigError(f"{name}={value!r}; expected a positive integer.")


def check_choice(name: str, value: Any, choices) -> None:
    if value not in choices:
        raise ConfigError(
            f"{name}={value!r} is not supported; expected one of: {', '.join(repr(c) for c in choices)}."
        )


def need_val(what: str, fix: str) -> ConfigError:
    """The error for a choice that needs a validation split which fit was not given."""
    return ConfigError(
        f"{what} is chosen on validation data, but fit got none: pass "
        f"X_val= and y_val= to fit, or {fix}."
    )


class BaseHead(ClassifierMixin, BaseEstimator):
    """A classifier on feature arrays, with the learned state :mod:`xfeat.heads.io` saves.

    Subclasses implement ``fit`` (which calls :meth:`_set_common`) and ``_proba``;
    ``_arrays`` names the learned ndarrays saved as npz entries, ``_scalars`` the learned
    JSON-able attributes saved in the file's ``__meta__`` (besides ``selection_``).
    """

    _arrays: tuple[str, ...] = ()
    _scalars: tuple[str, ...] = ()

    def _check_predict_X(self, X: Any) -> np.ndarray:
        check_is_fitted(self, "classes_")
        X = check_X(X, "X")
        if X.shape[1] != self.n_features_in_:
            raise DataError(
                f"X has {X.shape[1]} features, but {type(self).__name__} is "
                f"expecting {self.n_features_in_} features as input."
            )
        return X

    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities, shape (N, C), float64; column ``j`` is ``classes_[j]``."""
        return self._proba(self._check_predict_X(X))

    def predict(self, X) -> np.ndarray:
        """The most probable class per row (the first in ``classes_`` on ties)."""
        proba = self.predict_proba(X)
        return self.classes_[np.argmax(proba, axis=1)]

    def _proba(self, X: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def _set_common(self, classes: np.ndarray, n_features: int) -> None:
        self.classes_ = classes
        self.n_features_in_ = int(n_features)


@contextlib.contextmanager
def single_blas_thread():
    """Run BLAS single-threaded inside the block.

    The heads' inner loops are matrix-vector products: memory-bound, so a second thread gains
    little, while with another process holding one of two cores, thread hand-offs made a
    logistic fit ~8x slower (measured). One thread is fast whatever else the machine is doing.
    """
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def proba_from_logits(logits: np.ndarray) -> np.ndarray:
    """(N, 1) binary logits -> sigmoid; (N, C) -> softmax; always (N, C) float64."""
    logits = np.asarray(logits, dtype=np.float64)
    if logits.shape[1] == 1:
        p1 = expit(logits[:, 0])
        return np.column_stack([1.0 - p1, p1])
    return softmax(logits, axis=1)
