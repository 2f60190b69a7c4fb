"""Shared click options. Defaults come from :mod:`xfeat.config`, so they are defined once."""

from __future__ import annotations

import functools
from dataclasses import fields
from typing import Optional

import click

from xfeat.config import (
    AMP_CHOICES,
    DEFAULT_N_BOOT,
    DEFAULT_THRESHOLD,
    DICOM_GROUPS,
    DICOM_WINDOWS,
    INT8_CALIBRATION_IMAGES,
    POOLS,
    PRECISIONS,
    PRETRAINED,
    RECIPES,
    RESIZE_MODES,
    UNCERTAIN_POLICIES,
    DataSpec,
    ExtractConfig,
    FinetuneConfig,
    with_pool,
    with_trusted_code,
)
from xfeat.errors import ConfigError


def not_empty(ctx, param, value):
    """An empty value (a command substitution that printed nothing) is refused, naming why."""
    if value is not None and not str(value).strip():
        raise click.BadParameter(
            "is empty: a command substitution that printed nothing gives that, such as "
            "$(hf download ...) without a connection (download once on a connected machine); "
            "pass DEFAULT, none, a weights name or a file"
        )
    return value


def out_folder(what: str, default_path: str):
    """``--out`` (``out_dir``): the folder a command writes, ``default_path`` when not given."""
    return click.option(
        "--out",
        "out_dir",
        type=click.Path(file_okay=False),
        default=None,
        help=f"{what} [default: {default_path}].",
    )


def default(cls, name: str):
    """The default of field ``name`` of dataclass ``cls``, without instantiating it."""
    return {f.name: f.default for f in fields(cls)}[name]


def apply(f, options):
    for option in reversed(options):
        f = option(f)
    return f


def data_options(f, required: bool = True):
    """--data and the validation carve-out recipe, plus the cache folder."""
    return apply(
        f,
        [
            click.option(
                "--data",
                "-d",
                required=required,
                metavar="PATH|NAME",
                help="Folder ROOT/{train,val,test}/CLASS/*, a label table (.csv, .tsv, .jsonl, "
                "or a folder with metadata.csv), a MedMNIST-style .npz, or a built-in name "
                "(pneumoniamnist, pneumoniamnist_224, ...).",
            ),
            click.option(
                "--val-fraction",
                type=float,
                show_default=True,
                default=default(DataSpec, "val_fraction"),
                help="Share of train carved out as val when val is missing or tiny.",
            ),
            click.option(
                "--split-seed",
                type=int,
                default=default(DataSpec, "split_seed"),
                show_default=True,
                help="Seed of the val carve-out.",
            ),
            click.option(
                "--group-pattern",
                default=default(DataSpec, "group_pattern"),
                show_default=True,
                help="Regex whose first group on a file name is the patient id (kept on "
                "one side of the split); '' disables grouping.",
            ),
            click.option(
                "--image-col",
                default=default(DataSpec, "image_col"),
                show_default=True,
                help="Label tables: the column of image paths (relative to the table).",
            ),
            click.option(
                "--label-col",
                default=default(DataSpec, "label_col"),
                show_default=True,
                help="Label tables: the column of class names (or of joined labels, with --label-sep).",
            ),
            click.option(
                "--label-sep",
                default=None,
                metavar="SEP",
                help="Label tables, multi-label: --label-col holds several labels joined by SEP "
                "(e.g. '|', as NIH ChestX-ray14's 'Finding Labels').",
            ),
            click.option(
                "--negative-label",
                default=None,
                metavar="NAME",
                help="With --label-sep: the label that means none (e.g. 'No Finding').",
            ),
            click.option(
                "--label-cols",
                default=None,
                metavar="A,B,C",
                help="Label tables, multi-label: one column per label holding 1, 0, -1 "
                "(uncertain) or blank (unknown), as CheXpert's.",
            ),
            click.option(
                "--uncertain",
                type=click.Choice(UNCERTAIN_POLICIES),
                default=default(DataSpec, "uncertain"),
                show_default=True,
                help="Multi-label: what -1 (uncertain) means: unknown (ignore, masked out of "
                "losses and metrics), 0 (zeros) or 1 (ones).",
            ),
            click.option(
                "--split-col",
                default=default(DataSpec, "split_col"),
                show_default=True,
                help="Label tables: the column of train/val/test (used when the table has it; "
                "without it every row is train and val is carved out).",
            ),
            click.option(
                "--patient-col",
                default=None,
                help="Label tables: the column of patient ids; a patient's images stay on one "
                "side of a carved val split [default: the patient id in the file names].",
            ),
            click.option(
                "--dicom-group",
                type=click.Choice(DICOM_GROUPS),
                default=None,
                help="DICOM files: the tag that groups a patient's images where neither "
                "--patient-col nor --group-pattern names one [default: PatientID].",
            ),
            click.option(
                "--cache-dir",
                type=click.Path(file_okay=False),
                default=None,
                help="Feature cache folder [default: $XFEAT_CACHE or ./cache].",
            ),
        ],
    )


