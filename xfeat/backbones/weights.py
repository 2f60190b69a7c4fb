"""Where a backbone's weights come from: random init, torchvision's, or a local file.

``resolve_weights`` turns a ``--weights`` value into a :class:`WeightsInfo` (what the cache key
records) without reading or downloading anything; ``load_state_dict_into`` checks a state dict
against the architecture key by key, so a file for another model is a clear error.
"""
from __future__ import annotations

import hashlib
import logging
import os
import urllib.error
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from ..errors import BackboneError, WeightsUnavailableError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WeightsInfo:
    """Where a backbone's weights come from; ``id`` is what the cache key records."""

    kind: str  # "random" | "torchvision" | "file"
    id: str  # "random(seed=0)" | "ResNet50_Weights.IMAGENET1K_V2" | file path
    sha256: Optional[str] = None  # of the file, when there is one
    url: Optional[str] = None

    @property
    def tag(self) -> str:
        """Short name for folders and file names: random, IMAGENET1K_V2, or the file's stem."""
        return weights_tag(self.kind, self.id)

    def key(self) -> dict:
        # A file is identified by its content, not by where it lies.
        return {"kind": self.kind, "id": None if self.kind == "file" else self.id,
                "sha256": self.sha256, "url": self.url}

    @property
    def is_random(self) -> bool:
        return self.kind == "random"


def weights_tag(kind: str, weights_id: str) -> str:
    if kind == "random":
        return "random"
    if kind == "torchvision":
        return str(weights_id).rsplit(".", 1)[-1]
    return Path(str(weights_id)).stem


def resolve(value: Union[str, Path, None], *, enum=None, seed: int = 0, model: str = ""):
    """``(WeightsInfo, torchvision weights entry or None)`` for a ``--weights`` value.

    ``none`` (random init, seeded), a name of ``enum`` (``DEFAULT``, ``IMAGENET1K_V1``), or a
    local file. Never downloads.
    """
    value = "none" if value is None else str(value)
    if value.lower() in ("none", "random"):
        return WeightsInfo("random", f"random(seed={seed})"), None
    if enum is not None and value in enum.__members__:
        w = enum[value]
        return WeightsInfo("torchvision", f"{type(w).__name__}.{w.name}", url=w.url), w
    path = Path(value).expanduser()
    if path.is_file():
        return WeightsInfo("file", str(path.resolve()), sha256=sha256_file(path)), None
    looks_like_path = os.sep in value or value.endswith((".pth", ".pt", ".bin", ".ckpt",
                                                         ".safetensors"))
    names = list(enum.__members__) if enum is not None else []
    raise BackboneError(
        f"--weights {value!r}: " + ("no such file" if looks_like_path else "not understood") +
        "; expected 'none'" + (f", one of {names} for {model}" if names else "") +
        ", or the path of a state-dict file")


def download_state_dict(url: str, *, name: str, weights_id: str, progress: bool = True):
    """torchvision's weights file (from torch hub's folder, or downloaded there once)."""
    from torch.hub import get_dir, load_state_dict_from_url

    file_name = url.rsplit("/", 1)[-1]
    try:
        state = load_state_dict_from_url(url, progress=progress, check_hash=True,
                                         map_location="cpu", weights_only=True)
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        raise WeightsUnavailableError(
            f"could not download {weights_id} for {name} from {url} ({exc}). If this machine is "
            f"offline, download {file_name} on a connected machine and either pass it with "
            f"--weights /path/to/{file_name} or copy it to "
            f"{Path(get_dir()) / 'checkpoints' / file_name}") from None
    file_path = Path(get_dir()) / "checkpoints" / file_name
    return state, (sha256_file(file_path) if file_path.is_file() else None)


def read_state_dict_file(path: Path) -> dict:
    """Tensors from a ``torch.save``d state dict (never unpickles code)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise BackboneError(
            f"cannot read weights file {path} as a state dict of tensors ({first[:200]}). "
            "xfeat loads weights with torch.load(weights_only=True) and never runs pickled "
            "code: if the file holds a whole pickled model, load it where it was made and "
            "save model.state_dict() instead; a TorchScript file goes to --model "
            "torchscript:PATH") from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise BackboneError(f"weights file {path} does not hold a state dict (a mapping of "
                            "parameter names to tensors)")
    prefix = "module."  # saved from DataParallel / DDP
    if obj and all(k.startswith(prefix) for k in obj):
        obj = {k[len(prefix):]: v for k, v in obj.items()}
    return obj


def load_state_dict_into(model: nn.Module, state: dict, *, classifier_path: str,
                         source: str) -> None:
    """Load ``state`` into ``model``, key by key; the classifier's keys may be missing."""
    expected = model.state_dict()
    classifier_keys = {k for k in expected if k.startswith(classifier_path + ".")}
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise BackboneError(f"{source}: {len(unexpected)} keys do not belong to "
                            f"{type(model).__name__}, e.g. {unexpected[:3]}; is this file for "
                            "another model?")
    for key, value in state.items():
        if key in classifier_keys:
            continue
        if tuple(value.shape) != tuple(expected[key].shape):
            raise BackboneError(f"{source}: {key} has shape {tuple(value.shape)} but "
                                f"{type(model).__name__} expects {tuple(expected[key].shape)}; "
                                "is this file for another model or variant?")
    missing = sorted(set(expected) - set(state) - classifier_keys)
    if missing:
        raise BackboneError(f"{source}: {len(missing)} backbone keys are missing, e.g. "
                            f"{missing[:3]}; expected a complete state dict for this model")
    state = {k: v for k, v in state.items() if k not in classifier_keys}
    model.load_state_dict(state, strict=False)
    logger.info("loaded %d tensors from %s", len(state), source)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
