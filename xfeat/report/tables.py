"""Comparison rows -> tables, as fixed-width text or Markdown: the results, the timings per
model and the significance tests. Cells with an interval read ``0.843 [0.81–0.87]``; runs
with a caveat (random weights, transductive) say so in their row."""

from __future__ import annotations

from xfeat.evaluation.stats import format_interval, format_p_value
from xfeat.report.rows import format_seconds, run_label


def _params(value) -> str:
    return f"{value / 1e6:.2f}M" if value >= 1e4 else str(value)


def _fixed(digits: int):
    return lambda value: f"{value:.{digits}f}"


def _interval(key: str):
    return lambda row: format_interval(row.get(key), row.get(f"{key}_ci"))


def _value(key: str, fmt):
    def cell(row: dict) -> str:
        value = row.get(key)
        return "—" if value is None or value != value else fmt(value)

    return cell


# (header, cell). Seldom-needed columns (extract/train/eval seconds, img/s, val accuracy,
# balanced accuracy, total parameters) are in comparison.csv and the timings table.
_COLUMNS = (
    ("model", lambda r: r["model"]),
    ("mode", lambda r: r["mode"]),
    ("weights", lambda r: r["weights"]),
    ("note", lambda r: r.get("caveat") or ""),
    ("trainable", _value("trainable_parameters", _params)),
    ("total s", _value("total_seconds", _fixed(1))),
    ("peak MiB", _value("peak_memory_mib", _fixed(0))),
    ("val AUC", _value("val_auc", _fixed(3))),
    ("test acc [95% CI]", _interval("test_accuracy")),
    ("AUC [95% CI]", _interval("auc")),
    ("sens [95% CI]", _interval("sensitivity")),
    ("spec [95% CI]", _interval("specificity")),
    ("thr", _value("threshold", _fixed(3))),
)


def render_table(header: list, body: list, markdown: bool = False, left: int = 1) -> str:
    """Rows of cells as Markdown, or as text with the first ``left`` columns left-aligned
    and the others (numbers) right-aligned."""
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(b) + " |" for b in body])
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(header)]

    def line(cells):
        return "  ".join(
            c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
        ).rstrip()

    return "\n".join(
        [line(header), "-" * (sum(widths) + 2 * (len(widths) - 1))] + [line(b) for b in body]
    )


_MACRO = ("val AUC", "AUC [95% CI]", "sens [95% CI]", "spec [95% CI]")


# Multi-label runs: no accuracy; AUC, AP, sensitivity and specificity are macro over labels
# (each at its own threshold, chosen on val).
_MULTILABEL_COLUMNS = tuple(c for c in _COLUMNS if c[0] not in ("test acc [95% CI]", "thr")) + (
    ("macro AP", _value("average_precision", _fixed(3))),
)


def format_comparison_table(rows: list, markdown: bool = False) -> str:
    """The comparison, one row per run: test metrics at the threshold chosen on val, with
    95% bootstrap intervals (text, or Markdown with ``markdown=True``). With three classes
    or more, AUC, sensitivity and specificity are macro averages over the classes, and the
    headers say so; multi-label runs show macro AUC and AP over the labels instead of
    accuracy."""
    if any(r.get("multilabel") for r in rows):
        header = [f"macro {h}" if h in _MACRO else h for h, _ in _MULTILABEL_COLUMNS]
        body = [[cell(r) for _, cell in _MULTILABEL_COLUMNS] for r in rows]
        return render_table(header, body, markdown, left=4)
    multiclass = any((r.get("n_classes") or 2) > 2 for r in rows)
    header = [f"macro {h}" if multiclass and h in _MACRO else h for h, _ in _COLUMNS]
    body = [[cell(r) for _, cell in _COLUMNS] for r in rows]
    return render_table(header, body, markdown, left=4)


_TIMING_HEADER = [
    "model",
    "extraction s",
    "head fit s",
    "frozen s (epochs)",
    "full s (epochs)",
    "cached vs frozen",
    "cache built vs frozen",
    "cached vs full",
    "frozen recipe on cache s",
]


