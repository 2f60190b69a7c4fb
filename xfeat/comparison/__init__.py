"""``compare``: speed and accuracy of every (backbone, mode) pair, side by side, with a report.

``run`` orchestrates the runs (reused, resumed, validated up front); ``table`` turns saved
results into the table rows, the best run, the significance tests and the timings;
``verdict`` says what they mean in a few sentences, which the report opens with.
"""

from xfeat.comparison.run import QUICK_EPOCHS, QUICK_SIZES, Comparison, compare
from xfeat.config import COMPARE_MODES as MODES
from xfeat.config import parse_weights

__all__ = ["MODES", "QUICK_EPOCHS", "QUICK_SIZES", "Comparison", "compare", "parse_weights"]
