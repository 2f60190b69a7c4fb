"""Where a backbone's weights come from: random init, torchvision's, or a local file.

``resolve_weights`` turns a ``--weights`` value into a :class:`WeightsInfo` (what the cache key
records) without reading or downloading anything; ``download_state_dict`` prefers a verified
local copy of torchvision's file (:mod:`.offline`) to the network; ``load_state_dict_into``
checks a state dict against the architecture key by key, so a file for another model is a
clear error.
"""

from __future__ import annotations

import logging
import os
import urllib.error
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from xfeat.errors import BackboneError, WeightsUnavailableError
from xfeat.files import sha256_file

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WeightsInfo:
    """Where a backbone's weights come from; ``id`` is what the cache key records."""

    # "random" | "torchvision" | "file" | "torchscript" (inside the model's file) | "timm"
    # | "hf" (a transformers checkpoint) | "open_clip"
    kind: str
    # "random(seed=0)" | "ResNet50_Weights.IMAGENET1K_V2" | file path | "resnet18.a1_in1k"
    id: str
    sha256: Optional[str] = None  # of the file, when there is one
    url: Optional[str] = None

    @property
    def tag(self) -> str:
        """Short name for folders and file names: random, IMAGENET1K_V2, or the file's stem."""
        return weights_tag(self.kind, self.id)

    def key(self) -> dict:
        # A file is identified by its content, not by where it lies.
        by_content = self.kind in ("file", "torchscript")
        return {
            "kind": self.kind,
            "id": None if by_content else self.id,
            "sha256": self.sha256,
            "url": self.url,
        }

    @property
    def is_random(self) -> bool:
        return self.kind == "random"


def weights_tag(kind: str, weights_id: str) -> str:
    """Short name of a weights record: random, IMAGENET1K_V1 (torchvision), a1_in1k (a timm
    tag), or a file's stem."""
    if kind == "random":
        return "random"
    if kind in ("torchvision", "timm"):
        return str(weights_id).rsplit(".", 1)[-1]
    return Path(str(weights_id)).stem


def resolve(
    value: Union[str, Path, None], *, enum=None, seed: int = 0, model: str = "", digest_memo=None
):
    """``(WeightsInfo, torchvision weights entry or None)`` for a ``--weights`` value.

    ``none`` (random init, seeded), a name of ``enum`` (``DEFAULT``, ``IMAGENET1K_V1``), or a
    local file (its digest remembered in the folder ``digest_memo``, when given). Never
    downloads.
    """
    value = "none" if value is None else str(value)
    if value.lower() in ("none", "random"):
        return WeightsInfo("random", f"random(seed={seed})"), None
    if enum is not None and value in enum.__members__:
        w = enum[value]
        return WeightsInfo("torchvision", f"{type(w).__name__}.{w.name}", url=w.url), w
    path = Path(value).expanduser()
    if path.is_file():
        return (
            WeightsInfo("file", str(path.resolve()), sha256=sha256_file(path, digest_memo)),
            None,
        )
    looks_like_path = os.sep in value or value.endswith((".pth", ".pt", ".bin", ".ckpt", ".safetensors"))
    names = list(enum.__members__) if enum is not None else []
    raise BackboneError(
        f"--weights {value!r}: "
        + ("no such file" if looks_like_path else "not understood")
        + "; expected 'none'"
        + (f", one of {names} for {model}" if names else "")
        + ", or the path of a state-dict file"
    )


def download_state_dict(url: str, *, name: str, weights_id: str, progress: bool = True):
    """``(state dict, sha256)`` of torchvision's weights file ``url``.

    A verified local copy (torch hub's folder, a weights package) is used without touching
    the network; otherwise the file is downloaded into torch hub's folder once.
    """
    from torch.hub import load_state_dict_from_url

    from xfeat.backbones import offline

    file_name = url.rsplit("/", 1)[-1]
    local, sha, searched = offline.find_weights_file(file_name)
    if local is not None:
        logger.info("%s for %s: %s (sha256 %s)", weights_id, name, local, sha[:12])
        return read_state_dict_file(local), sha
    try:
        state = load_state_dict_from_url(
            url, progress=progress, check_hash=True, map_location="cpu", weights_only=True
        )
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        hint, others = offline.install_hint(file_name), offline.available_for(name)
        raise WeightsUnavailableError(
            f"could not download {weights_id} for {name} from {url} ({exc}); xfeat looked "
            f"for {file_name} in: {'; '.join(searched)}. "
            + (f"Available offline for {name}: --weights {' or '.join(others)}. " if others else "")
            + "If this machine is offline, "
            + (f"install the package that ships it, {hint}, or " if hint else "")
            + f"download {file_name} on a connected machine and either pass it with "
            f"--weights /path/to/{file_name} or copy it to "
            f"{offline.hub_checkpoints_dir() / file_name} (`xfeat weights` lists what is "
            "available offline); --weights none builds a random network instead (timing only)"
        ) from None
    file_path = offline.hub_checkpoints_dir() / file_name
    return state, (sha256_file(file_path) if file_path.is_file() else None)


def read_state_dict_file(path: Path) -> dict:
    """Tensors from a ``torch.save``d state dict or a ``.safetensors`` file (never unpickles
    code)."""
    try:
        if Path(path).suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise BackboneError(
            f"cannot read weights file {path} as a state dict of tensors ({first[:200]}). "
            "xfeat loads weights with torch.load(weights_only=True) and never runs pickled "
            "code: if the file holds a whole pickled model, load it where it was made and "
            "save model.state_dict() instead; a TorchScript file goes to --model "
            "torchscript:PATH"
        ) from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise BackboneError(
            f"weights file {path} does not hold a state dict (a mapping of parameter names to tensors)"
        )
    prefix = "module."  # saved from DataParallel / DDP
    if obj and all(k.startswith(prefix) for k in obj):
        obj = {k[len(prefix) :]: v for k, v in obj.items()}
    return obj


def load_state_dict_into(model: nn.Module, state: dict, *, classifier_path: str, source: str) -> None:
    """Load ``state`` into ``model``, key by key; the classifier's keys may be missing."""
    expected = model.state_dict()
    classifier_keys = {k for k in expected if k.startswith(classifier_path + ".")}
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise BackboneError(
            f"{source}: {len(unexpected)} keys do not belong to "
            f"{type(model).__name__}, e.g. {unexpected[:3]}; is this file for "
            "another model?"
        )
    for key, value in state.items():
        if key in classifier_keys:
            continue
        if tuple(value.shape) != tuple(expected[key].shape):
            raise BackboneError(
                f"{source}: {key} has shape {tuple(value.shape)} but "
                f"{type(model).__name__} expects {tuple(expected[key].shape)}; "
                "is this file for another model or variant?"
            )
    missing = sorted(set(expected) - set(state) - classifier_keys)
    if missing:
        raise BackboneError(
            f"{source}: {len(missing)} backbone keys are missing, e.g. "
            f"{missing[:3]}; expected a complete state dict for this model"
        )
    state = {k: v for k, v in state.items() if k not in classifier_keys}
    model.load_state_dict(state, strict=False)
    logger.info("loaded %d tensors from %s", len(state), source)
