"""The network being fine-tuned: a backbone with a new last layer, its optimiser and schedule,
LP-FT's start from the cached probe, checkpoints and the saved model.

Files hold tensors and plain values only and are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import logging
import math
import zipfile
from pathlib import Path
from typing import Union

import numpy as np
import torch
from torch import nn

from xfeat.backbones import Backbone, Preprocessing, create_backbone
from xfeat.config import FinetuneConfig
from xfeat.errors import ConfigError
from xfeat.files import atomic_write

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "xfeat-checkpoint"
MODEL_FORMAT = "xfeat-finetuned"


class ProbeHead(nn.Module):
    """LP-FT's last layer: the logistic probe kept unfolded, ``Linear(standardise(x))``.

    Folding the standardisation into the weights (``W / scale``) makes them enormous where a
    feature barely varies on the cache (random-init networks in eval mode: scale ~1e-10), and
    once the network trains in train mode, where BatchNorm uses batch statistics, the features
    are orders of magnitude larger and the loss diverges. Here the standardisation is a batch
    norm without affine parameters, started at the probe's mean and variance: in eval mode it
    is exactly the probe's; in training it standardises with the batch's own statistics (and
    tracks them), so the linear layer keeps seeing well-scaled inputs. A batch of one image
    uses the running statistics. ``eps`` is a buffer, saved with the weights.
    """

    def __init__(
        self,
        mean: np.ndarray,
        scale: np.ndarray,
        weight: np.ndarray,
        bias: np.ndarray,
        momentum: float = 0.1,
    ):
        super().__init__()
        var = np.asarray(scale, dtype=np.float64) ** 2
        self.momentum = momentum
        self.register_buffer("running_mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("running_var", torch.as_tensor(var, dtype=torch.float32))
        # eps far below every variance, so that in eval mode this is the probe to float32.
        self.register_buffer(
            "eps", torch.tensor(float(max(var.min() * 1e-6, 1e-38)), dtype=torch.float64)
        )
        self.linear = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            self.linear.weight.copy_(torch.as_tensor(weight, dtype=torch.float32))
            self.linear.bias.copy_(torch.as_tensor(bias, dtype=torch.float32))

    @classmethod
    def from_logistic(cls, probe) -> ProbeHead:
        """From a fitted :class:`~xfeat.heads.LogisticHead` (binary: softmax([0, z]) = sigmoid)."""
        W, b = np.asarray(probe.coef_), np.ravel(probe.intercept_)
        if W.shape[0] == 1:
            W, b = np.vstack([np.zeros_like(W), W]), np.concatenate([[0.0], b])
        return cls(probe.mean_, probe.scale_, W, b)

    @classmethod
    def from_one_vs_rest(cls, probe) -> ProbeHead:
        """From a fitted multi-label :class:`~xfeat.heads.OneVsRestHead` of logistic heads: one
        logit per label. Each label's probe standardised with the statistics of its own known
        rows; they are refolded exactly onto the first label's mean and scale."""
        first = probe.estimators_[0]
        m0, s0 = np.asarray(first.mean_, np.float64), np.asarray(first.scale_, np.float64)
        W, b = [], []
        for e in probe.estimators_:
            w = np.ravel(e.coef_) / np.asarray(e.scale_, np.float64)  # weight on raw features
            W.append(w * s0)
            b.append(
                float(np.ravel(e.intercept_)[0]) + float(w @ (m0 - np.asarray(e.mean_, np.float64)))
            )
        return cls(m0, s0, np.stack(W), np.asarray(b))

    @classmethod
    def empty(cls, dim: int, n_classes: int) -> ProbeHead:
        """A head of the right shape whose values a state dict will replace (resume, load)."""
        return cls(np.zeros(dim), np.ones(dim), np.zeros((n_classes, dim)), np.zeros(n_classes))

    def forward(self, x):
        batch_stats = self.training and x.shape[0] > 1
        z = nn.functional.batch_norm(
            x,
            self.running_mean,
            self.running_var,
            training=batch_stats,
            momentum=self.momentum,
            eps=float(self.eps),
        )
        return self.linear(z)


def build_network(backbone: Backbone, n_classes: int, config: FinetuneConfig, *, probe=None) -> tuple:
    """``(network, head)``: the backbone with a new, seeded last layer. LP-FT: the layer of the
    logistic ``probe`` (or, resuming, an empty one that the checkpoint fills)."""
    if config.mode != "frozen":
        backbone.check_trainable(config.mode)
    if config.mode == "lp-ft":
        if backbone.classifier_kind != "linear":
            raise ConfigError(
                f"lp-ft needs a linear last layer; {backbone.name} ends with a 1x1 "
                "convolution followed by ReLU, which a linear probe cannot "
                "initialise; use --mode full"
            )
        if probe is None:
            head = ProbeHead.empty(backbone.feature_dim, n_classes)
        elif hasattr(probe, "estimators_"):  # multi-label: one logistic probe per label
            head = ProbeHead.from_one_vs_rest(probe)
        else:
            head = ProbeHead.from_logistic(probe)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            head = backbone.new_classifier(n_classes)
    backbone.replace_classifier(head)
    net = backbone.model
    if config.mode == "frozen":
        for p in net.parameters():
            p.requires_grad_(False)
        for p in head.parameters():
            p.requires_grad_(True)
    return net, head


