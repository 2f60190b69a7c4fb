"""Runs -> tables and plots (PNG files).

Figures use matplotlib's object-oriented API (``Figure``), never pyplot: nothing here touches
the backend or the global figure list of a notebook that imports xfeat.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .files import atomic_write, save_figure, write_csv, write_json, write_text

logger = logging.getLogger(__name__)


def plot_training_curves(history: list, path, *, title: str = "",
                         best_epoch: Optional[int] = None) -> Path:
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


# --------------------------------------------------------------------------- comparison

_COLUMNS = [("model", "model", "{}"), ("mode", "mode", "{}"), ("params", "parameters", "M"),
            ("trainable", "trainable_parameters", "M"), ("extract s", "extract_seconds", "{:.1f}"),
            ("train s", "train_seconds", "{:.1f}"), ("eval s", "evaluate_seconds", "{:.1f}"),
            ("total s", "total_seconds", "{:.1f}"), ("img/s", "images_per_second", "{:.1f}"),
            ("peak MiB", "peak_memory_mib", "{:.0f}"), ("val acc", "val_accuracy", "{:.3f}"),
            ("test acc", "test_accuracy", "ci"), ("bal acc", "balanced_accuracy", "{:.3f}"),
            ("AUC", "auc", "ci"), ("sens", "sensitivity", "ci"), ("spec", "specificity", "ci"),
            ("thr", "threshold", "{:.3f}")]


def _cell(row: dict, key: str, fmt: str) -> str:
    value = row.get(key)
    if value is None:
        return "—"
    if fmt == "M":
        return f"{value / 1e6:.2f}M" if value >= 1e4 else str(value)
    if fmt == "ci":
        ci = row.get(f"{key}_ci")
        text = f"{value:.3f}"
        return f"{text} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else text
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def format_comparison_table(rows: list, markdown: bool = False) -> str:
    """The comparison as a fixed-width text table (or a Markdown table)."""
    header = [c[0] for c in _COLUMNS]
    body = [[_cell(r, key, fmt) for _, key, fmt in _COLUMNS] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(b) + " |" for b in body]
        return "\n".join(lines)
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(header)]
    fmt_line = lambda cells: "  ".join(c.rjust(w) if i > 1 else c.ljust(w)  # noqa: E731
                                       for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([fmt_line(header), "-" * (sum(widths) + 2 * (len(widths) - 1))] +
                     [fmt_line(b) for b in body])


def plot_pareto(rows: list, path) -> Path:
    """Test AUC (and accuracy) against wall-clock seconds, one point per run."""
    fig = Figure(figsize=(11, 4.5))
    axes = fig.subplots(1, 2)
    markers = {"cached": "o", "frozen": "s", "full": "^", "lp-ft": "D"}
    colors = {}
    for ax, key, label in ((axes[0], "auc", "test ROC AUC"), (axes[1], "test_accuracy",
                                                               "test accuracy")):
        for r in rows:
            color = colors.setdefault(r["model"], f"C{len(colors)}")
            ax.scatter(max(r["total_seconds"], 1e-2), r[key], marker=markers.get(r["mode"], "x"),
                       color=color, s=60, label=f"{r['model']} {r['mode']}")
            ci = r.get(f"{key}_ci" if key == "test_accuracy" else "auc_ci")
            if ci:
                ax.errorbar(max(r["total_seconds"], 1e-2), r[key],
                            yerr=[[r[key] - ci[0]], [ci[1] - r[key]]], color=color, alpha=0.4)
        pts = sorted(((max(r["total_seconds"], 1e-2), r[key]) for r in rows))
        front, best = [], -np.inf
        for x, y in pts:
            if y > best:
                front.append((x, y))
                best = y
        if len(front) > 1:
            ax.step(*zip(*front), where="post", color="grey", lw=1, ls="--", label="Pareto front")
        ax.set_xscale("log")
        ax.set_xlabel("total seconds (extract + train + evaluate), log scale")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
    handles, labels = axes[0].get_legend_handles_labels()
    uniq = dict(zip(labels, handles))
    fig.legend(uniq.values(), uniq.keys(), loc="center right", fontsize=8)
    fig.tight_layout(rect=(0, 0, 0.8, 1))
    return save_figure(fig, path)


def plot_roc_curves(results: list, path) -> Path:
    """ROC curves on test for every binary run, with the operating point chosen on val."""
    from sklearn.metrics import roc_curve

    fig = Figure(figsize=(6, 6))
    ax = fig.subplots()
    for r in results:
        if "test" not in r.predictions or r.predictions["test"][2].shape[1] != 2:
            continue
        _, y, p = r.predictions["test"]
        fpr, tpr, _ = roc_curve(y, p[:, 1])
        rec = r.record
        line, = ax.plot(fpr, tpr, lw=1.3, label=f"{rec['model']} {rec['mode']} "
                                                f"(AUC {rec['metrics']['test']['roc_auc']:.3f})")
        m = rec["metrics"]["test"]
        ax.plot(1 - m["specificity"], m["sensitivity"], "o", color=line.get_color())
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title("ROC on test (dots: threshold chosen on val)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_confusion_matrices(results: list, path) -> Path:
    n = len(results)
    cols = min(4, n)
    rows = int(np.ceil(n / cols))
    fig = Figure(figsize=(3.2 * cols, 3.0 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    for ax, r in zip(axes.flat, results):
        rec = r.record
        cm = np.asarray(rec["metrics"]["test"]["confusion_matrix"])
        names = rec["dataset"]["class_names"]
        ax.imshow(cm, cmap="Blues")
        span = max(cm.max() - cm.min(), 1)
        for (i, j), v in np.ndenumerate(cm):  # white on the darker half of the colour map
            ax.text(j, i, str(v), ha="center", va="center",
                    color="white" if (v - cm.min()) / span > 0.5 else "black")
        ax.set_xticks(range(len(names)), [c[:10] for c in names], fontsize=7)
        ax.set_yticks(range(len(names)), [c[:10] for c in names], fontsize=7)
        ax.set_xlabel("predicted", fontsize=8)
        ax.set_ylabel("true", fontsize=8)
        ax.set_title(f"{rec['model']} {rec['mode']}", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def write_comparison_report(comparison, results: list, *, analyses: Optional[dict] = None) -> Path:
    """report.md, report.html, comparison.csv/json and the PNGs, in ``comparison.out_dir``."""
    from .stats import format_p_value

    out = Path(comparison.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = comparison.rows
    write_json(out / "comparison.json", {"rows": rows, "tests": comparison.tests,
                                         "time_savings": comparison.savings,
                                         "notes": comparison.notes})
    write_csv(out / "comparison.csv", rows, list(rows[0]))
    plot_pareto(rows, out / "pareto.png")
    plot_roc_curves(results, out / "roc.png")
    plot_confusion_matrices(results, out / "confusion.png")
    curves = []
    for r in results:
        src = Path(r.record.get("run_dir") or "") / "curves.png"
        if src.is_file():
            curves.append((f"{r.record['model']} {r.record['mode']}", src))
    md = ["# xfeat comparison", ""]
    md += [f"> {note}" for note in comparison.notes] + ([""] if comparison.notes else [])
    md += ["## Results (test metrics at the threshold chosen on val; 95% bootstrap CIs)", "",
           format_comparison_table(rows, markdown=True), ""]
    if comparison.savings:
        md += ["## Time", ""] + [f"- {line}" for line in comparison.savings] + [""]
    if comparison.tests:
        best = comparison.tests[0]
        md += ["## Are the differences real?", "",
               f"Each run against the best by {best['chosen_by']} ({best['best']}), on the same "
               "test images: DeLong test for AUC, paired bootstrap for accuracy.", "",
               "| run | AUC diff [95% CI] | p (DeLong) | accuracy diff [95% CI] | p (bootstrap) "
               "| significant at 0.05 |", "|---|---|---|---|---|---|"]
        for t in comparison.tests[1:]:
            auc = (f"{t['auc_diff']:+.3f} [{t['auc_diff_ci'][0]:+.3f}, {t['auc_diff_ci'][1]:+.3f}]"
                   if "auc_diff" in t else "—")
            auc_p = format_p_value(t["auc_p_value"]) if "auc_p_value" in t else "—"
            md.append(f"| {t['model']} {t['mode']} | {auc} | {auc_p} | "
                      f"{t['accuracy_diff']:+.3f} "
                      f"[{t['accuracy_diff_ci'][0]:+.3f}, {t['accuracy_diff_ci'][1]:+.3f}] | "
                      f"{format_p_value(t['accuracy_p_value'], t.get('n_boot'))} | "
                      f"{'yes' if t['significant'] else 'no'} |")
        md.append("")
    md += ["## Accuracy against time", "", "![Pareto plot](pareto.png)", "",
           "## ROC curves on test", "", "![ROC curves](roc.png)", "",
           "## Confusion matrices on test", "", "![Confusion matrices](confusion.png)", ""]
    if curves:
        md += ["## Training curves", ""]
        for name, src in curves:
            md += [f"### {name}", "", f"![{name}]({_figure_link(src, out)})", ""]
    if analyses:
        md += ["## Why test accuracy lags", ""]
        for model, path in analyses.items():
            rel = Path(path).resolve().relative_to(out.resolve()) / "analysis.md"
            md.append(f"- [{model}]({rel.as_posix()})")
        md.append("")
    md += ["## Files", "", "- `comparison.csv`, `comparison.json`: the table and tests above",
           "- `runs/*/results.json`: every run in full (schema xfeat-result/1)", ""]
    text = "\n".join(md)
    write_text(out / "report.md", text)
    write_text(out / "report.html", markdown_to_html(text, title="xfeat comparison"))
    return out / "report.md"


def _figure_link(path, out: Path) -> str:
    """A link to the figure ``path`` relative to the report folder ``out``, so the folder can
    be moved, copied or zipped and still show it. A figure outside ``out`` (a run folder kept
    elsewhere, or the original's after the comparison folder was copied) is copied into
    ``out/figures`` first: a link leaving the folder would break with the first move."""
    from urllib.parse import quote

    path, out = Path(path).resolve(), Path(out).resolve()
    try:
        rel = path.relative_to(out)
    except ValueError:
        rel = Path("figures") / f"{path.parent.name}-{path.name}"
        data = path.read_bytes()
        atomic_write(out / rel, lambda f: f.write(data))
    return quote(rel.as_posix())


def markdown_to_html(text: str, title: str = "xfeat report") -> str:
    """The small Markdown subset xfeat writes (headings, tables, images, lists, quotes)."""
    import html
    import re

    def inline(s: str) -> str:
        s = html.escape(s)
        s = re.sub(r"!\[([^\]]*)\]\(([^)]+)\)", r'<img alt="\1" src="\2">', s)
        s = re.sub(r"\[([^\]]*)\]\(([^)]+)\)", r'<a href="\2">\1</a>', s)
        return re.sub(r"`([^`]+)`", r"<code>\1</code>", s)

    out, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("|"):
            table = []
            while i < len(lines) and lines[i].startswith("|"):
                table.append([c.strip() for c in lines[i].strip("|").split("|")])
                i += 1
            out.append("<table><tr>" + "".join(f"<th>{inline(c)}</th>" for c in table[0]) +
                       "</tr>")
            out += ["<tr>" + "".join(f"<td>{inline(c)}</td>" for c in row) + "</tr>"
                    for row in table[2:]]
            out.append("</table>")
            continue
        m = re.match(r"(#+) (.*)", line)
        if m:
            n = len(m.group(1))
            out.append(f"<h{n}>{inline(m.group(2))}</h{n}>")
        elif line.startswith("- "):
            out.append(f"<ul><li>{inline(line[2:])}</li></ul>")
        elif line.startswith("> "):
            out.append(f"<blockquote>{inline(line[2:])}</blockquote>")
        elif line.strip():
            out.append(f"<p>{inline(line)}</p>")
        i += 1
    style = ("body{font-family:sans-serif;max-width:1200px;margin:auto;padding:1em}"
             "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;"
             "padding:3px 6px;text-align:right}img{max-width:100%}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
            f"</title><style>{style}</style></head><body>\n" + "\n".join(out) +
            "\n</body></html>\n")
