"""Hugging Face transformers backbones: ``hf:NAME_OR_DIR`` (``pip install 'xfeat[hf]'``).

``NAME_OR_DIR`` is a folder saved with ``save_pretrained`` (``config.json``, ``model.safetensors``,
``preprocessor_config.json``) or a hub name (``microsoft/rad-dino``), read from the local
Hugging Face cache and downloaded only when it is missing and the hub is reachable; offline and
not cached, the error says how to download it once. A repository's own code is never run
(``trust_remote_code=False``) unless ``--trust-remote-code`` is given (recorded in the name as
``hf:NAME:trust_remote_code``); weights are read from safetensors, and a pickle-only repository
is refused unless its ``pytorch_model.bin`` is passed with ``--weights PATH``, which reads it
with ``torch.load(weights_only=True)`` like any state-dict file.

``--weights``: ``DEFAULT`` (the checkpoint's weights), ``none`` (random, seeded, from its
config) or a state-dict file. The preprocessing is the image processor's
(:func:`preprocessing_from_processor`). The tokens become one vector as ``:pool=`` in the name
says (:data:`xfeat.config.POOLS`; ``--pool`` writes it there): by default the CLS token as the
model pools it (DINOv2, RAD-DINO: ``pooler_output``, the layer-normed CLS token), or for a
CLIP-style tower its projected image embedding (``image_embeds``). ``--layers last:N`` also
caches the layer-normed CLS tokens of the last N blocks (DINOv2's linear evaluation).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from xfeat.backbones import offline
from xfeat.backbones import weights as w
from xfeat.backbones.preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from xfeat.config import POOL_SUFFIX, POOLS, TRUST_SUFFIX
from xfeat.errors import BackboneError, ConfigError, WeightsUnavailableError

logger = logging.getLogger(__name__)

PREFIX = "hf:"
PENULTIMATE = "penultimate"
# Files fetched from the hub: configs, safetensors weights, tokenizer vocabularies; never pickles.
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "README.md", "LICENSE*"]
# Families whose pooler_output is the final-normed CLS token (others: last_hidden_state[:, 0]).
_POOLER_IS_CLS = frozenset({"dinov2", "dinov2_with_registers", "clip_vision_model", "clip"})
# Families with no CLS token (SigLIP pools with an attention head).
_NO_CLS = ("siglip",)
# PIL's resample codes, as image processors record them.
_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}


def handles(name: str) -> bool:
    return name.startswith(PREFIX)


def trusts_code(name: str) -> bool:
    """Whether the name opts in to running the repository's own code (``--trust-remote-code``)."""
    return TRUST_SUFFIX in name


def split_name(name: str) -> tuple:
    """``hf:SOURCE[:trust_remote_code][:pool=P]`` -> ``(SOURCE, P or None)``."""
    source, _, pool = name[len(PREFIX) :].replace(TRUST_SUFFIX, "").partition(POOL_SUFFIX)
    pool = pool.replace("_", "+") or None
    if pool is not None and pool not in POOLS:
        raise ConfigError(f"--model {name}: pool {pool!r}; expected one of {', '.join(POOLS)}")
    if not source:
        raise BackboneError(f"--model {name}: expected hf:NAME (a hub name) or hf:DIR (a saved model)")
    return source, pool


def _is_path(source: str) -> bool:
    return Path(source).expanduser().is_dir() or source.startswith(("/", ".", "~"))


def normalize_name(name: str) -> str:
    """A local folder made absolute (so the name works from any folder); a hub name kept."""
    source, pool = split_name(name)
    if _is_path(source):
        source = str(Path(source).expanduser().resolve())
    trust = TRUST_SUFFIX if trusts_code(name) else ""
    return PREFIX + source + trust + (f"{POOL_SUFFIX}{pool.replace('+', '_')}" if pool else "")


def _transformers(name: str):
    try:
        import transformers
    except ImportError:
        raise BackboneError(
            f"--model {name} needs transformers, which is not installed; install it with "
            "`pip install 'xfeat[hf]'`"
        ) from None
    transformers.utils.logging.disable_progress_bar()
    return transformers


