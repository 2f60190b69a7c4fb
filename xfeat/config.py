"""Every default in one place, as frozen dataclasses the API, the CLI and the records share.

Importing this module costs nothing (no torch, no numpy), so ``xfeat --help`` reads its
option defaults from here. A run records the dataclass it ran with (``asdict``), and a
checkpoint resumes only with the same training fields.
"""

from __future__ import annotations

import numbers
import os
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Optional, Sequence, Union

from xfeat.errors import ConfigError

# Kermany file names: person123_bacteria_456.jpeg, IM-0115-0001.jpeg, NORMAL2-IM-0381-0001.jpeg.
DEFAULT_GROUP_PATTERN = r"^(person\d+|(?:NORMAL\d+-)?IM-\d+)[_-]"
FEATURE_DTYPES = ("float32", "float16")
# How an image becomes the resize_size square whose centre crop the network sees:
#   crop    short side to resize_size, centre square (torchvision's Resize + CenterCrop)
#   stretch the whole image to resize_size x resize_size, aspect ratio not kept (the images
#           of a data set that was squashed to a square; transformers' ViT processors)
#   pad     letterbox to a square on black (aspect ratio kept, nothing cut), then resize
RESIZE_MODES = ("crop", "stretch", "pad")
PRETRAINED = "DEFAULT"  # --weights on the command line: each architecture's pretrained weights
UNCERTAIN_POLICIES = ("ignore", "zeros", "ones")  # CheXpert's U-Ignore, U-Zeros, U-Ones
HEAD_NAMES = ("logreg", "linear", "knn")
FINETUNE_MODES = ("full", "frozen", "lp-ft")
COMPARE_MODES = ("cached", "frozen", "full", "lp-ft")
RECIPES = ("tutorial", "modern")
AMP_CHOICES = ("auto", "bf16", "none")
PRECISIONS = ("fp32", "int8")
COMPILE_CHOICES = ("auto", "on", "off")
FIT_ADAPTATIONS = ("standardize", "coral", "em")  # transductive, see xfeat.heads.adaptation
PREDICT_ADAPTATIONS = ("standardize", "em")
# predict: bring an image whose aspect ratio differs from the training images' to their geometry
# first ("match"), or apply the recorded preprocessing to it as it is ("as-recorded").
GEOMETRY_CHOICES = ("match", "as-recorded")
# DICOM: how a file's values are shown (see xfeat.data.dicom) and which tag names the patient
DICOM_WINDOWS = ("file", "minmax", "none")
DICOM_GROUPS = ("PatientID", "StudyInstanceUID")
FINETUNE_ADAPTATIONS = ("adabn",)
INT8_CALIBRATION_IMAGES = 256
DEFAULT_THRESHOLD = "youden"
DEFAULT_N_BOOT = 1000
DEFAULT_RUNS_DIR = "runs"
# How a foundation model's tokens become one vector (hf: models; see xfeat.backbones.hf_models):
#   cls       the CLS token as the model pools it (DINOv2, RAD-DINO: pooler_output)
#   mean      the mean of the last layer's patch tokens
#   cls+mean  both side by side (DINOv2's linear evaluation)
#   embed     the projected image embedding (CLIP-style towers: image_embeds)
POOLS = ("cls", "mean", "cls+mean", "embed")
POOL_SUFFIX = ":pool="  # hf:NAME:pool=mean; "+" is spelled "_" there (fit-head joins models with +)
TRUST_SUFFIX = ":trust_remote_code"  # hf:NAME:trust_remote_code: --trust-remote-code, recorded


def default_cache_dir() -> Path:
    """``$XFEAT_CACHE`` if set, else ``./cache``."""
    return Path(os.environ.get("XFEAT_CACHE", "cache"))


