"""``compare``: every (backbone, mode) pair through the API, then one decision report.

Each pair runs in its own folder under ``OUT/runs``; a folder with a ``results.json`` is reused
and one with only a checkpoint is resumed, so an interrupted comparison, or one with a model
added, computes only what is missing. The report (``report.md``, ``report.html``, CSV, JSON,
PNGs) is rebuilt from the results every time.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from . import cache as cache_io
from .backbones import parameter_count, resolve_weights
from .data import DEFAULT_GROUP_PATTERN, SplitRecipe, load_dataset
from .extract import default_cache_dir
from .finetune import TrainingDiverged, finetune
from .fit import fit_head
from .metrics import delong_test, paired_bootstrap
from .results import RunResult, load_result

logger = logging.getLogger(__name__)

MODES = ("cached", "frozen", "full", "lp-ft")
QUICK_SIZES = {"train": 300, "val": 100, "test": 200}
QUICK_EPOCHS = 2


@dataclass
class Comparison:
    """The rows of the comparison table, the statistical tests and where the report is."""

    rows: list
    tests: list
    savings: list
    out_dir: Path
    notes: list = field(default_factory=list)

    def table(self) -> str:
        from .report import format_comparison_table

        return format_comparison_table(self.rows)


def parse_weights(weights: Union[str, dict, None], models: Sequence[str]) -> dict:
    """``"W"`` for every model, or ``"m1=W1,m2=W2"`` (others: ``none``) -> model -> weights."""
    if isinstance(weights, dict):
        return {m: weights.get(m, "none") for m in models}
    text = "none" if weights is None else str(weights)
    pairs = [p for p in text.split(",") if p]
    if all("=" in p for p in pairs) and pairs:
        mapping = {}
        for pair in pairs:
            model, _, value = pair.partition("=")
            if model not in models:
                raise ValueError(f"--weights names model {model!r}, which is not in --models "
                                 f"{list(models)}")
            mapping[model] = value
        return {m: mapping.get(m, "none") for m in models}
    return {m: text for m in models}


def compare(data, models: Sequence[str] = ("resnet18", "resnet50", "shufflenet_v2_x2_0"), *,
            weights: Union[str, dict, None] = "none", modes: Sequence[str] = MODES,
            epochs: int = 25, quick: bool = False, out_dir: Union[str, Path] = "runs/compare",
            head: str = "logreg", batch_size: int = 32, num_workers: Optional[int] = None,
            device: Optional[str] = None, cache_dir=None, image_size: Optional[int] = None,
            val_fraction: float = 0.1, split_seed: int = 0,
            group_pattern: Optional[str] = DEFAULT_GROUP_PATTERN, seed: int = 0,
            n_boot: int = 1000, analyze: bool = False, progress: bool = True) -> Comparison:
    """Run every (model, mode) pair not already done and write the comparison report.

    ``quick`` uses a stratified subset (train 300, val 100, test 200 images) and 2 epochs, so
    the whole comparison fits in minutes on a CPU; the report says so.
    """
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise ValueError(f"unknown modes {unknown}; expected some of {', '.join(MODES)}")
    out_dir = Path(out_dir)
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    weights_by_model = parse_weights(weights, models)
    for m in models:
        resolve_weights(m, weights_by_model[m], seed=seed)  # fail fast on a bad name or file
    dataset = load_dataset(data, recipe=SplitRecipe(val_fraction, split_seed, group_pattern),
                           cache_dir=cache_dir)
    notes = []
    requested_epochs = epochs
    if quick:
        dataset = dataset.subsample(QUICK_SIZES, seed=seed)
        epochs = min(epochs, QUICK_EPOCHS)
        sizes = ", ".join(f"{split} {sum(counts)}" for split, counts in dataset.counts().items())
        notes.append(f"--quick: a stratified subset ({sizes} images) and {epochs} epochs instead "
                     f"of {requested_epochs}; no figure is extrapolated to the full data or to "
                     "more epochs.")
    run_root = out_dir / "runs"
    results, failed = [], []
    for model in models:
        w = weights_by_model[model]
        for mode in modes:
            run_dir = run_root / _run_name(dataset, model, w, mode, epochs=epochs, head=head,
                                           image_size=image_size, seed=seed,
                                           batch_size=batch_size, n_boot=n_boot, quick=quick)
            result, peak = _run_or_reuse(run_dir, mode, dataset, model, w, epochs=epochs,
                                         head=head, batch_size=batch_size,
                                         num_workers=num_workers, device=device,
                                         cache_dir=cache_dir, image_size=image_size, seed=seed,
                                         n_boot=n_boot, progress=progress)
            if result is None:
                failed.append(json.loads((run_dir / "failed.json").read_text()))
                continue
            results.append((model, mode, result, peak))
    notes += [f"{f['model']} {f['mode']} failed: {f['error']}" for f in failed]
    if not results:
        raise ValueError("every run of the comparison failed: " + "; ".join(notes))
    rows = [_row(model, mode, r, peak) for model, mode, r, peak in results]
    tests = _significance(results)
    savings = _time_savings(rows, results, epochs)
    analyses = {}
    if analyze:
        from .analyze import analyze as run_analysis

        for model in models:
            model_runs = [r.run_dir for m, _, r, _ in results if m == model and r.run_dir]
            analysis = run_analysis(dataset, model, weights=weights_by_model[model],
                                    out_dir=out_dir / "analysis" / model, runs=model_runs,
                                    seed=seed, n_boot=n_boot, progress=progress,
                                    extract_options={"cache_dir": cache_dir,
                                                     "image_size": image_size,
                                                     "num_workers": num_workers,
                                                     "device": device, "seed": seed,
                                                     "progress": progress})
            analyses[model] = analysis.out_dir
    comparison = Comparison(rows, tests, savings, out_dir, notes)
    from .report import write_comparison_report

    write_comparison_report(comparison, [r for _, _, r, _ in results], analyses=analyses)
    return comparison


def _run_name(dataset, model: str, weights, mode: str, *, epochs, head, image_size, seed,
              batch_size, n_boot, quick) -> str:
    """Readable, and unique per configuration: a changed option never reuses an old run."""
    info, _ = resolve_weights(model, weights, seed=seed)
    config = {"dataset": dataset.fingerprint, "model": model, "weights": info.key(),
              "mode": mode, "image_size": image_size, "seed": seed, "n_boot": n_boot}
    config.update({"head": head} if mode == "cached" else
                  {"epochs": epochs, "batch_size": batch_size})
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:8]
    suffix = f"-{head}" if mode == "cached" else f"-{epochs}ep"
    return f"{model}-{info.tag}-{mode}{suffix}{'-quick' if quick else ''}-{digest}"


def _run_or_reuse(run_dir: Path, mode: str, dataset, model: str, weights, *, epochs, head,
                  batch_size, num_workers, device, cache_dir, image_size, seed, n_boot,
                  progress):
    if (run_dir / "results.json").is_file():
        logger.info("reusing %s", run_dir)
        result = load_result(run_dir)
        return result, result.record.get("peak_memory_mib")
    (run_dir / "failed.json").unlink(missing_ok=True)
    try:
        with _PeakMemory() as peak:
            result = _run(run_dir, mode, dataset, model, weights, epochs=epochs, head=head,
                          batch_size=batch_size, num_workers=num_workers, device=device,
                          cache_dir=cache_dir, image_size=image_size, seed=seed, n_boot=n_boot,
                          progress=progress)
    except TrainingDiverged as exc:
        # One diverging run must not sink the comparison: it is reported as failed.
        logger.error("%s", exc)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "failed.json").write_text(json.dumps({"model": model, "mode": mode,
                                                         "error": str(exc)}))
        return None, None
    result.record["peak_memory_mib"] = peak.mib
    result.record["memory_increase_mib"] = peak.increase_mib
    result.save(run_dir)
    return result, peak.mib


def _run(run_dir, mode, dataset, model, weights, *, epochs, head, batch_size, num_workers,
         device, cache_dir, image_size, seed, n_boot, progress) -> RunResult:
    if mode == "cached":
        return fit_head(dataset, model, weights=weights, head=head, out_dir=run_dir,
                        n_boot=n_boot, seed=seed,
                        extract_options={"cache_dir": cache_dir, "image_size": image_size,
                                         "num_workers": num_workers, "device": device,
                                         "progress": progress, "seed": seed})
    return finetune(dataset, model, weights=weights, mode=mode, epochs=epochs,
                    batch_size=batch_size, num_workers=num_workers, device=device,
                    cache_dir=cache_dir, image_size=image_size, seed=seed, n_boot=n_boot,
                    out_dir=run_dir, resume=(run_dir / "checkpoint.pt").is_file(),
                    progress=progress)


class _PeakMemory:
    """Peak memory while the block runs: this process plus its children (data-loader workers),
    as proportional set size (shared pages counted once), sampled once a second (reading
    /proc/PID/smaps_rollup costs CPU time itself). ``mib`` is the peak, ``increase_mib`` the
    peak minus the memory held when the block started."""

    interval = 1.0

    def __enter__(self):
        self.start = self.mib = _rss_mib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(self.interval):
            self.mib = max(self.mib, _rss_mib())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.mib = round(max(self.mib, _rss_mib()), 1)
        self.increase_mib = round(self.mib - self.start, 1)


def _rss_mib(pid="self") -> float:
    """PSS of a process and, recursively, its children (Linux /proc); else peak RSS so far."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("Pss:"))
        total = kib / 1024
        base = f"/proc/{pid}/task"
        for task in os.listdir(base):
            with open(f"{base}/{task}/children") as f:
                total += sum(_rss_mib(child) for child in f.read().split())
        return total
    except (OSError, ValueError, StopIteration):
        if pid != "self":
            return 0.0  # a child that just exited
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _row(model: str, mode: str, result: RunResult, peak) -> dict:
    r = result.record
    t, test, ci = r["timing"], r["metrics"]["test"], r.get("ci", {}).get("test", {})
    params = r.get("params", {})
    if mode == "cached":
        meta = cache_io.read_meta(r["cache"]["path"]) if Path(r["cache"]["path"]).is_file() \
            else None
        n_params = parameter_count(model)
        trainable = _head_params(r, meta)
        extract_s, train_s, eval_s = t["extract_seconds"], t["fit_seconds"], t["evaluate_seconds"]
        ips = t.get("extract_images_per_second")
    else:
        n_params, trainable = params.get("parameters"), params.get("trainable_parameters")
        extract_s, train_s, eval_s = 0.0, t["train_seconds"], t["evaluate_seconds"]
        extract_s += t.get("store_seconds", 0.0)
        ips = t.get("train_images_per_second")
    return {
        "model": model, "mode": mode, "head": r["head"], "weights": r["weights"]["id"]
        if r["weights"]["kind"] != "file" else Path(r["weights"]["id"]).name,
        "parameters": n_params, "trainable_parameters": trainable,
        "extract_seconds": extract_s, "train_seconds": train_s, "evaluate_seconds": eval_s,
        "total_seconds": extract_s + train_s + eval_s, "images_per_second": ips,
        "peak_memory_mib": peak, "epochs": len(r.get("history") or []) or None,
        "val_accuracy": r["metrics"]["val"]["accuracy"], "val_auc": r["metrics"]["val"]["roc_auc"],
        "test_accuracy": test["accuracy"], "test_accuracy_ci": ci.get("accuracy"),
        "balanced_accuracy": test["balanced_accuracy"], "auc": test["roc_auc"],
        "auc_ci": ci.get("roc_auc"), "sensitivity": test["sensitivity"],
        "sensitivity_ci": ci.get("sensitivity"), "specificity": test["specificity"],
        "specificity_ci": ci.get("specificity"), "threshold": r["threshold"]["value"],
        "run_dir": r.get("run_dir"),
    }