def hub_offline_reason() -> Optional[str]:
    """Why the hub cannot be reached now (HF_HUB_OFFLINE, or its host does not resolve), else
    None; answered in milliseconds, so an offline machine never waits for retries."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    host = urlparse(constants.ENDPOINT).hostname or ""
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return f"{host or constants.ENDPOINT} cannot be reached"
    return None


def model_dir(source: str, *, code: bool = False) -> Path:
    """The local folder of ``source``: itself, its snapshot in the Hugging Face cache, or the
    snapshot downloaded now (configs and safetensors only) when the hub is reachable."""
    if _is_path(source):
        path = Path(source).expanduser()
        if not (path / "config.json").is_file():
            raise BackboneError(
                f"--model hf:{source}: no config.json in {path}; expected a folder written by "
                "model.save_pretrained(...) (and image_processor.save_pretrained(...))"
            )
        return path.resolve()
    return _hub_snapshot(source, code=code)


def _hub_snapshot(repo: str, *, code: bool = False) -> Path:
    from huggingface_hub import constants, snapshot_download

    try:
        return Path(snapshot_download(repo, local_files_only=True))
    except Exception:  # LocalEntryNotFoundError and relatives: not (fully) cached
        pass
    reason = hub_offline_reason()
    if reason:
        raise WeightsUnavailableError(
            f"hf:{repo} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and {reason}; "
            f"download it once on a connected machine with `hf download {repo}` (then copy the "
            "cache folder here, or set HF_HOME to it), or pass a saved folder: --model hf:DIR"
        )
    logger.info("downloading hf:%s into %s", repo, constants.HF_HUB_CACHE)
    try:
        patterns = _HUB_PATTERNS + (["*.py"] if code else [])  # code only when trusted
        return Path(snapshot_download(repo, allow_patterns=patterns))
    except Exception as exc:  # hub and network errors come in many types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise WeightsUnavailableError(
            f"could not download hf:{repo} ({first[:200]}); check the name on "
            f"https://huggingface.co/{repo}, log in with `hf auth login` for a gated model, or "
            "pass a saved folder: --model hf:DIR"
        ) from None


@functools.lru_cache(maxsize=32)
def _config(folder: str, trust: bool = False):
    transformers = _transformers(folder)
    try:
        return transformers.AutoConfig.from_pretrained(
            folder, trust_remote_code=trust, local_files_only=True
        )
    except (ValueError, KeyError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise BackboneError(
            f"hf:{folder}: transformers cannot build this model without running the "
            f"repository's own code ({first[:160]}); xfeat runs it only with "
            "--trust-remote-code (read that code first: it runs with your permissions)"
        ) from None


def _model_class(config):
    """The class the checkpoint was saved as when it is a vision tower with a projection
    (``CLIPVisionModelWithProjection``), else ``AutoModel``'s choice for the config."""
    import transformers

    arch = (getattr(config, "architectures", None) or [""])[0]
    if arch.endswith("VisionModelWithProjection") and hasattr(transformers, arch):
        return getattr(transformers, arch)
    return transformers.AutoModel


