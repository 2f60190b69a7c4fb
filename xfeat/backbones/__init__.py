"""Backbones: a name -> a network whose forward gives ``(N, D)`` penultimate features.

Owns the registry (every torchvision classifier), which layer is the classifier, the feature
dimension ``D``, how weights are resolved (random, torchvision's, a local file) and the
preprocessing that travels with them. ``create_backbone`` is the one factory.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from ..errors import BackboneError, WeightsUnavailableError
from . import torchvision_models as tv
from .preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from .weights import WeightsInfo, weights_tag

logger = logging.getLogger(__name__)

__all__ = ["Backbone", "BackboneError", "IMAGENET_MEAN", "IMAGENET_STD", "Preprocessing",
           "WeightsInfo", "WeightsUnavailableError", "create_backbone", "default_preprocessing",
           "describe_backbones", "feature_dim", "list_backbones", "min_input_size",
           "parameter_count", "resolve_weights", "weights_tag"]


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
        return tv.classifier_of(self.name)[2]


def list_backbones() -> list:
    """Names of every torchvision classification model."""
    return list(tv.names())


def feature_dim(name: str) -> int:
    """Penultimate feature dimension ``D`` of model ``name``."""
    tv.check_name(name)
    return tv.classifier_of(name)[1]


def min_input_size(name: str) -> int:
    return tv.min_input_size(name)


def parameter_count(name: str) -> int:
    """Parameters of model ``name`` with its original classifier, counted without building it."""
    return tv.parameter_count(name)


def describe_backbones() -> list:
    """One dict per model: name, feature_dim, parameters (millions), weights names."""
    return tv.describe()


def resolve_weights(name: str, weights: Union[str, Path, None], *, seed: int = 0):
    """``(WeightsInfo, torchvision weights entry or None)`` for a ``--weights`` value.

    Accepts ``none`` (random init, seeded), ``DEFAULT`` or an enum name such as
    ``IMAGENET1K_V1``, or a path to a local state-dict file. Never downloads.
    """
    from torchvision.models import get_model_weights

    from . import weights as w

    tv.check_name(name)
    return w.resolve(weights, enum=get_model_weights(name), seed=seed, model=name)


def default_preprocessing(name: str, tv_weights=None) -> Preprocessing:
    """The preprocessing of ``tv_weights``, else of the model's DEFAULT weights, else ImageNet's."""
    from torchvision.models import get_model_weights

    w = tv_weights
    if w is None:
        enum = get_model_weights(name)
        w = enum.DEFAULT if "DEFAULT" in enum.__members__ else None
    return Preprocessing() if w is None else Preprocessing.from_transforms(w.transforms())


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
    from . import weights as w

    info, tv_weights = resolve_weights(name, weights, seed=seed)
    preprocessing = default_preprocessing(name, tv_weights).with_size(image_size)
    with torch.random.fork_rng(devices=[]):  # seeded init, caller's RNG stream untouched
        torch.manual_seed(seed)
        model = tv.build(name)
    path, dim, _ = tv.classifier_of(name)
    if info.kind == "torchvision":
        state, sha = w.download_state_dict(tv_weights.url, name=name, weights_id=info.id,
                                           progress=progress)
        info = WeightsInfo(info.kind, info.id, sha256=sha, url=info.url)
        w.load_state_dict_into(model, state, classifier_path=path,
                               source=f"torchvision weights {info.id}")
    elif info.kind == "file":
        w.load_state_dict_into(model, w.read_state_dict_file(Path(info.id)),
                               classifier_path=path, source=info.id)
    _set_submodule(model, path, nn.Identity())
    model.eval()
    return Backbone(name, model, dim, path, preprocessing, info)


def _set_submodule(model: nn.Module, path: str, layer: nn.Module) -> None:
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, attr, layer)
