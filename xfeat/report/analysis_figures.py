"""The analysis figures, and writing them as PNG files.

Figures are built with matplotlib's object API (:class:`~matplotlib.figure.Figure`, no
pyplot): no global figure registry to leak into or close, no backend to select, and nothing
drawn on a display.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
from matplotlib.figure import Figure

from xfeat import files

SPLIT_COLORS = {"train": "tab:blue", "val": "tab:green", "test": "tab:red"}
CLASS_MARKERS = ("o", "^", "s", "D", "v", "P", "X", "*")
DPI = 110


def plot_class_balance(
    fractions: dict, class_names: list, *, title: str = "", ylabel: str = "fraction of the split"
) -> Figure:
    """Grouped bars: the fraction of each class (x) in each split (one bar per split); for
    multi-label data, each label's prevalence."""
    splits = list(fractions)
    width = 0.8 / max(1, len(splits))
    fig = Figure(figsize=(max(5, 1.6 * len(class_names) + 2), 3.8), layout="tight")
    ax = fig.subplots()
    for k, split in enumerate(splits):
        xs = [c + (k - (len(splits) - 1) / 2) * width for c in range(len(class_names))]
        bars = ax.bar(xs, fractions[split], width, label=split, color=SPLIT_COLORS.get(split))
        ax.bar_label(bars, labels=[f"{f:.0%}" for f in fractions[split]], fontsize=8)
    ax.set_xticks(range(len(class_names)), class_names)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1.1)
    ax.legend()
    ax.set_title(title)
    return fig


def plot_cooccurrence(
    conditional: np.ndarray, counts: np.ndarray, names: list, *, title: str = ""
) -> Figure:
    """Heatmap of P(column label | row label) on train, each cell annotated with that value and
    the number of images with both labels."""
    n = len(names)
    fig = Figure(figsize=(max(4.5, 1.1 * n + 2.5), max(3.8, 0.9 * n + 1.8)), layout="tight")
    ax = fig.subplots()
    image = ax.imshow(conditional, cmap="Blues", vmin=0, vmax=1)
    for (i, j), v in np.ndenumerate(conditional):
        text = "—" if np.isnan(v) else f"{v:.2f}\n({int(counts[i, j])})"
        ax.text(j, i, text, ha="center", va="center", fontsize=8, color="white" if v > 0.5 else "black")
    ax.set_xticks(range(n), names, rotation=30, ha="right")
    ax.set_yticks(range(n), names)
    ax.set_xlabel("label B")
    ax.set_ylabel("label A")
    fig.colorbar(image, ax=ax, label="P(B | A) on train")
    ax.set_title(title)
    return fig


def plot_projection(
    coords, splits, labels, class_names: list, *, title: str = "", axis_labels=("PC 1", "PC 2")
) -> Figure:
    """2-D scatter of a projection: colour = split, marker = class."""
    coords, splits, labels = np.asarray(coords), np.asarray(splits), np.asarray(labels)
    fig = Figure(figsize=(6.5, 5.5), layout="tight")
    ax = fig.subplots()
    for split in dict.fromkeys(splits.tolist()):
        for c, name in enumerate(class_names):
            rows = (splits == split) & (labels == c)
            if rows.any():
                ax.scatter(
                    coords[rows, 0],
                    coords[rows, 1],
                    s=9,
                    alpha=0.5,
                    color=SPLIT_COLORS.get(split),
                    label=f"{split} {name}",
                    marker=CLASS_MARKERS[c % len(CLASS_MARKERS)],
                    linewidths=0,
                )
    ax.set_xlabel(axis_labels[0])
    ax.set_ylabel(axis_labels[1])
    ax.legend(fontsize=8, markerscale=2)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    return fig


def plot_reliability(
    curves: dict, *, ece: Optional[dict] = None, title: str = "", xlabel: str = "predicted probability"
) -> Figure:
    """Reliability diagram, one line per split, from ``{split: {confidence, accuracy, count}}``."""
    fig = Figure(figsize=(5.5, 5), layout="tight")
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="grey", ls="--", lw=1, label="perfectly calibrated")
    for split, curve in curves.items():
        conf = np.asarray(curve["confidence"], dtype=float)
        acc = np.asarray(curve["accuracy"], dtype=float)
        ok = np.asarray(curve["count"]) > 0
        label = split if not ece or split not in ece else f"{split} (ECE {ece[split]:.3f})"
        ax.plot(conf[ok], acc[ok], "o-", ms=4, color=SPLIT_COLORS.get(split), label=label)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("observed frequency")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title)
    return fig


def save_figure(figure: Union[Figure, Callable], path) -> Path:
    """Write ``figure`` as a PNG at ``path``, atomically; a callable is given the path."""
    path = Path(path)
    if isinstance(figure, Figure):
        files.save_figure(figure, path, dpi=DPI)
    else:
        figure(path)
    return path


def plot_grouped_bars(
    values: dict, groups: list, *, title: str = "", ylabel: str = "", group_labels: Optional[list] = None
) -> Figure:
    """Grouped bars: ``{series: [one value per group]}``, one bar per series in each group.

    A missing value (None or NaN) leaves its bar out; each bar is labelled with its value.
    """
    series = list(values)
    width = 0.8 / max(1, len(series))
    fig = Figure(figsize=(max(5.5, 0.5 * len(groups) * len(series) + 2), 3.8), layout="tight")
    ax = fig.subplots()
    for k, name in enumerate(series):
        heights = [np.nan if v is None else float(v) for v in values[name]]
        xs = [g + (k - (len(series) - 1) / 2) * width for g in range(len(groups))]
        bars = ax.bar(xs, heights, width, label=name)
        ax.bar_label(bars, labels=["" if np.isnan(h) else f"{h:+.3f}" for h in heights], fontsize=7)
    ax.axhline(0, color="grey", lw=1)
    ax.set_xticks(range(len(groups)), group_labels or groups)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    return fig
