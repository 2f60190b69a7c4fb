"""``compare``: speed and accuracy of every (backbone, mode) pair, side by side, with a report.

``run`` orchestrates the runs (reused, resumed, validated up front); ``table`` turns saved
results into the table, the significance tests and the time savings.
"""
from ..config import COMPARE_MODES as MODES
from .run import QUICK_EPOCHS, QUICK_SIZES, Comparison, compare, parse_weights

__all__ = ["MODES", "QUICK_EPOCHS", "QUICK_SIZES", "Comparison", "compare", "parse_weights"]
