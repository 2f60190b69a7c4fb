"""``finetune``: a thin main over named steps.

prepare (plan, splits, run folder, checkpoint) -> build the model -> make the loaders ->
train (checkpoint every epoch, keep the best by val accuracy) -> evaluate the best epoch once
on every split, test included, at the threshold chosen on val -> write the record.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from xfeat.cache import WeightsRecord
from xfeat.config import DEFAULT_THRESHOLD, FinetuneConfig, default_cache_dir
from xfeat.data import split_patients, stratified_rows
from xfeat.data.dataset import strata
from xfeat.errors import ConfigError, TrainingDiverged
from xfeat.extraction import distributed
from xfeat.extraction.allocator import freed_memory_kept
from xfeat.extraction.runtime import resolve_device
from xfeat.extraction.store import store_profile
from xfeat.files import write_csv, write_json
from xfeat.finetuning.loaders import EpochBatches, mix_seed, split_loader
from xfeat.finetuning.loop import adabn, evaluate, train_one_epoch
from xfeat.finetuning.model import (
    build_network,
    load_checkpoint,
    load_verified,
    make_optimizer,
    save_checkpoint,
    save_model,
    save_state_dict,
)
from xfeat.runs.folders import default_run_dir, run_lock
from xfeat.runs.results import CacheUse, RunDataset, RunRecord, RunResult, RunThreshold

logger = logging.getLogger(__name__)


@dataclass
class _Run:
    """Everything the steps share: what is trained, where, and how far it got."""

    config: FinetuneConfig
    plan: object  # extract.ExtractionPlan: dataset, weights, preprocessing, cache key
    device: torch.device
    amp_dtype: Optional[torch.dtype]
    run_dir: Path
    train_rows: Optional[np.ndarray]
    num_workers: Optional[int]
    progress: bool
    world: distributed.World
    state: Optional[dict] = None  # the checkpoint being resumed
    history: list = field(default_factory=list)
    best: dict = field(default_factory=lambda: {"epoch": 0, "val_accuracy": -1.0})
    lpft: Optional[dict] = None

    @property
    def checkpoint(self) -> Path:
        return self.run_dir / "checkpoint.pt"

    def config_key(self) -> dict:
        ds, p = self.plan.dataset, self.plan
        return {
            **self.config.training_key(),
            "model": p.model,
            "weights": p.weights.key(),
            "preprocessing": p.preprocessing.to_dict(),
            "dataset": ds.fingerprint,
        }


def finetune(
    data,
    model: str = "resnet18",
    *,
    weights="none",
    config: Optional[FinetuneConfig] = None,
    out_dir=None,
    resume: bool = False,
    image_size: Optional[int] = None,
    cache_dir=None,
    num_workers: Optional[int] = None,
    device: Optional[str] = None,
    progress: bool = True,
    resize_size: Optional[int] = None,
    mean: Optional[tuple] = None,
    std: Optional[tuple] = None,
    resize_mode: Optional[str] = None,
    dicom_window: Optional[str] = None,
    dicom_frame: Optional[int] = None,
    **options,
) -> Optional[RunResult]:
    """Train ``model`` end to end, its new last layer only, or LP-FT; evaluate once on test.

    Parameters
    ----------
    data, model, weights, image_size, cache_dir, resize_size, mean, std, resize_mode,
    dicom_window, dicom_frame : as for
        :func:`xfeat.extract` (``data`` a :class:`~xfeat.config.DataSpec` or its source); the
        splits are the cache's.
    config : a :class:`~xfeat.config.FinetuneConfig` (mode, recipe, epochs, lr, ...);
        ``**options`` replace some of its fields, e.g. ``mode="frozen", epochs=5``.
    out_dir : the run folder (default ``runs/DATASET/MODEL-WEIGHTS/MODE-linear``).
    resume : continue the interrupted run in ``out_dir`` (its checkpoint must match).

    Under torchrun the network is wrapped in DistributedDataParallel: every global batch is
    shared between the ranks, rank 0 evaluates, checkpoints and returns the result; the other
    ranks return None.
    """
    config = (config or FinetuneConfig()).with_options(**options).resolved()
    run = _prepare(
        data,
        model,
        weights,
        config,
        out_dir=out_dir,
        resume=resume,
        image_size=image_size,
        cache_dir=cache_dir,
        num_workers=num_workers,
        device=device,
        progress=progress,
        preprocessing={
            "resize_size": resize_size,
            "mean": mean,
            "std": std,
            "resize_mode": resize_mode,
            "dicom_window": dicom_window,
            "dicom_frame": dicom_frame,
        },
    )
    lock = run_lock(run.run_dir, "fine-tuning run") if run.world.is_main else _no_lock()
    with lock, freed_memory_kept():  # every step reuses the previous one's memory
        if run.world.is_main and not resume and run.checkpoint.exists():
            raise ConfigError(
                f"{run.run_dir} holds an interrupted or finished run; pass "
                "resume=True (--resume) to continue it, or choose another "
                "out_dir (--out)"
            )
        run.state = load_checkpoint(run.checkpoint, run.config_key()) if resume else None
        t_start = time.perf_counter()
        store, store_seconds = _decode_store(run)
        backbone, net, head = _build_model(run)
        optimizer, scheduler, per_step = make_optimizer(net, head, run.config, _steps_per_epoch(run))
        _restore(run, net, optimizer, scheduler)
        _train(run, store, net, optimizer, scheduler, per_step)
        if not run.world.is_main:
            return None  # rank 0 evaluates and writes the results
        outputs, evaluation, eval_seconds = _evaluate_best(run, store, net)
        return _write_record(
            run,
            backbone,
            net,
            outputs,
            evaluation,
            timing={
                "store": store_seconds,
                "evaluate": eval_seconds,
                "wall": time.perf_counter() - t_start,
            },
        )


class _no_lock:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _prepare(
    data,
    model,
    weights,
    config,
    *,
    out_dir,
    resume,
    image_size,
    cache_dir,
    num_workers,
    device,
    progress,
    preprocessing,
) -> _Run:
    """Resolve the data, weights and device; decide the run folder."""
    from xfeat.extraction.pipeline import plan_extraction

    dev = resolve_device(device)
    world = distributed.current_world()
    if world.size > 1:  # under torchrun: one device per local rank
        dev = distributed.init_process_group(dev)
    amp = {"auto": torch.bfloat16 if dev.type == "cuda" else None, "bf16": torch.bfloat16, "none": None}[
        config.amp
    ]
    plan = plan_extraction(
        data,
        model,
        weights=weights,
        cache_dir=Path(cache_dir) if cache_dir else default_cache_dir(),
        image_size=image_size,
        seed=config.seed,
        **preprocessing,
    )
    if config.channels_last is None:
        from xfeat.extraction.runtime import channels_last_default

        config = config.with_options(channels_last=channels_last_default(plan.model, dev))
    if config.threshold != DEFAULT_THRESHOLD and not plan.dataset.multilabel:
        from xfeat.fitting import check_threshold_applies

        check_threshold_applies(config.threshold, plan.dataset.class_names)
    if plan.dataset.multilabel and config.label_smoothing:
        logger.info("multi-label: label smoothing pulls each binary target towards 0.5")
    labels = plan.dataset.splits["train"].labels
    rows = None
    if config.max_train_images is not None and config.max_train_images < len(labels):
        rows = stratified_rows(strata(labels), config.max_train_images, config.seed)
    if plan.dataset.multilabel:  # before any training: each label needs both values in train and val
        from xfeat.heads.multilabel import check_label_values

        train = labels if rows is None else labels[rows]
        check_label_values(train, plan.dataset.splits["val"].labels, plan.dataset.class_names)
    kind = f"{config.mode}-linear" + ("" if config.recipe == "tutorial" else f"-{config.recipe}")
    run_dir = (
        Path(out_dir)
        if out_dir
        else default_run_dir(
            plan.dataset.name, plan.model, {"kind": plan.weights.kind, "id": plan.weights.id}, kind
        )
    )
    return _Run(config, plan, dev, amp, run_dir, rows, num_workers, progress, world)


def _decode_store(run: _Run):
    from xfeat.extraction.store import build_store

    return build_store(
        run.plan.dataset, run.plan.preprocessing, cache_dir=run.plan.path.parent, progress=run.progress
    )


def _build_model(run: _Run):
    """The backbone with its new last layer, on the device (LP-FT: from the cached probe)."""
    from xfeat.backbones import create_backbone

    plan, config = run.plan, run.config
    backbone = create_backbone(plan.model, plan.weights_arg, seed=config.seed, progress=run.progress)
    backbone.preprocessing = plan.preprocessing
    probe = None
    if config.mode == "lp-ft":
        probe, run.lpft = _lpft_probe(run)
    net, head = build_network(backbone, len(plan.dataset.class_names), config, probe=probe)
    if config.adapt == "adabn" and not any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules()
    ):
        raise ConfigError(
            f"--adapt adabn re-estimates BatchNorm statistics, and {plan.model} "
            "has no BatchNorm layer; run without --adapt"
        )
    net = net.to(run.device)
    if config.channels_last:
        net = net.to(memory_format=torch.channels_last)
    return backbone, net, head


def _lpft_probe(run: _Run):
    """The logistic probe to start from: ``config.probe`` (checked against the cache), or
    fit-head's logistic head fitted on the cache (C chosen on val)."""
    from xfeat.cache import read_meta
    from xfeat.extraction.pipeline import extract
    from xfeat.fitting import check_head_matches, fit_head
    from xfeat.heads import LogisticHead, OneVsRestHead, load_head

    if run.state is not None:  # resuming: the layer comes from the checkpoint
        return None, run.state.get("lpft")
    path = extract(
        plan=run.plan, num_workers=run.num_workers, device=str(run.device), progress=run.progress
    )
    probe_file = run.config.probe
    if probe_file is not None:
        fitted, head_meta = load_head(probe_file)
        check_head_matches(head_meta, read_meta(path), source=f"the cache {path.name}")
        dataset = run.plan.dataset
        probe_multilabel = head_meta.get("label_thresholds") is not None
        if (
            list(head_meta["class_names"]) != list(dataset.class_names)
            or probe_multilabel != dataset.multilabel
        ):
            kind = "labels" if dataset.multilabel else "classes"
            raise ConfigError(
                f"{probe_file} was fitted on {'labels' if probe_multilabel else 'classes'} "
                f"{list(head_meta['class_names'])} but these data have {kind} "
                f"{list(dataset.class_names)}; fit the probe on these data (fit-head --head logreg)"
            )
        logistic = (
            all(isinstance(e, LogisticHead) for e in fitted.estimators_)
            if isinstance(fitted, OneVsRestHead)
            else isinstance(fitted, LogisticHead)
        )
        if not logistic:
            raise ConfigError(
                f"{probe_file} holds a {type(fitted).__name__}; LP-FT needs a "
                "logistic head (fit-head --head logreg)"
            )
    else:
        fitted = fit_head(cache=path, head="logreg", save=False, n_boot=0).head
    if isinstance(fitted, OneVsRestHead):
        C = {name: float(e.C_) for name, e in zip(fitted.label_names_, fitted.estimators_)}
        logger.info("lp-ft: last layer starts from the per-label logistic probes on %s", path.name)
    else:
        C = float(fitted.C_)
        logger.info("lp-ft: last layer starts from the logistic probe on %s (C=%.4g)", path.name, C)
    return fitted, {
        "C": C,
        "cache": str(path),
        "probe": str(probe_file) if probe_file else None,
    }


