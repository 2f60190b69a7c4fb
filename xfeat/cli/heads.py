"""``xfeat fit-head`` and ``predict``: heads on cached features, and applying them."""

from __future__ import annotations

import json

import click

from xfeat.cli.app import api_errors, api_imports, cli
from xfeat.cli.options import (
    cache_source,
    data_spec,
    feature_options,
    json_option,
    model_options,
    n_boot_option,
    optional_data_options,
    out_folder,
    predict_run_options,
    run_options,
    threshold_option,
)
from xfeat.config import (
    FIT_ADAPTATIONS,
    GEOMETRY_CHOICES,
    HEAD_NAMES,
    PREDICT_ADAPTATIONS,
    PRETRAINED,
    parse_weights,
)
from xfeat.files import dumps

# CLI flag -> the head parameter it sets; which head takes which is read from the heads.
_HEAD_FLAGS = {
    "C": "--C",
    "scoring": "--scoring",
    "class_weight": "--class-weight",
    "refit_on_val": "--refit-on-val",
    "epochs": "--epochs",
    "lr": "--lr",
}


def head_params_from_flags(head: str, given: dict) -> dict:
    """The head parameters a user set, refusing flags that belong to another head."""
    from xfeat.heads import head_options

    accepted = set(head_options()[head])
    ignored = [_HEAD_FLAGS[k] for k, v in given.items() if v is not None and k not in accepted]
    if ignored:
        takes = [flag for k, flag in _HEAD_FLAGS.items() if k in accepted]
        raise click.UsageError(
            f"{', '.join(ignored)} do(es) not apply to --head {head}; it "
            f"takes {', '.join(takes) or 'no head options'}"
        )
    params = {k: v for k, v in given.items() if v is not None}
    if params.get("class_weight") == "none":
        params["class_weight"] = None
    return params


@cli.command("fit-head")
@click.pass_context
@optional_data_options
@model_options
@click.option(
    "--cache",
    "cache_file",
    type=click.Path(dir_okay=False),
    multiple=True,
    help="Use this feature cache (.h5) instead of --data/--model/--weights; "
    "repeat it to put several backbones' features side by side.",
)
@click.option(
    "--head",
    type=click.Choice(HEAD_NAMES),
    default="logreg",
    show_default=True,
    help="logreg: C swept on val; linear: the tutorial's SGD recipe; knn: cosine k-NN, k chosen on val.",
)
@click.option(
    "--blocks",
    default=None,
    metavar="BLOCK,BLOCK",
    help="Feature blocks of the cache to use [default: all]; `xfeat info` lists them.",
)
@feature_options
@click.option(
    "--ignore-views",
    is_flag=True,
    help="Train on the centre crops only, even if the cache holds augmented views.",
)
@click.option(
    "--adapt",
    type=click.Choice(FIT_ADAPTATIONS),
    default=None,
    help="TRANSDUCTIVE site adaptation to the test images (labels never read).",
)
@threshold_option
@click.option(
    "--class-weight",
    type=click.Choice(["balanced", "none"]),
    default=None,
    help="logreg class weights [default: the head's, balanced].",
)
@click.option("--C", "C", type=float, default=None, help="logreg: fix C instead of sweeping it.")
@click.option(
    "--scoring",
    type=click.Choice(["log_loss", "accuracy", "balanced_accuracy", "roc_auc"]),
    default=None,
    help="logreg: val score that chooses C [default: the head's, log_loss].",
)
@click.option(
    "--refit-on-val", is_flag=True, default=None, help="logreg: refit on train+val with the chosen C."
)
@click.option("--epochs", type=int, default=None, help="linear: epochs [default: the head's].")
@click.option("--lr", type=float, default=None, help="linear: SGD learning rate [default: the head's].")
@out_folder("Run folder", "runs/DATASET/MODEL-WEIGHTS/cached-HEAD")
@n_boot_option
@run_options
@json_option
@api_errors
def fit_head_cmd(
    ctx,
    data,
    model,
    weights,
    image_size,
    seed,
    cache_file,
    head,
    blocks,
    ignore_views,
    tta,
    adapt,
    threshold,
    out_dir,
    n_boot,
    as_json,
    **options,
):
    """Fit a head on cached features (extracting them first if needed) and evaluate it."""
    with api_imports():
        from xfeat.config import parse_threshold_rule
        from xfeat.fitting import fit_head

    if threshold is not None:
        parse_threshold_rule(threshold)  # before any extraction
    head_params = head_params_from_flags(head, {k: options.pop(k) for k in _HEAD_FLAGS})
    from xfeat.heads import head_options

    if "seed" in head_options()[head]:
        head_params["seed"] = seed
    data = data_spec(data, options)
    extract_options = cache_source(
        ctx, data, cache_file, {**options, "tta": tta}, image_size=image_size, seed=seed
    )
    if cache_file:
        extraction = {
            "--layers": options.get("layers") != "penultimate",
            "--views": bool(options.get("views")),
            "--precision": options.get("precision") != "fp32",
        }
        given = [flag for flag, set_ in extraction.items() if set_]
        if given:
            raise click.UsageError(
                f"{', '.join(given)} choose what to extract, and --cache "
                "gives features already extracted; use --blocks to pick "
                "blocks of the cache, or --data to extract"
            )
    cache_file = list(cache_file) if len(cache_file) > 1 else (cache_file[0] if cache_file else None)
    if "=" in str(weights):  # a per-model mapping: the models it leaves out are pretrained
        weights = parse_weights(weights, [m for m in model.split("+") if m], others=PRETRAINED)
    result = fit_head(
        data,
        model,
        weights=weights,
        cache=cache_file,
        head=head,
        blocks=blocks.split(",") if blocks else None,
        use_views=not ignore_views,
        tta=tta,
        adapt=adapt,
        threshold=threshold,
        head_params=head_params,
        out_dir=out_dir,
        n_boot=n_boot,
        extract_options=extract_options,
    )
    click.echo(json.dumps(result.record.to_dict(), indent=2) if as_json else result.table())