@functools.lru_cache(maxsize=32)
def _describe(name: str) -> dict:
    """What the model is, from its architecture built on the meta device (no weights)."""
    source, pool = split_name(name)
    trust = trusts_code(name)
    folder = model_dir(source, code=trust)
    config = _config(str(folder), trust)
    with torch.device("meta"):
        model = _from_config(config, trust)
    tower, projection = _tower(model)
    vcfg = getattr(config, "vision_config", None) or config
    family = vcfg.model_type
    has_cls = not family.startswith(_NO_CLS)
    hidden = int(vcfg.hidden_size)
    embed_dim = int(projection.out_features) if projection is not None else hidden
    default = "embed" if projection is not None or not has_cls else "cls"
    pool = pool or default
    if pool in ("cls", "cls+mean") and not has_cls:
        raise ConfigError(f"--model {name}: {family} has no CLS token; use --pool mean or embed")
    dims = {"cls": hidden, "mean": hidden, "cls+mean": 2 * hidden, "embed": embed_dim}
    parts = [tower] + ([projection] if projection is not None else [])
    return {
        "folder": folder,
        "family": family,
        "pool": pool,
        "default_pool": default,
        "feature_dim": dims[pool],
        "hidden": hidden,
        "layers": int(vcfg.num_hidden_layers),
        "has_cls": has_cls,
        "patch": int(getattr(vcfg, "patch_size", 16)),
        "image_size": int(getattr(vcfg, "image_size", 224)),
        "parameters": int(sum(p.numel() for m in parts for p in m.parameters())),
        "dual": hasattr(model, "get_text_features"),
        "trust": trust,
    }


def _from_config(config, trust: bool = False) -> nn.Module:
    """The architecture of ``config``, initialised as transformers does (no weights read)."""
    cls = _model_class(config)
    if hasattr(cls, "from_config"):
        return cls.from_config(config, trust_remote_code=trust)
    return cls(config)


def _tower(model: nn.Module) -> tuple:
    """``(vision transformer, projection or None)`` of a transformers model."""
    tower = getattr(model, "vision_model", model)
    return tower, getattr(model, "visual_projection", None)


def check_name(name: str) -> None:
    _describe(name)


def feature_dim(name: str) -> int:
    return _describe(name)["feature_dim"]


def parameter_count(name: str) -> int:
    """Parameters of the image tower (and its projection)."""
    return _describe(name)["parameters"]


def min_input_size(name: str) -> int:
    """DINOv2 interpolates its position embeddings (any multiple of the patch); others need
    the size they were trained at."""
    d = _describe(name)
    return d["patch"] if d["family"].startswith("dinov2") else d["image_size"]


def resolve_weights(name: str, weights, *, seed: int = 0, digest_memo=None) -> tuple:
    """``(WeightsInfo, None)``: ``DEFAULT`` (the checkpoint's safetensors), ``none`` or a file."""
    source, _ = split_name(name)
    value = "none" if weights is None else str(weights)
    if value.lower() in ("none", "random"):
        return w.WeightsInfo("random", f"random(seed={seed})"), None
    if value == "DEFAULT":
        folder = _describe(name)["folder"]
        files = _safetensors_files(folder, name)
        digest = _digest(files, digest_memo)
        url = None if _is_path(source) else f"https://huggingface.co/{source}"
        return w.WeightsInfo("hf", source if url else str(folder), sha256=digest, url=url), None
    path = Path(value).expanduser()
    if path.is_file():
        return w.WeightsInfo("file", str(path.resolve()), sha256=w.sha256_file(path, digest_memo)), None
    raise BackboneError(
        f"--weights {value!r} for {name}: expected 'DEFAULT' (the checkpoint's weights), 'none' "
        "(random, from its config) or the path of a state-dict file (.safetensors, .bin)"
    )


def _safetensors_files(folder: Path, name: str) -> list:
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in folder.glob("*.bin"))
    raise BackboneError(
        f"{name}: no .safetensors weights in {folder}"
        + (
            f" (only {', '.join(pickles)}, a pickle); pass --weights {folder / pickles[0]} to "
            "read its tensors with torch.load(weights_only=True), or convert it to safetensors"
            if pickles
            else "; save the model with save_pretrained(..., safe_serialization=True)"
        )
    )


def _digest(files: list, digest_memo) -> str:
    """sha256 of the one weights file, or of the shards' digests in order."""
    digests = [w.sha256_file(f, digest_memo) if digest_memo else offline.file_sha256(f) for f in files]
    if len(digests) == 1:
        return digests[0]
    return hashlib.sha256("".join(digests).encode()).hexdigest()