def _steps_per_epoch(run: _Run) -> int:
    n = len(run.train_rows) if run.train_rows is not None else len(run.plan.dataset.splits["train"])
    return len(EpochBatches(n, run.config.batch_size, run.config.seed))  # as the loader batches


def _restore(run: _Run, net, optimizer, scheduler) -> None:
    if run.state is None:
        return
    net.load_state_dict(run.state["model"])
    optimizer.load_state_dict(run.state["optimizer"])
    scheduler.load_state_dict(run.state["scheduler"])
    run.history, run.best = run.state["history"], run.state["best"]
    run.lpft = run.state.get("lpft")
    logger.info("resuming %s at epoch %d of %d", run.run_dir, run.state["epoch"] + 1, run.config.epochs)


def _loaders(run: _Run, store):
    labels = {s: sp.labels for s, sp in run.plan.dataset.splits.items()}
    common = dict(
        batch_size=run.config.batch_size,
        seed=run.config.seed,
        num_workers=run.num_workers,
        device=run.device,
    )
    train = split_loader(
        store,
        labels,
        "train",
        run.plan.preprocessing,
        train=True,
        rows=run.train_rows,
        rank=run.world.rank,
        world_size=run.world.size,
        **common,
    )
    return train, lambda split: split_loader(
        store,
        labels,
        split,
        run.plan.preprocessing,
        train=False,
        rows=run.train_rows if split == "train" else None,
        **common,
    )


