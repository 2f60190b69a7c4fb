"""``compare``: every (backbone, mode) pair through the API, then one decision report.

Every option, model and weights spec is checked before anything is computed. Each pair runs
in its own folder under ``OUT/runs`` named by a hash of its configuration; a folder with a
``results.json`` is reused and one with only a checkpoint is resumed, so an interrupted
comparison, or one with a model added, computes only what is missing. The report is rebuilt
from the saved results every time; building it trains nothing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

from xfeat.config import (
    COMPARE_MODES,
    DEFAULT_N_BOOT,
    DEFAULT_THRESHOLD,
    HEAD_NAMES,
    FinetuneConfig,
    default_cache_dir,
    parse_weights,
)
from xfeat.data import split_patients
from xfeat.errors import ConfigError, TrainingDiverged
from xfeat.files import read_json, write_json
from xfeat.runs.folders import config_run_name, run_lock
from xfeat.runs.results import RunResult, load_result

logger = logging.getLogger(__name__)

QUICK_SIZES = {"train": 300, "val": 100, "test": 200}
QUICK_EPOCHS = 2


@dataclass
class Comparison:
    """The comparison: its verdict, table rows, timings and tests, and where the report is.

    ``verdict`` (:func:`~xfeat.comparison.verdict.build_verdict`) says in plain words what the
    rows, ``timings`` (per model, :func:`~xfeat.report.rows.timing_rows`) and ``tests``
    (:func:`~xfeat.report.rows.significance`) hold.
    """

    rows: list
    tests: list
    timings: list
    verdict: dict
    out_dir: Path
    notes: list = field(default_factory=list)

    def table(self) -> str:
        from xfeat.report import format_comparison_table

        return format_comparison_table(self.rows)

    def summary(self) -> str:
        """The notes, the verdict, the table and the timings, for a terminal."""
        from xfeat.report import format_timings_table

        lines = [f"note: {note}" for note in self.notes] + ["Verdict:"]
        lines += [f"- {line}" for line in self.verdict["sentences"]]
        lines += [
            "",
            self.table(),
            "",
            format_timings_table(self.timings),
            "",
            f"report: {self.out_dir / 'report.md'} (and report.html)",
        ]
        return "\n".join(lines)


@dataclass(frozen=True)
class _Setup:
    """What every run of one comparison shares."""

    dataset: object
    finetune: FinetuneConfig
    head: str
    n_boot: int
    quick: bool
    extract_options: dict  # cache_dir, image_size, resize_mode, dicom_window, dicom_frame, ...
    prompts: Optional[dict] = None  # class -> texts: a zero-shot run per model with a text tower


def compare(
    data,
    models: Sequence[str] = ("resnet18", "resnet50", "shufflenet_v2_x2_0"),
    *,
    weights: Union[str, dict, None] = "none",
    modes: Sequence[str] = COMPARE_MODES,
    quick: bool = False,
    out_dir: Union[str, Path] = "runs/compare",
    head: str = "logreg",
    finetune: Union[FinetuneConfig, dict, None] = None,
    n_boot: int = DEFAULT_N_BOOT,
    image_size: Optional[int] = None,
    resize_mode: Optional[str] = None,
    dicom_window: Optional[str] = None,
    dicom_frame: Optional[int] = None,
    num_workers: Optional[int] = None,
    device: Optional[str] = None,
    cache_dir=None,
    analyze: bool = False,
    progress: bool = True,
    prompts=None,
    **finetune_options,
) -> Comparison:
    """Run every (model, mode) pair not already done and write the comparison report.

    ``data`` is a :class:`~xfeat.config.DataSpec` or its source (a folder, an npz file or a
    built-in name); every run uses the same splits.
    ``finetune`` (a :class:`~xfeat.config.FinetuneConfig` or a dict of its fields, plus any
    ``**finetune_options`` such as ``epochs=5``) is the recipe of the fine-tuned modes; its
    ``seed`` seeds everything. ``quick`` uses a stratified subset (train 300, val 100, test
    200 images) and at most 2 epochs, so the comparison fits in minutes on a CPU.
    ``resize_mode``, ``dicom_window`` and ``dicom_frame``: as for :func:`xfeat.extract`.
    ``prompts`` (``{class: text}`` or ``["CLASS=text"]``) adds a ``zero-shot`` run for every
    model with a text tower (:func:`xfeat.zeroshot.zero_shot`), beside its linear probe.
    """
    from xfeat.data import load_dataset

    config = _finetune_config(finetune, finetune_options)
    weights_by_model = _validate(models, weights, modes, head, n_boot, config)
    modes_by_model, notes = _supported_modes(models, weights_by_model, modes, config.seed)
    if prompts:
        from xfeat.backbones import check_text_tower
        from xfeat.errors import XfeatError
        from xfeat.zeroshot import MODE, parse_prompts

        prompts = parse_prompts(prompts)
        for m in models:
            try:
                check_text_tower(m)
            except XfeatError as exc:  # an image-only model: its other runs go on
                notes.append(f"no zero-shot run of {m}: {exc}")
                continue
            modes_by_model[m].append(MODE)
    out_dir = Path(out_dir)
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    dataset = load_dataset(data, cache_dir=cache_dir)
    if prompts and dataset.multilabel:
        from xfeat.zeroshot import refuse_multilabel

        refuse_multilabel()
    if quick:
        dataset = dataset.subsample(QUICK_SIZES, seed=config.seed)
        requested = config.epochs
        config = config.with_options(epochs=min(config.epochs, QUICK_EPOCHS))
        sizes = ", ".join(f"{s} {sum(c)}" for s, c in dataset.counts().items())
        notes.append(
            f"--quick: a stratified subset ({sizes} images) and {config.epochs} "
            f"epoch(s) instead of {requested}; no figure is extrapolated to the full "
            "data or to more epochs."
        )
    setup = _Setup(
        dataset,
        config,
        head,
        n_boot,
        quick,
        {
            "cache_dir": cache_dir,
            "image_size": image_size,
            "resize_mode": resize_mode,
            "dicom_window": dicom_window,
            "dicom_frame": dicom_frame,
            "num_workers": num_workers,
            "device": device,
            "progress": progress,
            "seed": config.seed,
        },
        prompts,
    )
    with run_lock(out_dir, "comparison"):
        results, failed = _run_all(setup, models, weights_by_model, modes_by_model, out_dir / "runs")
        notes += [f"{f['model']} {f['mode']} failed: {f['error']}" for f in failed]
        if not results:
            raise TrainingDiverged("every run of the comparison failed: " + "; ".join(notes))
        return _report(setup, results, notes, out_dir, models, weights_by_model, analyze)


def _finetune_config(finetune, options) -> FinetuneConfig:
    if isinstance(finetune, FinetuneConfig):
        return finetune.with_options(**options)
    return FinetuneConfig().with_options(**{**(finetune or {}), **options})


def _validate(models, weights, modes, head, n_boot, config: FinetuneConfig) -> dict:
    """Every model, weights spec and option, before anything is computed."""
    from xfeat.backbones import resolve_weights

    if not models:
        raise ConfigError("--models is empty; expected one or more backbone names")
    unknown = [m for m in modes if m not in COMPARE_MODES]
    if unknown or not modes:
        raise ConfigError(f"modes {list(modes)}: expected some of {', '.join(COMPARE_MODES)}")
    if head not in HEAD_NAMES:
        raise ConfigError(f"head={head!r}: expected one of {', '.join(HEAD_NAMES)}")
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 0:
        raise ConfigError(f"n_boot={n_boot!r}: expected an integer >= 0")
    weights_by_model = parse_weights(weights, models)
    for m in models:
        resolve_weights(m, weights_by_model[m], seed=config.seed)  # a bad name or file: now
    return weights_by_model


def _supported_modes(models, weights_by_model, modes, seed: int) -> tuple:
    """``({model: modes}, notes)``: fine-tuning modes are skipped, with a note, for a backbone
    that cannot be trained (a frozen TorchScript module such as ``inception_v3_fid``)."""
    from xfeat.backbones import create_backbone

    plan, notes = {}, []
    for m in models:
        plan[m] = list(modes)
        training = [mode for mode in modes if mode in ("full", "lp-ft")]
        if not training or not m.startswith(("torchscript:", "inception_v3_fid")):
            continue
        if not create_backbone(m, weights_by_model[m], seed=seed, progress=False).trainable:
            plan[m] = [mode for mode in modes if mode not in training]
            notes.append(
                f"{m}: {', '.join(training)} skipped: its TorchScript module has no "
                "trainable parameters (the cached head and the frozen baseline run)"
            )
    return plan, notes


def _run_all(setup: _Setup, models, weights_by_model, modes_by_model: dict, run_root: Path):
    """Every pair, reusing finished runs; a diverging run is recorded as failed."""
    results, failed = [], []
    pairs = [(model, mode) for model in models for mode in modes_by_model[model]]
    for k, (model, mode) in enumerate(pairs, 1):
        if setup.extract_options["progress"]:
            logger.info("run %d of %d: %s %s", k, len(pairs), model, mode)
        run_dir = run_root / _run_name(setup, model, weights_by_model[model], mode)
        result = _run_or_reuse(setup, run_dir, model, weights_by_model[model], mode)
        if result is None:
            failed.append(read_json(run_dir / "failed.json"))
        else:
            results.append((model, mode, result))
    return results, failed


def _run_name(setup: _Setup, model: str, weights, mode: str) -> str:
    """Readable, and unique per configuration: a changed option never reuses an old run."""
    from xfeat.backbones import resolve_weights

    info, _ = resolve_weights(model, weights, seed=setup.finetune.seed)
    config = {
        "dataset": setup.dataset.fingerprint,
        "model": model,
        "weights": info.key(),
        "mode": mode,
        "image_size": setup.extract_options["image_size"],
        "n_boot": setup.n_boot,
        "seed": setup.finetune.seed,
    }
    for name in ("resize_mode", "dicom_window", "dicom_frame"):  # absent: earlier runs keep names
        if setup.extract_options[name] is not None:
            config[name] = setup.extract_options[name]
    config["threshold"] = setup.finetune.threshold
    if mode == "cached":
        config["head"] = setup.head
        kind = f"cached-{setup.head}"
    elif mode == "zero-shot":
        config["prompts"] = setup.prompts
        kind = mode
    else:
        config["finetune"] = {k: v for k, v in setup.finetune.training_key().items() if k != "mode"}
        config["adapt"] = setup.finetune.adapt
        kind = f"{mode}-{setup.finetune.epochs}ep"
    return config_run_name(
        model, {"kind": info.kind, "id": info.id}, kind + ("-quick" if setup.quick else ""), config
    )


def _run_or_reuse(setup: _Setup, run_dir: Path, model: str, weights, mode: str):
    from xfeat.extraction.runtime import PeakMemory

    if (run_dir / "results.json").is_file():
        try:
            result = load_result(run_dir)
            logger.info("reusing %s", run_dir)
            return result
        except ConfigError as exc:  # damaged: never used, run again
            logger.warning("%s; running it again", exc)
            (run_dir / "results.json").unlink(missing_ok=True)
    (run_dir / "failed.json").unlink(missing_ok=True)
    try:
        with PeakMemory() as peak:
            result = _run(setup, run_dir, model, weights, mode)
    except TrainingDiverged as exc:
        # One diverging run must not sink the comparison: it is reported as failed.
        logger.error("%s", exc)
        write_json(run_dir / "failed.json", {"model": model, "mode": mode, "error": str(exc)})
        return None
    result.record.peak_memory_mib = peak.mib
    result.record.memory_increase_mib = peak.increase_mib
    result.save(run_dir)
    return result


def _run(setup: _Setup, run_dir: Path, model: str, weights, mode: str) -> RunResult:
    from xfeat.finetuning import finetune
    from xfeat.fitting import fit_head

    options = setup.extract_options
    if mode == "zero-shot":
        from xfeat.zeroshot import zero_shot

        return zero_shot(
            setup.dataset,
            model,
            prompts=setup.prompts,
            weights=weights,
            out_dir=run_dir,
            n_boot=setup.n_boot,
            seed=setup.finetune.seed,
            extract_options=options,
        )
    if mode == "cached":
        return fit_head(
            setup.dataset,
            model,
            weights=weights,
            head=setup.head,
            out_dir=run_dir,
            # the recipe's default rule is no explicit choice (it does not apply to 3+ classes)
            threshold=None
            if setup.finetune.threshold == DEFAULT_THRESHOLD
            else setup.finetune.threshold,
            n_boot=setup.n_boot,
            seed=setup.finetune.seed,
            extract_options=options,
        )
    config = setup.finetune.with_options(mode=mode, n_boot=setup.n_boot)
    return finetune(
        setup.dataset,
        model,
        weights=weights,
        config=config,
        out_dir=run_dir,
        resume=(run_dir / "checkpoint.pt").is_file(),
        image_size=options["image_size"],
        resize_mode=options["resize_mode"],
        dicom_window=options["dicom_window"],
        dicom_frame=options["dicom_frame"],
        cache_dir=options["cache_dir"],
        num_workers=options["num_workers"],
        device=options["device"],
        progress=options["progress"],
    )


def _report(
    setup: _Setup, results, notes, out_dir: Path, models, weights_by_model, analyze: bool
) -> Comparison:
    from xfeat.comparison.verdict import build_verdict
    from xfeat.report import write_comparison_report
    from xfeat.report.rows import best_run, significance, table_row, timing_rows

    rows = [table_row(model, mode, r) for model, mode, r in results]
    best = best_run(rows)
    test = setup.dataset.splits.get("test")
    groups = split_patients(test, setup.dataset.spec) if test is not None else None
    patients = dict(zip(test.ids, groups)) if groups is not None else None
    tests = significance(results, rows, best, patients)
    baselines = {
        model: linear_on_cache(r, _frozen_epochs(results, model), out_dir / "runs")
        for model, mode, r in results
        if mode == "cached"
    }
    timings = timing_rows(rows, baselines)
    verdict = build_verdict(rows, tests, timings, best)
    analyses = _analyses(setup, results, out_dir, models, weights_by_model) if analyze else {}
    comparison = Comparison(rows, tests, timings, verdict, out_dir, notes)
    write_comparison_report(comparison, [r for _, _, r in results], analyses=analyses)
    return comparison


def _frozen_epochs(results, model: str) -> Optional[int]:
    return next(
        (len(r.record.history) for m, mode, r in results if m == model and mode == "frozen"),
        None,
    )


def _analyses(setup: _Setup, results, out_dir: Path, models, weights_by_model) -> dict:
    """One analysis per backbone, reusing the cached logistic probe of the comparison."""
    from xfeat.analysis import analyze as run_analysis

    analyses = {}
    for model in models:
        runs = [r for m, _, r in results if m == model]
        probe = next(
            (
                r
                for m, mode, r in results
                if m == model and mode == "cached" and r.record.head == "logreg"
            ),
            None,
        )
        analysis = run_analysis(
            setup.dataset,
            model,
            weights=weights_by_model[model],
            out_dir=out_dir / "analysis" / model,
            runs=[r.run_dir for r in runs if r.run_dir],
            probe=probe,
            seed=setup.finetune.seed,
            n_boot=setup.n_boot,
            progress=setup.extract_options["progress"],
            extract_options=setup.extract_options,
        )
        analyses[model] = analysis.out_dir
    return analyses


def linear_on_cache(cached: RunResult, epochs: Optional[int], run_root: Path):
    """The frozen baseline's linear layer and SGD recipe, trained on the cached features for
    the same number of epochs: the like-for-like time of the cached path. Saved once in
    ``run_root`` and reused."""
    if epochs is None or cached.record.cache is None:
        return None
    cache_path = Path(cached.record.cache.path)
    run_dir = run_root / f"{Path(cached.record.run_dir).name}-as-linear-{epochs}ep"
    if (run_dir / "results.json").is_file():
        try:
            return load_result(run_dir)
        except ConfigError as exc:  # damaged: never used, made again
            logger.warning("%s; making it again", exc)
    if not cache_path.is_file():
        return None
    from xfeat.fitting import fit_head

    return fit_head(
        cache=cache_path, head="linear", head_params={"epochs": epochs}, out_dir=run_dir, n_boot=0
    )


def _explicit_threshold(config: FinetuneConfig):
    """The recipe's threshold rule for fit_head, None when it is the default (a default is no
    explicit choice, and with three classes or more no threshold applies)."""
    return None if config.threshold == DEFAULT_THRESHOLD else config.threshold
