"""The forward pass: images -> the model as it runs fastest here -> feature blocks.

:class:`Runner` is the backbone prepared for inference (blocks, device, memory layout,
optionally compiled or int8); :func:`extract_group` streams one split (or view) of a dataset
through it into the cache writer, timing each stage; :func:`embed_files` does the same for
loose files (``predict``).
"""

from __future__ import annotations

import logging
import time
from typing import Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from xfeat.config import default_cache_dir
from xfeat.data.dataset import Split
from xfeat.data.profile import STAT_COLUMNS
from xfeat.errors import ImageReadError
from xfeat.extraction.allocator import freed_memory_kept
from xfeat.extraction.blocks import BlockExtractor
from xfeat.extraction.compiled import compile_for_inference, first_line
from xfeat.extraction.runtime import (
    channels_last_default,
    decode_ahead,
    inference_batches,
    pad_batch,
    stop_decoding,
    to_memory_format,
)
from xfeat.extraction.views import ViewImages

logger = logging.getLogger(__name__)


class Runner:
    """``runner(uint8 NCHW batch)`` -> ``{block: float32 (N, D)}`` on the CPU.

    ``channels_last=None`` picks the faster layout for the model family; ``compiled`` batches
    are padded to ``batch_size`` so that one static graph serves every batch (a last batch of
    at most half that size runs eagerly instead, which is cheaper). A compilation
    that fails falls back to eager mode with a warning: extraction never fails because of it.
    """

    def __init__(
        self,
        backbone,
        blocks: list,
        device: torch.device,
        *,
        batch_size: int,
        channels_last: Optional[bool] = None,
        compile: bool = False,
        cache_dir=None,
        precision: str = "fp32",
        calibration=None,
    ):
        cache_dir = default_cache_dir() if cache_dir is None else cache_dir  # compiled graphs
        self.backbone, self.device, self.batch_size = backbone, device, batch_size
        self.normalize = backbone.preprocessing.normalize
        self.channels_last = (
            channels_last_default(backbone.name, device) if channels_last is None else channels_last
        )
        module = BlockExtractor(backbone.model, blocks).eval().to(device)
        if self.channels_last:
            module = module.to(memory_format=torch.channels_last)
        self.precision = precision
        self.static = precision == "int8"  # an exported graph takes whole batches only
        name = f"{backbone.name}-{precision}"
        if precision == "int8":  # offered where check_int8 allows (extract checks first)
            from xfeat.extraction.quantize import calibration_salt

            # calibrated and quantized only when no earlier run kept the compiled graph
            self._fp32, self._calibration, self._eager = module, calibration, None
            self.compiled = compile_for_inference(
                module, cache_dir, name=name, build=self._quantize, salt=calibration_salt(calibration)
            )
        else:  # the uint8 batch goes in: the normalisation is compiled into the graph
            self._eager = Normalized(module, backbone.preprocessing.mean, backbone.preprocessing.std).to(
                device
            )
            self.compiled = compile_for_inference(self._eager, cache_dir, name=name) if compile else None

    @property
    def module(self) -> torch.nn.Module:
        """The eager module (int8: calibrated and quantized on first use)."""
        return self._eager if self._eager is not None else self._quantize()

    def _quantize(self) -> torch.nn.Module:
        from xfeat.extraction.quantize import quantize_int8

        if self._eager is None:
            with torch.inference_mode(False):  # export cannot trace inference tensors
                self._eager = quantize_int8(
                    self._fp32, self._calibration, self._prepare, self.batch_size
                )
        return self._eager

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device, non_blocking=True)
        if self.precision == "int8":  # the quantizer calibrated on normalised floats
            x = self.normalize(x)
        return to_memory_format(x, self.channels_last)

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> dict:
        n = len(images)
        # a short last batch runs eagerly: cheaper than padding it to the compiled shape
        compiled = self.compiled if n > self.batch_size // 2 or self.static else None
        if compiled is not None or self.static:
            images = pad_batch(images, self.batch_size)  # one static shape for every batch
        x = self._prepare(images)
        out = None
        if compiled is not None:
            try:
                out = self.compiled(x)
            except Exception as exc:  # inductor could not build this graph here
                logger.warning(
                    "the compiled model failed (%s); continuing in eager mode", first_line(exc)
                )
                self.compiled = None
        if out is None:
            out = self.module(x)
        return {k: v[:n].float().cpu().numpy() for k, v in out.items()}


class Normalized(torch.nn.Module):
    """``module((uint8 images - 255 mean) / (255 std))``: the input conversion as part of the
    module, so that a compiled graph fuses it into one loop."""

    def __init__(self, module: torch.nn.Module, mean, std):
        super().__init__()
        self.module = module
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1) * 255.0)

    def forward(self, images: torch.Tensor):
        return self.module((images.float() - self.mean) / self.std)


