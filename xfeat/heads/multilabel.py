"""``OneVsRestHead``: one binary head per label, each fitted on its known rows only.

Multi-label targets are (N, L) matrices of 1 / 0 / -1 (unknown). Label ``j``'s head is fitted
on the train rows where label ``j`` is known, and chooses its own hyper-parameters (C, k,
epoch) on the val rows where label ``j`` is known: a rare label gets the regularisation that
suits it, and an unknown entry counts in no loss and no choice.
"""

from __future__ import annotations

import time
from typing import Optional, Sequence

import numpy as np

from xfeat.errors import DataError
from xfeat.heads.registry import create_head

UNKNOWN = -1


def check_label_values(Y_train, Y_val, names) -> None:
    """Each label needs positive and negative known rows in train (to be learnt) and in val
    (where its choices and threshold are made); a one-line error names the label otherwise."""
    for split, Y in (("train", np.asarray(Y_train)), ("val", np.asarray(Y_val))):
        for j, name in enumerate(names):
            y = Y[:, j][Y[:, j] != UNKNOWN]
            if len(np.unique(y)) < 2:
                state = "no known rows" if not len(y) else f"only the value {int(y[0])}"
                fix = (
                    "give a larger val split (--val-fraction) or more val rows in the table"
                    if split == "val"
                    else "add train rows with both values"
                )
                raise DataError(
                    f"the label {name!r} has {state} in {split}; every label needs positives and "
                    f"negatives there: {fix}, or drop the label"
                )


class OneVsRestHead:
    """L independent binary heads of one kind (``head``: ``logreg``, ``linear`` or ``knn``).

    After :meth:`fit`: ``estimators_`` (one fitted head per label), ``label_names_``,
    ``selection_`` (``{label: that head's selection}``), ``fit_seconds_``.
    :meth:`predict_proba` returns the (N, L) positive-class probabilities.
    """

    def __init__(self, head: str = "logreg", **params):
        self.head = head
        self.params = params

    def fit(
        self,
        X,
        Y,
        *,
        X_val,
        Y_val,
        label_names: Optional[Sequence[str]] = None,
    ) -> OneVsRestHead:
        t0 = time.perf_counter()
        Y, Y_val = np.asarray(Y), np.asarray(Y_val)
        if Y.ndim != 2 or Y_val.ndim != 2 or Y.shape[1] != Y_val.shape[1]:
            raise DataError(f"multi-label targets must be (N, L); got {Y.shape} and {Y_val.shape}")
        names = list(label_names) if label_names is not None else [str(j) for j in range(Y.shape[1])]
        check_label_values(Y, Y_val, names)
        self.estimators_, self.selection_ = [], {}
        for j, name in enumerate(names):
            rows, val_rows = Y[:, j] != UNKNOWN, Y_val[:, j] != UNKNOWN
            estimator = create_head(self.head, **self.params).fit(
                X[rows], Y[rows, j], X_val=X_val[val_rows], y_val=Y_val[val_rows, j]
            )
            self.estimators_.append(estimator)
            self.selection_[name] = estimator.selection_
        self.label_names_ = names
        self.fit_seconds_ = time.perf_counter() - t0
        return self

    def predict_proba(self, X) -> np.ndarray:
        """(N, L): the probability that each label is present."""
        return np.stack([e.predict_proba(X)[:, 1] for e in self.estimators_], axis=1)

    @property
    def history_(self) -> list:
        return []

    @classmethod
    def from_estimators(cls, head: str, params: dict, estimators: list, label_names: list, selection):
        """A fitted head from saved parts (see :func:`xfeat.heads.io.load_head`)."""
        ovr = cls(head, **params)
        ovr.estimators_, ovr.label_names_, ovr.selection_ = estimators, list(label_names), selection
        ovr.fit_seconds_ = sum(getattr(e, "fit_seconds_", 0.0) for e in estimators)
        return ovr


def is_multilabel_head(head) -> bool:
    return isinstance(head, OneVsRestHead)
