"""End-to-end training: ``full`` fine-tuning, the ``frozen`` backbone baseline, and ``lp-ft``.

Read top to bottom: :func:`finetune` prepares data (a decoded uint8 store, the cache's
splits), the model (a torchvision backbone with a new linear layer), then runs
:func:`train_one_epoch` and :func:`evaluate` per epoch, checkpointing after each one so
``resume=True`` continues an interrupted run exactly. The best epoch by val accuracy is
kept; test is evaluated once, on that checkpoint, at the threshold chosen on val.

Defaults follow the PyTorch transfer-learning tutorial: SGD lr 1e-3, momentum 0.9, StepLR
step 7 gamma 0.1, batch 32, RandomResizedCrop + horizontal flip at the weights' input size.
Augmentation draws from a generator seeded by (seed, epoch, sample), so a resumed run sees
exactly the crops an uninterrupted one would.
"""
from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from torch import nn
from tqdm.auto import tqdm

from . import cache as cache_io
from . import distributed
from .backbones import Backbone, Preprocessing, create_backbone
from .data import DEFAULT_GROUP_PATTERN
from .extract import default_cache_dir, extract, make_loader, plan_extraction, resolve_device
from .errors import TrainingDiverged  # noqa: F401  (re-exported)
from .files import atomic_write
from .metrics import evaluate_splits
from .results import RunResult, new_record
from .store import build_store, random_resized_crop_params

logger = logging.getLogger(__name__)

MODES = ("full", "frozen", "lp-ft")
IGNORE_LABEL = -100  # cross_entropy's ignore_index: padding samples


CHECKPOINT_FORMAT = "xfeat-checkpoint"
MODEL_FORMAT = "xfeat-finetuned"


class _StoreImages(torch.utils.data.Dataset):
    """uint8 CHW crops from a decoded store: random resized crop + flip, or a centre crop."""

    def __init__(self, array: np.ndarray, labels: np.ndarray, preprocessing: Preprocessing, *,
                 train: bool, seed: int = 0):
        self.array, self.labels, self.preprocessing = array, labels, preprocessing
        self.crop = preprocessing.crop_size
        self.train, self.seed = train, seed

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key):
        if not isinstance(key, tuple):
            key = (key, 0, 0, False)
        i, epoch, batch_n, pad = key  # training keys come from _EpochBatches
        if not self.train:
            crop = np.array(self.preprocessing.center_crop(self.array[i]))
            return torch.from_numpy(crop).permute(2, 0, 1), int(self.labels[i])
        image = torch.from_numpy(np.array(self.array[i])).permute(2, 0, 1)
        g = torch.Generator().manual_seed(_mix(self.seed, epoch, i))
        top, left, h, w = random_resized_crop_params(image.shape[1], image.shape[2], g)
        image = TF.resized_crop(image, top, left, h, w, [self.crop, self.crop], antialias=True)
        if torch.rand(1, generator=g).item() < 0.5:
            image = TF.horizontal_flip(image)
        # A padding sample (a rank with no share of a short last batch) carries no loss.
        return image, IGNORE_LABEL if pad else int(self.labels[i]), batch_n


def _mix(*values: int) -> int:
    return int.from_bytes(hashlib.blake2b(repr(values).encode(), digest_size=8).digest(), "little")


