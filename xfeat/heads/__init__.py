"""Heads: scikit-learn classifiers trained on cached (N, D) feature arrays, and their files.

Every head is a scikit-learn estimator (``clone``, ``get_params``, ``set_params``, ``score``
work): ``__init__`` stores parameters only, ``fit(X, y, *, X_val=None, y_val=None)``
validates, learns and returns ``self``, learned attributes end in ``_``.  The val split is
the only data a head uses to make a choice (C, k, best epoch); a head whose choice is fixed
needs none.

============  ================  ===============================================
name          class             choice made on val
============  ================  ===============================================
``logreg``    LogisticHead      C (CLIP-style sweep), unless ``C`` is given
``linear``    LinearHead        the best epoch
``knn``       KNNHead           k, unless ``ks`` holds one value
============  ================  ===============================================

Multi-label data get a :class:`OneVsRestHead`: one binary head of any of these kinds per label,
each fitted and tuned on the rows where its label is known.

Heads are saved by :func:`save_head` as one pickle-free ``.npz`` and read by :func:`load_head`.
"""

from xfeat.heads.io import FORMAT, FORMAT_VERSION, load_head, load_head_extra, save_head
from xfeat.heads.knn import KNNHead
from xfeat.heads.linear import LinearHead
from xfeat.heads.logistic import LogisticHead
from xfeat.heads.multilabel import OneVsRestHead
from xfeat.heads.ood import NearestNeighbourOOD
from xfeat.heads.registry import HEADS, create_head, head_options

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "HEADS",
    "KNNHead",
    "LinearHead",
    "LogisticHead",
    "create_head",
    "head_options",
    "load_head",
    "load_head_extra",
    "NearestNeighbourOOD",
    "OneVsRestHead",
    "save_head",
]
