"""Runs -> figures (PNG files): training curves, and the comparison's Pareto plot, ROC curves
and confusion matrices, every run drawn in its :mod:`~xfeat.report.style`.

Figures use matplotlib's object-oriented API (``Figure``), never pyplot: nothing here touches
the backend or the global figure list of a notebook that imports xfeat.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

from xfeat.files import save_figure
from xfeat.report.rows import RANDOM_WEIGHTS
from xfeat.report.style import bold_headings, key_handles, run_styles

# one colour per class in the one-vs-rest ROC panels (Okabe-Ito: safe for colour-blind readers)
CLASS_COLORS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#F0E442", "#999999")


def plot_training_curves(
    history: list, path, *, title: str = "", best_epoch: Optional[int] = None
) -> Path:
    """Accuracy and loss per epoch, train vs val, the kept epoch marked."""
    epochs = [h["epoch"] for h in history]
    fig = Figure(figsize=(10, 4))
    (ax_acc, ax_loss) = fig.subplots(1, 2)
    for ax, key, label in ((ax_acc, "accuracy", "accuracy"), (ax_loss, "loss", "loss")):
        ax.plot(epochs, [h[f"train_{key}"] for h in history], "o-", label="train", ms=3)
        ax.plot(epochs, [h[f"val_{key}"] for h in history], "s-", label="val", ms=3)
        if best_epoch:
            ax.axvline(best_epoch, color="grey", ls="--", lw=1, label=f"kept epoch {best_epoch}")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_pareto(rows: list, path) -> Path:
    """Test AUC and accuracy against wall-clock seconds, one point per run, with its 95% CI
    and the Pareto front; colour = model, marker = mode, hollow = random weights."""
    styles = run_styles(rows)
    fig = Figure(figsize=(12, 4.8), layout="constrained")
    axes = fig.subplots(1, 2)
    multilabel = any(r.get("multilabel") for r in rows)
    for ax, key, label in (
        (axes[0], "auc", "test macro ROC AUC" if multilabel else "test ROC AUC"),
        (
            axes[1],
            *(("average_precision", "test mAP") if multilabel else ("test_accuracy", "test accuracy")),
        ),
    ):
        points = [(max(r["total_seconds"], 1e-2), r[key], r) for r in rows if r.get(key) is not None]
        for x, y, r in points:
            style = styles[(r["model"], r["mode"])]
            ci = r.get(f"{key}_ci")
            if ci and None not in ci:
                ax.errorbar(
                    x, y, yerr=[[y - ci[0]], [ci[1] - y]], color=style.color, alpha=0.35, lw=1, zorder=1
                )
            ax.scatter(x, y, s=55, zorder=3, **style.scatter())
            if r.get("transductive"):
                ax.annotate(
                    "transductive",
                    (x, y),
                    xytext=(4, 4),
                    textcoords="offset points",
                    fontsize=7,
                    color=style.color,
                )
        # Random weights say nothing about accuracy: they are drawn, not on the front.
        _pareto_front(ax, [(x, y) for x, y, r in points if r["weights_kind"] != "random"])
        _seconds_axis(ax)
        ax.set_xlabel("total seconds (extract + train + evaluate), log scale")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
    handles, labels, headings = key_handles(rows, styles)
    front = axes[0].get_legend_handles_labels()
    legend = fig.legend(
        handles + front[0], labels + front[1], loc="outside right upper", fontsize=8, frameon=False
    )
    bold_headings(legend, headings)
    return save_figure(fig, path)


def _seconds_axis(ax) -> None:
    """Log scale labelled 1, 10, 100 (and 2, 5 within two decades): no crowded labels."""
    ax.set_xscale("log")
    low, high = ax.get_xlim()
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0) if high / low < 100 else (1.0,)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def _pareto_front(ax, points: list) -> None:
    front, best = [], -np.inf
    for x, y in sorted(points):
        if y > best:
            front.append((x, y))
            best = y
    if len(front) > 1:
        ax.step(*zip(*front), where="post", color="grey", lw=1, ls="--", label="Pareto front", zorder=2)


def plot_roc_curves(rows: list, results: list, path) -> Path:
    """:func:`roc_figure` as a PNG at ``path``."""
    return save_figure(roc_figure(rows, results), path)


def roc_figure(rows: list, results: list) -> Figure:
    """ROC curves on test, one panel per model for binary runs (readable with a dozen runs:
    colour = model, line and marker = mode, each marker the operating point, the threshold
    chosen on val), and one panel per multi-class run with a one-vs-rest curve per class and
    their macro average. ``rows`` and ``results`` are aligned."""
    styles = run_styles(rows)
    scored = [(row, r) for row, r in zip(rows, results) if "test" in r.predictions]
    if scored and all(np.asarray(r.predictions["test"][1]).ndim == 2 for _, r in scored):
        return _label_grid(scored, styles)
    panels = {}  # title key -> ("binary", runs) or ("classes", (row, result))
    for row, r in zip(rows, results):
        if "test" not in r.predictions:
            continue
        multilabel = np.asarray(r.predictions["test"][1]).ndim == 2
        if r.predictions["test"][2].shape[1] == 2 and not multilabel:
            panels.setdefault(row["model"], ("binary", []))[1].append((row, r))
        else:
            panels[(row["model"], row["mode"])] = ("classes", (row, r))
    cols = max(1, min(3, len(panels)))
    n_rows = max(1, -(-len(panels) // cols))
    fig = Figure(figsize=(4.6 * cols, 4.4 * n_rows + 0.5), layout="constrained")
    axes = fig.subplots(n_rows, cols, squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    for k, (ax, (kind, content)) in enumerate(zip(axes.flat, panels.values())):
        first = content[0][0] if kind == "binary" else content[0]
        if kind == "binary":
            _roc_panel(ax, content, styles)
            title = first["model"]
        else:
            _one_vs_rest_panel(ax, *content)
            title = f"{first['model']} {first['mode']}"
        if k % cols:
            ax.set_ylabel("")
        caveat = f" ({RANDOM_WEIGHTS})" if first["weights_kind"] == "random" else ""
        ax.set_title(
            title + caveat,
            color=styles[(first["model"], first["mode"])].color,
            fontsize=10,
            fontweight="bold",
        )
    kinds = {kind for kind, _ in panels.values()}
    multilabel = any(
        np.asarray(r.predictions["test"][1]).ndim == 2 for r in results if "test" in r.predictions
    )
    if kinds == {"binary"}:
        title = (
            "ROC on test; markers: the threshold chosen on val. Colour = model, line and marker = mode"
        )
    elif multilabel:
        title = "ROC on test, a curve per label (its known rows); markers: each label's val threshold"
    else:
        title = (
            "ROC on test: binary runs by model; 3 or more classes: one-vs-rest per class, macro average"
        )
    fig.suptitle(title, fontsize=10, wrap=True)
    return fig


def _label_grid(runs: list, styles: dict) -> Figure:
    """Multi-label runs: one panel per label, a curve per run on the rows where the label is
    known (colour = model, line = mode), each marker the run's operating point at the label's
    threshold chosen on val."""
    from matplotlib.lines import Line2D
    from sklearn.metrics import roc_curve

    names = list(runs[0][1].record.dataset.class_names)
    cols = max(1, min(4, len(names)))
    n_rows = -(-len(names) // cols)
    fig = Figure(figsize=(4.2 * cols, 4.0 * n_rows + 0.6), layout="constrained")
    axes = fig.subplots(n_rows, cols, squeeze=False)
    for ax in axes.flat[len(names) :]:
        ax.axis("off")
    for j, (ax, name) in enumerate(zip(axes.flat, names)):
        handles, labels = [], []
        for row, r in runs:
            _, y, p = r.predictions["test"]
            y, p = np.asarray(y), np.asarray(p)
            known = y[:, j] >= 0
            positive = y[known, j] == 1
            if positive.all() or not positive.any():
                continue  # one value on test: no curve
            style = styles[(row["model"], row["mode"])]
            fpr, tpr, _ = roc_curve(positive, p[known, j])
            ax.plot(fpr, tpr, **style.line())
            m = r.record.metrics["test"]["per_label"][name]
            ax.plot(1 - m["specificity"], m["sensitivity"], **style.point())
            handles.append(Line2D([], [], **{**style.point(), **style.line()}))
            labels.append(f"{row['model']} {row['mode']}: AUC {m['roc_auc']:.3f}")
        ax.plot([0, 1], [0, 1], ":", color="grey", lw=1)
        ax.set(xlabel="1 - specificity", ylabel="sensitivity" if j % cols == 0 else "")
        ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01))
        ax.grid(alpha=0.3)
        ax.set_title(name, fontsize=10, fontweight="bold")
        if handles:
            ax.legend(handles, labels, loc="lower right", fontsize=7, handlelength=3.2)
    fig.suptitle(
        "ROC on test per label (its known rows); markers: each run's threshold for the label, "
        "chosen on val. Colour = model, line and marker = mode",
        fontsize=10,
        wrap=True,
    )
    return fig


def _one_vs_rest_panel(ax, row: dict, result) -> None:
    """One ROC curve per class (that class against the others) and their macro average (the
    mean true-positive rate over a common false-positive grid), AUCs in the legend.
    Multi-label runs: one curve per label on the rows where it is known, with a marker at the
    label's operating point (its threshold chosen on val)."""
    from sklearn.metrics import roc_auc_score, roc_curve

    _, y, p = result.predictions["test"]
    y = np.asarray(y)
    names = result.record.dataset.class_names
    per_label = result.record.metrics["test"].get("per_label") if y.ndim == 2 else None
    grid = np.linspace(0.0, 1.0, 201)
    curves = []
    for c, name in enumerate(names):
        known = y[:, c] >= 0 if y.ndim == 2 else np.ones(len(y), dtype=bool)
        positive = (y[:, c] == 1)[known] if y.ndim == 2 else y == c
        if positive.all() or not positive.any():
            continue  # a class absent from test (or alone in it) has no curve
        color = CLASS_COLORS[c % len(CLASS_COLORS)]
        fpr, tpr, _ = roc_curve(positive, p[known, c])
        auc = roc_auc_score(positive, p[known, c])
        ax.plot(fpr, tpr, lw=1.3, color=color, label=f"{name}: AUC {auc:.3f}")
        if per_label:
            m = per_label[name]
            ax.plot(1 - m["specificity"], m["sensitivity"], "o", color=color, ms=6, mec="black")
        curves.append((np.interp(grid, fpr, tpr), auc))
    if curves:
        mean_tpr = np.mean([t for t, _ in curves], axis=0)
        macro = np.mean([a for _, a in curves])
        ax.plot(grid, mean_tpr, "--", lw=2, color="black", label=f"macro average: AUC {macro:.3f}")
    ax.plot([0, 1], [0, 1], ":", color="grey", lw=1)
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", xlim=(-0.01, 1.01), ylim=(-0.01, 1.01))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)


