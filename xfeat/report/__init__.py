"""Runs -> tables, figures and report pages.

``plots`` draws (matplotlib's ``Figure``, never pyplot) in the colours and markers of
``style``; ``tables`` formats rows as text or Markdown; ``html`` turns xfeat's Markdown into
a standalone page; ``comparison`` writes the comparison report. Nothing here trains or fits.
"""

from xfeat.report.comparison import write_comparison_report
from xfeat.report.figures import (
    plot_confusion_matrices,
    plot_pareto,
    plot_roc_curves,
    plot_training_curves,
)
from xfeat.report.html import markdown_to_html
from xfeat.report.tables import format_comparison_table, format_tests_table, format_timings_table

__all__ = [
    "format_comparison_table",
    "format_tests_table",
    "format_timings_table",
    "markdown_to_html",
    "plot_confusion_matrices",
    "plot_pareto",
    "plot_roc_curves",
    "plot_training_curves",
    "write_comparison_report",
]