def optional_data_options(f):
    """As :func:`data_options`, for commands that can take ``--cache`` instead."""
    return data_options(f, required=False)


def _pool_into_model(f):
    """``--pool`` and ``--trust-remote-code`` folded into ``--model`` (``hf:NAME:pool=mean``):
    the name then carries them to every command that rebuilds the backbone."""

    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        pool, trust = kwargs.pop("pool", None), kwargs.pop("trust_remote_code", False)
        try:
            if trust:
                kwargs["model"] = with_trusted_code(kwargs["model"])
            if pool:
                kwargs["model"] = with_pool(kwargs["model"], pool)
        except ConfigError as exc:
            raise click.BadParameter(str(exc), param_hint="--pool/--trust-remote-code") from None
        return f(*args, **kwargs)

    return wrapper


def model_options(f):
    """--model, --weights, --pool, --trust-remote-code, --image-size, --resize-size,
    --resize-mode, --mean, --std, --seed, and :func:`dicom_options`."""
    return apply(
        dicom_options(_pool_into_model(f)),
        [
            click.option(
                "--model",
                "-m",
                default=default(ExtractConfig, "model"),
                show_default=True,
                help="A torchvision classifier (`xfeat models` lists them), timm:NAME, "
                "torchscript:PATH (a module mapping images to (N, D); loading it runs the code "
                "it holds, so use files you trust), inception_v3_fid, or hf:NAME_OR_DIR (a "
                "transformers image tower: a hub name from the local cache, or a saved folder).",
            ),
            click.option(
                "--pool",
                type=click.Choice(POOLS),
                default=None,
                help="hf: models: how tokens become one vector: cls, mean (patch tokens), "
                "cls+mean, embed (projected image embedding) [default: DINOv2 and RAD-DINO "
                "cls (pooler_output), CLIP-style towers embed].",
            ),
            click.option(
                "--trust-remote-code",
                is_flag=True,
                help="hf: models: run the repository's own Python code (transformers' "
                "trust_remote_code; off by default: read the code first).",
            ),
            click.option(
                "--weights",
                "-w",
                default=PRETRAINED,
                show_default=True,
                callback=not_empty,
                help="DEFAULT: the architecture's pretrained weights (torchvision's DEFAULT, "
                "timm's pretrained tag, an hf: checkpoint's own); a torchvision weights name "
                "such as IMAGENET1K_V1; a local state-dict file; or none: random init, an "
                "untrained network (timing only). `xfeat weights` lists those available offline.",
            ),
            click.option(
                "--image-size",
                type=int,
                default=None,
                help="Crop size override [default: the weights' own, e.g. 224].",
            ),
            click.option(
                "--resize-size",
                type=int,
                default=None,
                help="Short side before the centre crop [default: the weights' own, or "
                "the crop's ratio kept].",
            ),
            click.option(
                "--resize-mode",
                type=click.Choice(RESIZE_MODES),
                default=None,
                help="How an image becomes the square that is centre-cropped: crop (short side, "
                "then the centre), stretch (the whole image to a square, aspect not kept: data "
                "squashed to a square), pad (letterboxed on black) [default: crop].",
            ),
            click.option(
                "--mean",
                type=float,
                nargs=3,
                default=None,
                metavar="R G B",
                help="Normalisation mean of x/255 [default: the weights' own].",
            ),
            click.option(
                "--std",
                type=float,
                nargs=3,
                default=None,
                metavar="R G B",
                help="Normalisation std of x/255 [default: the weights' own].",
            ),
            click.option(
                "--seed",
                type=int,
                default=default(ExtractConfig, "seed"),
                show_default=True,
                help="Seed of random initialisation (weights=none).",
            ),
        ],
    )


