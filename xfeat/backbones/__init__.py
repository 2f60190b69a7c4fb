"""Backbones: a name -> a network whose forward gives ``(N, D)`` penultimate features.

Owns the registry and dispatches on the name: a torchvision classifier (``resnet50``,
:mod:`.torchvision_models`), ``timm:NAME`` (:mod:`.timm_models`), ``torchscript:PATH`` or a
registered TorchScript network such as ``inception_v3_fid`` (:mod:`.torchscript_models`).
Each source says which layer is the classifier, the feature dimension ``D``, how weights are
resolved (random, pretrained, a local file) and the preprocessing that travels with them;
``hf:NAME_OR_DIR`` is a transformers image tower (:mod:`.hf_models`), ``open_clip:ARCH`` an
open_clip one (:mod:`.open_clip_models`);
:mod:`.offline` finds weight files on this machine. ``create_backbone`` is the one factory.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from xfeat.backbones import hf_models, offline, open_clip_models, timm_models, torchscript_models
from xfeat.backbones import torchvision_models as tv
from xfeat.backbones.preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from xfeat.backbones.weights import WeightsInfo, weights_tag
from xfeat.errors import BackboneError, WeightsUnavailableError

logger = logging.getLogger(__name__)

__all__ = [
    "Backbone",
    "BackboneError",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Preprocessing",
    "WeightsInfo",
    "WeightsUnavailableError",
    "create_backbone",
    "default_preprocessing",
    "describe_backbones",
    "feature_dim",
    "list_backbones",
    "min_input_size",
    "normalize_name",
    "offline_weights",
    "parameter_count",
    "resolve_weights",
    "check_text_tower",
    "text_tower",
    "weights_tag",
]


@dataclass
class Backbone:
    """A feature extractor: ``model(x)`` returns ``(N, feature_dim)``.

    ``classifier_path`` names the stripped last layer (an ``Identity`` now), where fine-tuning
    installs a new one; ``trainable`` is False for a module without trainable parameters
    (a frozen TorchScript file), which only the new last layer can be trained on top of.
    """

    name: str
    model: nn.Module
    feature_dim: int
    classifier_path: str
    preprocessing: Preprocessing
    weights: WeightsInfo
    classifier_kind: str = "linear"  # or "conv": SqueezeNet ends with a 1x1 convolution
    trainable: bool = True

    def new_classifier(self, n_classes: int) -> nn.Module:
        """A fresh classifier of the architecture's kind: ``Linear(D, C)``, or for SqueezeNet
        the ``Conv2d(D, C, 1)`` it ends with. Its ``weight`` holds ``C x D`` numbers."""
        if self.classifier_kind == "conv":
            return nn.Conv2d(self.feature_dim, n_classes, kernel_size=1)
        return nn.Linear(self.feature_dim, n_classes)

    def replace_classifier(self, layer: nn.Module) -> None:
        """Install ``layer`` where the stripped classifier was (used by fine-tuning)."""
        set_submodule(self.model, self.classifier_path, layer)

    def check_trainable(self, mode: str) -> None:
        """A clear error if fine-tuning mode ``mode`` needs parameters the network lacks."""
        if not self.trainable:
            raise BackboneError(
                f"{self.name} cannot be fine-tuned with mode {mode!r}: its module has no "
                "trainable parameters (frozen with torch.jit.freeze, or requires_grad=False); "
                "use mode 'frozen' (train the new last layer only) or fit a head on the cached "
                "features, or save the module without freezing it"
            )


def _source(name: str):
    """The module that builds ``name``: transformers, timm, TorchScript or torchvision."""
    if not isinstance(name, str):
        raise BackboneError(f"model {name!r}: expected a name such as 'resnet50'")
    if hf_models.handles(name):
        return hf_models
    if open_clip_models.handles(name):
        return open_clip_models
    if timm_models.handles(name):
        return timm_models
    if torchscript_models.handles(name):
        return torchscript_models
    return tv


def normalize_name(name: str) -> str:
    """The name as recorded: ``torchscript:`` and ``hf:`` paths made absolute, others unchanged."""
    if hf_models.handles(name):
        return hf_models.normalize_name(name)
    if open_clip_models.handles(name):
        return open_clip_models.normalize_name(name)
    if torchscript_models.handles(name):
        return torchscript_models.normalize_name(name)
    return name


def list_backbones() -> list:
    """Every torchvision classification model, then the registered TorchScript networks whose
    package is installed; any ``timm:NAME`` and ``torchscript:PATH`` work too."""
    return list(tv.names()) + torchscript_models.available_registered()


def feature_dim(name: str) -> int:
    """Penultimate feature dimension ``D`` of model ``name``."""
    return _source(name).feature_dim(name)


def min_input_size(name: str) -> int:
    """Smallest square input the architecture accepts (its only one, if fixed)."""
    return _source(name).min_input_size(name)


def parameter_count(name: str) -> int:
    """Parameters of model ``name`` with its original classifier, counted without building it
    (a TorchScript file is loaded)."""
    return _source(name).parameter_count(name)


def describe_backbones() -> list:
    """One dict per model: name, feature_dim, parameters (millions), weights names, source."""
    return (
        [{**row, "source": "torchvision"} for row in tv.describe()]
        + torchscript_models.describe()
        + hf_models.describe()
        + open_clip_models.describe()
    )


def resolve_weights(name: str, weights: Union[str, Path, None], *, seed: int = 0, digest_memo=None):
    """``(WeightsInfo, torchvision weights entry or None)`` for a ``--weights`` value.

    Accepts ``none`` (random init, seeded), ``DEFAULT`` or, for torchvision, an enum name such
    as ``IMAGENET1K_V1``, or a path to a local state-dict file (its sha256 remembered in the
    folder ``digest_memo`` by path, size and modification time, when given); a TorchScript
    model takes ``none`` only (its weights are inside its file). Never downloads.
    """
    return _source(name).resolve_weights(name, weights, seed=seed, digest_memo=digest_memo)


def default_preprocessing(name: str, tv_weights=None) -> Preprocessing:
    """The preprocessing of the weights: torchvision's ``transforms()`` (of ``tv_weights``,
    else of the DEFAULT weights), timm's ``pretrained_cfg``, a TorchScript file's sidecar
    JSON; ImageNet's when there is nothing to read it from."""
    return _source(name).default_preprocessing(name, tv_weights)


