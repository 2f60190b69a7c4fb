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
    totals = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, seen (this rank)
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
            loss_sum = nn.functional.cross_entropy(
                logits.float(),
                y,
                reduction="sum",
                ignore_index=IGNORE_LABEL,
                label_smoothing=label_smoothing,
            )
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
        real = y != IGNORE_LABEL
        totals += torch.tensor(
            [loss_sum.item(), (logits.argmax(1) == y)[real].sum().item(), real.sum().item()],
            dtype=torch.float64,
        )
        bar.update(int(batch_n[0]))
        bar.set_postfix(loss=f"{totals[0] / max(totals[2], 1):.3f}", refresh=False)
    bar.close()
    if world > 1:
        torch.distributed.all_reduce(totals)
    seconds = time.perf_counter() - t0
    loss_total, correct, seen = totals.tolist()
    return {
        "loss": loss_total / seen,
        "accuracy": correct / seen,
        "images": int(seen),
        "seconds": seconds,
        "images_per_second": seen / seconds,
    }


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    loader,
    *,
    normalize,
    device: torch.device,
    amp_dtype=None,
    channels_last: bool = True,
) -> dict:
    """Loss, accuracy and class probabilities on ``loader`` (model in eval mode)."""
    model.eval()
    probas, labels_all, total_loss = [], [], 0.0
    t0 = time.perf_counter()
    for images, labels in loader:
        x = to_memory_format(normalize(images.to(device, non_blocking=True)), channels_last)
        y = labels.to(device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(x).float()
        total_loss += nn.functional.cross_entropy(logits, y, reduction="sum").item()
        probas.append(torch.softmax(logits, 1).cpu().numpy())
        labels_all.append(labels.numpy())
    proba, labels = np.concatenate(probas), np.concatenate(labels_all)
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
