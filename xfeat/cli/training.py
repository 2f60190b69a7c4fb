"""``xfeat finetune``, ``compare`` and ``analyze``."""

from __future__ import annotations

import json

import click

from xfeat.cli.app import api_errors, api_imports, cli
from xfeat.cli.options import (
    cache_source,
    data_options,
    data_spec,
    default,
    dicom_options,
    finetune_options,
    json_option,
    loader_options,
    model_options,
    n_boot_option,
    not_empty,
    optional_data_options,
    out_folder,
    run_options,
    threshold_option,
)
from xfeat.config import (
    COMPARE_MODES,
    FINETUNE_ADAPTATIONS,
    FINETUNE_MODES,
    HEAD_NAMES,
    PRETRAINED,
    RESIZE_MODES,
    FinetuneConfig,
    parse_weights,
)


@cli.command("finetune")
@data_options
@model_options
@click.option(
    "--mode",
    type=click.Choice(FINETUNE_MODES),
    default=default(FinetuneConfig, "mode"),
    show_default=True,
    help="full: train every layer; frozen: only the new last layer (backbone forward "
    "every epoch); lp-ft: start the last layer from the cached logistic probe.",
)
@finetune_options
@loader_options
@threshold_option
@out_folder("Run folder", "runs/DATASET/MODEL-WEIGHTS/MODE-linear")
@click.option("--resume", is_flag=True, help="Continue the interrupted run in --out.")
@click.option(
    "--probe",
    type=click.Path(dir_okay=False),
    default=None,
    help="lp-ft: start from this head.npz of fit-head (default: fit one on the cache).",
)
@click.option(
    "--adapt",
    type=click.Choice(FINETUNE_ADAPTATIONS),
    default=None,
    help="TRANSDUCTIVE: evaluate test with BatchNorm statistics re-estimated on the "
    "test images (labels never read).",
)
@n_boot_option
@json_option
@click.pass_context
@api_errors
def finetune_cmd(
    ctx, data, model, weights, image_size, num_workers, device, out_dir, resume, as_json, **options
):
    """Train end to end (full), the frozen-backbone baseline, or LP-FT; evaluate once on test."""
    with api_imports():
        from xfeat.finetuning import finetune

    data = data_spec(data, options)
    if options.get("threshold") is None:
        options.pop("threshold", None)  # the recipe's default
    result = finetune(
        data,
        model,
        weights=weights,
        image_size=image_size,
        out_dir=out_dir,
        resume=resume,
        num_workers=num_workers,
        device=device,
        progress=ctx.obj["progress"],
        **options,
    )
    if result is not None:  # under torchrun, rank 0 holds the result
        click.echo(json.dumps(result.record.to_dict(), indent=2) if as_json else result.table())