def default_preprocessing(name: str, extra=None) -> Preprocessing:
    """The image processor's (``preprocessor_config.json``), mapped onto :class:`Preprocessing`."""
    folder = _describe(name)["folder"]
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        logger.warning("%s has no preprocessor_config.json: ImageNet preprocessing (256, 224)", folder)
        return Preprocessing()
    try:
        spec = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path} as JSON ({exc})") from None
    return preprocessing_from_processor(spec, source=str(path))


def _side(value, source: str, what: str) -> tuple:
    """``(size, exact)`` of a processor ``size``/``crop_size``: exact is True for a
    ``{"height", "width"}`` square, False for ``{"shortest_edge"}``."""
    if isinstance(value, (int, float)):
        return int(value), True
    if isinstance(value, dict):
        if "shortest_edge" in value and value.get("longest_edge") is None:
            return int(value["shortest_edge"]), False
        if "height" in value and "width" in value:
            if int(value["height"]) != int(value["width"]):
                raise ConfigError(
                    f"{source}: {what} {value}; xfeat's preprocessing is square, so the "
                    "model needs --image-size/--resize-size set by hand"
                )
            return int(value["height"]), True
    raise ConfigError(
        f"{source}: {what} {value!r} not understood; expected shortest_edge or height/width"
    )


# Processor settings that change the pixels and that the mapping below does not reproduce
# (besides crop_pct, which it reproduces for ConvNeXt's processors only).
_UNMAPPED = ("do_pad", "do_flip_channel_order", "do_reduce_labels")


def _refuse_unmapped(spec: dict, source: str) -> None:
    kind = str(spec.get("image_processor_type") or "image processor")
    on = [k for k in _UNMAPPED if spec.get(k)]
    if spec.get("crop_pct") is not None and not kind.startswith("ConvNext"):
        on.append(f"crop_pct={spec['crop_pct']}")
    if on:
        raise ConfigError(
            f"{source}: {', '.join(on)} of a {kind} is not reproduced by xfeat's preprocessing, "
            "so its features would not be the model's; use the model through timm: or export "
            "it with its preprocessing as torchscript:"
        )


def preprocessing_from_processor(spec: dict, *, source: str = "image processor") -> Preprocessing:
    """An image processor's configuration (``processor.to_dict()``) as xfeat's preprocessing.

    ``size {"shortest_edge": S}`` resizes the short side (``crop`` mode); ``{"height": S,
    "width": S}`` resizes the whole image to S x S (``stretch`` mode, as ViT and SigLIP
    processors do); ``crop_size`` is the centre crop when ``do_center_crop``; ConvNeXt's
    ``crop_pct`` as its processor applies it; ``resample`` the filter; ``(x * rescale_factor -
    mean) / std`` becomes ``(x / 255 - mean') / std'``. Settings it cannot reproduce (padding,
    BGR channel order, another processor's ``crop_pct``) are refused with a one-line error.
    """
    size, exact = _side(spec.get("size", 224), source, "size")
    if not spec.get("do_resize", True):
        raise ConfigError(f"{source}: do_resize is false; set --image-size and --resize-size by hand")
    _refuse_unmapped(spec, source)
    crop = size
    if spec.get("do_center_crop", False) and spec.get("crop_size") is not None:
        crop, _ = _side(spec["crop_size"], source, "crop_size")
    if spec.get("crop_pct") is not None and not exact:
        # ConvNeXt: below 384 px the short side goes to int(S / crop_pct), then the centre
        # S x S crop; from 384 px on the image is resized to S x S (no crop)
        if size < 384:
            crop, size = size, int(size / float(spec["crop_pct"]))
        else:
            exact = True
    resample = spec.get("resample", 2)
    interpolation = _RESAMPLE.get(resample if isinstance(resample, int) else -1)
    if interpolation is None:
        raise ConfigError(f"{source}: resample {resample!r}; expected a PIL code 0-3")
    scale = float(spec.get("rescale_factor", 1 / 255)) if spec.get("do_rescale", True) else 1.0
    mean, std = (0.0,) * 3, (1.0,) * 3
    if spec.get("do_normalize", True):
        mean = tuple(spec.get("image_mean", IMAGENET_MEAN))
        std = tuple(spec.get("image_std", IMAGENET_STD))
    # (x * scale - m) / s == (x / 255 - m / (255 scale)) / (s / (255 scale))
    k = 255.0 * scale
    return Preprocessing(
        max(size, crop),
        crop,
        tuple(m / k for m in mean),
        tuple(s / k for s in std),
        interpolation,
        resize_mode="stretch" if exact else "crop",
        crop_offset="floor",  # transformers' center_crop: int((side - crop) / 2)
    )