@dataclass(frozen=True)
class DataSpec:
    """Which images, with which labels, in which splits: the one data argument of every command.

    ``source`` is a folder ``ROOT/{train,val,test}/CLASS/*``, a MedMNIST-style ``.npz`` or a
    built-in name. When the data have no val split (or one under 50 images), val is carved
    out of train: ``val_fraction`` of it, stratified by class, seeded by ``split_seed``, whole
    patient groups only (``group_pattern``'s first group on a file name is the patient id;
    ``None`` or ``""`` groups nothing).

    A label table (a ``.csv``, ``.tsv`` or ``.jsonl`` file, or a folder with a
    ``metadata.csv``/``metadata.jsonl``: see :mod:`xfeat.data.tables`) is read through its
    columns: ``image_col`` (image paths, relative to the table), ``label_col`` (class names),
    ``split_col`` (train/val/test; used when the table has it) and ``patient_col`` (when given,
    the patient of each image groups the carve-out instead of ``group_pattern``). A DICOM file
    that neither names is grouped by its ``dicom_group`` tag (``PatientID`` or
    ``StudyInstanceUID``).

    Multi-label tables: ``label_sep`` splits ``label_col`` into several labels (``"|"`` for NIH
    ChestX-ray14's ``Finding Labels``; ``negative_label`` such as ``"No Finding"`` means none),
    or ``label_cols`` names one column per label holding 1 / 0 / -1 (uncertain) / blank
    (unknown), as CheXpert does; ``uncertain`` maps -1 to unknown (``ignore``), 0 (``zeros``)
    or 1 (``ones``). Unknown entries count in no loss, metric or threshold choice.

    The CLI builds one from ``--data``, ``--val-fraction``, ``--split-seed``,
    ``--group-pattern``, ``--image-col``, ``--label-col``, ``--split-col`` and
    ``--patient-col``; the feature cache records it (``to_dict``), so later commands reload
    exactly the same data set (``from_dict``).
    """

    source: str
    val_fraction: float = 0.1
    split_seed: int = 0
    group_pattern: Optional[str] = DEFAULT_GROUP_PATTERN
    image_col: str = "file_name"
    label_col: str = "label"
    split_col: str = "split"
    patient_col: Optional[str] = None
    label_sep: Optional[str] = None
    negative_label: Optional[str] = None
    label_cols: Optional[tuple] = None
    uncertain: str = "ignore"
    dicom_group: str = "PatientID"

    VERSION = 3  # of the recorded dict (2: table columns, 3: multi-label); reads older records

    def __post_init__(self):
        object.__setattr__(self, "source", str(self.source))
        if not self.source:
            raise ConfigError("data source is empty; expected a folder, an .npz file or a built-in name")
        _check_number("val_fraction", self.val_fraction, low=0.0, low_open=True, high=1.0)
        if self.val_fraction is None or self.val_fraction >= 1.0:
            raise ConfigError(f"val_fraction={self.val_fraction!r}: expected a number in (0, 1)")
        _check_positive_int("split_seed", self.split_seed, minimum=0)
        if self.group_pattern == "":
            object.__setattr__(self, "group_pattern", None)
        for name in ("patient_col", "label_sep", "negative_label"):
            if getattr(self, name) == "":
                object.__setattr__(self, name, None)
        if isinstance(self.label_cols, str):
            object.__setattr__(self, "label_cols", tuple(c.strip() for c in self.label_cols.split(",")))
        if self.label_cols is not None:
            cols = tuple(self.label_cols)
            if not cols or not all(isinstance(c, str) and c for c in cols) or len(set(cols)) < len(cols):
                raise ConfigError(
                    f"label_cols={self.label_cols!r}: expected distinct column names, e.g. "
                    "'Atelectasis,Cardiomegaly,Edema'"
                )
            if self.label_sep is not None:
                raise ConfigError("give either label_cols (one column per label) or label_sep, not both")
            object.__setattr__(self, "label_cols", cols)
        if self.negative_label is not None and self.label_sep is None:
            raise ConfigError(
                f"negative_label={self.negative_label!r} applies to joined labels: give label_sep "
                "(--label-sep) too, or leave it out"
            )
        if self.uncertain not in UNCERTAIN_POLICIES:
            raise ConfigError(
                f"uncertain={self.uncertain!r}: expected one of {', '.join(UNCERTAIN_POLICIES)}"
            )
        if self.uncertain != "ignore" and self.label_cols is None:
            raise ConfigError(
                f"uncertain={self.uncertain!r} maps the -1 entries of label columns: give "
                "label_cols (--label-cols), or leave it out"
            )
        for name in ("image_col", "label_col", "split_col"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ConfigError(f"{name}={getattr(self, name)!r}: expected a column name")
        if self.dicom_group not in DICOM_GROUPS:
            raise ConfigError(
                f"dicom_group={self.dicom_group!r}: expected one of {', '.join(DICOM_GROUPS)}"
            )
        if self.group_pattern is not None:
            import re

            try:
                re.compile(self.group_pattern)
            except (re.error, TypeError) as exc:
                raise ConfigError(
                    f"group pattern {self.group_pattern!r} is not a valid regular expression: "
                    f"{exc}; give a regex whose first group is the patient id, or '' for none"
                ) from None

    @classmethod
    def coerce(cls, data) -> DataSpec:
        """``data`` as a spec: a :class:`DataSpec` itself, or a path or name with the defaults."""
        if isinstance(data, cls):
            return data
        if isinstance(data, (str, os.PathLike)):
            return cls(os.fspath(data))
        raise ConfigError(
            f"data={data!r}: expected a folder, an .npz file, a built-in name or a DataSpec"
        )

    def with_source(self, source) -> DataSpec:
        """The same recipe for data found elsewhere (a moved folder, a copy)."""
        return replace(self, source=os.fspath(source))

    def table_fields(self) -> dict:
        """The options that say how a label table is read (part of its content digest)."""
        names = ("image_col", "label_col", "split_col", "patient_col")
        multi = ("label_sep", "negative_label", "label_cols", "uncertain")
        fields_ = {k: getattr(self, k) for k in names}
        if self.multilabel:  # single-label tables keep their version-2 digest
            fields_.update({k: getattr(self, k) for k in multi})
        return fields_

    @property
    def multilabel(self) -> bool:
        """Whether a label table is read as several labels per image."""
        return self.label_sep is not None or self.label_cols is not None

    def to_dict(self) -> dict:
        """The record; ``dicom_group`` only when not ``PatientID``, so older records keep keys."""
        d = {"version": self.VERSION, **asdict(self)}
        if d["dicom_group"] == "PatientID":
            del d["dicom_group"]
        return d

    @classmethod
    def from_dict(cls, record: dict) -> DataSpec:
        version = record.get("version", 1)
        if version > cls.VERSION:
            raise ConfigError(
                f"a data record of version {version} was written by a newer xfeat (this one "
                f"reads up to {cls.VERSION}); upgrade xfeat"
            )
        values = {f.name: record[f.name] for f in fields(cls) if f.name in record}
        if values.get("label_cols") is not None:
            values["label_cols"] = tuple(values["label_cols"])
        return cls(**values)


@dataclass(frozen=True)
class ExtractConfig:
    """What determines the cached features, and how the pass runs."""

    model: str = "resnet18"
    weights: str = "none"
    image_size: Optional[int] = None
    feature_dtype: str = "float32"
    seed: int = 0
    batch_size: int = 64
    num_workers: Optional[int] = None
    device: Optional[str] = None


@dataclass(frozen=True)
class FinetuneConfig:
    """One fine-tuning run: the training recipe and how it is evaluated.

    ``mode``: ``full`` trains every layer; ``frozen`` only a new last layer with the backbone
    forward every epoch (the transfer-learning tutorial's "fixed feature extractor"; as in the
    tutorial the network runs in train mode, so BatchNorm statistics adapt); ``lp-ft`` starts
    that layer from the logistic probe on the cached features, then trains all.

    ``recipe``: ``tutorial`` (the PyTorch transfer-learning tutorial: SGD lr 1e-3, momentum
    0.9, StepLR 7 / 0.1, no weight decay) or ``modern`` (AdamW, lr 1e-3 for the new layer and
    ``backbone_lr_scale`` 0.1 of it for the backbone, weight decay 0.05, linear warm-up for
    ``warmup_epochs`` then cosine decay to 0, label smoothing 0.1). ``None`` fields take the
    recipe's value; :meth:`resolved` fills them in.

    ``adapt="adabn"``: *transductive*: the test split is evaluated after re-estimating the
    BatchNorm statistics on its images (labels unused); train and val are not affected.
    """

    mode: str = "full"
    recipe: str = "tutorial"
    epochs: int = 25
    lr: Optional[float] = None
    momentum: float = 0.9
    step_size: int = 7
    gamma: float = 0.1
    weight_decay: Optional[float] = None
    warmup_epochs: Optional[int] = None
    label_smoothing: Optional[float] = None
    backbone_lr_scale: Optional[float] = None
    batch_size: int = 32
    max_train_images: Optional[int] = None
    threshold: str = DEFAULT_THRESHOLD
    amp: str = "auto"
    channels_last: Optional[bool] = None
    compile: bool = False
    seed: int = 0
    n_boot: int = DEFAULT_N_BOOT
    probe: Optional[str] = None
    adapt: Optional[str] = None

    # Fields that do not change the trained network: a checkpoint resumes across them.
    _NOT_TRAINING = ("threshold", "n_boot", "adapt")
    _RECIPE_DEFAULTS = {
        "tutorial": {
            "lr": 1e-3,
            "weight_decay": 0.0,
            "warmup_epochs": 0,
            "label_smoothing": 0.0,
            "backbone_lr_scale": 1.0,
        },
        "modern": {
            "lr": 1e-3,
            "weight_decay": 0.05,
            "warmup_epochs": 1,
            "label_smoothing": 0.1,
            "backbone_lr_scale": 0.1,
        },
    }

    def __post_init__(self):
        _check_choice("mode", self.mode, FINETUNE_MODES)
        _check_choice("recipe", self.recipe, RECIPES)
        _check_choice("amp", self.amp, AMP_CHOICES)
        for name in ("epochs", "batch_size", "step_size"):
            _check_positive_int(name, getattr(self, name))
        if self.max_train_images is not None:
            _check_positive_int("max_train_images", self.max_train_images, minimum=2)
        if self.warmup_epochs is not None:
            _check_positive_int("warmup_epochs", self.warmup_epochs, minimum=0)
        _check_number("lr", self.lr, low=0.0, low_open=True)
        for name in ("momentum", "gamma", "weight_decay"):
            _check_number(name, getattr(self, name), low=0.0)
        _check_number("label_smoothing", self.label_smoothing, low=0.0, high=1.0)
        _check_number("backbone_lr_scale", self.backbone_lr_scale, low=0.0)
        if self.probe is not None and self.mode != "lp-ft":
            raise ConfigError(f"probe={self.probe!r} applies to mode 'lp-ft' only, not {self.mode!r}")
        if self.adapt not in (None, "adabn"):
            raise ConfigError(
                f"adapt={self.adapt!r}: a fine-tuned network takes 'adabn' "
                "(BatchNorm statistics re-estimated on the test images, "
                "transductive)"
            )
        parse_threshold_rule(self.threshold)

    def resolved(self) -> FinetuneConfig:
        """A copy with every ``None`` recipe field set to the recipe's value."""
        defaults = self._RECIPE_DEFAULTS[self.recipe]
        return replace(self, **{k: v for k, v in defaults.items() if getattr(self, k) is None})

    def to_dict(self) -> dict:
        return asdict(self)

    def training_key(self) -> dict:
        """The fields that determine the trained network (a resumed run must match them)."""
        return {k: v for k, v in asdict(self.resolved()).items() if k not in self._NOT_TRAINING}

    def with_options(self, **options) -> FinetuneConfig:
        """A copy with some fields replaced; an unknown name is a :class:`ConfigError`."""
        unknown = sorted(set(options) - {f.name for f in fields(self)})
        if unknown:
            raise ConfigError(
                f"unknown fine-tuning options {unknown}; expected some of "
                f"{sorted(f.name for f in fields(self))}"
            )
        return replace(self, **options)


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r}: expected one of {', '.join(choices)}")


