"""The keyword options of ``extract``: those that shape the features (the plan, and so the
cache key) and those that only say how the pass runs. Torch-free, so that a request can be
looked up before anything heavy is imported."""

from __future__ import annotations

from xfeat.errors import ConfigError

_PLAN_OPTIONS = (
    "cache_dir",
    "image_size",
    "resize_size",
    "mean",
    "std",
    "resize_mode",
    "dicom_window",
    "dicom_frame",
    "feature_dtype",
    "seed",
    "layers",
    "views",
    "tta",
    "precision",
)
_RUN_OPTIONS = (
    "batch_size",
    "num_workers",
    "device",
    "skip_bad",
    "force",
    "progress",
    "compile",
    "channels_last",
)


def split_extract_options(options: dict) -> tuple:
    """``extract`` keyword options -> (those of ``plan_extraction``, those of the run)."""
    unknown = set(options) - set(_PLAN_OPTIONS) - set(_RUN_OPTIONS)
    if unknown:
        raise ConfigError(
            f"unknown extract options {sorted(unknown)}; expected some of "
            f"{sorted(_PLAN_OPTIONS + _RUN_OPTIONS)}"
        )
    return (
        {k: v for k, v in options.items() if k in _PLAN_OPTIONS},
        {k: v for k, v in options.items() if k in _RUN_OPTIONS},
    )


# The values plan_extraction takes when an option is not given: a request that spells a
# default out is the same request as one that leaves it out.
PLAN_DEFAULTS = {
    "seed": 0,
    "layers": "penultimate",
    "views": 0,
    "precision": "fp32",
    "feature_dtype": "float32",
    "skip_bad": False,
    "dicom_window": "file",
}


def shaping_options(options: dict) -> dict:
    """The options that shape the features, without those left at their defaults."""
    return {
        k: v
        for k, v in options.items()
        if k in _PLAN_OPTIONS + ("skip_bad", "batch_size")
        and k != "cache_dir"
        and v not in (None, "", (), [])
        and not (k in PLAN_DEFAULTS and v == PLAN_DEFAULTS[k])
    }
