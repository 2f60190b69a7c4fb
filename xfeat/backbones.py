"""Backbone registry: every torchvision classifier by name, its classifier stripped.

Owns name -> builder, which layer is the classifier, the feature dimension ``D``, how weights
are resolved (torchvision's, random, or a local file) and the preprocessing that travels with
them. ``create_backbone`` returns a model whose forward gives ``(N, D)`` penultimate features.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import urllib.error
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
import torchvision
from PIL import Image
from torch import nn
from torchvision.models import get_model_builder, get_model_weights, list_models

from .errors import BackboneError, WeightsUnavailableError  # noqa: F401  (re-exported)

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Architectures whose input size is fixed or bounded below (others run at 32 px).
_MIN_INPUT_SIZE = {"alexnet": 64, "inception_v3": 75, "googlenet": 32, "squeezenet1_0": 48,
                   "squeezenet1_1": 48, "maxvit_t": 224}
_FIXED_INPUT_SIZE = ("vit_", "maxvit_")
_PIL_INTERPOLATION = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
                      "nearest": Image.NEAREST, "lanczos": Image.LANCZOS}


@dataclass(frozen=True)
class Preprocessing:
    """Resize the short side, centre-crop, scale to [0, 1], normalise. Part of every cache key."""

    resize_size: int = 256
    crop_size: int = 224
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    interpolation: str = "bilinear"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    def resize_square(self, image: Image.Image) -> np.ndarray:
        """Short side to ``resize_size``, centre square: ``(R, R, 3)`` uint8 (the train store)."""
        w, h = image.size
        size = self.resize_size
        scale = size / min(w, h)
        new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
        if (new_w, new_h) != (w, h):
            image = image.resize((new_w, new_h), _PIL_INTERPOLATION[self.interpolation],
                                 reducing_gap=None)
        left, top = (new_w - size) // 2, (new_h - size) // 2
        return np.array(image.crop((left, top, left + size, top + size)), dtype=np.uint8)

    def center_crop(self, square: np.ndarray) -> np.ndarray:
        """The centre ``crop_size`` square of a ``(R, R, ...)`` array."""
        o = (square.shape[0] - self.crop_size) // 2
        return square[o:o + self.crop_size, o:o + self.crop_size]

    def resize_and_crop(self, image: Image.Image) -> np.ndarray:
        """RGB PIL image -> ``(crop, crop, 3)`` uint8, exactly the store's eval view."""
        return np.ascontiguousarray(self.center_crop(self.resize_square(image)))

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        """``(N, 3, H, W)`` uint8 -> float32 normalised with ``mean`` / ``std``."""
        mean = torch.tensor(self.mean, device=batch.device).view(1, 3, 1, 1) * 255.0
        std = torch.tensor(self.std, device=batch.device).view(1, 3, 1, 1) * 255.0
        return (batch.float() - mean) / std

    def with_size(self, crop_size: Optional[int], resize_size: Optional[int] = None):
        """The same preprocessing at another crop size, keeping the resize/crop ratio."""
        if crop_size is None:
            return self
        if resize_size is None:
            resize_size = int(round(crop_size * self.resize_size / self.crop_size))
        return Preprocessing(resize_size, crop_size, self.mean, self.std, self.interpolation)


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


def weights_tag(kind: str, weights_id: str) -> str:
    return {"random": "random", "torchvision": str(weights_id).rsplit(".", 1)[-1],
            "file": Path(str(weights_id)).stem}[kind]


@dataclass
class Backbone:
    """A feature extractor: ``model(x)`` returns ``(N, feature_dim)``."""

    name: str
    model: nn.Module
    feature_dim: int
    classifier_path: str
    preprocessing: Preprocessing
    weights: WeightsInfo

    def new_classifier(self, n_classes: int) -> nn.Module:
        """A fresh classifier of the architecture's kind: ``Linear(D, C)``, or for SqueezeNet
        the ``Conv2d(D, C, 1)`` it ends with. Its ``weight`` holds ``C x D`` numbers."""
        if self.classifier_kind == "conv":
            return nn.Conv2d(self.feature_dim, n_classes, kernel_size=1)
        return nn.Linear(self.feature_dim, n_classes)

    def replace_classifier(self, layer: nn.Module) -> None:
        """Install ``layer`` where the stripped classifier was (used by fine-tuning)."""
        _set_submodule(self.model, self.classifier_path, layer)

    @property
    def classifier_kind(self) -> str:
        return _classifier_of(self.name)[2]


