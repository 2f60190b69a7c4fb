"""Where and how tensors run: the device, data loaders, and the memory layout.

One place for the choices every pass shares (extraction, fine-tuning, predict), so they
agree: decoding threads or loader workers and pinned memory, ``channels_last`` where it is
faster, when compiling pays off.
"""

from __future__ import annotations

import collections
import logging
import os
from typing import Optional

import numpy as np
import torch

from xfeat.config import COMPILE_CHOICES
from xfeat.errors import ConfigError

logger = logging.getLogger(__name__)
# On a machine without CUDA, torch logs "No CUDA runtime is found" as soon as its C++-extension
# helper is imported (the compilers import it); xfeat builds no extension, so it means nothing.
if not torch.cuda.is_available():
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


def mix_seed(*values) -> int:
    """A 64-bit seed from a tuple of values (stable across processes, platforms, resumes)."""
    import hashlib

    return int.from_bytes(hashlib.blake2b(repr(values).encode(), digest_size=8).digest(), "little")


def resolve_device(device: Optional[str] = None) -> torch.device:
    """``None``/``auto``: CUDA when available, else the CPU; a clear error for a bad name."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(
            f"device {device!r} not understood; expected 'auto', 'cpu', 'cuda' or 'cuda:N'"
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"device {device!r} requested but CUDA is not available on this machine; use --device cpu"
        )
    return dev


def default_num_workers() -> int:
    return max(0, min(4, (os.cpu_count() or 1) - 1))


def default_decoding_threads() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def resolve_num_workers(num_workers: Optional[int], default=default_num_workers) -> int:
    """``None``: ``default()``; else an integer >= 0, or a clear error. More than the CPUs this
    process may use is capped there, with a note (128 workers would start 130 processes)."""
    workers = default() if num_workers is None else num_workers
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ConfigError(f"num_workers={num_workers!r}: expected an integer >= 0")
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if workers > cpus:
        logger.warning("num_workers=%d is more than the %d CPUs here: using %d", workers, cpus, cpus)
        workers = cpus
    return workers


def make_loader(
    dataset: torch.utils.data.Dataset,
    *,
    batch_size: int = 1,
    num_workers: Optional[int],
    device: torch.device,
    batch_sampler=None,
    persistent: bool = False,
    seed: int = 0,
) -> torch.utils.data.DataLoader:
    """Batches in order (or ``batch_sampler``'s); pinned memory on CUDA; ``persistent`` keeps
    the worker processes between passes (a training loader reused every epoch).

    The loader draws its workers' base seed from its own generator, never from the global
    RNG, so starting it (or not, with ``num_workers=0``) cannot shift dropout masks: results
    do not depend on the number of workers or on where a run was resumed.
    """
    workers = resolve_num_workers(num_workers)
    sizing = (
        {"batch_sampler": batch_sampler} if batch_sampler is not None else {"batch_size": batch_size}
    )
    return torch.utils.data.DataLoader(
        dataset,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=persistent and workers > 0,
        prefetch_factor=4 if workers else None,
        generator=torch.Generator().manual_seed(seed),
        **sizing,
    )


def inference_batches(dataset, *, batch_size: int, num_workers: Optional[int], device: torch.device):
    """``(uint8 images, errors, stat rows)`` batches of ``dataset`` in order, for a forward pass.

    On the CPU the images are decoded by ``num_workers`` threads of this process (default: one
    per core, at most 4; PIL releases the GIL while it decodes and resizes): no worker
    processes to start and no copies through shared memory, which the forward pass, running
    on the same cores, would otherwise pay for. A graph compiled ahead of time holds the GIL
    for its whole forward call, so decoding then happens between batches, on every core
    (worker processes, which would overlap it, were slower on a 2-core machine: they compete
    with the forward pass for the cores).

    On a GPU, or for a dataset whose items are made with torch operations
    (``dataset.uses_torch_ops``: they would start a second thread team), a
    :func:`make_loader` with worker processes. ``num_workers=0`` decodes in the calling thread.
    """
    if device.type != "cpu" or getattr(dataset, "uses_torch_ops", False):
        return make_loader(dataset, batch_size=batch_size, num_workers=num_workers, device=device)
    return ThreadedBatches(
        dataset, batch_size, resolve_num_workers(num_workers, default_decoding_threads)
    )


class ThreadedBatches:
    """Iterate over ``dataset`` in batches of ``batch_size`` ``(CHW uint8 tensor, error, stat
    row)`` items, decoded ahead by ``workers`` threads (none: in the calling thread); each
    batch is ``(N, C, H, W)`` in channels_last memory, its errors and its ``(N, 6)`` stats.

    Iterate once. :meth:`prime` starts the decoding before the iteration (while the model is
    being built, say), and a ``successor`` (see :func:`decode_ahead`) is primed as soon as this
    one hands out its last batch, so that the next split's first batch is decoded while this
    one's last batch runs: no split starts with the cores waiting for images.
    """

    prefetch = 4  # batches decoded ahead

    def __init__(self, dataset, batch_size: int, workers: int):
        self.dataset, self.batch_size, self.workers = dataset, batch_size, workers
        self.successor: Optional[ThreadedBatches] = None
        self._pool = None
        self._pending = collections.deque()
        self._next = 0  # the first row not yet handed to a decoding thread

    def __len__(self) -> int:
        return -(-len(self.dataset) // self.batch_size)

    def _batch(self, start: int):
        items = [self.dataset[i] for i in range(start, min(start + self.batch_size, len(self.dataset)))]
        # numpy stacks in this thread alone (torch.stack would start its own thread team,
        # competing with the forward pass for the cores); the pixels stay in their decoded
        # HWC order, so the batch is channels_last in memory (no conversion for most models)
        images = np.stack([image.permute(1, 2, 0).numpy() for image, _, _ in items])
        stats = np.stack([s for _, _, s in items])
        return torch.from_numpy(images).permute(0, 3, 1, 2), [error for _, error, _ in items], stats

    def prime(self) -> None:
        """Start decoding the first batches in the background now (once; nothing to do without
        decoding threads)."""
        if self.workers == 0 or self._pool is not None:
            return
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="xfeat-decode")
        self._submit(self.prefetch)

    def _submit(self, n: int) -> None:
        while n > 0 and self._next < len(self.dataset):
            self._pending.append(self._pool.submit(self._batch, self._next))
            self._next, n = self._next + self.batch_size, n - 1

    def close(self) -> None:
        """Stop decoding: batches not started are dropped, the threads exit when idle."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def __iter__(self):
        if self.workers == 0:
            yield from map(self._batch, range(0, len(self.dataset), self.batch_size))
            return
        self.prime()
        try:
            while self._pending:
                batch = self._pending.popleft().result()
                self._submit(1)
                if not self._pending and self.successor is not None:
                    self.successor.prime()  # its first batches decode while this last one runs
                yield batch
        finally:
            self.close()


def decode_ahead(loaders: list) -> None:
    """Chain ``loaders`` (from :func:`inference_batches`, iterated one after the other) so that
    each primes the next, and prime the first now. A loader without decoding threads (a
    :class:`~torch.utils.data.DataLoader`, ``num_workers=0``) is left as it is."""
    for before, after in zip(loaders, loaders[1:]):
        if isinstance(before, ThreadedBatches) and isinstance(after, ThreadedBatches):
            before.successor = after
    if loaders and isinstance(loaders[0], ThreadedBatches):
        loaders[0].prime()


def stop_decoding(loaders) -> None:
    """Close the decoding threads of ``loaders`` an error left unread (see :func:`decode_ahead`)."""
    for loader in loaders:
        if isinstance(loader, ThreadedBatches):
            loader.close()


def pad_batch(x: torch.Tensor, size: int) -> torch.Tensor:
    """``x`` with its first row repeated up to ``size`` rows (a static batch shape)."""
    return x if len(x) >= size else torch.cat([x, x[:1].expand(size - len(x), *x.shape[1:])])


def to_memory_format(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """``x`` in channels_last (4-d) or contiguous NCHW memory; a no-op when it already is."""
    if channels_last and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x.contiguous()


class PeakMemory:
    """Peak memory while the block runs: this process plus its children (data-loader workers),
    as proportional set size (shared pages counted once), sampled once a second (reading
    /proc/PID/smaps_rollup costs CPU time itself). ``mib`` is the peak, ``increase_mib`` the
    peak minus the memory held when the block started."""

    interval = 1.0

    def __enter__(self):
        import threading

        self.start = self.mib = process_memory_mib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(self.interval):
            self.mib = max(self.mib, process_memory_mib())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.mib = round(max(self.mib, process_memory_mib()), 1)
        self.increase_mib = round(self.mib - self.start, 1)


def process_memory_mib(pid="self") -> float:
    """PSS of a process and, recursively, its children (Linux /proc); else peak RSS so far."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("Pss:"))
        total = kib / 1024
        base = f"/proc/{pid}/task"
        for task in os.listdir(base):
            with open(f"{base}/{task}/children") as f:
                total += sum(process_memory_mib(child) for child in f.read().split())
        return total
    except (OSError, ValueError, StopIteration):
        if pid != "self":
            return 0.0  # a child that just exited
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def family(model_name: str) -> str:
    """The architecture family of a torchvision model name: resnet, mobilenet_v2, vit, ..."""
    import re

    name = model_name.split(":")[-1]
    for prefix in (
        "mobilenet_v2",
        "mobilenet_v3",
        "efficientnet_v2",
        "shufflenet_v2",
        "wide_resnet",
        "regnet_x",
        "regnet_y",
        "swin_v2",
        "squeezenet",
    ):
        if name.startswith(prefix):
            return prefix
    return re.match(r"[a-z]+", name).group(0) if re.match(r"[a-z]+", name) else name


# Families where channels_last is not faster than contiguous NCHW in eval on this project's CPU
# (AVX-512, 2 threads, malloc keeping freed memory), measured with
# scripts/bench_channels_last.py: ConvNeXt, Swin and ViT gain nothing (1.00x-1.01x);
# everything else runs channels_last (1.1x-2.6x faster there). On CUDA channels_last is used
# throughout.
CHANNELS_LAST_SLOWER_ON_CPU = frozenset({"convnext", "swin", "vit"})
# Compiling costs 15-60 s the first time (xfeat.extraction.compiled keeps the result: later runs load it
# in under a second) and makes the forward pass 1.1-1.45x faster than eager channels_last here
# (scripts/bench_extract.py): from a few thousand images on, the later runs win it back.
AUTO_COMPILE_MIN_IMAGES = 3000
# Transformer families (hf:, open_clip:): eager only; their graphs are not exported here.
FOUNDATION_PREFIXES = ("hf:", "open_clip:")


def check_compile(model_name: str, choice) -> None:
    """A clear error for ``--compile on`` with a model that runs eagerly only."""
    if choice in (True, "on") and str(model_name).startswith(FOUNDATION_PREFIXES):
        raise ConfigError(
            f"--compile on is not offered for {model_name}: transformer towers from "
            "transformers / open_clip run eagerly in xfeat; omit --compile (or pass off)"
        )


def channels_last_default(model_name: str, device: torch.device) -> bool:
    if model_name.startswith("torchscript:"):
        return False  # a scripted graph keeps the layout it was made with
    if model_name.startswith(FOUNDATION_PREFIXES) and device.type == "cpu":
        return False  # vision transformers: one patch convolution, then tokens
    return device.type == "cuda" or family(model_name) not in CHANNELS_LAST_SLOWER_ON_CPU


def should_compile(choice, n_images: int) -> bool:
    """``on``/``off`` as given; ``auto``: when there are enough images to amortise it."""
    if choice in (True, "on"):
        return True
    if choice in (False, None, "off"):
        return False
    if choice != "auto":
        raise ConfigError(f"compile={choice!r}: expected one of {', '.join(COMPILE_CHOICES)}")
    return n_images >= AUTO_COMPILE_MIN_IMAGES
