"""One training epoch and one evaluation pass: the loop, readable top to bottom."""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from xfeat.errors import TrainingDiverged
from xfeat.extraction import distributed
from xfeat.extraction.runtime import to_memory_format
from xfeat.finetuning.loaders import IGNORE_LABEL


def train_one_epoch(
    model: nn.Module,
    loader,
    optimizer,
    *,
    normalize,
    device: torch.device,
    amp_dtype=None,
    channels_last: bool = True,
    label_smoothing: float = 0.0,
    step_scheduler=None,
    progress: bool = True,
    desc: str = "",
) -> dict:
    """One pass over ``loader`` in train mode; returns mean loss, accuracy, images, seconds.

    As in the PyTorch tutorial, a frozen backbone is in train mode too: its weights get no
    gradient, but BatchNorm uses batch statistics and updates its running averages.
    ``step_scheduler`` (a per-step learning-rate schedule) is stepped after every batch.
    """
    model.train()
    world = distributed.current_world().size
    totals = torch.zeros(4, dtype=torch.float64)  # loss sum, correct, judged, images (this rank)
    t0 = time.perf_counter()
    bar = tqdm(
        total=loader.batch_sampler.n,
        unit="img",
        desc=desc,
        disable=not progress,
        leave=False,
        dynamic_ncols=True,
    )
    for images, labels, batch_n in loader:
        x = to_memory_format(normalize(images.to(device, non_blocking=True)), channels_last)
        y = labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(x)
            loss_sum = loss_sum_of(logits.float(), y, label_smoothing)
        # Mean over the global batch: DDP averages the ranks' gradients, hence "* world".
        loss = loss_sum * (world / int(batch_n[0]))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step_scheduler is not None:
            step_scheduler.step()
        if not math.isfinite(loss_sum.item()):
            raise TrainingDiverged(
                f"{desc}: the training loss became {loss_sum.item()}; lower the learning rate (--lr)"
            )
        if y.ndim == 2:  # multi-label: per known entry (as evaluate), right at 0.5
            known = y >= 0
            right = ((logits.detach() >= 0) == (y == 1))[known].sum().item()
            judged, images = known.sum().item(), known.any(1).sum().item()
        else:
            real_rows = y != IGNORE_LABEL
            right, judged = (logits.argmax(1) == y)[real_rows].sum().item(), real_rows.sum().item()
            images = judged
        totals += torch.tensor([loss_sum.item(), right, judged, images], dtype=torch.float64)
        bar.update(int(batch_n[0]))
        bar.set_postfix(loss=f"{totals[0] / max(totals[2], 1):.3f}", refresh=False)
    bar.close()
    if world > 1:
        torch.distributed.all_reduce(totals)
    seconds = time.perf_counter() - t0
    loss_total, correct, judged, seen = totals.tolist()
    return {  # per image, or for multi-label data per known entry (as evaluate reports them)
        "loss": loss_total / max(judged, 1),
        "accuracy": correct / max(judged, 1),
        "images": int(seen),
        "seconds": seconds,
        "images_per_second": seen / seconds,
    }


def loss_sum_of(logits: torch.Tensor, y: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """The summed loss of a batch: cross-entropy over classes (padding ignored), or for
    multi-label targets binary cross-entropy with logits over the known entries only (an
    unknown entry, -1, counts in no loss), summed over labels."""
    if y.ndim == 2:
        known = y >= 0
        target = y.clamp(min=0)
        if label_smoothing:
            target = target * (1 - label_smoothing) + 0.5 * label_smoothing
        losses = nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none")
        return (losses * known).sum()
    return nn.functional.cross_entropy(
        logits, y, reduction="sum", ignore_index=IGNORE_LABEL, label_smoothing=label_smoothing
    )


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    loader,
    *,
    normalize,
    device: torch.device,
    amp_dtype=None,
    channels_last: bool = True,
    progress: bool = False,
    desc: str = "",
) -> dict:
    """Loss, accuracy and class probabilities on ``loader`` (model in eval mode).

    Multi-label data: sigmoid probabilities (N, L), the loss per known entry, and ``roc_auc``
    (the macro AUC over labels, on the known entries) which picks the best epoch."""
    model.eval()
    probas, labels_all, total_loss = [], [], 0.0
    t0 = time.perf_counter()
    bar = tqdm(total=len(loader.dataset), unit="img", desc=desc, disable=not progress, leave=False)
    for images, labels in loader:
        bar.update(len(labels))
        x = to_memory_format(normalize(images.to(device, non_blocking=True)), channels_last)
        y = labels.to(device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(x).float()
        total_loss += loss_sum_of(logits, y).item()
        multilabel = y.ndim == 2
        probas.append((torch.sigmoid(logits) if multilabel else torch.softmax(logits, 1)).cpu().numpy())
        labels_all.append(labels.numpy())
    bar.close()
    proba, labels = np.concatenate(probas), np.concatenate(labels_all)
    if labels.ndim == 2:
        from xfeat.evaluation.multilabel import macro_auc

        labels = labels.astype(np.int64)
        known = labels >= 0
        return {
            "loss": total_loss / max(1, known.sum()),
            "accuracy": float(((proba >= 0.5) == (labels == 1))[known].mean()),
            "roc_auc": macro_auc(labels, proba),
            "proba": proba.astype(np.float64),
            "labels": labels,
            "seconds": time.perf_counter() - t0,
        }
    return {
        "loss": total_loss / len(labels),
        "accuracy": float((proba.argmax(1) == labels).mean()),
        "proba": proba.astype(np.float64),
        "labels": labels,
        "seconds": time.perf_counter() - t0,
    }


@torch.no_grad()
def adabn(
    model: nn.Module,
    loader,
    *,
    normalize,
    device: torch.device,
    amp_dtype=None,
    channels_last: bool = True,
) -> nn.Module:
    """A copy of ``model`` whose BatchNorm running statistics are re-estimated on the images
    of ``loader`` (AdaBN, Li et al. 2016): the cumulative mean and variance of one pass in
    train mode, with every weight unchanged. The labels are not used."""
    import copy

    adapted = copy.deepcopy(model)
    norms = [m for m in adapted.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the pass
    adapted.eval()
    for m in norms:
        m.train()
    for images, _ in loader:
        x = to_memory_format(normalize(images.to(device, non_blocking=True)), channels_last)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            adapted(x)
    return adapted.eval()
