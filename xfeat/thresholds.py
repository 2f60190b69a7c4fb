"""Decision-threshold rules (``youden``, ``0.5``, ``sensitivity:0.95``), parsed without numpy.

Parsing lives here, apart from the metrics, so options are validated before any work starts
(and ``xfeat --help`` stays light); :func:`xfeat.metrics.choose_threshold` applies a rule.
"""
from __future__ import annotations

import numbers

from .errors import ConfigError

RULE_HELP = ("expected 'youden', a probability in (0, 1) such as 0.5, or "
             "'sensitivity:T' / 'specificity:T' with T in (0, 1]")


def parse_threshold_rule(rule):
    """Validate a threshold rule; return ``'youden'``, a float in (0, 1), or a normalised
    ``'sensitivity:<target>'`` / ``'specificity:<target>'`` string (target in (0, 1])."""
    if isinstance(rule, numbers.Real) and not isinstance(rule, bool):
        if 0.0 < rule < 1.0:
            return float(rule)
        raise ConfigError(f"threshold rule {rule!r}: a fixed threshold must lie in (0, 1)")
    if isinstance(rule, str):
        text = rule.strip().lower()
        if text == "youden":
            return text
        kind, sep, value = text.partition(":")
        if sep and kind in ("sensitivity", "specificity"):
            target = _to_float(value)
            if target is not None and 0.0 < target <= 1.0:
                return f"{kind}:{target!r}"
            raise ConfigError(f"threshold rule {rule!r}: the {kind} target must be a number "
                              f"in (0, 1], e.g. '{kind}:0.95'")
        number = _to_float(text)
        if number is not None:
            if 0.0 < number < 1.0:
                return number
            raise ConfigError(f"threshold rule {rule!r}: a fixed threshold must lie in (0, 1)")
    raise ConfigError(f"threshold rule {rule!r} not understood; {RULE_HELP}")


def _to_float(text):
    try:
        return float(text)
    except ValueError:
        return None
