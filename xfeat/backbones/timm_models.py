"""timm backbones: ``timm:NAME`` (``timm:resnet18``, ``timm:convnext_tiny.fb_in1k``) when timm is
installed (``pip install 'xfeat[timm]'``).

timm builds the network with ``num_classes=0``, so it returns ``(N, D)`` pooled features; the
preprocessing comes from the model's ``pretrained_cfg`` (``input_size``, ``crop_pct``, mean,
std, interpolation), as ``timm.data.resolve_data_config`` reads it. Weights: ``none`` (random,
seeded), a local state-dict file in timm's layout (``.pth``, ``.bin`` or ``.safetensors``, read
and checked key by key like any other), or ``DEFAULT``: timm's pretrained weights, from the
Hugging Face cache when they are there, else downloaded; offline, a clear error at once.
"""

from __future__ import annotations

import functools
import logging
import math
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch

from xfeat.backbones import offline
from xfeat.backbones import weights as w
from xfeat.backbones.preprocessing import IMAGENET_MEAN, IMAGENET_STD, INTERPOLATIONS, Preprocessing
from xfeat.errors import BackboneError, WeightsUnavailableError

logger = logging.getLogger(__name__)

PREFIX = "timm:"
_HF_FILES = ("model.safetensors", "pytorch_model.bin")


def handles(name: str) -> bool:
    return name.startswith(PREFIX)


def _timm(name: str):
    try:
        import timm
    except ImportError:
        raise BackboneError(
            f"--model {name} needs timm, which is not installed; install it "
            "with `pip install 'xfeat[timm]'`"
        ) from None
    return timm


def _arch(name: str) -> str:
    return name[len(PREFIX) :]


@functools.cache
def _describe(name: str) -> dict:
    """Feature dimension, parameters, classifier and pretrained_cfg, from the architecture
    built on the meta device (no memory, no initialisation)."""
    timm, arch = _timm(name), _arch(name)
    if not timm.is_model(arch):
        stem = arch.split(".")[0]
        close = timm.list_models(f"*{stem[:5]}*")[:6]
        raise BackboneError(
            f"unknown timm model {arch!r}"
            + (f"; did you mean one of {close}?" if close else "")
            + " (timm.list_models() lists them)"
        )
    try:
        with torch.device("meta"):
            model = timm.create_model(arch, pretrained=False)
    except RuntimeError as exc:  # e.g. an unknown pretrained tag
        raise BackboneError(f"timm model {arch!r}: {exc}") from None
    classifier = model.pretrained_cfg.get("classifier")
    return {
        "feature_dim": int(getattr(model, "head_hidden_size", None) or model.num_features),
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "classifier": classifier,
        "cfg": dict(model.pretrained_cfg),
    }


def check_name(name: str) -> None:
    _describe(name)


def feature_dim(name: str) -> int:
    return _describe(name)["feature_dim"]


def parameter_count(name: str) -> int:
    """Parameters with the original classifier, counted on the meta device."""
    return _describe(name)["parameters"]


def min_input_size(name: str) -> int:
    cfg = _describe(name)["cfg"]
    if cfg.get("fixed_input_size"):
        return int(cfg["input_size"][-1])
    return max(32, int((cfg.get("min_input_size") or (3, 32, 32))[-1]))


def resolve_weights(name: str, weights, *, seed: int = 0, digest_memo=None) -> tuple:
    """``(WeightsInfo, None)`` for ``none``, ``DEFAULT`` or a local file; never downloads."""
    cfg = _describe(name)["cfg"]
    value = "none" if weights is None else str(weights)
    if value.lower() in ("none", "random"):
        return w.WeightsInfo("random", f"random(seed={seed})"), None
    if value == "DEFAULT":
        source = cfg.get("hf_hub_id") or cfg.get("url")
        if not source:
            raise BackboneError(
                f"timm has no pretrained weights for {_arch(name)}; use --weights none or --weights PATH"
            )
        tag = f"{cfg['architecture']}.{cfg['tag']}" if cfg.get("tag") else cfg["architecture"]
        return w.WeightsInfo("timm", tag, url=source), None
    path = Path(value).expanduser()
    if path.is_file():
        return w.WeightsInfo("file", str(path.resolve()), sha256=w.sha256_file(path, digest_memo)), None
    raise BackboneError(
        f"--weights {value!r} for {name}: no such file; expected 'none', "
        "'DEFAULT' (timm's pretrained weights) or the path of a state-dict "
        "file (.pth, .bin, .safetensors)"
    )