def _head_params(record: dict, meta) -> Optional[int]:
    if meta is None:
        return None
    d, c = meta["feature_dim"], len(meta["class_names"])
    return {"logreg": d * (1 if c == 2 else c) + (1 if c == 2 else c), "linear": d * c + c,
            "knn": 0}[record["head"]]


def _significance(results) -> list:
    """Each run against the best by val AUC, on the same test images."""
    usable = [(m, mode, r) for m, mode, r, _ in results if "test" in r.predictions]
    if len(usable) < 2:
        return []
    best = max(usable, key=lambda x: (x[2]["metrics"]["val"]["roc_auc"],
                                      x[2]["metrics"]["val"]["accuracy"]))
    ids_b, y_b, p_b = best[2].predictions["test"]
    order_b = np.argsort(np.asarray(ids_b))
    tests = []
    for model, mode, r in usable:
        if r is best[2]:
            continue
        ids, y, p = r.predictions["test"]
        order = np.argsort(np.asarray(ids))
        if list(np.asarray(ids)[order]) != list(np.asarray(ids_b)[order_b]):
            logger.warning("%s %s was evaluated on other test images; no paired test", model, mode)
            continue
        y_sorted, pa, pb = np.asarray(y)[order], np.asarray(p)[order], np.asarray(p_b)[order_b]
        entry = {"model": model, "mode": mode, "against": f"{best[0]} {best[1]}"}
        if pa.shape[1] == 2:
            d = delong_test(y_sorted, pa[:, 1], pb[:, 1])
            entry["auc_diff"], entry["auc_p_value"], entry["auc_diff_ci"] = \
                d["diff"], d["p_value"], d["ci"]
        acc = paired_bootstrap(y_sorted, pa, pb, metric="accuracy",
                               threshold_a=r["threshold"]["value"] or 0.5,
                               threshold_b=best[2]["threshold"]["value"] or 0.5)
        entry["accuracy_diff"], entry["accuracy_p_value"], entry["accuracy_diff_ci"] = \
            acc["diff"], acc["p_value"], acc["ci"]
        entry["significant"] = bool(min(entry.get("auc_p_value", 1.0),
                                        entry["accuracy_p_value"]) < 0.05)
        tests.append(entry)
    return [{"best": f"{best[0]} {best[1]}", "chosen_by": "val AUC"}] + tests


