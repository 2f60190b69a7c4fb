"""open_clip image towers: ``open_clip:ARCH[:PRETRAINED_OR_FILE]``, ``open_clip:hf-hub:NAME`` or
``open_clip:DIR`` (``pip install 'xfeat[open_clip]'``).

``ARCH`` is one of ``open_clip.list_models()``; ``PRETRAINED`` one of its tags
(``open_clip.list_pretrained_tags_by_model(ARCH)``) or a state-dict file. ``hf-hub:NAME``
(BiomedCLIP: ``hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224``) is read from
the local Hugging Face cache, downloaded only when missing and the hub is reachable (as
``hf:`` models are); ``DIR`` holds ``open_clip_config.json`` and ``open_clip_model.safetensors``.
The features are ``encode_image``'s (the projected embedding, not normalised); the preprocessing
is open_clip's own ``preprocess_cfg`` (:func:`preprocessing_from_open_clip`).

``--weights``: ``DEFAULT`` (the name's checkpoint), ``none`` (random, seeded) or a state-dict
file. A folder's weights must be safetensors; a pickle is read only when passed with
``--weights PATH`` (``torch.load(weights_only=True)``, as for every state-dict file).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
from pathlib import Path

import torch
from torch import nn

from xfeat.backbones import hf_models, offline
from xfeat.backbones import weights as w
from xfeat.backbones.preprocessing import Preprocessing
from xfeat.errors import BackboneError, ConfigError, WeightsUnavailableError

logger = logging.getLogger(__name__)

PREFIX = "open_clip:"
HUB = "hf-hub:"
_RESIZE_MODES = {"shortest": "crop", "squash": "stretch", "longest": "pad"}


def handles(name: str) -> bool:
    return name.startswith(PREFIX)


def _is_path(text: str) -> bool:
    return Path(text).expanduser().is_dir() or text.startswith(("/", ".", "~"))


def parse(name: str) -> dict:
    """``{"hub": NAME}``, ``{"dir": PATH}`` or ``{"arch": ARCH, "pretrained": TAG/FILE/None}``."""
    body = name[len(PREFIX) :]
    if body.startswith(HUB) and body[len(HUB) :]:
        return {"hub": body[len(HUB) :]}
    if _is_path(body):
        return {"dir": body}
    arch, _, pretrained = body.partition(":")
    if not arch:
        raise BackboneError(
            f"--model {name}: expected open_clip:ARCH[:PRETRAINED], open_clip:hf-hub:NAME "
            "or open_clip:DIR"
        )
    return {"arch": arch, "pretrained": pretrained or None}


def normalize_name(name: str) -> str:
    """A folder or a weights file made absolute; other names unchanged."""
    spec = parse(name)
    if "dir" in spec:
        return PREFIX + str(Path(spec["dir"]).expanduser().resolve())
    pretrained = spec.get("pretrained")
    if pretrained and Path(pretrained).expanduser().is_file():
        return f"{PREFIX}{spec['arch']}:{Path(pretrained).expanduser().resolve()}"
    return name


def _open_clip(name: str):
    try:
        import open_clip
    except ImportError:
        raise BackboneError(
            f"--model {name} needs open_clip, which is not installed; install it with "
            "`pip install 'xfeat[open_clip]'`"
        ) from None
    return open_clip


def _folder(name: str):
    """The local folder of a hub or folder name (None for ``ARCH``)."""
    spec = parse(name)
    if "hub" in spec:
        return hf_models.model_dir(spec["hub"])
    if "dir" in spec:
        folder = Path(spec["dir"]).expanduser().resolve()
        if not (folder / "open_clip_config.json").is_file():
            raise BackboneError(
                f"--model {name}: no open_clip_config.json in {folder}; expected a folder with "
                "open_clip_config.json and open_clip_model.safetensors"
            )
        return folder
    return None


def _model_name(name: str) -> str:
    """What ``open_clip.create_model`` is given: ``local-dir:FOLDER`` or ``ARCH``."""
    folder = _folder(name)
    return f"local-dir:{folder}" if folder is not None else parse(name)["arch"]


@functools.lru_cache(maxsize=16)
def _describe(name: str) -> dict:
    """Dimension, parameters and preprocessing, from the architecture built with random weights."""
    open_clip = _open_clip(name)
    spec = parse(name)
    if "arch" in spec and spec["arch"] not in open_clip.list_models():
        raise BackboneError(
            f"unknown open_clip architecture {spec['arch']!r}; open_clip.list_models() lists "
            "them (e.g. ViT-B-32), or use open_clip:hf-hub:NAME"
        )
    with torch.random.fork_rng(devices=[]), _quiet(), _offline_if_unreachable():
        model = open_clip.create_model(_model_name(name), load_weights=False)
    cfg = dict(model.visual.preprocess_cfg)
    pretrained = spec.get("pretrained")
    if pretrained and not Path(pretrained).is_file():
        tag = open_clip.get_pretrained_cfg(spec["arch"], pretrained)
        if not tag:
            tags = open_clip.list_pretrained_tags_by_model(spec["arch"])
            raise BackboneError(
                f"open_clip {spec['arch']} has no pretrained tag {pretrained!r}; its tags: {tags}"
            )
        cfg.update({k: v for k, v in tag.items() if k in cfg})
    size = cfg["size"] if isinstance(cfg["size"], int) else cfg["size"][0]
    dim = getattr(model.visual, "output_dim", None)
    if dim is None:
        with torch.inference_mode():
            dim = model.visual(torch.zeros(1, 3, size, size)).shape[1]
    return {
        "feature_dim": int(dim),
        "parameters": int(sum(p.numel() for p in model.visual.parameters())),
        "preprocess": cfg,
        "image_size": int(size),
    }


def check_name(name: str) -> None:
    _describe(name)


def feature_dim(name: str) -> int:
    return _describe(name)["feature_dim"]


def parameter_count(name: str) -> int:
    """Parameters of the image tower."""
    return _describe(name)["parameters"]


def min_input_size(name: str) -> int:
    return _describe(name)["image_size"]


def default_preprocessing(name: str, extra=None) -> Preprocessing:
    return preprocessing_from_open_clip(_describe(name)["preprocess"])


def preprocessing_from_open_clip(cfg: dict) -> Preprocessing:
    """open_clip's ``preprocess_cfg`` as xfeat's preprocessing: ``shortest`` is torchvision's
    Resize + CenterCrop (``crop``), ``squash`` a resize to a square (``stretch``), ``longest``
    the image letterboxed (``pad``)."""
    size = cfg["size"]
    if not isinstance(size, int):
        if size[0] != size[1]:
            raise ConfigError(f"open_clip input size {size}: xfeat's preprocessing is square")
        size = size[0]
    mode = _RESIZE_MODES.get(cfg.get("resize_mode", "shortest"))
    interpolation = cfg.get("interpolation", "bicubic")
    if mode is None or interpolation not in ("bicubic", "bilinear", "nearest"):
        raise ConfigError(
            f"open_clip preprocess_cfg {cfg}: resize_mode must be shortest, squash or longest, "
            "interpolation bicubic, bilinear or nearest"
        )
    return Preprocessing(
        int(size), int(size), tuple(cfg["mean"]), tuple(cfg["std"]), interpolation, resize_mode=mode
    )


def resolve_weights(name: str, weights, *, seed: int = 0, digest_memo=None) -> tuple:
    """``(WeightsInfo, None)``: ``DEFAULT`` (the name's checkpoint), ``none`` or a file."""
    value = "none" if weights is None else str(weights)
    if value.lower() in ("none", "random"):
        return w.WeightsInfo("random", f"random(seed={seed})"), None
    spec = parse(name)
    if value == "DEFAULT":
        folder = _folder(name)
        if folder is not None:
            files = sorted(folder.glob("*.safetensors"))
            if not files:
                pickles = sorted(p.name for p in folder.glob("*.bin")) + sorted(
                    p.name for p in folder.glob("*.pth")
                )
                raise BackboneError(
                    f"{name}: no .safetensors weights in {folder}"
                    + (
                        f" (only {', '.join(pickles)}, a pickle); pass --weights "
                        f"{folder / pickles[0]} to read its tensors with torch.load(weights_only=True)"
                        if pickles
                        else ""
                    )
                )
            digest = offline.file_sha256(_checkpoint(files))
            url = f"https://huggingface.co/{spec['hub']}" if "hub" in spec else None
            return w.WeightsInfo(
                "open_clip", spec.get("hub") or str(folder), sha256=digest, url=url
            ), None
        pretrained = spec.get("pretrained")
        if not pretrained:
            tags = _open_clip(name).list_pretrained_tags_by_model(spec["arch"])
            raise BackboneError(
                f"--weights DEFAULT with {name}: name the pretrained weights, "
                f"open_clip:{spec['arch']}:TAG (its tags: {tags}) or open_clip:{spec['arch']}:FILE"
            )
        if Path(pretrained).is_file():
            return w.WeightsInfo(
                "file",
                str(Path(pretrained).resolve()),
                sha256=w.sha256_file(Path(pretrained), digest_memo),
            ), None
        _describe(name)  # an unknown tag fails here
        cached = _cached_tag_file(name, spec["arch"], pretrained)
        sha = offline.file_sha256(cached) if cached else None
        return w.WeightsInfo("open_clip", f"{spec['arch']}.{pretrained}", sha256=sha), None
    path = Path(value).expanduser()
    if path.is_file():
        return w.WeightsInfo("file", str(path.resolve()), sha256=w.sha256_file(path, digest_memo)), None
    raise BackboneError(
        f"--weights {value!r} for {name}: expected 'DEFAULT' (the checkpoint the name gives), "
        "'none' (random) or the path of a state-dict file (.safetensors, .bin)"
    )


def _cached_tag_file(name: str, arch: str, tag: str):
    """The tag's weights file in the Hugging Face cache, or None; offline and not cached, a
    one-line error now (before any image is read)."""
    from huggingface_hub import try_to_load_from_cache

    cfg = _open_clip(name).get_pretrained_cfg(arch, tag)
    repo_id = "/".join(str(cfg.get("hf_hub", "")).split("/")[:2])
    if not repo_id:
        return None  # a plain URL: open_clip's own download folder
    for candidate in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
        found = try_to_load_from_cache(repo_id, candidate)
        if isinstance(found, str):
            return Path(found)
    reason = hf_models.hub_offline_reason()
    if reason:
        raise WeightsUnavailableError(
            f"open_clip weights {arch}.{tag} are not in the Hugging Face cache ({repo_id}) and "
            f"{reason}; download them once on a connected machine with `hf download {repo_id}`, "
            f"or pass a file: --model open_clip:{arch}:FILE"
        )
    return None


def _checkpoint(files: list) -> Path:
    preferred = [f for f in files if f.name == "open_clip_model.safetensors"]
    return (preferred or files)[0]


def load_model(name: str, info: w.WeightsInfo) -> nn.Module:
    """The whole open_clip model (image and text towers) with ``info``'s weights."""
    open_clip = _open_clip(name)
    model_name, spec = _model_name(name), parse(name)
    if info.kind == "open_clip" and "arch" in spec:
        with _offline_if_unreachable(), _quiet(logging.ERROR):
            try:
                return open_clip.create_model(model_name, pretrained=spec["pretrained"]).eval()
            except Exception as exc:  # hub and network errors come in many types
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise WeightsUnavailableError(
                    f"could not load open_clip weights {info.id} ({first[:200]}); offline, "
                    "download them once on a connected machine (they go to the Hugging Face "
                    f"cache) or pass a file: --model open_clip:{spec['arch']}:FILE"
                ) from None
    if info.kind == "open_clip":  # a folder (or hub snapshot) with safetensors, checked
        with _offline_if_unreachable():  # a text tower from transformers reads its config
            return open_clip.create_model(model_name, load_weights=True).eval()
    with _quiet(), _offline_if_unreachable():
        model = open_clip.create_model(model_name, load_weights=False)
    if info.kind == "file":
        state = w.read_state_dict_file(Path(info.id))
        w.load_state_dict_into(model, state, classifier_path="\0", source=info.id)
    return model.eval()


@contextlib.contextmanager
def _quiet(level: int = logging.WARNING):
    """open_clip's logging on the root logger up to ``level``: its warning that a model built
    without weights is random (xfeat means it), or its errors that xfeat's own replaces."""
    before = logging.root.manager.disable
    logging.disable(level)
    try:
        yield
    finally:
        logging.disable(before)


@contextlib.contextmanager
def _offline_if_unreachable():
    """Hub calls answer from the cache at once when the hub cannot be reached."""
    from huggingface_hub import constants

    reason, before = hf_models.hub_offline_reason(), constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = before or bool(reason)
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def build(name: str, info: w.WeightsInfo, extra=None, *, progress: bool = True) -> tuple:
    """``(OpenClipImageModel, info, ("classifier", D, "linear"))``; seed the RNG first."""
    model = load_model(name, info)
    return (
        OpenClipImageModel(model.visual).float().eval(),
        info,
        ("classifier", feature_dim(name), "linear"),
    )


class OpenClipImageModel(nn.Module):
    """open_clip's image tower: ``forward(x)`` is ``encode_image(x)``; ``classifier`` is where
    fine-tuning installs its new last layer."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.visual = visual
        self.classifier = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.visual(x))


def text_tower(name: str, info: w.WeightsInfo):
    """``(encode(prompts) -> (P, D) tensor, logit scale)``: open_clip's tokenizer and
    ``encode_text``, in the space of ``encode_image``."""
    open_clip = _open_clip(name)
    model = load_model(name, info)
    with _offline_if_unreachable():
        try:
            tokenizer = open_clip.get_tokenizer(_model_name(name))
        except Exception as exc:  # a hub tokenizer not in the cache, offline
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise WeightsUnavailableError(
                f"{name}: cannot load its tokenizer ({first[:200]}); download it once on a "
                "connected machine (it goes to the Hugging Face cache)"
            ) from None

    def encode(prompts: list) -> torch.Tensor:
        with torch.inference_mode():
            return model.encode_text(tokenizer(list(prompts)))

    return encode, float(model.logit_scale.detach().exp())


def describe() -> list:
    """The row for ``xfeat models``: how to name a model of this family."""
    return [
        {
            "name": "open_clip:ARCH[:PRETRAINED]",
            "feature_dim": None,
            "params_m": None,
            "weights": [
                "DEFAULT (the name's)",
                "none",
                "PATH",
                "also open_clip:hf-hub:NAME, open_clip:DIR",
            ],
            "source": "open_clip",
        }
    ]


def save_folder(model: nn.Module, model_cfg: dict, folder: Path, preprocess_cfg=None) -> Path:
    """``model`` as an ``open_clip:DIR`` folder: open_clip_config.json + open_clip_model.safetensors."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": model_cfg, "preprocess_cfg": dict(preprocess_cfg or {})}
    (folder / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "open_clip_model.safetensors"))
    return folder
