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
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from xfeat.backbones import Preprocessing
from xfeat.cache import entry_lock
from xfeat.data.dataset import Dataset, Split
from xfeat.data.profile import STAT_COLUMNS, stat_row, summarize
from xfeat.files import atomic_write

logger = logging.getLogger(__name__)

_FLUSH_EVERY = 256


def store_path(cache_dir, dataset: Dataset, preprocessing: Preprocessing) -> Path:
    """The store's folder, keyed on the data and on how the squares are made (the resize
    mode and the DICOM window and frame only when not the defaults, so that older stores keep
    their keys)."""
    p = preprocessing
    fields = [dataset.fingerprint, p.resize_size, p.interpolation]
    if p.resize_mode != "crop":
        fields.append(p.resize_mode)
    if (p.dicom_window, p.dicom_frame) != ("file", None):
        fields.append([p.dicom_window, p.dicom_frame])
    if p.crop_offset != "round":  # where the stored square sits in the resized image
        fields.append(["crop_offset", p.crop_offset])
    key = hashlib.sha256(json.dumps(fields).encode())
    return Path(cache_dir) / "stores" / f"{dataset.name}-{p.resize_size}px-{key.hexdigest()[:16]}"


def build_store(
    dataset: Dataset, preprocessing: Preprocessing, *, cache_dir="cache", progress: bool = True
):
    """Decode every split once (or reuse/resume the store).

    Returns ``(arrays, seconds)``: split -> read-only memmap ``(N, R, R, 3)``, and the
    seconds that decoding took when the store was made (whether or not this call made it).
    An unreadable image raises :class:`~xfeat.data.dataset.ImageReadError` naming the file.
    """
    root = store_path(cache_dir, dataset, preprocessing)
    arrays = {}
    with entry_lock(root.with_suffix(".npy")):
        root.mkdir(parents=True, exist_ok=True)
        seconds_file = root / "seconds.json"
        seconds = json.loads(seconds_file.read_text()) if seconds_file.is_file() else {}
        for name, split in dataset.splits.items():
            arrays[name], took = _build_split(root, split, preprocessing, progress)
            if took is not None:
                seconds[name] = seconds.get(name, 0.0) + took
                _write_json(seconds_file, seconds)
    return arrays, float(sum(seconds.values()))


def _build_split(root: Path, split: Split, preprocessing: Preprocessing, progress: bool):
    size = preprocessing.resize_size
    final = root / f"{split.name}.npy"
    if final.is_file():
        return np.load(final, mmap_mode="r"), None
    partial, state_file = root / f"{split.name}.npy.partial", root / f"{split.name}.progress"
    shape = (len(split), size, size, 3)
    start = 0
    if partial.is_file() and state_file.is_file():
        state = json.loads(state_file.read_text())
        if state.get("shape") == list(shape):
            start = state["rows_done"]
    stats_partial = root / f"{split.name}.stats.npy.partial"
    if start == 0:
        array = np.lib.format.open_memmap(partial, mode="w+", dtype=np.uint8, shape=shape)
    else:
        array = np.load(partial, mmap_mode="r+")
        logger.info("resuming image store %s/%s at row %d", root.name, split.name, start)
    if start == 0 or not stats_partial.is_file():  # a store begun by xfeat 0.2 had none
        stats = np.lib.format.open_memmap(
            stats_partial, mode="w+", dtype=np.float32, shape=(len(split), len(STAT_COLUMNS))
        )
        stats[:] = np.nan
    else:
        stats = np.load(stats_partial, mmap_mode="r+")
    t0 = time.perf_counter()
    bar = tqdm(
        total=len(split), initial=start, unit="img", desc=f"decode {split.name}", disable=not progress
    )
    p = preprocessing
    for i in range(start, len(split)):
        image, header = split.read_image_with_header(
            i, draft_size=size, exif_transpose=p.exif_transpose, dicom=p.dicom
        )
        array[i] = p.resize_square(image)
        stats[i] = stat_row(header, p.center_crop(array[i]), p.mean, p.std)
        bar.update(1)
        if (i + 1) % _FLUSH_EVERY == 0 or i + 1 == len(split):
            array.flush()
            stats.flush()
            _write_json(state_file, {"shape": list(shape), "rows_done": i + 1})
    bar.close()
    del array, stats
    os.replace(stats_partial, root / f"{split.name}.stats.npy")
    os.replace(partial, final)
    state_file.unlink(missing_ok=True)
    return np.load(final, mmap_mode="r"), time.perf_counter() - t0


def store_profile(dataset: Dataset, preprocessing: Preprocessing, *, cache_dir, split="train"):
    """The input profile (:func:`xfeat.data.profile.summarize`) of one split of the store, or
    None for a store built before the store kept its image facts."""
    path = store_path(cache_dir, dataset, preprocessing) / f"{split}.stats.npy"
    return summarize(np.load(path)) if path.is_file() else None


def _write_json(path: Path, state: dict) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(state).encode()))


def random_resized_crop_params(
    height: int, width: int, generator: torch.Generator, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)
) -> tuple:
    """torchvision's RandomResizedCrop parameters, drawn from an explicit generator."""
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect = torch.exp(
            torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator)
        ).item()
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
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