def offline_weights() -> dict:
    """The weights available without a network (:func:`.offline.offline_weights`), plus
    ``hf_cache``: the models in the local Hugging Face cache (``hf:REPO`` works offline)."""
    return {**offline.offline_weights(), "hf_cache": hf_models.cached_models()}


def create_backbone(
    name: str,
    weights: Union[str, Path, None] = "none",
    *,
    image_size: Optional[int] = None,
    seed: int = 0,
    progress: bool = True,
) -> Backbone:
    """Build ``name`` with ``weights`` and strip its classifier so it returns features.

    Parameters
    ----------
    name : a torchvision classification model (``list_backbones()``), ``timm:NAME`` (with
        timm installed), ``torchscript:PATH``, or a registered TorchScript network
        (``inception_v3_fid``).
    weights : ``"none"`` (random init, seeded by ``seed``), ``"DEFAULT"`` / ``"IMAGENET1K_V1"``
        (torchvision's: a verified local copy, else downloaded once; timm's ``DEFAULT``), or
        the path of a local state-dict file (classifier keys may be missing).
    image_size : crop size override (the resize keeps the weights' ratio), e.g. for tiny tests.
    """
    source = _source(name)
    info, tv_weights = source.resolve_weights(name, weights, seed=seed)
    if info.kind == "random":
        logger.warning(
            "%s: random init (weights none): an untrained network, whose features time the "
            "pipeline but are useless for transfer learning; --weights DEFAULT is pretrained",
            name,
        )
    preprocessing = source.default_preprocessing(name, tv_weights).with_size(image_size)
    with torch.random.fork_rng(devices=[]):  # seeded init, caller's RNG stream untouched
        torch.manual_seed(seed)
        model, info, (path, dim, kind) = source.build(name, info, tv_weights, progress=progress)
    set_submodule(model, path, nn.Identity())
    model.eval()
    trainable = any(p.requires_grad for p in model.parameters())
    return Backbone(name, model, dim, path, preprocessing, info, kind, trainable)


def check_text_tower(name: str) -> None:
    """A one-line error unless ``name`` has a text tower zero-shot can use (checked from the
    model's name and configuration: nothing is extracted or loaded)."""
    source = _source(name)
    if not hasattr(source, "text_tower"):
        raise BackboneError(
            f"{name} has no text tower; zero-shot needs an open_clip: model or a CLIP/SigLIP hf: one"
        )
    if hasattr(source, "check_text_tower"):
        source.check_text_tower(name)


def text_tower(name: str, weights: Union[str, Path, None] = "DEFAULT", *, seed: int = 0):
    """``(encode, logit_scale)`` of the text tower of ``name`` (an ``open_clip:`` model, or a
    CLIP/SigLIP ``hf:`` checkpoint): ``encode(prompts)`` gives ``(P, D)`` embeddings in the space
    of the model's image features, for zero-shot classification."""
    check_text_tower(name)
    source = _source(name)
    info, _ = source.resolve_weights(name, weights, seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return source.text_tower(name, info)


def set_submodule(model: nn.Module, path: str, layer: nn.Module) -> None:
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, attr, layer)