def _time_savings(rows: list, results: list, epochs: int) -> list:
    """Per model: cached head vs frozen baseline vs full fine-tuning, in plain words.

    For the same number of epochs as the frozen baseline, a linear layer is also trained on
    the cached features with the same recipe (a few seconds), so the comparison is like for
    like: the cache replaces the backbone's forward pass in every epoch.
    """
    lines = []
    by_model = {}
    for row, (_, _, result, _) in zip(rows, results):
        by_model.setdefault(row["model"], {})[row["mode"]] = (row, result)
    for model, modes in by_model.items():
        if "cached" not in modes or "frozen" not in modes:
            continue
        (cached, cached_result), (frozen, _) = modes["cached"], modes["frozen"]
        n_epochs = frozen["epochs"] or epochs
        linear = fit_head(cache=cached_result.record["cache"]["path"], head="linear",
                          head_params={"epochs": n_epochs}, save=False, n_boot=0)
        linear_s = linear["timing"]["fit_seconds"]
        extract_s = cached["extract_seconds"]
        ratio = frozen["train_seconds"] / max(extract_s + linear_s, 1e-9)
        text = (f"{model}, {n_epochs} epochs: the frozen-backbone baseline trained for "
                f"{frozen['train_seconds']:.0f} s; the same linear layer and SGD recipe on the cached "
                f"features (no augmentation) took "
                f"{linear_s:.2f} s after a one-off extraction of {extract_s:.0f} s "
                f"({ratio:.1f}x faster including the extraction, "
                f"{frozen['train_seconds'] / max(linear_s, 1e-9):.0f}x once the cache exists; "
                f"its test accuracy {linear['metrics']['test']['accuracy']:.3f} vs the frozen "
                f"run's {frozen['test_accuracy']:.3f}). The {cached['head']} head with its "
                f"val sweep took {cached['train_seconds']:.1f} s")
        if "full" in modes:
            full = modes["full"][0]
            text += (f"; full fine-tuning trained for {full['train_seconds']:.0f} s "
                     f"({full['epochs']} epochs)")
        lines.append(text + ".")
    return lines
