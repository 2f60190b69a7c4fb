"""Where images come from: sources (class folders, npz files, built-in data sets), image
decoding, the validation carve-out and patient groups.

Every source builds a :class:`Dataset`; :func:`load_dataset` reads what a
:class:`~xfeat.config.DataSpec` names and carves the validation split. Nothing here imports
torch.
"""

from xfeat.data.dataset import SPLITS, Dataset, Split, stratified_rows
from xfeat.data.load import load_dataset
from xfeat.data.splits import TINY_VAL_SIZE, carve_validation, patient_groups, split_patients

__all__ = [
    "SPLITS",
    "TINY_VAL_SIZE",
    "Dataset",
    "Split",
    "SplitRecipe",
    "carve_validation",
    "load_dataset",
    "patient_groups",
    "split_patients",
    "stratified_rows",
]
