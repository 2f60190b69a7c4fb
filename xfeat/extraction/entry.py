"""``extract``: reuse a complete cache entry found without torch, else plan and run the pass.

A request (the data spec, the model, the weights, every option that shapes the features) has a
signature computed from the file system alone: the data's listing fingerprint
(:mod:`xfeat.data.listing`: path, size and modification time of every file), the weights
file's and a TorchScript model's path, size and modification time, the options, and the
versions of xfeat, torch and torchvision as installed (read from package metadata, not by
importing them). After a pass, the signature is remembered beside the cache
(``CACHE_DIR/index/SIGNATURE.json``, naming the entry). A later identical request finds the
entry there and, when it is complete, returns it without importing torch, building the model
or reading an image: the cached path costs milliseconds. Anything else, or any doubt, takes
the full path (:func:`xfeat.extraction.pipeline.extract`), which keys the entry on the data's
content and the weights' digest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from importlib import metadata
from pathlib import Path
from typing import Optional, Union

from xfeat import __version__
from xfeat.cache import entry_index_path, is_complete
from xfeat.config import DataSpec, default_cache_dir
from xfeat.data.listing import listing_fingerprint
from xfeat.extraction.options import shaping_options
from xfeat.files import atomic_write

logger = logging.getLogger(__name__)


def _file_identity(value) -> Optional[tuple]:
    """(path, size, mtime) of a file argument, None when ``value`` names no file."""
    try:
        path = Path(str(value)).expanduser()
        if path.is_file():
            s = path.stat()
            return str(path.resolve()), s.st_size, s.st_mtime_ns
    except (OSError, ValueError):
        pass
    return None


def _version(package: str) -> Optional[str]:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _model_files(model: str):
    """What identifies a model held in files: a TorchScript file's identity, every file of an
    ``hf:`` folder; None for a name alone; False when it cannot be told without loading (a hub
    name, whose cached snapshot may change)."""
    if model.startswith("torchscript:"):
        return _file_identity(model.split(":", 1)[1])
    if model.startswith(("hf:", "open_clip:")):
        # the folder, without the :pool= and :trust_remote_code suffixes xfeat adds
        folder = Path(
            model.split(":", 1)[1].split(":pool=")[0].split(":trust_remote_code")[0]
        ).expanduser()
        if not folder.is_dir():
            return False
        return [_file_identity(p) for p in sorted(folder.iterdir()) if p.is_file()]
    return None


def request_signature(data, model: str, weights, options: dict) -> Optional[str]:
    """The signature of an extraction request, or None when it cannot be had without loading
    the data (a data set object, a built-in set not downloaded yet, a missing path)."""
    if not isinstance(data, (str, os.PathLike, DataSpec)):
        return None
    spec = DataSpec.coerce(data)
    listing = listing_fingerprint(spec, options.get("cache_dir"))
    if listing is None:
        return None
    model = str(model)
    model_file = _model_files(model)
    if model_file is False:
        return None
    shaping = shaping_options(options)
    if shaping.get("precision", "fp32") == "fp32":
        shaping.pop("batch_size", None)  # only int8's calibration batches depend on it
    record = {
        "data": listing,
        "model": model,
        "model_file": model_file,
        "weights": str(weights),
        "weights_file": _file_identity(weights),
        "options": sorted((k, repr(v)) for k, v in shaping.items()),
        "versions": [
            __version__,
            *(_version(p) for p in ("torch", "torchvision", "timm", "transformers", "open_clip_torch")),
        ],
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def find_entry(signature: Optional[str], cache_dir=None) -> Optional[Path]:
    """The complete entry a signature was remembered with, or None."""
    if signature is None:
        return None
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    try:
        name = json.loads(entry_index_path(cache_dir, signature).read_text())["entry"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    path = cache_dir / name
    return path if Path(name).name == name and is_complete(path) else None


def remember(signature: Optional[str], path: Path, cache_dir=None) -> None:
    """Remember that requests with ``signature`` are answered by the entry at ``path``
    (best effort: a read-only cache folder only loses the shortcut)."""
    if signature is None:
        return
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    index = entry_index_path(cache_dir, signature)
    try:
        index.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(index, lambda f: f.write(json.dumps({"entry": Path(path).name}).encode()))
    except OSError as exc:  # OutputError (a read-only folder, a full disk) is one too
        logger.debug("could not remember %s: %s", index, exc)


def _under_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def extract(
    data=None,
    model: str = "resnet18",
    *,
    weights: Union[str, Path, None] = "none",
    batch_size: int = 64,
    force: bool = False,
    plan=None,
    **options,
) -> Path:
    """Extract features of every split into the cache, or find them there; return the entry.

    As :func:`xfeat.extraction.pipeline.extract` (every parameter is passed on), plus the
    shortcut of this module: an identical earlier request is answered from the cache index
    without importing torch.
    """
    signature = None
    if plan is None and not force and not _under_torchrun():
        signature = request_signature(data, model, weights, {**options, "batch_size": batch_size})
        found = find_entry(signature, options.get("cache_dir"))
        if found is not None:
            logger.info("cache hit: %s (found by the data's listing; backbone not built)", found)
            return found
    from xfeat.extraction import pipeline

    path = pipeline.extract(
        data, model, weights=weights, batch_size=batch_size, force=force, plan=plan, **options
    )
    remember(signature, path, options.get("cache_dir"))
    return path