# --------------------------------------------------------------------------- registry

def list_backbones() -> list:
    """Names of every torchvision classification model."""
    return list(_all_names())


@functools.lru_cache(maxsize=1)
def _all_names() -> tuple:
    return tuple(sorted(list_models(module=torchvision.models)))


def _check_name(name: str) -> None:
    if name not in _all_names():
        close = [n for n in list_backbones() if n.startswith(name.split("_")[0][:4])]
        hint = f"; did you mean one of {close[:6]}?" if close else ""
        raise BackboneError(f"unknown model {name!r}{hint} (`xfeat models` lists all "
                            f"{len(list_backbones())})")


@functools.lru_cache(maxsize=None)
def _classifier_of(name: str) -> tuple:
    """(path, feature_dim, "linear" | "conv") of the final classifier, on the meta device."""
    return _describe_classifier(_build_empty(name))


def _describe_classifier(model: nn.Module) -> tuple:
    path, layer = _last_classifier_layer(model)
    if isinstance(layer, nn.Linear):
        return path, layer.in_features, "linear"
    return path, layer.in_channels, "conv"


def _build(name: str) -> nn.Module:
    kwargs = {}
    if name in ("googlenet", "inception_v3"):
        # No auxiliary heads: they are training-only classifiers, not features.
        kwargs = {"aux_logits": False, "init_weights": True}
    return get_model_builder(name)(weights=None, **kwargs)


def _build_empty(name: str) -> nn.Module:
    """The architecture with parameters on the meta device: no memory, no initialisation."""
    with _no_init():
        try:
            with torch.device("meta"):
                return _build(name)
        except (NotImplementedError, RuntimeError):
            pass  # regnets compute their widths with real tensors: move parameters instead
        register = nn.Module.register_parameter

        def register_on_meta(module, param_name, param):
            register(module, param_name, param)
            if param is not None:
                module._parameters[param_name] = nn.Parameter(param.to("meta"),
                                                              param.requires_grad)

        nn.Module.register_parameter = register_on_meta
        try:
            return _build(name)
        finally:
            nn.Module.register_parameter = register


@contextlib.contextmanager
def _no_init():
    """Make torch.nn.init's in-place initialisers no-ops (initialising meta tensors is slow)."""
    names = [n for n in dir(nn.init) if n.endswith("_") and not n.startswith("_")]
    saved = {n: getattr(nn.init, n) for n in names}
    for n in names:
        setattr(nn.init, n, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(nn.init, n, f)


def _last_classifier_layer(model: nn.Module):
    # torchvision registers the classifier last; squeezenet's is a 1x1 convolution.
    last = None
    for path, module in model.named_modules():
        if isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and
                                             path.startswith("classifier")):
            last = (path, module)
    if last is None:
        raise BackboneError(f"cannot find the classifier layer of {type(model).__name__}")
    return last


def feature_dim(name: str) -> int:
    """Penultimate feature dimension ``D`` of model ``name``."""
    _check_name(name)
    return _classifier_of(name)[1]


def min_input_size(name: str) -> int:
    """Smallest square input the architecture accepts (224 for fixed-size transformers)."""
    if name.startswith(_FIXED_INPUT_SIZE):
        return 224
    return _MIN_INPUT_SIZE.get(name, 32)


def parameter_count(name: str) -> int:
    """Parameters of model ``name`` with its original classifier, counted without building it."""
    _check_name(name)
    return int(sum(p.numel() for p in _build_empty(name).parameters()))


def describe_backbones() -> list:
    """One dict per model: name, feature_dim, parameters (millions), weights names."""
    rows = []
    for name in list_backbones():
        model = _build_empty(name)
        n_params = sum(p.numel() for p in model.parameters())
        rows.append({"name": name, "feature_dim": _describe_classifier(model)[1],
                     "params_m": round(n_params / 1e6, 1),
                     "weights": [w for w in get_model_weights(name).__members__ if w != "DEFAULT"]})
    return rows


# --------------------------------------------------------------------------- weights

