"""Feature blocks: which layers of a backbone are cached, found and pooled in one forward pass.

``--layers penultimate`` (the default) is the network's output with its classifier removed.
``--layers stages`` adds the output of each stage of the network: the last block at each
spatial resolution, from stride 4 on, found from the architecture itself (ResNet's
``layer1..3``, MobileNetV2's ``features.3/6/13``, ...). ``--layers NODE,NODE`` names nodes
as torchvision's ``create_feature_extractor`` does (``xfeat nodes MODEL`` lists them). Each
block is global-average-pooled to ``(N, C)``. ``--layers last:N`` (``hf:`` models) adds the CLS
tokens of the last N transformer blocks (:func:`xfeat.backbones.hf_models.resolve_blocks`).
"""

from __future__ import annotations

import functools
from typing import Sequence, Union

import torch
from torch import nn

from xfeat.errors import ConfigError

PENULTIMATE = "penultimate"
STAGES = "stages"
_CONTAINERS = ("features", "trunk_output", "layers")


def parse_layers(spec: Union[str, Sequence[str], None]) -> tuple:
    """``"penultimate"``, ``"stages"`` or ``"a,b,..."`` -> a tuple of names (penultimate last)."""
    if spec is None:
        return (PENULTIMATE,)
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec)]
    names = [n for n in names if n]
    if not names:
        raise ConfigError("--layers is empty; expected 'penultimate', 'stages' or node names")
    if len(set(names)) != len(names):
        raise ConfigError(f"--layers {spec!r} names a layer twice")
    return tuple(names)


def resolve_blocks(model_name: str, layers: tuple, crop_size: int) -> list:
    """``[(block name, dim)]`` for ``layers`` of a torchvision model, found on the meta device
    (no weights, no memory)."""
    if model_name.startswith("hf:"):
        from xfeat.backbones import hf_models

        return hf_models.resolve_blocks(model_name, layers)
    if layers == (PENULTIMATE,):
        from xfeat.backbones import feature_dim

        return [(PENULTIMATE, feature_dim(model_name))]
    return list(_resolve(model_name, layers, crop_size))


@functools.lru_cache(maxsize=64)
def _resolve(model_name: str, layers: tuple, crop_size: int) -> tuple:
    from xfeat.backbones import torchvision_models as tv

    if model_name not in tv.names():
        raise ConfigError(
            f"--layers {','.join(layers)!r} needs a torchvision model; "
            f"{model_name} gives its penultimate features only"
        )
    model = _stripped(tv.build_empty(model_name), model_name)
    nodes = expand_layers(model, layers, crop_size, model_name)
    shapes = _node_shapes(model, [n for n in nodes if n != PENULTIMATE], crop_size)
    blocks = [(n, _channels(shapes[n])) for n in nodes if n != PENULTIMATE]
    if PENULTIMATE in nodes:
        blocks.append((PENULTIMATE, tv.classifier_of(model_name)[1]))
    return tuple(blocks)


def _stripped(model: nn.Module, model_name: str) -> nn.Module:
    from xfeat.backbones import set_submodule
    from xfeat.backbones import torchvision_models as tv

    set_submodule(model, tv.classifier_of(model_name)[0], nn.Identity())
    return model.eval()


def expand_layers(model: nn.Module, layers: tuple, crop_size: int, model_name: str) -> list:
    """``stages`` replaced by the model's stage nodes; node names checked against the graph."""
    from torchvision.models.feature_extraction import get_graph_node_names

    nodes = []
    for layer in layers:
        if layer == STAGES:
            nodes += [n for n in stage_nodes(model, crop_size, model_name) if n not in nodes]
            if PENULTIMATE not in layers:
                nodes.append(PENULTIMATE)
        elif layer not in nodes:
            nodes.append(layer)
    known = set(get_graph_node_names(model)[1]) | {n for n, _ in model.named_modules()}
    unknown = [n for n in nodes if n != PENULTIMATE and n not in known]
    if unknown:
        raise ConfigError(
            f"{model_name} has no node {unknown[0]!r}; `xfeat nodes "
            f"{model_name}` lists its stages and nodes"
        )
    if PENULTIMATE in nodes:  # always last: the order of the columns in the cache
        nodes = [n for n in nodes if n != PENULTIMATE] + [PENULTIMATE]
    return nodes