def dicom_options(f):
    """--dicom-window and --frame: how DICOM files are shown (part of the preprocessing)."""
    return apply(
        f,
        [
            click.option(
                "--dicom-window",
                type=click.Choice(DICOM_WINDOWS),
                default=None,
                help="DICOM files: file (the file's VOI LUT or window, else the image's range), "
                "minmax (the image's range), none (the range the header allows) [default: file].",
            ),
            click.option(
                "--frame",
                "dicom_frame",
                type=click.IntRange(min=0),
                default=None,
                help="DICOM files: the frame of a multi-frame file (0 is the first); without it "
                "a multi-frame file is an error.",
            ),
        ],
    )


def run_options(f, batch_size: Optional[int] = default(ExtractConfig, "batch_size")):
    """--batch-size (unless ``batch_size`` is None), --num-workers, --device."""
    options = [
        click.option(
            "--num-workers",
            type=int,
            default=None,
            help="Image decoders: threads on the CPU (extract, predict) [default: "
            "min(4, CPUs)], worker processes on a GPU and for training "
            "[default: min(4, CPUs - 1)].",
        ),
        click.option("--device", default=None, help="cpu, cuda, cuda:N [default: cuda if available]."),
    ]
    if batch_size is not None:
        options.insert(
            0,
            click.option(
                "--batch-size",
                "-b",
                type=int,
                default=batch_size,
                show_default=True,
                help="Images per forward pass.",
            ),
        )
    return apply(f, options)


def loader_options(f):
    """--num-workers, --device (the batch size is part of the training recipe)."""
    return run_options(f, batch_size=None)


def predict_run_options(f):
    return run_options(f, batch_size=32)


def threshold_option(f):
    return click.option(
        "--threshold",
        default=None,
        help="Two classes: youden, a probability such as 0.5, or sensitivity:0.95 / "
        f"specificity:0.9, chosen on val [default: {DEFAULT_THRESHOLD}]. With three classes or "
        "more the prediction is the most probable class, and --threshold is an error.",
    )(f)


def n_boot_option(f):
    return click.option(
        "--n-boot",
        type=int,
        default=DEFAULT_N_BOOT,
        show_default=True,
        help="Bootstrap resamples for the test confidence intervals.",
    )(f)


def json_option(f, what: str = "results.json"):
    return click.option("--json", "as_json", is_flag=True, help=f"Print {what} instead of the table.")(f)