def resolve_weights(name: str, weights: Union[str, Path, None], *, seed: int = 0):
    """(WeightsInfo, torchvision weights enum or None) for a ``--weights`` value.

    Accepts ``none`` (random init, seeded), ``DEFAULT`` or an enum name such as
    ``IMAGENET1K_V1``, or a path to a local state-dict file. Never downloads.
    """
    _check_name(name)
    enum = get_model_weights(name)
    value = "none" if weights is None else str(weights)
    if value.lower() in ("none", "random"):
        return WeightsInfo("random", f"random(seed={seed})"), None
    if value in enum.__members__:
        w = enum[value]
        return WeightsInfo("torchvision", f"{type(w).__name__}.{w.name}", url=w.url), w
    path = Path(value).expanduser()
    if path.is_file():
        return WeightsInfo("file", str(path.resolve()), sha256=_sha256(path)), None
    looks_like_path = os.sep in value or value.endswith((".pth", ".pt", ".bin", ".ckpt"))
    raise BackboneError(
        f"--weights {value!r}: " + ("no such file" if looks_like_path else "not understood") +
        f"; expected 'none', one of {list(enum.__members__)} for {name}, or a path to a "
        "state-dict file")


def default_preprocessing(name: str, tv_weights=None) -> Preprocessing:
    """The preprocessing of ``tv_weights``, else of the model's DEFAULT weights, else ImageNet's."""
    w = tv_weights
    if w is None:
        enum = get_model_weights(name)
        w = enum.DEFAULT if "DEFAULT" in enum.__members__ else None
    if w is None:
        return Preprocessing()
    t = w.transforms()
    return Preprocessing(int(t.resize_size[0]), int(t.crop_size[0]), tuple(t.mean), tuple(t.std),
                         t.interpolation.value.lower())


def create_backbone(name: str, weights: Union[str, Path, None] = "none", *,
                    image_size: Optional[int] = None, seed: int = 0,
                    progress: bool = True) -> Backbone:
    """Build ``name`` with ``weights`` and strip its classifier so it returns features.

    Parameters
    ----------
    name : any torchvision classification model (``list_backbones()``).
    weights : ``"none"`` (random init, seeded by ``seed``), ``"DEFAULT"`` / ``"IMAGENET1K_V1"``
        (torchvision's, downloaded once), or the path of a local state-dict file (classifier
        keys may be missing).
    image_size : crop size override (the resize keeps the weights' ratio), e.g. for tiny tests.
    """
    info, tv_weights = resolve_weights(name, weights, seed=seed)
    preprocessing = default_preprocessing(name, tv_weights).with_size(image_size)
    with torch.random.fork_rng(devices=[]):  # seeded init, caller's RNG stream untouched
        torch.manual_seed(seed)
        model = _build(name)
    if info.kind == "torchvision":
        state, sha = _download_state_dict(tv_weights.url, name=name, weights_id=info.id,
                                          progress=progress)
        info = WeightsInfo(info.kind, info.id, sha256=sha, url=info.url)
        _load_state_dict(model, state, source=f"torchvision weights {info.id}")
    elif info.kind == "file":
        _load_state_dict(model, _read_state_dict_file(Path(info.id)), source=info.id)
    path, dim, _ = _classifier_of(name)
    _set_submodule(model, path, nn.Identity())
    model.eval()
    return Backbone(name, model, dim, path, preprocessing, info)


def _download_state_dict(url: str, *, name: str, weights_id: str, progress: bool = True):
    from torch.hub import get_dir, load_state_dict_from_url

    try:
        state = load_state_dict_from_url(url, progress=progress, check_hash=True,
                                         map_location="cpu", weights_only=True)
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        file_name = url.rsplit("/", 1)[-1]
        raise WeightsUnavailableError(
            f"could not download {weights_id} for {name} from {url} ({exc}). If this machine is "
            f"offline, download {file_name} on a connected machine and either pass it with "
            f"--weights /path/to/{file_name} or copy it to "
            f"{Path(get_dir()) / 'checkpoints' / file_name}") from None
    file_path = Path(get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]
    return state, (_sha256(file_path) if file_path.is_file() else None)


def _read_state_dict_file(path: Path) -> dict:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file
        raise BackboneError(f"cannot read weights file {path} as a PyTorch state dict "
                            f"(torch.load with weights_only=True): {exc}") from None
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


def _load_state_dict(model: nn.Module, state: dict, *, source: str) -> None:
    expected = model.state_dict()
    classifier_path = _last_classifier_layer(model)[0]
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


def _set_submodule(model: nn.Module, path: str, layer: nn.Module) -> None:
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, attr, layer)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