def build(name: str, info: w.WeightsInfo, extra=None, *, progress: bool = True) -> tuple:
    """``(HFImageModel, info, ("classifier", D, "linear"))``; seed the RNG first."""
    _transformers(name)
    d = _describe(name)
    tower, projection = _tower(build_full(name, info))
    module = HFImageModel(
        tower,
        projection,
        d["pool"],
        cls_from_pooler=d["family"] in _POOLER_IS_CLS,
        patch=d["patch"],
    )
    return module.float().eval(), info, ("classifier", d["feature_dim"], "linear")


def _load_file(model: nn.Module, path: Path) -> None:
    """A state dict (safetensors or ``torch.load(weights_only=True)``) into ``model``, strictly;
    a checkpoint saved from a model with a head (keys under ``dinov2.``) fits too."""
    state = w.read_state_dict_file(path)
    prefix = getattr(model, "base_model_prefix", "") + "."
    expected = model.state_dict()
    if prefix != "." and not any(k in expected for k in state):
        state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    w.load_state_dict_into(model, state, classifier_path="\0", source=str(path))


class HFImageModel(nn.Module):
    """A transformers image tower that returns ``(N, D)`` pooled features.

    ``pool`` as :data:`xfeat.config.POOLS`; ``classifier`` is where fine-tuning installs its
    new last layer (an ``Identity`` for features).
    """

    def __init__(self, tower: nn.Module, projection, pool: str, *, cls_from_pooler: bool, patch: int):
        super().__init__()
        self.tower, self.projection, self.pool = tower, projection, pool
        self.cls_from_pooler, self.patch = cls_from_pooler, patch
        self.norm = getattr(tower, "layernorm", None) or getattr(tower, "post_layernorm", None)
        self.classifier = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pooled(self.tower(pixel_values=x), x))

    def pooled(self, out, x: torch.Tensor) -> torch.Tensor:
        if self.pool == "embed":
            pooled = out.pooler_output
            return self.projection(pooled) if self.projection is not None else pooled
        tokens = out.last_hidden_state
        cls = out.pooler_output if self.cls_from_pooler else tokens[:, 0]
        if self.pool == "cls":
            return cls
        patches = (x.shape[-2] // self.patch) * (x.shape[-1] // self.patch)
        mean = tokens[:, tokens.shape[1] - patches :].mean(dim=1)  # after CLS and registers
        return mean if self.pool == "mean" else torch.cat([cls, mean], dim=1)

    def forward_blocks(self, x: torch.Tensor, names: list) -> dict:
        """``{block.I: CLS token of block I after the final norm, penultimate: pooled}``."""
        out = self.tower(pixel_values=x, output_hidden_states=True)
        result = {}
        for name in names:
            if name == PENULTIMATE:
                result[name] = self.pooled(out, x)
            else:
                cls = out.hidden_states[int(name.split(".")[1]) + 1][:, 0]
                result[name] = self.norm(cls) if self.norm is not None else cls
        return result


def resolve_blocks(name: str, layers: tuple) -> list:
    """``[(block name, dim)]`` for ``--layers penultimate`` or ``last:N`` (+ penultimate)."""
    d = _describe(name)
    blocks = []
    for layer in layers:
        if layer == PENULTIMATE:
            continue
        n = layer.partition("last:")[2]
        if not layer.startswith("last:") or not n.isdigit() or not 1 <= int(n) <= d["layers"]:
            raise ConfigError(
                f"--layers {layer!r} with {name}: expected penultimate or last:N, N from 1 to "
                f"its {d['layers']} blocks (the CLS tokens of the last N blocks)"
            )
        if not d["has_cls"]:
            raise ConfigError(f"--layers {layer} with {name}: {d['family']} has no CLS token")
        blocks += [(f"block.{i}", d["hidden"]) for i in range(d["layers"] - int(n), d["layers"])]
    return blocks + [(PENULTIMATE, d["feature_dim"])]


def describe() -> list:
    """The row for ``xfeat models``: how to name a model of this family."""
    return [
        {
            "name": "hf:NAME_OR_DIR[:pool=P]",
            "feature_dim": None,
            "params_m": None,
            "weights": ["DEFAULT (the checkpoint's)", "none", "PATH"],
            "source": "transformers",
        }
    ]


def cached_models() -> list:
    """Models in the local Hugging Face cache: ``{repo, revisions, size_mb, path, safetensors}``."""
    try:
        from huggingface_hub import constants, scan_cache_dir

        # the folder as configured now (scan_cache_dir's default is read when it is imported)
        info = scan_cache_dir(constants.HF_HUB_CACHE)
    except ImportError:  # huggingface_hub missing
        return []
    except Exception as exc:  # no cache folder yet (CacheNotFound), or an unreadable one
        logger.debug("no Hugging Face cache listed: %s", exc)
        return []
    rows = []
    for repo in sorted(info.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model":
            continue
        files = {f.file_name for rev in repo.revisions for f in rev.files}
        rows.append(
            {
                "repo": repo.repo_id,
                "revisions": len(repo.revisions),
                "size_mb": round(repo.size_on_disk / 1e6, 1),
                "path": str(repo.repo_path),
                "safetensors": any(f.endswith(".safetensors") for f in files),
            }
        )
    return rows


def check_text_tower(name: str) -> dict:
    """The model's description, after checking (from its config, no weights) that it has a
    text tower whose space its image features share; a one-line error otherwise."""
    d = _describe(name)
    if not d["dual"]:
        raise BackboneError(
            f"{name} has no text tower (it is a {d['family']} image model); zero-shot needs a "
            "CLIP- or SigLIP-style checkpoint with both towers, or an open_clip: model"
        )
    if d["pool"] != "embed":
        raise ConfigError(f"zero-shot compares text with the image embedding: drop --pool from {name}")
    return d


def text_tower(name: str, info: w.WeightsInfo):
    """``(encode(prompts) -> (P, D) tensor, logit scale)`` of a CLIP/SigLIP model's text tower,
    in the space of its ``embed`` image features."""
    transformers = _transformers(name)
    d = check_text_tower(name)
    folder = d["folder"]
    model = build_full(name, info)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise BackboneError(f"{name}: no tokenizer in {folder} ({first[:160]})") from None
    padding = "max_length" if d["family"].startswith("siglip") else True

    def encode(prompts: list) -> torch.Tensor:
        tokens = tokenizer(list(prompts), padding=padding, truncation=True, return_tensors="pt")
        with torch.inference_mode():
            out = model.get_text_features(**tokens)
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    return encode, float(model.logit_scale.detach().exp())


def build_full(name: str, info: w.WeightsInfo) -> nn.Module:
    """The whole transformers model (both towers of a CLIP) with ``info``'s weights."""
    d = _describe(name)
    folder, trust = d["folder"], d["trust"]
    config = _config(str(folder), trust)
    if info.kind == "hf":
        _safetensors_files(folder, name)
        model = _model_class(config).from_pretrained(
            str(folder),
            use_safetensors=True,
            trust_remote_code=trust,
            local_files_only=True,
            dtype=torch.float32,
        )
    else:
        model = _from_config(config, trust)
        if info.kind == "file":
            _load_file(model, Path(info.id))
    return model.float().eval()