def finetune_options(f):
    """The training recipe: every field of FinetuneConfig that a user sets."""
    d = lambda name: default(FinetuneConfig, name)  # noqa: E731
    return apply(
        f,
        [
            click.option("--epochs", type=int, default=d("epochs"), show_default=True),
            click.option("--batch-size", "-b", type=int, default=d("batch_size"), show_default=True),
            click.option(
                "--recipe",
                type=click.Choice(RECIPES),
                default=d("recipe"),
                show_default=True,
                help="tutorial: SGD + StepLR as in PyTorch's transfer-learning tutorial; "
                "modern: AdamW, warm-up + cosine, label smoothing, a 10x lower "
                "learning rate for the backbone.",
            ),
            click.option(
                "--lr",
                type=float,
                default=None,
                help="Learning rate (of the new layer) [default: the recipe's, 1e-3].",
            ),
            click.option("--momentum", type=float, default=d("momentum"), show_default=True),
            click.option(
                "--step-size",
                type=int,
                default=d("step_size"),
                show_default=True,
                help="StepLR: decay the learning rate every N epochs.",
            ),
            click.option("--gamma", type=float, default=d("gamma"), show_default=True),
            click.option(
                "--weight-decay",
                type=float,
                default=None,
                help="[default: the recipe's: tutorial 0, modern 0.05]",
            ),
            click.option(
                "--warmup-epochs",
                type=int,
                default=None,
                help="modern: linear warm-up epochs [default: 1].",
            ),
            click.option(
                "--label-smoothing",
                type=float,
                default=None,
                help="[default: the recipe's: tutorial 0, modern 0.1]",
            ),
            click.option(
                "--backbone-lr-scale",
                type=float,
                default=None,
                help="Backbone learning rate / new layer's [default: tutorial 1, modern 0.1].",
            ),
            click.option(
                "--amp",
                type=click.Choice(AMP_CHOICES),
                default=d("amp"),
                show_default=True,
                help="auto: bf16 autocast on CUDA, fp32 on CPU.",
            ),
            click.option(
                "--channels-last/--no-channels-last",
                default=None,
                help="Memory layout [default: channels_last where it is faster for the "
                "model family on this device].",
            ),
            click.option(
                "--compile", is_flag=True, help="torch.compile the network (slow first epoch)."
            ),
            click.option(
                "--max-train-images",
                type=int,
                default=None,
                help="Train on a stratified subset of train (quick runs).",
            ),
        ],
    )


def data_spec(data, options: dict):
    """``--data`` with the carve-out and table options (popped from ``options``) as one
    :class:`~xfeat.config.DataSpec`; None when ``--data`` is not given."""
    names = ("val_fraction", "split_seed", "group_pattern", "image_col", "label_col", "split_col")
    multi = ("patient_col", "label_sep", "negative_label", "label_cols", "uncertain")
    recipe = {k: options.pop(k) for k in (*names, *multi) if k in options}
    dicom_group = options.pop("dicom_group", None)
    if dicom_group is not None:
        recipe["dicom_group"] = dicom_group
    return DataSpec(data, **recipe) if data else None


def cache_source(ctx, data, cache_file, options: dict, *, image_size, seed) -> dict:
    """Check that --data or --cache is given; return ``extract``'s options from the rest."""
    if not data and not cache_file:
        raise click.UsageError("give --data (and --model/--weights) or --cache FILE.h5")
    extract_options = {
        **options,
        "image_size": image_size,
        "seed": seed,
        "progress": ctx.obj["progress"],
    }
    return {k: v for k, v in extract_options.items() if v is not None}


def feature_options(f):
    """What is cached besides the penultimate features of the centre crop."""
    return apply(
        f,
        [
            click.option(
                "--layers",
                default="penultimate",
                show_default=True,
                help="penultimate, stages (each stage's pooled output too), node names "
                "NODE,NODE (`xfeat nodes MODEL`), or for hf: models last:N (the CLS tokens of "
                "the last N blocks too); one forward pass.",
            ),
            click.option(
                "--views",
                type=int,
                default=0,
                show_default=True,
                help="Augmented views cached per train image (the fine-tuning "
                "augmentation, seeded); heads train on all of them.",
            ),
            click.option(
                "--tta",
                default=None,
                metavar="flip|crops|flip,crops",
                help="Test-time views of val and test to cache; fit-head averages the "
                "features of the centre crop and these views.",
            ),
            click.option(
                "--precision",
                type=click.Choice(PRECISIONS),
                default="fp32",
                show_default=True,
                help="int8: quantized CPU extraction (calibrated on "
                f"{INT8_CALIBRATION_IMAGES} train images).",
            ),
        ],
    )
