"""The :class:`Section` every diagnosis returns, and the formatting its report lines share."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Union

from matplotlib.figure import Figure

SPLIT_ORDER = ("train", "val", "test")


@dataclass
class Section:
    """One diagnosis: its entry in ``analysis.json``, its part of the report, its files.

    ``analyze`` writes nothing until every section is done; then ``summary`` goes into
    ``analysis.json`` under ``name``, ``markdown`` into ``analysis.md`` under a heading made
    of ``title``, each figure to a PNG and each table to a CSV beside them.

    Attributes
    ----------
    name : key in ``analysis.json`` (``class_balance``, ``shift``, ...).
    title : heading in ``analysis.md``.
    summary : the measurements, JSON-able once NumPy scalars are converted.
    headlines : one-sentence findings for the top of the report and the terminal.
    markdown : the body of the section in ``analysis.md``, one line per item.
    figures : PNG file name -> a :class:`~matplotlib.figure.Figure`, or a callable that
        writes the PNG to the path it is given.
    tables : CSV file name -> ``(rows, columns)``; rows are dicts, columns their header.
    """

    name: str
    title: str
    summary: dict
    headlines: list = field(default_factory=list)
    markdown: list = field(default_factory=list)
    figures: dict[str, Union[Figure, Callable]] = field(default_factory=dict)
    tables: dict[str, tuple] = field(default_factory=dict)


def split_names(features) -> list:
    """The splits of a :class:`~xfeat.cache.FeatureSet`, in train, val, test order."""
    return [s for s in SPLIT_ORDER if s in features.splits]


def md_table(header: list, rows: list) -> list:
    """A Markdown table as lines; ``|`` inside a cell is escaped."""

    def cell(v):
        return str(v).replace("|", "\\|")

    return [
        "| " + " | ".join(cell(h) for h in header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ] + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]


def fmt(v, signed: bool = False) -> str:
    """Three decimals; ``-`` for a missing or undefined value."""
    if v is None or is_nan(v):
        return "-"
    return f"{v:+.3f}" if signed else f"{v:.3f}"


def fmt_ci(ci) -> str:
    return f"{ci[0]:.3f}-{ci[1]:.3f}" if ci and not any(c is None or is_nan(c) for c in ci) else "-"


def count(n: int, noun: str) -> str:
    """``1 group``, ``2 groups``."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def diff(a, b):
    """``a - b``, or None when either is missing or undefined."""
    return None if a is None or b is None or is_nan(a) or is_nan(b) else float(a) - float(b)


def is_nan(v) -> bool:
    return isinstance(v, float) and math.isnan(v)
