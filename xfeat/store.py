"""Decoded image store for training: every image decoded once, kept as uint8 on disk.

Fine-tuning draws random crops from each image on every epoch. Instead of decoding the JPEG
each time, each split is decoded once into ``(N, R, R, 3)`` uint8 (short side resized to R,
centre square) in a ``.npy`` file memory-mapped by the data loaders. The store is keyed on
the dataset fingerprint, R and the interpolation, built resumably (``rows_done`` in a side
file) and renamed into place when complete.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .backbones import Preprocessing
from .cache import entry_lock
from .data import Dataset, ImageReadError, Split

logger = logging.getLogger(__name__)

_FLUSH_EVERY = 256


def store_path(cache_dir, dataset: Dataset, size: int, interpolation: str) -> Path:
    key = hashlib.sha256(json.dumps([dataset.fingerprint, size, interpolation]).encode())
    return Path(cache_dir) / "stores" / f"{dataset.name}-{size}px-{key.hexdigest()[:16]}"


def build_store(dataset: Dataset, preprocessing: Preprocessing, *, cache_dir="cache",
                progress: bool = True) -> dict:
    """Decode every split once (or reuse/resume the store); return split -> memmap array."""
    size, interpolation = preprocessing.resize_size, preprocessing.interpolation
    root = store_path(cache_dir, dataset, size, interpolation)
    arrays = {}
    with entry_lock(root.with_suffix(".npy")):
        root.mkdir(parents=True, exist_ok=True)
        for name, split in dataset.splits.items():
            arrays[name] = _build_split(root, split, preprocessing, progress)
    return arrays


def _build_split(root: Path, split: Split, preprocessing: Preprocessing, progress: bool):
    size = preprocessing.resize_size
    final = root / f"{split.name}.npy"
    if final.is_file():
        return np.load(final, mmap_mode="r")
    partial, state_file = root / f"{split.name}.npy.partial", root / f"{split.name}.progress"
    shape = (len(split), size, size, 3)
    start = 0
    if partial.is_file() and state_file.is_file():
        state = json.loads(state_file.read_text())
        if state.get("shape") == list(shape):
            start = state["rows_done"]
    if start == 0:
        array = np.lib.format.open_memmap(partial, mode="w+", dtype=np.uint8, shape=shape)
    else:
        array = np.load(partial, mmap_mode="r+")
        logger.info("resuming image store %s/%s at row %d", root.name, split.name, start)
    bar = tqdm(total=len(split), initial=start, unit="img", desc=f"decode {split.name}",
               disable=not progress)
    for i in range(start, len(split)):
        try:
            array[i] = preprocessing.resize_square(split.read_image(i, draft_size=size))
        except ImageReadError:
            array[i] = 0  # unreadable images are excluded by the caller's sample list
            logger.warning("store: unreadable image %s left black", split.ids[i])
        bar.update(1)
        if (i + 1) % _FLUSH_EVERY == 0 or i + 1 == len(split):
            array.flush()
            _write_state(state_file, {"shape": list(shape), "rows_done": i + 1})
    bar.close()
    del array
    os.replace(partial, final)
    state_file.unlink(missing_ok=True)
    return np.load(final, mmap_mode="r")


def _write_state(path: Path, state: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(state))
    os.replace(tmp, path)


def random_resized_crop_params(height: int, width: int, generator: torch.Generator,
                               scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple:
    """torchvision's RandomResizedCrop parameters, drawn from an explicit generator."""
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1],
                                                   generator=generator)).item()
        w = int(round((target_area * aspect) ** 0.5))
        h = int(round((target_area / aspect) ** 0.5))
        if 0 < w <= width and 0 < h <= height:
            i = torch.randint(0, height - h + 1, (1,), generator=generator).item()
            j = torch.randint(0, width - w + 1, (1,), generator=generator).item()
            return i, j, h, w
    in_ratio = width / height  # fallback: centre crop at the clamped ratio
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w