def _check_positive_int(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name}={value!r}: expected an integer >= {minimum}")


def _check_number(name: str, value, *, low=None, high=None, low_open=False) -> None:
    if value is None:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        bounds = (f" {'>' if low_open else '>='} {low}" if low is not None else "") + (
            f" and <= {high}" if high is not None else ""
        )
        raise ConfigError(f"{name}={value!r}: expected a number{bounds}")


# Decision-threshold rules (``youden``, ``0.5``, ``sensitivity:0.95``), parsed without numpy so
# options are validated before any work starts; xfeat.evaluation.metrics.choose_threshold
# applies a rule.
RULE_HELP = (
    "expected 'youden', a probability in (0, 1) such as 0.5, or "
    "'sensitivity:T' / 'specificity:T' with T in (0, 1]"
)


def parse_threshold_rule(rule):
    """Validate a threshold rule; return ``'youden'``, a float in (0, 1), or a normalised
    ``'sensitivity:<target>'`` / ``'specificity:<target>'`` string (target in (0, 1])."""
    if isinstance(rule, numbers.Real) and not isinstance(rule, bool):
        if 0.0 < rule < 1.0:
            return float(rule)
        raise ConfigError(f"threshold rule {rule!r}: a fixed threshold must lie in (0, 1)")
    if isinstance(rule, str):
        text = rule.strip().lower()
        if text == "youden":
            return text
        kind, sep, value = text.partition(":")
        if sep and kind in ("sensitivity", "specificity"):
            target = _to_float(value)
            if target is not None and 0.0 < target <= 1.0:
                return f"{kind}:{target!r}"
            raise ConfigError(
                f"threshold rule {rule!r}: the {kind} target must be a number "
                f"in (0, 1], e.g. '{kind}:0.95'"
            )
        number = _to_float(text)
        if number is not None:
            if 0.0 < number < 1.0:
                return number
            raise ConfigError(f"threshold rule {rule!r}: a fixed threshold must lie in (0, 1)")
    raise ConfigError(f"threshold rule {rule!r} not understood; {RULE_HELP}")


