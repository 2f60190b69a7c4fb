"""The comparison report: ``report.md`` and ``report.html`` (the verdict first, then the
timings, the results, the tests and the figures), ``comparison.csv``/``.json`` and the PNGs.

Everything shown is computed by :mod:`xfeat.comparison` (rows, tests, timings, verdict); this
module only lays it out and draws it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional
from urllib.parse import quote

from xfeat.files import atomic_write, write_csv, write_json, write_text
from xfeat.report.figures import plot_confusion_matrices, plot_pareto, plot_roc_curves
from xfeat.report.html import markdown_to_html
from xfeat.report.rows import run_label
from xfeat.report.tables import (
    format_comparison_table,
    format_per_label_table,
    format_prevalence_table,
    format_tests_table,
    format_timings_table,
)

TITLE = "xfeat comparison"


def write_comparison_report(comparison, results: list, *, analyses: Optional[dict] = None) -> Path:
    """report.md, report.html, comparison.csv/json and the PNGs, in ``comparison.out_dir``.

    ``results``: the :class:`~xfeat.runs.results.RunResult` of each row of ``comparison.rows``,
    in the same order. ``analyses``: model -> folder of its ``xfeat analyze`` report.
    """
    out = Path(comparison.out_dir)
    rows = comparison.rows
    if len(results) != len(rows):
        raise ValueError(
            f"{len(results)} results for {len(rows)} rows of the comparison; "
            "expected one result per row, in the same order"
        )
    out.mkdir(parents=True, exist_ok=True)
    write_json(
        out / "comparison.json",
        {
            "verdict": comparison.verdict,
            "rows": rows,
            "timings": comparison.timings,
            "tests": comparison.tests,
            "notes": comparison.notes,
        },
    )
    write_csv(out / "comparison.csv", rows, list(rows[0]))
    plot_pareto(rows, out / "pareto.png")
    plot_roc_curves(rows, results, out / "roc.png")
    multilabel = any(r.get("multilabel") for r in rows)
    if not multilabel:  # multi-label runs: the per-label table gives each operating point
        plot_confusion_matrices(rows, results, out / "confusion.png")
    curves = _training_curves(rows, results, out)
    per_label = _per_label_section(rows, results) if multilabel else []
    for page, analysis_page in (("report.md", "analysis.md"), ("report.html", "analysis.html")):
        text = "\n".join(_markdown(comparison, curves, analyses or {}, out, analysis_page, per_label))
        write_text(out / page, markdown_to_html(text, title=TITLE) if page.endswith(".html") else text)
    return out / "report.md"


def _per_label_section(rows: list, results: list) -> list:
    """Multi-label: the test metrics per label for every run, and label prevalence per split."""
    return [
        "## Per label",
        "",
        "Test metrics of each label on the rows where it is known, at its own threshold "
        "chosen on val; 95% bootstrap CIs over patients where the data name them.",
        "",
        format_per_label_table(rows, results),
        "",
        "### Label prevalence per split",
        "",
        format_prevalence_table(results[0]),
        "",
    ]


def _markdown(
    comparison, curves: list, analyses: dict, out: Path, analysis_page: str, per_label=()
) -> list:
    """The report's Markdown lines, in reading order: the answer first, the evidence after."""
    md = [f"# {TITLE}", ""]
    md += [f"> {note}" for note in comparison.notes] + ([""] if comparison.notes else [])
    md += ["## Verdict", ""] + [f"- {s}" for s in comparison.verdict["sentences"]] + [""]
    if comparison.timings:
        md += [
            "## Time",
            "",
            "Training seconds per model. The cached path is the extraction (once per cache) "
            "plus the head's fit; ratios are the other run's training seconds over the "
            "cached path's. The last column times the frozen baseline's own linear layer "
            "and SGD recipe trained on the cached features for as many epochs.",
            "",
            format_timings_table(comparison.timings, markdown=True),
            "",
        ]
    md += [
        "## Results",
        "",
        "Test metrics at the threshold chosen on val, with 95% bootstrap CIs. Every column "
        "(seconds per stage, img/s, val accuracy, balanced accuracy, parameters) is in "
        "`comparison.csv`.",
        "",
        format_comparison_table(comparison.rows, markdown=True),
        "",
    ]
    md += list(per_label)
    if comparison.tests:
        method = comparison.verdict["significance"]["method"]
        md += [
            "## Are the differences real?",
            "",
            f"Each run against the best by {comparison.tests[0]['chosen_by']} "
            f"({comparison.tests[0]['best']}), on the same test images: {method}.",
            "",
            format_tests_table(comparison.tests, comparison.verdict["significance"]["alpha"]),
            "",
        ]
    md += [
        "## Accuracy against time",
        "",
        "![Pareto plot](pareto.png)",
        "",
        "## ROC curves on test",
        "",
        "![ROC curves](roc.png)",
        "",
    ]
    if not per_label:
        md += ["## Confusion matrices on test", "", "![Confusion matrices](confusion.png)", ""]
    if curves:
        md += ["## Training curves", ""]
        for name, link in curves:
            md += [f"### {name}", "", f"![{name}]({link})", ""]
    if analyses:
        md += ["## Why test accuracy lags", ""]
        for model, path in analyses.items():
            rel = Path(path).resolve().relative_to(out.resolve()) / analysis_page
            md.append(f"- [{model}]({quote(rel.as_posix())})")
        md.append("")
    md += [
        "## Files",
        "",
        "- `comparison.csv`, `comparison.json`: the rows, timings, tests and verdict above",
        "- `runs/*/results.json`: every run in full (schema xfeat-result/1)",
        "",
    ]
    return md


def _training_curves(rows: list, results: list, out: Path) -> list:
    """(run label, link) of each run's ``curves.png``, copied into ``out`` when outside."""
    curves = []
    for row, r in zip(rows, results):
        src = Path(r.record.run_dir or "") / "curves.png"
        if src.is_file():
            curves.append((run_label(row), _figure_link(src, out)))
    return curves


def _figure_link(path, out: Path) -> str:
    """A link to the figure ``path`` relative to the report folder ``out``, so the folder can
    be moved, copied or zipped and still show it. A figure outside ``out`` (a run folder kept
    elsewhere, or the original's after the comparison folder was copied) is copied into
    ``out/figures`` first: a link leaving the folder would break with the first move."""
    path, out = Path(path).resolve(), Path(out).resolve()
    try:
        rel = path.relative_to(out)
    except ValueError:
        rel = Path("figures") / f"{path.parent.name}-{path.name}"
        data = path.read_bytes()
        atomic_write(out / rel, lambda f: f.write(data))
    return quote(rel.as_posix())