class _EpochBatches(torch.utils.data.Sampler):
    """Batches of a permutation seeded by (seed, epoch): identical whether or not the run was
    resumed, and however many processes share it.

    Under torchrun, rank r takes items r, r + W, ... of every global batch, so W ranks see
    exactly the samples one process would, step by step (a rank left without a sample in a
    short last batch gets a padding sample that carries no loss). Keys are
    ``(index, epoch, global batch size, is padding)``; ``set_epoch`` before each epoch lets
    one loader with persistent workers serve them all.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size, self.epoch = rank, world_size, 1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)

    def __iter__(self):
        g = torch.Generator().manual_seed(_mix(self.seed, self.epoch, -1))
        order = torch.randperm(self.n, generator=g).tolist()
        for start in range(0, self.n, self.batch_size):
            batch = order[start:start + self.batch_size]
            mine = batch[self.rank::self.world_size]
            keys = [(i, self.epoch, len(batch), False) for i in mine]
            yield keys or [(batch[0], self.epoch, len(batch), True)]


def train_one_epoch(model: nn.Module, loader, optimizer, *, normalize, device: torch.device,
                    amp_dtype=None, channels_last: bool = True, progress: bool = True,
                    desc: str = "") -> dict:
    """One pass over ``loader`` in train mode; returns mean loss, accuracy, images, seconds.

    As in the PyTorch tutorial, a frozen backbone is in train mode too: its weights get no
    gradient, but BatchNorm uses batch statistics and updates its running averages.
    """
    model.train()
    world = distributed.current_world().size
    totals = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, seen (this rank)
    t0 = time.perf_counter()
    bar = tqdm(total=loader.batch_sampler.n, unit="img", desc=desc, disable=not progress,
               leave=False, dynamic_ncols=True)
    for images, labels, batch_n in loader:
        x = _prepare(images, normalize, device, channels_last)
        y = labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(x)
            loss_sum = nn.functional.cross_entropy(logits, y, reduction="sum",
                                                   ignore_index=IGNORE_LABEL)
        # Mean over the global batch: DDP averages the ranks' gradients, hence "* world".
        loss = loss_sum * (world / int(batch_n[0]))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if not math.isfinite(loss_sum.item()):
            raise TrainingDiverged(f"{desc}: the training loss became {loss_sum.item()}; lower "
                                   "the learning rate (--lr)")
        real = y != IGNORE_LABEL
        totals += torch.tensor([loss_sum.item(), (logits.argmax(1) == y)[real].sum().item(),
                                real.sum().item()], dtype=torch.float64)
        bar.update(int(batch_n[0]))
        bar.set_postfix(loss=f"{totals[0] / max(totals[2], 1):.3f}", refresh=False)
    bar.close()
    if world > 1:
        torch.distributed.all_reduce(totals)
    seconds = time.perf_counter() - t0
    loss_total, correct, seen = totals.tolist()
    return {"loss": loss_total / seen, "accuracy": correct / seen, "images": int(seen),
            "seconds": seconds, "images_per_second": seen / seconds}


@torch.inference_mode()
def evaluate(model: nn.Module, loader, *, normalize, device: torch.device, amp_dtype=None,
             channels_last: bool = True) -> dict:
    """Loss, accuracy and class probabilities on ``loader`` (model in eval mode)."""
    model.eval()
    probas, labels_all, total_loss = [], [], 0.0
    t0 = time.perf_counter()
    for images, labels in loader:
        x = _prepare(images, normalize, device, channels_last)
        y = labels.to(device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(x).float()
        total_loss += nn.functional.cross_entropy(logits, y, reduction="sum").item()
        probas.append(torch.softmax(logits, 1).cpu().numpy())
        labels_all.append(labels.numpy())
    proba, labels = np.concatenate(probas), np.concatenate(labels_all)
    return {"loss": total_loss / len(labels), "accuracy": float((proba.argmax(1) == labels).mean()),
            "proba": proba.astype(np.float64), "labels": labels,
            "seconds": time.perf_counter() - t0}


def _prepare(images, normalize, device, channels_last):
    x = normalize(images.to(device, non_blocking=True))
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def finetune(data, model: str = "resnet18", *, weights="none", mode: str = "full",
             epochs: int = 25, lr: float = 1e-3, momentum: float = 0.9, step_size: int = 7,
             gamma: float = 0.1, weight_decay: float = 0.0, batch_size: int = 32,
             image_size: Optional[int] = None, num_workers: Optional[int] = None,
             device: Optional[str] = None, amp: str = "auto", channels_last: bool = True,
             compile: bool = False, threshold="youden", out_dir=None, resume: bool = False,
             seed: int = 0, cache_dir=None, val_fraction: float = 0.1, split_seed: int = 0,
             group_pattern: Optional[str] = DEFAULT_GROUP_PATTERN, n_boot: int = 1000,
             max_train_images: Optional[int] = None, probe=None,
             progress: bool = True) -> RunResult:
    """Train ``model`` end to end (``full``), its new last layer only (``frozen``), or
    initialise that layer from the cached logistic head and then train all (``lp-ft``).

    Parameters
    ----------
    data, model, weights, image_size, val_fraction, split_seed, group_pattern, cache_dir :
        as for :func:`xfeat.extract`; the splits are the cache's.
    amp : ``auto`` (bf16 autocast on CUDA, none on CPU), ``bf16`` or ``none``.
    resume : continue the interrupted run in ``out_dir`` (its checkpoint must match).
    max_train_images : train on a stratified subset of train (quick runs); val/test stay whole.
    probe : lp-ft only: a ``head.npz`` from fit-head to start from (default: fit one).

    Under torchrun the network is wrapped in DistributedDataParallel: every global batch of
    ``batch_size`` is shared between the ranks (one process's steps, spread out), rank 0
    evaluates, checkpoints and returns the result; the other ranks return None.
    """
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} not understood; expected one of {', '.join(MODES)}")
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if value < 1:
            raise ValueError(f"{name}={value} must be >= 1")
    t_start = time.perf_counter()
    dev = resolve_device(device)
    world = distributed.current_world()
    if world.size > 1:  # under torchrun: DistributedDataParallel, one device per local rank
        dev = distributed.init_process_group(dev)
    amp_dtype = _amp_dtype(amp, dev)
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    plan = plan_extraction(data, model, weights=weights, cache_dir=cache_dir,
                           image_size=image_size, val_fraction=val_fraction,
                           split_seed=split_seed, group_pattern=group_pattern, seed=seed)
    dataset = plan.dataset
    prep = plan.preprocessing
    train_rows = _subset_rows(dataset.splits["train"].labels, max_train_images, seed)
    config = {"model": model, "weights": plan.weights.key(), "mode": mode, "epochs": epochs,
              "lr": lr, "momentum": momentum, "step_size": step_size, "gamma": gamma,
              "weight_decay": weight_decay, "batch_size": batch_size,
              "preprocessing": prep.to_dict(), "dataset": dataset.fingerprint, "seed": seed,
              "max_train_images": max_train_images,
              "probe": str(probe) if probe and mode == "lp-ft" else None}
    run_dir = Path(out_dir) if out_dir else _default_run_dir(plan, mode)
    ckpt_path = run_dir / "checkpoint.pt"
    state = _load_checkpoint(ckpt_path, config) if resume else None
    if state is None and ckpt_path.exists() and not resume:
        raise ValueError(f"{run_dir} holds an interrupted or finished run; pass resume=True "
                         "(--resume) to continue it, or choose another out_dir (--out)")
    if (run_dir / "results.json").exists() and state is not None and \
            state["epoch"] == epochs:
        logger.info("run in %s already finished; evaluating its best checkpoint", run_dir)

    # -- data: decode once into the store; epochs only crop and flip uint8 arrays
    store, store_seconds = build_store(dataset, prep, cache_dir=cache_dir, progress=progress)
    labels = {s: sp.labels for s, sp in dataset.splits.items()}

    def loader(split, *, train):
        rows = train_rows if split == "train" and train_rows is not None else None
        array = store[split] if rows is None else _RowView(store[split], rows)
        y = labels[split] if rows is None else labels[split][rows]
        images = _StoreImages(array, y, prep, train=train, seed=seed)
        if not train:
            return make_loader(images, batch_size=batch_size, num_workers=num_workers,
                               device=dev)
        batches = _EpochBatches(len(images), batch_size, seed, world.rank, world.size)
        return make_loader(images, batch_sampler=batches, num_workers=num_workers, device=dev,
                           persistent=True)

    # -- model: backbone + a new linear layer (lp-ft: initialised from the cached probe)
    backbone = create_backbone(model, weights, image_size=image_size, seed=seed,
                               progress=progress)
    n_classes = len(dataset.class_names)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = backbone.new_classifier(n_classes)
    lpft_info = None
    if mode == "lp-ft" and state is None:
        lpft_info = _init_from_probe(head, plan, probe=probe, num_workers=num_workers,
                                     device=device, progress=progress)
    backbone.replace_classifier(head)
    net = backbone.model.to(dev)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    if mode == "frozen":
        for p in net.parameters():
            p.requires_grad_(False)
        for p in head.parameters():
            p.requires_grad_(True)
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=step_size, gamma=gamma)
    history, best = [], {"epoch": 0, "val_accuracy": -1.0}
    start_epoch = 1
    if state is not None:
        net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history, best, lpft_info = state["history"], state["best"], state.get("lpft")
        start_epoch = state["epoch"] + 1
        logger.info("resuming %s at epoch %d of %d", run_dir, start_epoch, epochs)
    runner = net
    if world.size > 1:
        runner = nn.parallel.DistributedDataParallel(
            net, device_ids=[dev.index] if dev.type == "cuda" else None)
    runner = torch.compile(runner) if compile else runner

    # -- epochs
    run_dir.mkdir(parents=True, exist_ok=True)
    val_loader, train_loader = loader("val", train=False), loader("train", train=True)
    normalize = prep.normalize
    for epoch in range(start_epoch, epochs + 1):
        torch.manual_seed(_mix(seed, epoch, -2) % 2**63)  # dropout etc.: same on resume
        lr_now = optimizer.param_groups[0]["lr"]
        train_loader.batch_sampler.set_epoch(epoch)
        tr = train_one_epoch(runner, train_loader, optimizer,
                             normalize=normalize, device=dev,
                             amp_dtype=amp_dtype, channels_last=channels_last,
                             progress=progress and world.is_main,
                             desc=f"{model} {mode} epoch {epoch}/{epochs}")
        scheduler.step()
        if not world.is_main:  # rank 0 alone evaluates, keeps the best epoch and checkpoints
            distributed.barrier()
            continue
        va = evaluate(net, val_loader, normalize=normalize, device=dev, amp_dtype=amp_dtype,
                      channels_last=channels_last)
        if not math.isfinite(va["loss"]):
            raise TrainingDiverged(f"{model} {mode} epoch {epoch}: the val loss is {va['loss']} "
                                   "(the network outputs inf or NaN); lower the learning rate "
                                   "(--lr)")
        record = {"epoch": epoch, "train_loss": tr["loss"], "train_accuracy": tr["accuracy"],
                  "val_loss": va["loss"], "val_accuracy": va["accuracy"], "lr": lr_now,
                  "train_seconds": tr["seconds"], "val_seconds": va["seconds"],
                  "seconds": tr["seconds"] + va["seconds"],
                  "images_per_second": tr["images_per_second"]}
        history.append(record)
        logger.info("epoch %d/%d: train loss %.4f acc %.4f | val loss %.4f acc %.4f | %.1f s, "
                    "%.1f img/s, %.0f ms/batch", epoch, epochs, tr["loss"], tr["accuracy"],
                    va["loss"], va["accuracy"], record["seconds"], tr["images_per_second"],
                    1000 * tr["seconds"] / max(1, -(-tr["images"] // batch_size)))
        if va["accuracy"] > best["val_accuracy"]:
            best = {"epoch": epoch, "val_accuracy": va["accuracy"]}
            _atomic_save({k: v.detach().cpu() for k, v in net.state_dict().items()},
                         run_dir / "best_model.pt")
        _atomic_save({"format": CHECKPOINT_FORMAT, "config": config, "epoch": epoch,
                      "model": net.state_dict(), "optimizer": optimizer.state_dict(),
                      "scheduler": scheduler.state_dict(), "history": history, "best": best,
                      "lpft": lpft_info}, ckpt_path)
        _write_history(history, run_dir)
        distributed.barrier()

    if not world.is_main:
        return None  # rank 0 evaluates and writes the results

    # -- test once, on the best epoch, at the threshold chosen on val
    net.load_state_dict(torch.load(run_dir / "best_model.pt", map_location=dev,
                                   weights_only=True))
    t_eval = time.perf_counter()
    outputs = {s: evaluate(net, loader(s, train=False), normalize=normalize, device=dev,
                           amp_dtype=amp_dtype, channels_last=channels_last)
               for s in dataset.splits}
    evaluation = evaluate_splits({s: o["labels"] for s, o in outputs.items()},
                                 {s: o["proba"] for s, o in outputs.items()},
                                 threshold=threshold, n_boot=n_boot, seed=seed)
    eval_seconds = time.perf_counter() - t_eval
    train_seconds = sum(h["seconds"] for h in history)
    n_params = sum(p.numel() for p in net.parameters())
    n_trainable = sum(p.numel() for p in params)
    record = new_record(
        model=model, weights={"kind": backbone.weights.kind, "id": backbone.weights.id,
                              "sha256": backbone.weights.sha256},
        mode=mode, head="linear",
        dataset={"name": dataset.name, "source": dataset.source,
                 "fingerprint": dataset.fingerprint, "class_names": dataset.class_names,
                 "counts": dataset.counts()},
        threshold=evaluation["threshold"],
        selection={"best_epoch": best["epoch"], "metric": "val_accuracy",
                   "val_accuracy": best["val_accuracy"], "lpft_probe": lpft_info},
        metrics=evaluation["metrics"], **{"metrics_at_0.5": evaluation["metrics_at_0.5"]},
        ci=evaluation["ci"],
        timing={"store_seconds": store_seconds, "train_seconds": train_seconds,
                "evaluate_seconds": eval_seconds,
                "total_seconds": store_seconds + train_seconds + eval_seconds,
                "wall_seconds": time.perf_counter() - t_start,
                "seconds_per_epoch": train_seconds / max(1, len(history)),
                "train_images_per_second": float(np.mean([h["images_per_second"]
                                                          for h in history]))},
        cache={"path": lpft_info["cache"], "key": None, "hit": None} if lpft_info else None,
        history=history,
        params={**config, "weights": plan.weights.id, "threshold": threshold,
                "device": str(dev), "amp": str(amp_dtype), "channels_last": channels_last,
                "compile": compile, "num_workers": num_workers, "n_boot": n_boot,
                "parameters": n_params, "trainable_parameters": n_trainable,
                "train_images": len(train_rows) if train_rows is not None
                else len(dataset.splits["train"])},
    )
    ids = {s: (sp.ids if s != "train" or train_rows is None else [sp.ids[r] for r in train_rows])
           for s, sp in dataset.splits.items()}
    result = RunResult(record, {s: (ids[s], o["labels"], o["proba"]) for s, o in outputs.items()})
    result.save(run_dir)
    _save_model(net, backbone, plan, evaluation, run_dir / "model.pt")
    from .report import plot_training_curves
    plot_training_curves(history, run_dir / "curves.png",
                         title=f"{model} {mode} ({dataset.name})", best_epoch=best["epoch"])
    return result


class _RowView:
    """Rows ``rows`` of an array, indexable like the array (for a training subset)."""

    def __init__(self, array, rows):
        self.array, self.rows = array, np.asarray(rows)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.array[self.rows[i]]


def _subset_rows(labels: np.ndarray, n: Optional[int], seed: int):
    if n is None or n >= len(labels):
        return None
    if n < 2:
        raise ValueError(f"max_train_images={n} must be >= 2")
    rng = np.random.default_rng(seed)
    rows = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        k = max(1, round(n * len(members) / len(labels)))
        rows.extend(rng.choice(members, size=min(k, len(members)), replace=False))
    return np.sort(np.asarray(rows))


def _amp_dtype(amp: str, device: torch.device):
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if amp == "bf16":
        return torch.bfloat16
    if amp in ("none", None):
        return None
    raise ValueError(f"amp={amp!r} not understood; expected auto, bf16 or none")


def _default_run_dir(plan, mode: str) -> Path:
    from .fit import default_run_dir

    return default_run_dir({"weights": {"kind": plan.weights.kind, "id": plan.weights.id},
                            "dataset": {"name": plan.dataset.name}, "model": plan.model},
                           mode, "linear")


def _init_from_probe(head: nn.Module, plan, *, probe=None, num_workers=None, device=None,
                     progress=True) -> dict:
    """LP-FT: copy a logistic probe on this backbone's cached features into ``head``.

    ``probe`` is a ``head.npz`` saved by fit-head (checked against the cache: same backbone,
    weights and preprocessing); by default fit-head's logistic head is fitted on the cache
    (C chosen on val).
    """
    from .fit import check_head_matches, fit_head
    from .heads import LogisticHead, load_head

    path = extract(plan=plan, num_workers=num_workers, device=device, progress=progress)
    if probe is not None:
        fitted, head_meta = load_head(probe)
        check_head_matches(head_meta, cache_io.read_meta(path), source=f"the cache {path.name}")
        if not isinstance(fitted, LogisticHead):
            raise ValueError(f"{probe} holds a {type(fitted).__name__}; LP-FT needs a logistic "
                             "head (fit-head --head logreg)")
    else:
        fitted = fit_head(cache=path, head="logreg", save=False, n_boot=0).head
    # logits = ((x - mean) / scale) @ coef.T + intercept, folded into one linear layer
    W = fitted.coef_ / fitted.scale_
    b = np.ravel(fitted.intercept_) - (fitted.mean_ / fitted.scale_) @ fitted.coef_.T
    if W.shape[0] == 1:  # binary: softmax([0, z]) == sigmoid(z)
        W = np.vstack([np.zeros_like(W), W])
        b = np.concatenate([[0.0], np.ravel(b)])
    with torch.no_grad():
        head.weight.copy_(torch.as_tensor(W, dtype=torch.float32).view_as(head.weight))
        head.bias.copy_(torch.as_tensor(np.ravel(b), dtype=torch.float32))
    logger.info("lp-ft: last layer initialised from the logistic probe on %s (C=%.4g)",
                path.name, fitted.C_)
    return {"C": float(fitted.C_), "cache": str(path), "probe": str(probe) if probe else None}


def _load_checkpoint(path: Path, config: dict):
    if not path.exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not an xfeat checkpoint")
    if state["config"] != config:
        diff = sorted(k for k in config if state["config"].get(k) != config[k])
        raise ValueError(f"cannot resume {path}: it was made with different options ({diff}); "
                         "use the original options or another --out")
    return state


def _atomic_save(obj, path: Path) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def _write_history(history: list, run_dir: Path) -> None:
    (run_dir / "history.json").write_text(json.dumps(history, indent=2))
    with open(run_dir / "history.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)


def _save_model(net: nn.Module, backbone: Backbone, plan, evaluation: dict, path: Path) -> None:
    """The fine-tuned network for ``xfeat predict``: tensors and plain values only."""
    _atomic_save({"format": MODEL_FORMAT, "model": plan.model,
                  "classifier_path": backbone.classifier_path,
                  "feature_dim": backbone.feature_dim,
                  "class_names": plan.dataset.class_names,
                  "preprocessing": plan.preprocessing.to_dict(),
                  "weights": {"kind": backbone.weights.kind, "id": backbone.weights.id,
                              "sha256": backbone.weights.sha256},
                  "threshold": evaluation["threshold"]["value"],
                  "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()}},
                 path)


def load_finetuned(path: Union[str, Path]):
    """``(network, meta)`` from a ``model.pt`` written by :func:`finetune`.

    ``network`` is a :class:`~xfeat.backbones.Backbone` whose model, classifier included,
    returns class logits.
    Loading uses ``torch.load(weights_only=True)``: tensors and plain values, never code.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no fine-tuned model at {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path} is not an xfeat fine-tuned model ({exc})") from None
    if not isinstance(obj, dict) or obj.get("format") != MODEL_FORMAT:
        raise ValueError(f"{path} is not an xfeat fine-tuned model")
    backbone = create_backbone(obj["model"], "none")
    backbone.replace_classifier(backbone.new_classifier(len(obj["class_names"])))
    backbone.model.load_state_dict(obj["state_dict"])
    backbone.model.eval()
    p = obj["preprocessing"]
    backbone.preprocessing = Preprocessing(p["resize_size"], p["crop_size"], tuple(p["mean"]),
                                           tuple(p["std"]), p["interpolation"])
    meta = {k: v for k, v in obj.items() if k != "state_dict"}
    return backbone, meta