@cli.command("predict")
@click.option(
    "--head",
    "head_path",
    required=True,
    type=click.Path(dir_okay=False),
    help="A head.npz written by fit-head, or a model.pt written by finetune.",
)
@click.argument("images", nargs=-1, required=True, type=click.Path())
@click.option(
    "--out",
    "out_csv",
    type=click.Path(dir_okay=False),
    default="predictions.csv",
    show_default=True,
    help="CSV: path, probability per class, predicted class, threshold and rule, geometry, "
    "input_check, ood_score, ood, error.",
)
@click.option("--weights", default=None, help="Where the head's weights file is now, if it moved.")
@click.option(
    "--tta",
    default=None,
    metavar="flip|crops|flip,crops",
    help="Average the features of these test-time views with the centre crop's.",
)
@click.option(
    "--adapt",
    type=click.Choice(PREDICT_ADAPTATIONS),
    default=None,
    help="TRANSDUCTIVE: adapt to the images given (at least 20), their labels unused.",
)
@click.option(
    "--geometry",
    type=click.Choice(GEOMETRY_CHOICES),
    default="match",
    show_default=True,
    help="match: an image whose aspect ratio differs from the training images' (when those "
    "share one) is first resized to their size or aspect, as they were; as-recorded: the "
    "recorded preprocessing on the image as it is.",
)
@click.option(
    "--frame",
    type=click.IntRange(min=0),
    default=None,
    help="DICOM files: the frame of multi-frame files to read (0 is the first) "
    "[default: the one the features were made from].",
)
@click.option(
    "--compile",
    is_flag=True,
    help="Compile the backbone ahead of time (kept in the cache folder for later "
    "runs; the first compilation pays off for thousands of images).",
)
@predict_run_options
@json_option
@click.pass_context
@api_errors
def predict_cmd(
    ctx, head_path, images, out_csv, weights, tta, adapt, geometry, frame, compile, as_json, **options
):
    """Classify image files or folders with a saved head and its backbone."""
    with api_imports():
        from xfeat.prediction import predict

    rows = predict(
        head_path,
        images,
        out_csv=out_csv,
        weights=weights,
        tta=tta,
        adapt=adapt,
        geometry=geometry,
        frame=frame,
        compile=compile,
        progress=ctx.obj["progress"],
        **options,
    )
    if as_json:
        click.echo(dumps(rows))
        return
    failed = [r for r in rows if r["error"]]
    counts = {}
    for r in rows:
        if r["predicted"]:
            counts[r["predicted"]] = counts.get(r["predicted"], 0) + 1
    click.echo(
        f"{len(rows)} images -> {out_csv}: "
        + ", ".join(f"{c} {n}" for c, n in sorted(counts.items()))
        + (f"; {len(failed)} unreadable (see the error column)" if failed else "")
    )


@cli.command("zero-shot")
@click.pass_context
@optional_data_options
@model_options
@click.option(
    "--prompts",
    multiple=True,
    required=True,
    metavar="CLASS=TEXT",
    help="A class and a text describing it, e.g. 'NORMAL=a chest x-ray with no findings'; "
    "every class needs one, and several for a class are averaged.",
)
@click.option(
    "--cache",
    "cache_file",
    type=click.Path(dir_okay=False),
    default=None,
    help="Use this feature cache (.h5).",
)
@click.option(
    "--threshold",
    default=None,
    help="Two classes: 0.5 on the softmax (the most similar class; fixed, no labels used) "
    "[default], or a rule chosen on val (youden, sensitivity:0.95: uses val labels).",
)
@out_folder("Run folder", "runs/DATASET/MODEL-WEIGHTS/zero-shot")
@n_boot_option
@run_options
@json_option
@api_errors
def zero_shot_cmd(
    ctx,
    data,
    model,
    weights,
    image_size,
    seed,
    prompts,
    cache_file,
    threshold,
    out_dir,
    n_boot,
    as_json,
    **options,
):
    """Zero-shot baseline: classify by similarity to class prompts (a text tower: open_clip:,
    CLIP/SigLIP hf:); results.json like fit-head's, no training labels used."""
    with api_imports():
        from xfeat.zeroshot import zero_shot

    data = data_spec(data, options)
    extract_options = cache_source(ctx, data, cache_file, options, image_size=image_size, seed=seed)
    result = zero_shot(
        data,
        model,
        prompts=list(prompts),
        weights=weights,
        cache=cache_file,
        threshold=threshold,
        out_dir=out_dir,
        n_boot=n_boot,
        extract_options=extract_options,
    )
    click.echo(json.dumps(result.record.to_dict(), indent=2) if as_json else result.table())