@cli.command("compare")
@data_options
@click.option(
    "--models",
    default="resnet18,resnet50,shufflenet_v2_x2_0",
    show_default=True,
    help="Comma-separated backbones.",
)
@click.option(
    "--weights",
    "-w",
    default=PRETRAINED,
    show_default=True,
    callback=not_empty,
    help="Weights for every model (DEFAULT: pretrained, none: random init, a file), or per "
    "model: 'mobilenet_v2=PATH,resnet50=none' (others: DEFAULT).",
)
@click.option(
    "--modes",
    default=",".join(COMPARE_MODES),
    show_default=True,
    help="Comma-separated: cached, frozen, full, lp-ft.",
)
@click.option(
    "--quick",
    is_flag=True,
    help="Small stratified subset and 2 epochs: the whole comparison in minutes.",
)
@click.option(
    "--head",
    type=click.Choice(HEAD_NAMES),
    default="logreg",
    show_default=True,
    help="Head of the cached mode.",
)
@click.option("--image-size", type=int, default=None)
@click.option(
    "--resize-mode",
    type=click.Choice(RESIZE_MODES),
    default=None,
    help="crop (short side, then the centre), stretch (aspect not kept) or pad (letterbox) "
    "[default: crop].",
)
@dicom_options
@click.option("--seed", type=int, default=default(FinetuneConfig, "seed"), show_default=True)
@finetune_options
@loader_options
@n_boot_option
@click.option("--analyze", is_flag=True, help="Also run `xfeat analyze` and link it.")
@click.option(
    "--prompts",
    multiple=True,
    metavar="CLASS=TEXT",
    help="Add a zero-shot run (no training labels) for every model with a text tower "
    "(open_clip:, CLIP/SigLIP hf:), e.g. 'NORMAL=a chest x-ray with no findings'.",
)
@click.option(
    "--out", "out_dir", type=click.Path(file_okay=False), default="runs/compare", show_default=True
)
@json_option
@click.pass_context
@api_errors
def compare_cmd(
    ctx,
    prompts,
    models,
    weights,
    modes,
    quick,
    head,
    image_size,
    resize_mode,
    dicom_window,
    dicom_frame,
    num_workers,
    device,
    analyze,
    out_dir,
    n_boot,
    as_json,
    **options,
):
    """Speed and accuracy of every (backbone, mode) pair, side by side, with a report."""
    with api_imports():
        from xfeat.comparison import compare

    data = data_spec(options.pop("data"), options)
    cache_dir = options.pop("cache_dir")
    model_names = [m for m in models.split(",") if m]
    result = compare(
        data,
        model_names,
        # on the command line a model the mapping does not name is pretrained
        weights=parse_weights(weights, model_names, others=PRETRAINED),
        modes=[m for m in modes.split(",") if m],
        quick=quick,
        head=head,
        out_dir=out_dir,
        analyze=analyze,
        n_boot=n_boot,
        image_size=image_size,
        resize_mode=resize_mode,
        dicom_window=dicom_window,
        dicom_frame=dicom_frame,
        num_workers=num_workers,
        device=device,
        progress=ctx.obj["progress"],
        finetune=options,
        cache_dir=cache_dir,
        prompts=list(prompts) or None,
    )
    if as_json:
        click.echo((result.out_dir / "comparison.json").read_text())
        return
    click.echo(result.summary())


@cli.command("analyze")
@optional_data_options
@model_options
@click.option(
    "--cache",
    "cache_file",
    type=click.Path(dir_okay=False),
    help="Use this feature cache (.h5) instead of --data/--model/--weights.",
)
@click.option(
    "--run",
    "runs",
    multiple=True,
    type=click.Path(file_okay=False),
    help="A run folder (fit-head or finetune) whose train/val/test gap to include; repeatable.",
)
@click.option(
    "--near-duplicate-threshold",
    type=float,
    default=0.995,
    show_default=True,
    help="Cosine similarity of embeddings at or above which images are near duplicates.",
)
@click.option(
    "--folds",
    "n_folds",
    type=int,
    default=5,
    show_default=True,
    help="Cross-validation folds (shift classifier, label noise).",
)
@n_boot_option
@out_folder("Report folder", "runs/DATASET/MODEL-WEIGHTS/analysis")
@run_options
@json_option
@click.pass_context
@api_errors
def analyze_cmd(
    ctx,
    data,
    model,
    weights,
    image_size,
    seed,
    cache_file,
    runs,
    near_duplicate_threshold,
    n_folds,
    n_boot,
    out_dir,
    as_json,
    **options,
):
    """Why test accuracy lags: imbalance, shift, duplicates and leakage, label noise,
    overfitting, calibration."""
    with api_imports():
        from xfeat.analysis import analyze

    data = data_spec(data, options)
    extract_options = cache_source(ctx, data, cache_file, options, image_size=image_size, seed=seed)
    analysis = analyze(
        data,
        model,
        weights=weights,
        cache=cache_file,
        out_dir=out_dir,
        runs=runs,
        near_duplicate_threshold=near_duplicate_threshold,
        n_folds=n_folds,
        n_boot=n_boot,
        seed=seed,
        extract_options=extract_options,
        progress=ctx.obj["progress"],
    )
    click.echo(json.dumps(analysis.record, indent=2) if as_json else analysis.summary())
