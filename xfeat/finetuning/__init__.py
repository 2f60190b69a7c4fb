"""End-to-end training: ``full`` fine-tuning, the ``frozen`` backbone baseline, and ``lp-ft``.

``run`` holds :func:`finetune` (a thin main over named steps), ``loop`` the training epoch
and the evaluation pass, ``model`` the network, optimiser and files, ``data`` the batches.
"""

from xfeat.config import FINETUNE_MODES as MODES
from xfeat.errors import TrainingDiverged
from xfeat.finetuning.loop import evaluate, train_one_epoch
from xfeat.finetuning.model import ProbeHead, load_finetuned
from xfeat.finetuning.run import finetune

__all__ = [
    "MODES",
    "ProbeHead",
    "TrainingDiverged",
    "evaluate",
    "finetune",
    "load_finetuned",
    "train_one_epoch",
]
