"""Command line: parses options, calls the Python API, prints. No logic lives here.

Option defaults are read from the API's signatures so they are defined once.
"""
from __future__ import annotations

import functools
import inspect
import json
import logging
import sys

import click

from . import __version__
from .extract import extract as extract_api
from .extract import plan_extraction
from .analyze import analyze as analyze_api
from .compare import compare as compare_api
from .finetune import finetune as finetune_api
from .fit import fit_head as fit_head_api

logger = logging.getLogger("xfeat")


def _default(func, name):
    return inspect.signature(func).parameters[name].default


def _api_errors(f):
    """Turn the API's user-facing exceptions into clean one-line CLI errors."""
    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        from .backbones import BackboneError
        from .cache import CacheError
        from .datasets_builtin import DownloadError
        from .finetune import TrainingDiverged

        try:
            return f(*args, **kwargs)
        except (ValueError, BackboneError, CacheError, DownloadError, FileNotFoundError,
                TrainingDiverged) as exc:
            raise click.ClickException(str(exc)) from None
    return wrapper


def _data_options(f, required=True):
    api = plan_extraction
    options = [
        click.option("--data", "-d", required=required, metavar="PATH|NAME",
                     help="Folder ROOT/{train,val,test}/CLASS/*, a MedMNIST-style .npz, or a "
                          "built-in name (pneumoniamnist, pneumoniamnist_224, ...)."),
        click.option("--val-fraction", type=float, default=_default(api, "val_fraction"),
                     show_default=True,
                     help="Share of train carved out as val when val is missing or tiny."),
        click.option("--split-seed", type=int, default=_default(api, "split_seed"),
                     show_default=True, help="Seed of the val carve-out."),
        click.option("--group-pattern", default=_default(api, "group_pattern"), show_default=True,
                     help="Regex whose first group on a file name is the patient id (kept on "
                          "one side of the split); '' disables grouping."),
        click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
                     help="Feature cache folder [default: $XFEAT_CACHE or ./cache]."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _model_options(f):
    api = plan_extraction
    options = [
        click.option("--model", "-m", default=_default(api, "model"), show_default=True,
                     help="Any torchvision classifier; `xfeat models` lists them."),
        click.option("--weights", "-w", default=_default(api, "weights"), show_default=True,
                     help="none (random init), DEFAULT, a torchvision weights name such as "
                          "IMAGENET1K_V1, or a local state-dict file."),
        click.option("--image-size", type=int, default=None,
                     help="Crop size override [default: the weights' own, e.g. 224]."),
        click.option("--seed", type=int, default=_default(api, "seed"), show_default=True,
                     help="Seed of random initialisation (weights=none)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _extract_run_options(f):
    options = [
        click.option("--batch-size", "-b", type=int, default=_default(extract_api, "batch_size"),
                     show_default=True, help="Images per forward pass."),
        click.option("--num-workers", type=int, default=None,
                     help="Data-loader processes [default: min(4, CPUs - 1)]."),
        click.option("--device", default=None,
                     help="cpu, cuda, cuda:N [default: cuda if available]."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="xfeat")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
@click.pass_context
def cli(ctx, verbose, quiet):
    """xfeat: transfer learning on medical images with cached backbone features."""
    from .distributed import current_world

    main_rank = current_world().is_main  # under torchrun only rank 0 reports
    quiet = quiet or not main_rank
    level = logging.WARNING if quiet else logging.DEBUG if verbose > 1 else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr, force=True)
    ctx.ensure_object(dict)
    ctx.obj["progress"] = not quiet
    ctx.obj["report"] = main_rank


@cli.command("models")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@_api_errors
def models_cmd(as_json):
    """List every backbone: feature dimension, parameters, torchvision weights."""
    from .backbones import describe_backbones

    rows = describe_backbones()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(f"{'model':<22} {'D':>5} {'params':>8}  weights")
    for r in rows:
        click.echo(f"{r['name']:<22} {r['feature_dim']:>5} {r['params_m']:>7.1f}M  "
                   f"{', '.join(r['weights'])}")


@cli.command("extract")
@_data_options
@_model_options
@_extract_run_options
@click.option("--feature-dtype", type=click.Choice(["float32", "float16"]),
              default=_default(extract_api, "feature_dtype"), show_default=True,
              help="Stored feature precision.")
@click.option("--skip-bad", is_flag=True, help="Record and skip unreadable images.")
@click.option("--force", is_flag=True, help="Recompute even if a complete cache entry exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the cache summary as JSON.")
@click.pass_context
@_api_errors
def extract_cmd(ctx, as_json, **options):
    """Run a backbone once over every split and cache the features (HDF5)."""
    from .cache import read_meta

    path = extract_api(progress=ctx.obj["progress"], **options)
    if not ctx.obj["report"]:
        return
    meta = read_meta(path)
    if as_json:
        click.echo(json.dumps({"path": str(path), **meta}, indent=2))
        return
    click.echo(_describe_cache(path, meta))


@cli.command("fit-head")
@functools.partial(_data_options, required=False)
@_model_options
@click.option("--cache", "cache_file", type=click.Path(dir_okay=False),
              help="Use this feature cache (.h5) instead of --data/--model/--weights.")
@click.option("--head", type=click.Choice(["logreg", "linear", "knn"]),
              default=_default(fit_head_api, "head"), show_default=True,
              help="logreg: C swept on val; linear: the tutorial's SGD recipe; knn: cosine "
                   "k-NN, k chosen on val.")
@click.option("--threshold", default=_default(fit_head_api, "threshold"), show_default=True,
              help="youden, a probability such as 0.5, or sensitivity:0.95 / specificity:0.9; "
                   "chosen on val.")
@click.option("--class-weight", type=click.Choice(["balanced", "none"]), default=None,
              help="logreg class weights [default: the head's, balanced].")
@click.option("--C", "C", type=float, default=None, help="logreg: fix C instead of sweeping it.")
@click.option("--scoring", type=click.Choice(["log_loss", "accuracy", "balanced_accuracy",
                                              "roc_auc"]), default=None,
              help="logreg: val score that chooses C [default: the head's, log_loss].")
@click.option("--refit-on-val", is_flag=True, help="logreg: refit on train+val with the chosen C.")
@click.option("--epochs", type=int, default=None, help="linear: epochs [default: the head's].")
@click.option("--lr", type=float, default=None,
              help="linear: SGD learning rate [default: the head's].")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Run folder [default: runs/DATASET/MODEL-WEIGHTS/cached-HEAD].")
@click.option("--n-boot", type=int, default=_default(fit_head_api, "n_boot"), show_default=True,
              help="Bootstrap resamples for the test confidence intervals.")
@_extract_run_options
@click.option("--json", "as_json", is_flag=True, help="Print results.json instead of the table.")
@click.pass_context
@_api_errors
def fit_head_cmd(ctx, data, model, weights, image_size, seed, cache_file, head, threshold,
                 class_weight, C, scoring, refit_on_val, epochs, lr, out_dir, n_boot, as_json,
                 **extract_options):
    """Fit a head on cached features (extracting them first if needed) and evaluate it."""
    from .heads import head_options  # here, not at the top: `xfeat --help` stays light

    takes = head_options()[head]
    given = {"C": C, "scoring": scoring, "class_weight": class_weight,
             "refit_on_val": refit_on_val or None, "epochs": epochs, "lr": lr}
    flag = {name: "--" + name.replace("_", "-") for name in given}  # the option of each param
    ignored = [flag[name] for name, value in given.items() if value is not None and name not in takes]
    if ignored:
        accepted = [flag[name] for name in given if name in takes]
        raise click.UsageError(f"{', '.join(ignored)} do(es) not apply to --head {head}; "
                               f"it takes {', '.join(accepted) or 'no head options'}")
    head_params = {k: v for k, v in given.items() if v is not None}
    if class_weight is not None:
        head_params["class_weight"] = None if class_weight == "none" else class_weight
    if "seed" in takes:
        head_params["seed"] = seed
    extract_options.update(image_size=image_size, seed=seed, progress=ctx.obj["progress"])
    extract_options = {k: v for k, v in extract_options.items() if v is not None}
    if not data and not cache_file:
        raise click.UsageError("give --data (and --model/--weights) or --cache FILE.h5")
    result = fit_head_api(data, model, weights=weights, cache=cache_file, head=head,
                          threshold=threshold, head_params=head_params, out_dir=out_dir,
                          n_boot=n_boot, extract_options=extract_options)
    if as_json:
        click.echo(json.dumps(result.record, indent=2))
    else:
        click.echo(result.table())


@cli.command("predict")
@click.option("--head", "head_path", required=True, type=click.Path(dir_okay=False),
              help="A head.npz written by fit-head.")
@click.argument("images", nargs=-1, required=True, type=click.Path())
@click.option("--out", "out_csv", type=click.Path(dir_okay=False), default="predictions.csv",
              show_default=True, help="CSV: path, probability per class, predicted label.")
@click.option("--weights", default=None,
              help="Where the head's weights file is now, if it moved.")
@_extract_run_options
@click.pass_context
@_api_errors
def predict_cmd(ctx, head_path, images, out_csv, weights, **options):
    """Classify image files or folders with a saved head and its backbone."""
    from .predict import predict

    rows = predict(head_path, images, out_csv=out_csv, weights=weights,
                   progress=ctx.obj["progress"], **options)
    failed = [r for r in rows if r["error"]]
    counts = {}
    for r in rows:
        if r["predicted"]:
            counts[r["predicted"]] = counts.get(r["predicted"], 0) + 1
    click.echo(f"{len(rows)} images -> {out_csv}: " +
               ", ".join(f"{c} {n}" for c, n in sorted(counts.items())) +
               (f"; {len(failed)} unreadable (see the error column)" if failed else ""))


@cli.command("finetune")
@_data_options
@_model_options
@click.option("--mode", type=click.Choice(["full", "frozen", "lp-ft"]),
              default=_default(finetune_api, "mode"), show_default=True,
              help="full: train every layer; frozen: only the new last layer (backbone forward "
                   "every epoch); lp-ft: start the last layer from the cached logistic probe.")
@click.option("--epochs", type=int, default=_default(finetune_api, "epochs"), show_default=True)
@click.option("--lr", type=float, default=_default(finetune_api, "lr"), show_default=True)
@click.option("--momentum", type=float, default=_default(finetune_api, "momentum"),
              show_default=True)
@click.option("--step-size", type=int, default=_default(finetune_api, "step_size"),
              show_default=True, help="StepLR: decay the learning rate every N epochs.")
@click.option("--gamma", type=float, default=_default(finetune_api, "gamma"), show_default=True)
@click.option("--weight-decay", type=float, default=_default(finetune_api, "weight_decay"),
              show_default=True)
@click.option("--batch-size", "-b", type=int, default=_default(finetune_api, "batch_size"),
              show_default=True)
@click.option("--num-workers", type=int, default=None,
              help="Data-loader processes [default: min(4, CPUs - 1)].")
@click.option("--device", default=None, help="cpu, cuda, cuda:N [default: cuda if available].")
@click.option("--amp", type=click.Choice(["auto", "bf16", "none"]),
              default=_default(finetune_api, "amp"), show_default=True,
              help="auto: bf16 autocast on CUDA, full precision on CPU.")
@click.option("--channels-last/--no-channels-last", default=True, show_default=True)
@click.option("--compile", is_flag=True, help="torch.compile the network (slow first epoch).")
@click.option("--threshold", default=_default(finetune_api, "threshold"), show_default=True,
              help="Decision threshold rule, chosen on val.")
@click.option("--max-train-images", type=int, default=None,
              help="Train on a stratified subset of train (quick runs).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Run folder [default: runs/DATASET/MODEL-WEIGHTS/MODE-linear].")
@click.option("--resume", is_flag=True, help="Continue the interrupted run in --out.")
@click.option("--probe", type=click.Path(dir_okay=False), default=None,
              help="lp-ft: start from this head.npz of fit-head (default: fit one on the cache).")
@click.option("--n-boot", type=int, default=_default(finetune_api, "n_boot"), show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print results.json instead of the table.")
@click.pass_context
@_api_errors
def finetune_cmd(ctx, as_json, **options):
    """Train end to end (full), the frozen-backbone baseline, or LP-FT; evaluate once on test."""
    result = finetune_api(progress=ctx.obj["progress"], **options)
    if result is not None:  # under torchrun, rank 0 holds the result
        click.echo(json.dumps(result.record, indent=2) if as_json else result.table())


@cli.command("compare")
@_data_options
@click.option("--models", default=",".join(_default(compare_api, "models")), show_default=True,
              help="Comma-separated backbones.")
@click.option("--weights", "-w", default=_default(compare_api, "weights"), show_default=True,
              help="Weights for every model (none, DEFAULT, a file), or per model: "
                   "'mobilenet_v2=PATH,resnet50=DEFAULT' (others: none).")
@click.option("--modes", default=",".join(_default(compare_api, "modes")), show_default=True,
              help="Comma-separated: cached, frozen, full, lp-ft.")
@click.option("--epochs", type=int, default=_default(compare_api, "epochs"), show_default=True)
@click.option("--quick", is_flag=True,
              help="Small stratified subset and 2 epochs: the whole comparison in minutes.")
@click.option("--head", type=click.Choice(["logreg", "linear", "knn"]),
              default=_default(compare_api, "head"), show_default=True,
              help="Head of the cached mode.")
@click.option("--image-size", type=int, default=None)
@click.option("--seed", type=int, default=_default(compare_api, "seed"), show_default=True)
@click.option("--batch-size", "-b", type=int, default=_default(compare_api, "batch_size"),
              show_default=True)
@click.option("--num-workers", type=int, default=None)
@click.option("--device", default=None)
@click.option("--n-boot", type=int, default=_default(compare_api, "n_boot"), show_default=True)
@click.option("--analyze", is_flag=True, help="Also run `xfeat analyze` and link it.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False),
              default=_default(compare_api, "out_dir"), show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print comparison.json instead.")
@click.pass_context
@_api_errors
def compare_cmd(ctx, models, modes, as_json, **options):
    """Speed and accuracy of every (backbone, mode) pair, side by side, with a report."""
    result = compare_api(models=[m for m in models.split(",") if m],
                         modes=[m for m in modes.split(",") if m],
                         progress=ctx.obj["progress"], **options)
    if as_json:
        click.echo((result.out_dir / "comparison.json").read_text())
        return
    for note in result.notes:
        click.echo(f"note: {note}")
    click.echo(result.table())
    for line in result.savings:
        click.echo(f"- {line}")
    for t in result.tests[1:]:
        click.echo(f"- {t['model']} {t['mode']} vs {t['against']}: AUC diff "
                   f"{t.get('auc_diff', float('nan')):+.3f} "
                   f"(p={t.get('auc_p_value', float('nan')):.3g}), "
                   f"accuracy diff {t['accuracy_diff']:+.3f} (p={t['accuracy_p_value']:.3g})")
    click.echo(f"report: {result.out_dir / 'report.md'} (and report.html)")


@cli.command("analyze")
@functools.partial(_data_options, required=False)
@_model_options
@click.option("--cache", "cache_file", type=click.Path(dir_okay=False),
              help="Use this feature cache (.h5) instead of --data/--model/--weights.")
@click.option("--run", "runs", multiple=True, type=click.Path(file_okay=False),
              help="A run folder (fit-head or finetune) whose train/val/test gap to include; "
                   "repeatable.")
@click.option("--near-duplicate-threshold", type=float,
              default=_default(analyze_api, "near_duplicate_threshold"), show_default=True,
              help="Cosine similarity of embeddings at or above which images are near duplicates.")
@click.option("--folds", "n_folds", type=int, default=_default(analyze_api, "n_folds"),
              show_default=True, help="Cross-validation folds (shift classifier, label noise).")
@click.option("--n-boot", type=int, default=_default(analyze_api, "n_boot"), show_default=True)
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Report folder [default: runs/DATASET/MODEL-WEIGHTS/analysis].")
@_extract_run_options
@click.option("--json", "as_json", is_flag=True, help="Print analysis.json instead.")
@click.pass_context
@_api_errors
def analyze_cmd(ctx, data, model, weights, image_size, seed, cache_file, runs,
                near_duplicate_threshold, n_folds, n_boot, out_dir, as_json, **extract_options):
    """Why test accuracy lags: imbalance, shift, duplicates and leakage, label noise,
    overfitting, calibration."""
    if not data and not cache_file:
        raise click.UsageError("give --data (and --model/--weights) or --cache FILE.h5")
    extract_options.update(image_size=image_size, seed=seed, progress=ctx.obj["progress"])
    extract_options = {k: v for k, v in extract_options.items() if v is not None}
    analysis = analyze_api(data, model, weights=weights, cache=cache_file, out_dir=out_dir,
                           runs=runs, near_duplicate_threshold=near_duplicate_threshold,
                           n_folds=n_folds, n_boot=n_boot, seed=seed,
                           extract_options=extract_options, progress=ctx.obj["progress"])
    click.echo(json.dumps(analysis.record, indent=2) if as_json else analysis.summary())


@cli.command("info")
@click.argument("cache_file", type=click.Path(exists=True, dir_okay=False))
@click.option("--json", "as_json", is_flag=True)
@_api_errors
def info_cmd(cache_file, as_json):
    """Show what a feature cache file holds and how it was made."""
    from .cache import read_meta

    meta = read_meta(cache_file)
    click.echo(json.dumps(meta, indent=2) if as_json else _describe_cache(cache_file, meta))


def _describe_cache(path, meta) -> str:
    w = meta["weights"]
    weights = w["id"] if w["kind"] != "file" else f"{w['id']} (sha256 {w['sha256'][:12]})"
    lines = [f"cache: {path}",
             f"  model {meta['model']} (D={meta['feature_dim']}, {meta['feature_dtype']}), "
             f"weights {weights}",
             f"  dataset {meta['dataset']['name']} ({meta['dataset']['source']}), classes "
             f"{', '.join(meta['class_names'])}; val {meta['split'].get('val')}",
             f"  preprocessing: resize {meta['preprocessing']['resize_size']}, crop "
             f"{meta['preprocessing']['crop_size']}, {meta['preprocessing']['interpolation']}"]
    for split, s in meta["splits"].items():
        rate = s.get("images_per_second")
        lines.append(f"  {split:<5} {s['n']:>6} images" +
                     (f", {s['seconds_total']:.1f} s, {rate:.1f} img/s" if rate else ""))
    return "\n".join(lines)


def main():  # pragma: no cover - console entry point for `python -m xfeat`
    cli(prog_name="xfeat")