def default_preprocessing(name: str, extra=None) -> Preprocessing:
    """From ``pretrained_cfg``: crop ``input_size``, resize ``floor(crop / crop_pct)``."""
    cfg = _describe(name)["cfg"]
    crop = int(cfg.get("input_size", (3, 224, 224))[-1])
    resize = int(math.floor(crop / float(cfg.get("crop_pct") or 0.875)))
    interpolation = cfg.get("interpolation", "bilinear")
    if interpolation not in INTERPOLATIONS:
        interpolation = "bilinear"
    if cfg.get("crop_mode", "center") != "center":
        logger.warning(
            "%s: timm's crop_mode %r; xfeat resizes the short side and centre-crops",
            name,
            cfg["crop_mode"],
        )
    return Preprocessing(
        max(resize, crop),
        crop,
        tuple(cfg.get("mean", IMAGENET_MEAN)),
        tuple(cfg.get("std", IMAGENET_STD)),
        interpolation,
    )


def build(name: str, info: w.WeightsInfo, extra=None, *, progress: bool = True) -> tuple:
    """``(model returning (N, D), info, (classifier path, D, "linear"))``; seed the RNG first."""
    timm, arch, d = _timm(name), _arch(name), _describe(name)
    path = d["classifier"]
    if not isinstance(path, str):
        raise BackboneError(
            f"timm model {arch} has several classifier heads {path}; xfeat supports models with one"
        )
    if info.kind == "timm":
        model, info = _pretrained(timm, name, info)
    else:
        model = timm.create_model(arch, pretrained=False, num_classes=0)
        if info.kind == "file":
            state = {
                k: v
                for k, v in w.read_state_dict_file(Path(info.id)).items()
                if not k.startswith(path + ".")
            }
            w.load_state_dict_into(model, state, classifier_path=path, source=info.id)
    return model, info, (path, d["feature_dim"], "linear")


def _pretrained(timm, name: str, info: w.WeightsInfo) -> tuple:
    """timm's pretrained network: from a local copy if there is one, else downloaded."""
    cfg = _describe(name)["cfg"]
    local = _local_copy(cfg)
    if local is not None:
        logger.info("timm weights %s: %s", info.id, local)
        # source "" makes timm read the file instead of asking the hub first.
        model = timm.create_model(
            info.id,
            pretrained=True,
            num_classes=0,
            pretrained_cfg_overlay={"file": str(local), "source": ""},
        )
        return model, w.WeightsInfo("timm", info.id, sha256=offline.file_sha256(local), url=info.url)
    host = _host(cfg)
    try:
        if not _reachable(host):
            raise OSError(f"cannot resolve {host}")
        model = timm.create_model(info.id, pretrained=True, num_classes=0)
    except Exception as exc:  # hub and network errors come in many types
        raise WeightsUnavailableError(
            f"could not download timm's weights {info.id} from {info.url} ({exc}); if this "
            f"machine is offline, download them on a connected machine (e.g. "
            f"model.safetensors from https://huggingface.co/{cfg.get('hf_hub_id')}) and pass "
            f"--weights /path/to/model.safetensors"
        ) from None
    local = _local_copy(cfg)
    return model, w.WeightsInfo(
        "timm", info.id, url=info.url, sha256=offline.file_sha256(local) if local else None
    )


def _local_copy(cfg: dict):
    """The weights file in the Hugging Face cache (or torch hub's folder), if it is there."""
    hub_id = cfg.get("hf_hub_id")
    if hub_id:
        from huggingface_hub import try_to_load_from_cache

        for file_name in _HF_FILES:
            found = try_to_load_from_cache(hub_id, file_name)
            if isinstance(found, str):
                return Path(found)
    if cfg.get("url"):
        path = offline.hub_checkpoints_dir() / cfg["url"].rsplit("/", 1)[-1]
        return path if path.is_file() else None
    return None


def _host(cfg: dict) -> str:
    if cfg.get("hf_hub_id"):
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            return ""
        return urlparse(constants.ENDPOINT).hostname or ""
    return urlparse(cfg.get("url", "")).hostname or ""


def _reachable(host: str) -> bool:
    """Whether ``host`` resolves: offline, the hub client would retry for a minute."""
    if not host:
        return False
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return False
    return True
