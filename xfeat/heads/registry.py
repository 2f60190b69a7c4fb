"""The heads by name: ``HEADS``, :func:`create_head` and :func:`head_options`."""

from __future__ import annotations

from xfeat.errors import ConfigError
from xfeat.heads.base import BaseHead
from xfeat.heads.knn import KNNHead
from xfeat.heads.linear import LinearHead
from xfeat.heads.logistic import LogisticHead

HEADS: dict[str, type[BaseHead]] = {"logreg": LogisticHead, "linear": LinearHead, "knn": KNNHead}


def head_options() -> dict[str, list[str]]:
    """``{head name: [parameter names]}``, from each estimator's ``get_params()``."""
    return {name: list(cls().get_params(deep=False)) for name, cls in HEADS.items()}


def create_head(name: str, **params) -> BaseHead:
    """Instantiate a registered head by name, e.g. ``create_head("logreg", scoring="accuracy")``.

    Parameter names are checked here; their values are checked by ``fit``, as in scikit-learn.
    """
    if name not in HEADS:
        raise ConfigError(f"unknown head {name!r}; expected one of: {', '.join(sorted(HEADS))}")
    takes = head_options()[name]
    wrong = [p for p in params if p not in takes]
    if wrong:
        raise ConfigError(
            f"{name} takes {', '.join(takes)}; {', '.join(wrong)} "
            f"do{'es' if len(wrong) == 1 else ''} not apply"
        )
    return HEADS[name](**params)