def _train(run: _Run, store, net, optimizer, scheduler, per_step: bool) -> None:
    """The epochs, from the first not yet done (the caller's random stream stays untouched)."""
    runner = net
    if run.world.size > 1:
        runner = nn.parallel.DistributedDataParallel(
            net, device_ids=[run.device.index] if run.device.type == "cuda" else None
        )
    runner = torch.compile(runner) if run.config.compile else runner
    run.run_dir.mkdir(parents=True, exist_ok=True)
    train_loader, eval_loader = _loaders(run, store)
    loaders = (train_loader, eval_loader("val"))
    first = run.state["epoch"] + 1 if run.state else 1
    with torch.random.fork_rng(devices=[]):
        for epoch in range(first, run.config.epochs + 1):
            _epoch(run, epoch, runner, net, loaders, optimizer, scheduler, per_step)


def _epoch(run: _Run, epoch: int, runner, net, loaders, optimizer, scheduler, per_step: bool) -> None:
    """One epoch: train, then (rank 0) evaluate on val, keep the best and checkpoint."""
    config, model = run.config, run.plan.model
    train_loader, val_loader = loaders
    normalize = run.plan.preprocessing.normalize
    torch.manual_seed(mix_seed(config.seed, epoch, -2) % 2**63)  # dropout: same on resume
    lr_now = optimizer.param_groups[0]["lr"]
    train_loader.batch_sampler.set_epoch(epoch)
    tr = train_one_epoch(
        runner,
        train_loader,
        optimizer,
        normalize=normalize,
        device=run.device,
        amp_dtype=run.amp_dtype,
        channels_last=config.channels_last,
        label_smoothing=config.label_smoothing,
        step_scheduler=scheduler if per_step else None,
        progress=run.progress and run.world.is_main,
        desc=f"{model} {config.mode} epoch {epoch}/{config.epochs}",
    )
    if not per_step:
        scheduler.step()
    if run.world.is_main:
        va = evaluate(
            net,
            val_loader,
            normalize=normalize,
            device=run.device,
            amp_dtype=run.amp_dtype,
            channels_last=config.channels_last,
        )
        if not math.isfinite(va["loss"]):
            raise TrainingDiverged(
                f"{model} {config.mode} epoch {epoch}: the val loss is "
                f"{va['loss']} (the network outputs inf or NaN); lower the "
                "learning rate (--lr)"
            )
        _end_epoch(run, epoch, tr, va, lr_now, net, optimizer, scheduler)
    distributed.barrier()