def extract_group(
    runner: Runner,
    loader,
    writer,
    group: str,
    *,
    start: int,
    batch_size: int,
    skip_bad: bool,
    progress: bool,
) -> dict:
    """Stream the batches of ``loader`` (:func:`~xfeat.extraction.runtime.inference_batches`
    over a :class:`ViewImages`: one split or view, from row ``start``) into ``writer``'s
    ``group``."""
    split = loader.dataset.split
    wait = forward = write = 0.0
    row, t_start = start, time.perf_counter()
    bar = tqdm(
        total=len(split),
        initial=start,
        unit="img",
        dynamic_ncols=True,
        desc=f"{runner.backbone.name} {group}",
        disable=not progress,
    )
    t0 = t_start
    with bar:  # closed (its line ended) whatever interrupts the loop
        for batch, errors, stats in loader:
            t1 = time.perf_counter()
            ok = np.array([not e for e in errors])
            if not ok.all() and not skip_bad:
                i = int(np.flatnonzero(~ok)[0])
                raise ImageReadError(sample_path(split, row + i), errors[i])
            for i in np.flatnonzero(~ok):
                logger.warning(
                    "skipping unreadable image %s: %s", sample_path(split, row + i), errors[i]
                )
            blocks = runner(batch)
            t2 = time.perf_counter()
            for array in blocks.values():
                array[~ok] = np.nan
            writer.write(
                group, row, blocks, ok, seconds=time.perf_counter() - t0, stats=np.asarray(stats)
            )
            t3 = time.perf_counter()
            wait, forward, write = wait + (t1 - t0), forward + (t2 - t1), write + (t3 - t2)
            row += len(ok)
            bar.update(len(ok))
            t0 = t3
    elapsed, n = time.perf_counter() - t_start, len(split) - start
    logger.info(
        "%s: %d images in %.1f s (%.1f img/s; waiting for data %.1f s, forward %.1f s, write %.1f s)",
        group,
        n,
        elapsed,
        n / elapsed if elapsed else 0,
        wait,
        forward,
        write,
    )
    return {
        "resumed_from_row": start,
        "images": n,
        "seconds": elapsed,
        "data_wait_seconds": wait,
        "forward_seconds": forward,
        "write_seconds": write,
        "device": str(runner.device),
        "batch_size": batch_size,
        "channels_last": runner.channels_last,
        "compiled": runner.compiled is not None,
    }


def sample_path(split: Split, row: int) -> str:
    return split.paths[row] if split.paths is not None else split.ids[row]


@freed_memory_kept()  # every batch reuses the previous one's memory
def embed_files(
    runner: Runner,
    paths,
    *,
    views=(None,),
    batch_size: int = 32,
    num_workers: Optional[int] = None,
    progress: bool = True,
    geometry: Optional[dict] = None,
):
    """``({view: {block: (N, D) with NaN rows}}, errors, stats)`` for image files; ``stats``
    holds the centre view's stat rows (:data:`xfeat.data.profile.STAT_COLUMNS`).

    An unreadable file gives NaN rows and its error message instead of stopping the rest.
    ``geometry``: bring each image to the training geometry first (see :class:`ViewImages`).
    """
    split = Split(
        "files",
        [str(p) for p in paths],
        np.zeros(len(paths), dtype=np.int64),
        paths=[str(p) for p in paths],
    )
    outputs, errors, stats = {}, [], None
    loaders = {
        view: inference_batches(
            ViewImages(split, runner.backbone.preprocessing, view, geometry=geometry),
            batch_size=batch_size,
            num_workers=num_workers,
            device=runner.device,
        )
        for view in views
    }
    try:
        decode_ahead(list(loaders.values()))  # each view's first batch while the last one's runs
        for view, loader in loaders.items():
            parts, errs, rows = [], [], []
            with tqdm(
                total=len(split),
                unit="img",
                desc=f"{runner.backbone.name} {view or ''}",
                disable=not progress,
            ) as bar:
                for batch, batch_errors, batch_stats in loader:
                    rows.append(np.asarray(batch_stats))
                    out = runner(batch)
                    bad = [bool(e) for e in batch_errors]
                    for array in out.values():
                        array[bad] = np.nan
                    parts.append(out)
                    errs += [
                        f"cannot read image {split.paths[len(errs) + i]}: {e}" if e else ""
                        for i, e in enumerate(batch_errors)
                    ]
                    bar.update(len(bad))
            outputs[view] = {b: np.concatenate([p[b] for p in parts]) for b in parts[0]} if parts else {}
            errors = errs
            if stats is None:
                stats = np.concatenate(rows) if rows else np.zeros((0, len(STAT_COLUMNS)), np.float32)
    finally:
        stop_decoding(loaders.values())
    return outputs, errors, stats
