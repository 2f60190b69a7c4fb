"""glibc's malloc set up for large tensors that are freed and allocated again every batch.

By default glibc serves every allocation above its mmap threshold (128 KiB, rising with use
to at most 32 MiB: most activations of a batch are larger) with a fresh ``mmap`` and returns
it to the kernel on ``free``, so the kernel zero-fills all those pages again for the next
batch. On this project's 2-core machine that page-faulting took more CPU time than the
convolutions themselves: MobileNetV2 ran at 73 img/s eager and 134 img/s compiled with the
default, 288 and 417 img/s with freed memory kept for reuse (``scripts/bench_extract.py``
times both). This is what Intel's PyTorch CPU guide gets by preloading jemalloc or tcmalloc;
here two ``mallopt`` calls do it, for the duration of a pass (extraction, predict,
fine-tuning); afterwards malloc's defaults come back and the memory is returned.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import sys

logger = logging.getLogger(__name__)

OPT_OUT = "XFEAT_MALLOC"  # XFEAT_MALLOC=system leaves malloc as it is
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # <malloc.h>
DEFAULT_TRIM_THRESHOLD, DEFAULT_MMAP_MAX = 128 * 1024, 65536  # glibc's defaults
_state = {"depth": 0, "active": False}


@contextlib.contextmanager
def freed_memory_kept():
    """Inside the block, glibc's malloc serves large blocks from its heap and keeps freed memory
    for reuse (no ``mmap`` per tensor, no trimming); on leaving it (the outermost block, when
    nested) malloc's defaults come back and the freed memory is returned to the system, so a
    long-lived process (a notebook, ``xfeat compare``) does not keep every pass's peak.

    Yields True when the setting is in effect. Nothing changes off Linux/glibc, with
    ``XFEAT_MALLOC=system``, or when the user chose an allocator (``LD_PRELOAD`` of jemalloc
    or tcmalloc, ``GLIBC_TUNABLES`` or ``MALLOC_*_`` variables).
    """
    if _state["depth"] == 0:
        _state["active"] = _keep()
    _state["depth"] += 1
    try:
        yield _state["active"]
    finally:
        _state["depth"] -= 1
        if _state["depth"] == 0 and _state["active"]:
            _restore()
            _state["active"] = False


def _keep() -> bool:
    reason = _user_choice()
    if reason:
        logger.debug("malloc left as it is: %s", reason)
        return False
    libc = _libc()
    return (
        libc is not None and libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, -1) == 1
    )


def _restore() -> None:
    libc = _libc()
    libc.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
    libc.mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD)
    libc.malloc_trim(0)


@functools.lru_cache(maxsize=1)
def _libc():
    """The C library's ``mallopt`` and ``malloc_trim``, or None where there are none (not
    glibc: musl, macOS)."""
    try:
        libc = ctypes.CDLL(None)  # the process's own symbols, libc's among them
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def _user_choice() -> str:
    """Why the allocator is the user's business here, or '' when it is not."""
    if not sys.platform.startswith("linux"):
        return "not Linux"
    if os.environ.get(OPT_OUT, "").lower() == "system":
        return f"{OPT_OUT}=system"
    preload = os.environ.get("LD_PRELOAD", "")
    if any(name in preload for name in ("jemalloc", "tcmalloc", "mimalloc")):
        return "an allocator is preloaded"
    if "malloc" in os.environ.get("GLIBC_TUNABLES", "") or any(
        k.startswith("MALLOC_") and k.endswith("_") for k in os.environ
    ):
        return "malloc is tuned through the environment"
    return ""