def _roc_panel(ax, runs: list, styles: dict) -> None:
    from matplotlib.lines import Line2D
    from sklearn.metrics import roc_curve

    handles, labels = [], []
    for row, r in runs:
        style = styles[(row["model"], row["mode"])]
        _, y, p = r.predictions["test"]
        fpr, tpr, _ = roc_curve(y, p[:, 1])
        ax.plot(fpr, tpr, **style.line())
        m = r.record.metrics["test"]
        ax.plot(1 - m["specificity"], m["sensitivity"], **style.point())
        handles.append(Line2D([], [], **{**style.point(), **style.line()}))
        auc = "—" if row.get("auc") is None else f"{row['auc']:.3f}"
        labels.append(f"{row['mode']}{', transductive' if row.get('transductive') else ''}: AUC {auc}")
    ax.plot([0, 1], [0, 1], ":", color="grey", lw=1)
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", xlim=(-0.01, 1.01), ylim=(-0.01, 1.01))
    ax.grid(alpha=0.3)
    ax.legend(handles, labels, loc="lower right", fontsize=8, handlelength=3.2)


def plot_confusion_matrices(rows: list, results: list, path) -> Path:
    """One confusion matrix on test per run, titled in the run's model colour."""
    styles = run_styles(rows)
    n = len(results)
    cols = min(4, n)
    n_rows = int(np.ceil(n / cols))
    fig = Figure(figsize=(3.3 * cols, 3.2 * n_rows), layout="constrained")
    axes = fig.subplots(n_rows, cols, squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    for ax, row, r in zip(axes.flat, rows, results):
        rec = r.record
        cm = np.asarray(rec.metrics["test"]["confusion_matrix"])
        names = rec.dataset.class_names
        ax.imshow(cm, cmap="Blues")
        span = max(cm.max() - cm.min(), 1)
        for (i, j), v in np.ndenumerate(cm):  # white on the darker half of the colour map
            ax.text(
                j,
                i,
                str(v),
                ha="center",
                va="center",
                color="white" if (v - cm.min()) / span > 0.5 else "black",
            )
        ax.set_xticks(range(len(names)), [c[:10] for c in names], fontsize=7)
        ax.set_yticks(range(len(names)), [c[:10] for c in names], fontsize=7)
        ax.set_xlabel("predicted", fontsize=8)
        ax.set_ylabel("true", fontsize=8)
        title = f"{row['model']} {row['mode']}" + (f"\n{row['caveat']}" if row["caveat"] else "")
        ax.set_title(
            title, fontsize=9, color=styles[(row["model"], row["mode"])].color, fontweight="bold"
        )
    return save_figure(fig, path)
