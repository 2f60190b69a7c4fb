"""torchvision's classifiers by name: build, find the classifier layer, feature dimension.

Feature dimensions and parameter counts come from the architecture built on the meta device
(no memory, no initialisation), so listing all models takes seconds and needs no weights.
Like the other sources (:mod:`.timm_models`, :mod:`.torchscript_models`), it provides
``resolve_weights``, ``default_preprocessing`` and ``build`` for :func:`create_backbone`.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
import torchvision
from torch import nn
from torch.overrides import TorchFunctionMode
from torchvision.models import get_model_builder, get_model_weights, list_models

from xfeat.backbones import weights as w
from xfeat.backbones.preprocessing import Preprocessing
from xfeat.errors import BackboneError

# Architectures whose input size is fixed or bounded below (others run at 32 px).
_MIN_INPUT_SIZE = {
    "alexnet": 64,
    "inception_v3": 75,
    "googlenet": 32,
    "squeezenet1_0": 48,
    "squeezenet1_1": 48,
    "maxvit_t": 224,
}
_FIXED_INPUT_SIZE = ("vit_", "maxvit_")
# Tensor factories whose results go to the meta device while an architecture is described.
# torch.tensor / arange stay real: RegNet computes its widths from real tensors.
_FACTORIES = frozenset(
    {
        torch.empty,
        torch.empty_strided,
        torch.zeros,
        torch.ones,
        torch.full,
        torch.rand,
        torch.randn,
        torch.randint,
        torch.randperm,
        torch.eye,
        torch.empty_like,
        torch.zeros_like,
        torch.ones_like,
        torch.full_like,
        torch.rand_like,
        torch.randn_like,
    }
)


class _OnMeta(TorchFunctionMode):
    """Parameters and buffers created inside the block live on the meta device."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in _FACTORIES and kwargs.get("device") is None:
            kwargs["device"] = "meta"
        return func(*args, **kwargs)


def names() -> tuple:
    """Every torchvision classification model, sorted."""
    return _all_names()


@functools.lru_cache(maxsize=1)
def _all_names() -> tuple:
    return tuple(sorted(list_models(module=torchvision.models)))


def check_name(name: str) -> None:
    if name not in _all_names():
        close = [n for n in _all_names() if n.startswith(name.split("_")[0][:4])]
        hint = f"; did you mean one of {close[:6]}?" if close else ""
        raise BackboneError(
            f"unknown model {name!r}{hint} (`xfeat models` lists the "
            f"{len(_all_names())} torchvision models; other backbones: "
            "'timm:NAME', 'torchscript:PATH')"
        )


def resolve_weights(name: str, weights, *, seed: int = 0, digest_memo=None) -> tuple:
    """``(WeightsInfo, torchvision weights entry or None)``; never downloads."""
    check_name(name)
    return w.resolve(
        weights, enum=get_model_weights(name), seed=seed, model=name, digest_memo=digest_memo
    )


def default_preprocessing(name: str, tv_weights=None) -> Preprocessing:
    """The preprocessing of ``tv_weights``, else of the model's DEFAULT weights, else ImageNet's."""
    if tv_weights is None:
        enum = get_model_weights(name)
        tv_weights = enum.DEFAULT if "DEFAULT" in enum.__members__ else None
    return (
        Preprocessing() if tv_weights is None else Preprocessing.from_transforms(tv_weights.transforms())
    )


def build(name: str, info, tv_weights, *, progress: bool = True) -> tuple:
    """``(model with its classifier, WeightsInfo with the file's sha256, classifier_of(name))``;
    seed the torch RNG first for the random initialisation."""
    model = build_random(name)
    path = classifier_of(name)[0]
    if info.kind == "torchvision":
        state, sha = w.download_state_dict(
            tv_weights.url, name=name, weights_id=info.id, progress=progress
        )
        info = w.WeightsInfo(info.kind, info.id, sha256=sha, url=info.url)
        w.load_state_dict_into(
            model, state, classifier_path=path, source=f"torchvision weights {info.id}"
        )
    elif info.kind == "file":
        w.load_state_dict_into(
            model, w.read_state_dict_file(Path(info.id)), classifier_path=path, source=info.id
        )
    return model, info, classifier_of(name)


def build_random(name: str) -> nn.Module:
    """The architecture with freshly initialised weights (seed it with the torch RNG)."""
    kwargs = {}
    if name in ("googlenet", "inception_v3"):
        # No auxiliary heads: they are training-only classifiers, not features.
        kwargs = {"aux_logits": False, "init_weights": True}
    return get_model_builder(name)(weights=None, **kwargs)


def build_empty(name: str) -> nn.Module:
    """The architecture with its parameters on the meta device: no memory, no real init."""
    with _OnMeta():
        return build_random(name)


@functools.cache
def classifier_of(name: str) -> tuple:
    """``(path, feature_dim, "linear" | "conv")`` of the final classifier layer."""
    return describe_classifier(build_empty(name))


def feature_dim(name: str) -> int:
    check_name(name)
    return classifier_of(name)[1]


def describe_classifier(model: nn.Module) -> tuple:
    path, layer = last_classifier_layer(model)
    if isinstance(layer, nn.Linear):
        return path, layer.in_features, "linear"
    return path, layer.in_channels, "conv"


def last_classifier_layer(model: nn.Module):
    # torchvision registers the classifier last; squeezenet's is a 1x1 convolution.
    last = None
    for path, module in model.named_modules():
        if isinstance(module, nn.Linear) or (
            isinstance(module, nn.Conv2d) and path.startswith("classifier")
        ):
            last = (path, module)
    if last is None:
        raise BackboneError(f"cannot find the classifier layer of {type(model).__name__}")
    return last


def min_input_size(name: str) -> int:
    """Smallest square input the architecture accepts (224 for fixed-size transformers)."""
    if name.startswith(_FIXED_INPUT_SIZE):
        return 224
    return _MIN_INPUT_SIZE.get(name, 32)


def parameter_count(name: str) -> int:
    """Parameters with the original classifier, counted on the meta device."""
    check_name(name)
    return int(sum(p.numel() for p in build_empty(name).parameters()))


def describe() -> list:
    """One dict per model: name, feature_dim, parameters (millions), weights names."""
    rows = []
    for name in _all_names():
        model = build_empty(name)
        rows.append(
            {
                "name": name,
                "feature_dim": describe_classifier(model)[1],
                "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
                "weights": [w for w in get_model_weights(name).__members__ if w != "DEFAULT"],
            }
        )
    return rows