def format_timings_table(timings: list, markdown: bool = False) -> str:
    """Per model: the cached path's seconds against the frozen baseline's and full
    fine-tuning's, and the ratios (from :func:`xfeat.report.rows.timing_rows`)."""

    def seconds(value, epochs=None):
        if value is None:
            return "—"
        return format_seconds(value) + (f" ({epochs})" if epochs else "")

    body = [
        [
            f"{t['model']} ({t['caveat']})" if t["caveat"] else t["model"],
            seconds(t["extract_seconds"]),
            seconds(t["head_fit_seconds"]),
            seconds(t["frozen_seconds"], t["frozen_epochs"]),
            seconds(t["full_seconds"], t["full_epochs"]),
            t["cached_vs_frozen"] or "—",
            t["cache_built_vs_frozen"] or "—",
            t["cached_vs_full"] or "—",
            seconds(t["same_recipe_on_cache_seconds"]),
        ]
        for t in timings
    ]
    return render_table(_TIMING_HEADER, body, markdown)


def format_tests_table(tests: list, alpha: float = 0.05) -> str:
    """Markdown: each run against the best, DeLong for AUC, paired bootstrap for accuracy."""

    def diff(t, key):
        if t.get(key) is None:
            return "—"
        lo, hi = t[f"{key}_ci"]
        return f"{t[key]:+.3f} [{lo:+.3f}, {hi:+.3f}]"

    if any("per_label" in t for t in tests[1:]):
        return _multilabel_tests_table(tests, alpha, diff)
    body = []
    for t in tests[1:]:
        auc_p = format_p_value(t["auc_p_value"]) if t.get("auc_p_value") is not None else "—"
        body.append(
            [
                run_label(t),
                diff(t, "auc_diff"),
                auc_p,
                diff(t, "accuracy_diff"),
                format_p_value(t["accuracy_p_value"], t.get("n_boot")),
                "yes" if t["significant"] else "no",
            ]
        )
    header = [
        "run",
        "AUC diff [95% CI]",
        "p (DeLong)",
        "accuracy diff [95% CI]",
        "p (bootstrap)",
        f"significant at {alpha:g}",
    ]
    return render_table(header, body, markdown=True)


def _multilabel_tests_table(tests: list, alpha: float, diff) -> str:
    labels = list(dict.fromkeys(name for t in tests[1:] for name in t.get("per_label", {})))
    body = [
        [
            run_label(t),
            diff(t, "auc_diff"),
            format_p_value(t["auc_p_value"], t.get("auc_n_boot"))
            if t.get("auc_p_value") is not None
            else "—",
            *(
                format_p_value(t["per_label"][name]["p_value"])
                if name in t.get("per_label", {})
                else "—"
                for name in labels
            ),
            "yes" if t["significant"] else "no",
        ]
        for t in tests[1:]
    ]
    header = [
        "run",
        "macro AUC diff [95% CI]",
        "p (paired bootstrap)",
        *(f"{name}: p (DeLong)" for name in labels),
        f"significant at {alpha:g}",
    ]
    return render_table(header, body, markdown=True)


def format_per_label_table(rows: list, results: list) -> str:
    """Markdown: each multi-label run's test metrics per label (AUC and AP with 95% CIs, the
    val-chosen threshold and the sensitivity and specificity there, rows judged)."""
    body = []
    for row, r in zip(rows, results):
        per_label = r.record.metrics["test"].get("per_label") or {}
        ci = (r.record.ci.get("test") or {}).get("per_label") or {}
        for name, m in per_label.items():
            c = ci.get(name, {})
            body.append(
                [
                    run_label(row),
                    name,
                    str(m["n"]),
                    f"{m['prevalence']:.3f}",
                    format_interval(m["roc_auc"], c.get("roc_auc")),
                    format_interval(m["average_precision"], c.get("average_precision")),
                    f"{m['threshold']:.3f}",
                    _value("sensitivity", _fixed(3))(m),
                    _value("specificity", _fixed(3))(m),
                ]
            )
    header = ["run", "label", "n", "prevalence", "AUC [95% CI]", "AP [95% CI]", "thr", "sens", "spec"]
    return render_table(header, body, markdown=True)


def format_prevalence_table(result) -> str:
    """Markdown: each label's prevalence (positives among known rows) and rows judged, split by
    split: a shift between splits shows here first."""
    metrics = result.record.metrics
    splits = [s for s in ("train", "val", "test") if s in metrics]
    labels = list(metrics[splits[0]]["per_label"])

    def cell(split: str, name: str) -> str:
        m = metrics[split]["per_label"][name]
        return f"{m['prevalence']:.3f} (n {m['n']})"

    body = [[name, *(cell(s, name) for s in splits)] for name in labels]
    return render_table(["label", *splits], body, markdown=True)