def _to_float(text):
    try:
        return float(text)
    except ValueError:
        return None


def parse_weights(
    weights: Union[str, dict, None], models: Sequence[str], *, others: str = "none"
) -> dict:
    """``"W"`` for every model, or ``"m1=W1,m2=W2"`` (the ``others``: ``none``, or
    ``DEFAULT`` from the command line) -> model -> weights."""
    if isinstance(weights, dict):
        return {m: weights.get(m, others) for m in models}
    text = "none" if weights is None else str(weights)
    pairs = [p for p in text.split(",") if p]
    if pairs and all("=" in p for p in pairs):
        mapping = {}
        for pair in pairs:
            # the longest model name the pair starts with: hf:NAME:pool=mean=none names
            # hf:NAME:pool=mean
            named = [m for m in models if pair.startswith(m + "=")]
            if named:
                model = max(named, key=len)
                value = pair[len(model) + 1 :]
            else:
                model, _, value = pair.partition("=")
            if model not in models:
                raise ConfigError(
                    f"--weights names model {model!r}, which is not in --models {list(models)}"
                )
            mapping[model] = value
        return {m: mapping.get(m, others) for m in models}
    return {m: text for m in models}


def with_pool(model: str, pool: Optional[str]) -> str:
    """``model`` with ``--pool`` recorded in its name (``hf:NAME:pool=mean``), so every command
    that rebuilds the backbone from the name (predict, finetune) pools the same way."""
    if not pool:
        return model
    if pool not in POOLS:
        raise ConfigError(f"--pool {pool!r}: expected one of {', '.join(POOLS)}")
    if "+" in model or not model.startswith("hf:"):
        raise ConfigError(
            f"--pool {pool} with --model {model}: --pool is for one hf:NAME model; "
            "the others pool as their architecture does"
        )
    base = model.split(POOL_SUFFIX, 1)[0]
    return f"{base}{POOL_SUFFIX}{pool.replace('+', '_')}"


def with_trusted_code(model: str) -> str:
    """``model`` with ``--trust-remote-code`` recorded in its name (before any ``:pool=``)."""
    if not model.startswith("hf:") or "+" in model:
        raise ConfigError(f"--trust-remote-code with --model {model}: it is for one hf:NAME model")
    if TRUST_SUFFIX in model:
        return model
    base, sep, pool = model.partition(POOL_SUFFIX)
    return f"{base}{TRUST_SUFFIX}{sep}{pool}"