def stage_nodes(model: nn.Module, crop_size: int, model_name: str = "") -> list:
    """The last block at each spatial resolution, from stride 4 up to (not including) the
    last one, whose information the penultimate features carry."""
    candidates = _candidates(model)
    if not candidates:
        raise ConfigError(
            f"cannot find the stages of {model_name or type(model).__name__}; "
            "name the nodes with --layers NODE,NODE (`xfeat nodes MODEL`)"
        )
    shapes = _node_shapes(model, candidates, crop_size)
    last_at = {}
    for name in candidates:
        size = _spatial(shapes[name])
        if size is not None and size <= crop_size // 4:
            last_at[size] = name
    sizes = sorted(last_at, reverse=True)
    return [last_at[s] for s in sizes[:-1]]


def _candidates(model: nn.Module) -> list:
    for name in _CONTAINERS:
        container = getattr(model, name, None)
        if isinstance(container, nn.Sequential):
            return [f"{name}.{child}" for child, _ in container.named_children()]
    return [n for n, _ in model.named_children() if n.startswith(("layer", "stage", "conv"))]


def _node_shapes(model: nn.Module, nodes: list, crop_size: int) -> dict:
    from torchvision.models.feature_extraction import create_feature_extractor

    if not nodes:
        return {}
    extractor = create_feature_extractor(model, return_nodes=nodes)
    device = next(model.parameters()).device
    with torch.no_grad():
        out = extractor(torch.zeros(1, 3, crop_size, crop_size, device=device))
    return {k: tuple(v.shape) for k, v in out.items()}


def _spatial(shape: tuple):
    """Height of a feature map, NCHW or (Swin) NHWC; None for token or vector outputs."""
    if len(shape) != 4:
        return None
    return shape[2] if shape[2] == shape[3] else shape[1]


def _channels(shape: tuple) -> int:
    if len(shape) == 4:
        return shape[1] if shape[2] == shape[3] else shape[3]
    return shape[-1]


def pool(x: torch.Tensor) -> torch.Tensor:
    """Global average pooling of a block output to ``(N, C)``."""
    if x.dim() == 4:
        return x.mean(dim=(2, 3)) if x.shape[2] == x.shape[3] else x.mean(dim=(1, 2))
    if x.dim() == 3:  # tokens (N, L, C)
        return x.mean(dim=1)
    return x.flatten(1)


class BlockExtractor(nn.Module):
    """``forward(x)`` -> ``{block: (N, D_block)}`` for the blocks of one cache entry."""

    def __init__(self, model: nn.Module, blocks: list):
        super().__init__()
        self.names = [name for name, _ in blocks]
        nodes = [n for n in self.names if n != PENULTIMATE]
        if not nodes or hasattr(model, "forward_blocks"):  # a token model picks its own blocks
            self.body, self.graph = model, False
            return
        from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

        returns = {n: n for n in nodes}
        if PENULTIMATE in self.names:
            returns[get_graph_node_names(model)[1][-1]] = PENULTIMATE
        self.body, self.graph = create_feature_extractor(model, return_nodes=returns), True

    def forward(self, x: torch.Tensor) -> dict:
        if not self.graph:
            if self.names != [PENULTIMATE]:
                return self.body.forward_blocks(x, self.names)
            return {PENULTIMATE: self.body(x)}
        out = self.body(x)
        return {name: pool(out[name]) for name in self.names}


def describe_nodes(model_name: str, crop_size: int = 224) -> dict:
    """Stage nodes and every graph node of a torchvision model (``xfeat nodes``)."""
    from torchvision.models.feature_extraction import get_graph_node_names

    from xfeat.backbones import torchvision_models as tv

    if model_name.startswith(("hf:", "open_clip:")):
        raise ConfigError(
            f"xfeat nodes is for torchvision models; {model_name.split(':')[0]}: models take "
            "--layers penultimate"
            + (
                " or last:N (the CLS tokens of the last N blocks)"
                if model_name.startswith("hf:")
                else ""
            )
        )
    tv.check_name(model_name)
    model = _stripped(tv.build_empty(model_name), model_name)
    try:
        stages = stage_nodes(model, crop_size, model_name)
    except ConfigError:
        stages = []
    return {
        "model": model_name,
        "stages": stages,
        "blocks_for_stages": [list(b) for b in _resolve(model_name, (STAGES,), crop_size)]
        if stages
        else [],
        "nodes": get_graph_node_names(model)[1],
    }