def make_optimizer(
    net: nn.Module, head: nn.Module, config: FinetuneConfig, steps_per_epoch: int
) -> tuple:
    """``(optimizer, scheduler, per_step)`` of the recipe.

    tutorial: SGD with momentum, StepLR every ``step_size`` epochs (stepped per epoch).
    modern: AdamW with the backbone at ``backbone_lr_scale`` of the head's learning rate,
    linear warm-up over ``warmup_epochs`` then cosine decay to 0 (stepped per batch).
    """
    head_ids = {id(p) for p in head.parameters()}
    head_params = [p for p in head.parameters() if p.requires_grad]
    body_params = [p for p in net.parameters() if p.requires_grad and id(p) not in head_ids]
    if config.recipe == "tutorial":
        opt = torch.optim.SGD(
            head_params + body_params,
            lr=config.lr,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
        )
        return opt, torch.optim.lr_scheduler.StepLR(opt, config.step_size, config.gamma), False
    groups = [{"params": head_params, "lr": config.lr}]
    if body_params:
        groups.append({"params": body_params, "lr": config.lr * config.backbone_lr_scale})
    opt = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
    total = config.epochs * steps_per_epoch
    warmup = min(config.warmup_epochs * steps_per_epoch, max(total - 1, 0))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor), True


def save_checkpoint(path: Path, **state) -> None:
    atomic_write(path, lambda f: torch.save({"format": CHECKPOINT_FORMAT, **state}, f))


def load_verified(path: Path, fix: str, map_location="cpu"):
    """``torch.load(path, weights_only=True)`` after checking the CRC-32 of every record in
    the file's zip archive: torch.load itself does not, so a flipped bit in a tensor would
    load as a wrong number. A damaged file is a :class:`ConfigError` naming it and ``fix``."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
        if bad is not None:
            raise ValueError(f"record {bad} fails its CRC-32 check")
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # zipfile, torch and pickle each raise their own kinds
        reason = str(exc).splitlines()[0][:120] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{path} is damaged ({reason}); {fix}") from None


def load_checkpoint(path: Path, config_key: dict):
    """The checkpoint in ``path`` if its configuration equals ``config_key``, else an error."""
    if not path.exists():
        return None
    state = load_verified(path, "delete it to start the run again")
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(f"{path} is not an xfeat checkpoint")
    if state["config"] != config_key:
        diff = sorted(
            k
            for k in set(config_key) | set(state["config"])
            if state["config"].get(k) != config_key.get(k)
        )
        raise ConfigError(
            f"cannot resume {path}: it was made with different options ({diff}); "
            "use the original options or another --out"
        )
    return state


def save_state_dict(net: nn.Module, path: Path) -> None:
    atomic_write(
        path, lambda f: torch.save({k: v.detach().cpu() for k, v in net.state_dict().items()}, f)
    )


def save_model(net: nn.Module, backbone: Backbone, meta: dict, path: Path) -> None:
    """The fine-tuned network for ``xfeat predict``: tensors and plain values only."""
    obj = {
        "format": MODEL_FORMAT,
        "model": backbone.name,
        "classifier_path": backbone.classifier_path,
        "feature_dim": backbone.feature_dim,
        "head": "probe" if isinstance(net.get_submodule(backbone.classifier_path), ProbeHead) else "new",
        "preprocessing": backbone.preprocessing.to_dict(),
        "weights": {
            "kind": backbone.weights.kind,
            "id": backbone.weights.id,
            "sha256": backbone.weights.sha256,
        },
        **meta,
        "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
    }
    atomic_write(path, lambda f: torch.save(obj, f))


def load_finetuned(path: Union[str, Path]):
    """``(network, meta)`` from a ``model.pt`` written by :func:`xfeat.finetuning`.

    ``network`` is a :class:`~xfeat.backbones.Backbone` whose model, classifier included,
    returns class logits.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no fine-tuned model at {path}")
    obj = load_verified(path, "it is not a fine-tuned model xfeat can read: fine-tune again")
    if not isinstance(obj, dict) or obj.get("format") != MODEL_FORMAT:
        raise ConfigError(f"{path} is not an xfeat fine-tuned model")
    backbone = create_backbone(obj["model"], "none")
    n_classes, d = len(obj["class_names"]), backbone.feature_dim
    if obj.get("head") == "probe":  # the buffers and weights come from the state dict
        head = ProbeHead.empty(d, n_classes)
    else:
        head = backbone.new_classifier(n_classes)
    backbone.replace_classifier(head)
    backbone.model.load_state_dict(obj["state_dict"])
    backbone.model.eval()
    backbone.preprocessing = Preprocessing.from_dict(obj["preprocessing"])
    return backbone, {k: v for k, v in obj.items() if k != "state_dict"}
