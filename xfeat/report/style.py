"""One look per run, the same in every figure: colour = model, marker and line style = mode.

Runs from random weights (speed only) get hollow markers and faded lines. Colours come from
``tab10`` (``tab20``, strong shades first, past 10 models; ``turbo`` past 20), so two runs of
different models never share a colour and two runs of one model never share a marker.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from matplotlib import colormaps
from matplotlib.lines import Line2D

from xfeat.report.rows import RANDOM_WEIGHTS

MODE_STYLES = {"cached": ("o", "-"), "frozen": ("s", "--"), "full": ("^", ":"), "lp-ft": ("D", "-.")}
# For a mode added later: still one marker and one dash pattern each.
_SPARE_STYLES = (
    ("v", (0, (5, 1, 1, 1))),
    ("P", (0, (1, 3))),
    ("X", (0, (8, 2))),
    ("*", (0, (3, 1, 1, 1, 1, 1))),
)


@dataclass(frozen=True)
class RunStyle:
    """How one run is drawn: ``color`` (its model's), ``marker`` and ``linestyle`` (its
    mode's), ``hollow`` for random weights."""

    color: tuple
    marker: str
    linestyle: object
    hollow: bool = False

    def scatter(self) -> dict:
        """Keyword arguments of ``Axes.scatter``."""
        return {
            "marker": self.marker,
            "edgecolors": [self.color],
            "linewidths": 1.5,
            "facecolors": "none" if self.hollow else [self.color],
        }

    def line(self) -> dict:
        """Keyword arguments of ``Axes.plot`` for a curve."""
        return {
            "color": self.color,
            "linestyle": self.linestyle,
            "lw": 1.2 if self.hollow else 1.6,
            "alpha": 0.6 if self.hollow else 1.0,
        }

    def point(self) -> dict:
        """Keyword arguments of ``Axes.plot`` for a single marker."""
        return {
            "marker": self.marker,
            "linestyle": "none",
            "color": self.color,
            "ms": 7,
            "markerfacecolor": "none" if self.hollow else self.color,
        }


def model_colors(models) -> dict:
    """Model -> RGBA, distinct for every model."""
    models = list(dict.fromkeys(models))
    n = len(models)
    if n <= 10:
        palette = colormaps["tab10"].colors[:n]
    elif n <= 20:
        tab20 = colormaps["tab20"].colors  # pairs (strong, light): strong shades first
        palette = (tab20[0::2] + tab20[1::2])[:n]
    else:
        palette = colormaps["turbo"](np.linspace(0.05, 0.95, n))
    return {m: tuple(float(c) for c in colors) for m, colors in zip(models, palette)}


def mode_styles(modes) -> dict:
    """Mode -> (marker, line style), distinct for every mode."""
    spare = iter(_SPARE_STYLES)
    return {mode: MODE_STYLES.get(mode) or next(spare) for mode in dict.fromkeys(modes)}


def run_styles(rows: list) -> dict:
    """``(model, mode)`` -> :class:`RunStyle` for every row of a comparison."""
    colors = model_colors(r["model"] for r in rows)
    marks = mode_styles([r["mode"] for r in rows])
    return {
        (r["model"], r["mode"]): RunStyle(
            colors[r["model"]], *marks[r["mode"]], hollow=r.get("weights_kind") == "random"
        )
        for r in rows
    }


def key_handles(rows: list, styles: dict) -> tuple:
    """Legend entries that explain the styles: each model's colour, each mode's marker, hollow
    = random weights. Returns (handles, labels, headings)."""
    handles, labels = [], []

    def add(handle, label):
        handles.append(handle)
        labels.append(label)

    headings = ("colour = model", "marker = mode")
    add(Line2D([], [], linestyle="none"), headings[0])
    for model in dict.fromkeys(r["model"] for r in rows):
        random = any(r["weights_kind"] == "random" for r in rows if r["model"] == model)
        color = next(s.color for (m, _), s in styles.items() if m == model)
        add(
            Line2D([], [], linestyle="none", marker="s", ms=9, color=color),
            f"{model} ({RANDOM_WEIGHTS})" if random else model,
        )
    add(Line2D([], [], linestyle="none"), headings[1])
    for mode in dict.fromkeys(r["mode"] for r in rows):
        style = next(s for (_, m), s in styles.items() if m == mode)
        add(Line2D([], [], color="0.3", marker=style.marker, linestyle="none"), mode)
    if any(s.hollow for s in styles.values()):
        add(
            Line2D([], [], linestyle="none", marker="o", color="0.3", markerfacecolor="none"),
            f"hollow: {RANDOM_WEIGHTS.replace(': ', ', ')}",
        )
    return handles, labels, headings


def bold_headings(legend, headings) -> None:
    for text in legend.get_texts():
        if text.get_text() in headings:
            text.set_fontweight("bold")