def best_metric(multilabel: bool) -> str:
    """What picks the best epoch: val accuracy, or for multi-label data the val macro AUC."""
    return "val_roc_auc" if multilabel else "val_accuracy"


def _end_epoch(run: _Run, epoch: int, tr: dict, va: dict, lr: float, net, optimizer, scheduler) -> None:
    """Log the epoch, keep the best weights, write the checkpoint and the history."""
    metric = best_metric(run.plan.dataset.multilabel)
    record = {
        "epoch": epoch,
        "train_loss": tr["loss"],
        "train_accuracy": tr["accuracy"],
        "val_loss": va["loss"],
        "val_accuracy": va["accuracy"],
        **({"val_roc_auc": va["roc_auc"]} if "roc_auc" in va else {}),
        "lr": lr,
        "train_seconds": tr["seconds"],
        "val_seconds": va["seconds"],
        "seconds": tr["seconds"] + va["seconds"],
        "images_per_second": tr["images_per_second"],
    }
    run.history.append(record)
    logger.info(
        "epoch %d/%d: train loss %.4f acc %.4f | val loss %.4f acc %.4f | %.1f s, "
        "%.1f img/s, %.0f ms/batch",
        epoch,
        run.config.epochs,
        tr["loss"],
        tr["accuracy"],
        va["loss"],
        va["accuracy"],
        record["seconds"],
        tr["images_per_second"],
        1000 * tr["seconds"] / max(1, -(-tr["images"] // run.config.batch_size)),
    )
    value = record[metric] if math.isfinite(record[metric]) else -math.inf
    if run.best["epoch"] == 0 or value > run.best.get(metric, -math.inf):  # the first epoch always
        run.best = {"epoch": epoch, metric: value}
        save_state_dict(net, run.run_dir / "best_model.pt")
    save_checkpoint(
        run.checkpoint,
        config=run.config_key(),
        epoch=epoch,
        model=net.state_dict(),
        optimizer=optimizer.state_dict(),
        scheduler=scheduler.state_dict(),
        history=run.history,
        best=run.best,
        lpft=run.lpft,
    )
    write_json(run.run_dir / "history.json", run.history)
    write_csv(run.run_dir / "history.csv", run.history, list(run.history[0]))


def _evaluate_best(run: _Run, store, net):
    """The best epoch's weights on every split; the threshold chosen on val. With
    ``adapt="adabn"`` the test split is evaluated with BatchNorm statistics re-estimated on
    its own images (transductive; labels unused)."""
    from xfeat.evaluation.metrics import evaluate_splits
    from xfeat.evaluation.multilabel import evaluate_multilabel

    best = run.run_dir / "best_model.pt"
    net.load_state_dict(load_verified(best, "delete its run folder and run again", run.device))
    t0 = time.perf_counter()
    _, eval_loader = _loaders(run, store)
    common = dict(
        normalize=run.plan.preprocessing.normalize,
        device=run.device,
        amp_dtype=run.amp_dtype,
        channels_last=run.config.channels_last,
    )
    outputs = {}
    for split in run.plan.dataset.splits:
        model = net
        if split == "test" and run.config.adapt == "adabn":
            model = adabn(net, eval_loader(split), **common)
        outputs[split] = evaluate(
            model,
            eval_loader(split),
            **common,
            progress=run.progress and run.world.is_main,
            desc=f"{run.plan.model} best epoch on {split}",
        )
    labels = {s: o["labels"] for s, o in outputs.items()}
    probas = {s: o["proba"] for s, o in outputs.items()}
    dataset = run.plan.dataset
    if dataset.multilabel:
        evaluation = evaluate_multilabel(
            labels,
            probas,
            dataset.class_names,
            threshold=run.config.threshold,
            n_boot=run.config.n_boot,
            seed=run.config.seed,
            groups={"test": split_patients(dataset.splits["test"], dataset.spec)}
            if "test" in dataset.splits
            else None,
        )
    else:
        evaluation = evaluate_splits(
            labels,
            probas,
            threshold=run.config.threshold,
            n_boot=run.config.n_boot,
            seed=run.config.seed,
        )
    return outputs, evaluation, time.perf_counter() - t0


def _write_record(run: _Run, backbone, net, outputs: dict, evaluation: dict, timing: dict) -> RunResult:
    """results.json, predictions, model.pt and the training curves."""
    from xfeat.report import plot_training_curves

    config, plan, dataset = run.config, run.plan, run.plan.dataset
    history = run.history
    train_seconds = sum(h["seconds"] for h in history)
    n_params = sum(p.numel() for p in net.parameters())
    n_trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    n_train = len(run.train_rows) if run.train_rows is not None else len(dataset.splits["train"])
    record = RunRecord(
        model=plan.model,
        weights=WeightsRecord(backbone.weights.kind, backbone.weights.id, backbone.weights.sha256),
        mode=config.mode,
        head="linear",
        dataset=RunDataset(
            dataset.name,
            dataset.source,
            dataset.fingerprint,
            tuple(dataset.class_names),
            dataset.counts(),
        ),
        threshold=RunThreshold(**evaluation["threshold"]),
        selection={
            "best_epoch": run.best["epoch"],
            "metric": best_metric(dataset.multilabel),
            **{k: v for k, v in run.best.items() if k != "epoch"},
            "lpft_probe": run.lpft,
        },
        metrics=evaluation["metrics"],
        metrics_at_half=evaluation["metrics_at_0.5"],
        ci=evaluation["ci"],
        timing={
            "store_seconds": timing["store"],
            "train_seconds": train_seconds,
            "evaluate_seconds": timing["evaluate"],
            "total_seconds": timing["store"] + train_seconds + timing["evaluate"],
            "wall_seconds": timing["wall"],
            "seconds_per_epoch": train_seconds / max(1, len(history)),
            "train_images_per_second": float(np.mean([h["images_per_second"] for h in history])),
        },
        cache=CacheUse(run.lpft["cache"]) if run.lpft else None,
        history=history,
        transductive=bool(config.adapt),
        adaptation=(
            {"method": "adabn", "target": "test images (labels not read)", "transductive": True}
            if config.adapt
            else None
        ),
        params={
            **config.to_dict(),
            "weights": plan.weights.id,
            "device": str(run.device),
            "num_workers": run.num_workers,
            "parameters": n_params,
            "trainable_parameters": n_trainable,
            "train_images": n_train,
            "preprocessing": plan.preprocessing.to_dict(),
            "dataset": dataset.fingerprint,
            "data": dataset.spec.to_dict() if dataset.spec is not None else None,
        },
    )
    ids = {
        s: (sp.ids if s != "train" or run.train_rows is None else [sp.ids[r] for r in run.train_rows])
        for s, sp in dataset.splits.items()
    }
    result = RunResult(record, {s: (ids[s], o["labels"], o["proba"]) for s, o in outputs.items()})
    save_model(
        net,
        backbone,
        {
            "class_names": dataset.class_names,
            "threshold": evaluation["threshold"]["value"],
            "threshold_rule": evaluation["threshold"]["rule"],
            "label_thresholds": evaluation["threshold"].get("per_label"),
            "input_profile": store_profile(dataset, plan.preprocessing, cache_dir=plan.path.parent),
        },
        run.run_dir / "model.pt",
    )
    plot_training_curves(
        history,
        run.run_dir / "curves.png",
        title=f"{plan.model} {config.mode} ({dataset.name})",
        best_epoch=run.best["epoch"],
    )
    result.save(run.run_dir)  # last: a run folder with a results.json is complete
    return result
