"""Compiled inference graphs, kept between runs.

The first run that compiles a backbone (fp32, or int8 after calibration) exports it
(``torch.export``) and compiles it ahead of time with AOTInductor, with inductor's freezing
(the weights become constants of the graph), for the one static batch shape the runner uses;
the package is written (atomically) to ``cache_dir/compiled/``. Every later run with the same
module, weights, input shape, calibration images (int8), torch version and CPU loads the
package in well under a second instead of calibrating and compiling again (3-8 s with a warm
inductor cache, 15-60 s without). Where export or ahead-of-time compilation is
not possible (an unusual graph, a read-only cache folder) it falls back to ``torch.compile``
in memory, with a warning; the runner falls back to eager mode if that fails too.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
from pathlib import Path
from typing import Callable, Optional

import torch

from xfeat.files import file_mode, free_bytes, safe_name

logger = logging.getLogger(__name__)

PACKAGE_FORMAT = 1  # bump when what the package key covers changes


MIN_FREE_TO_COMPILE = 1 << 30  # bytes free under the cache folder before compiling


def compile_for_inference(
    module: torch.nn.Module,
    cache_dir,
    *,
    name: str = "model",
    ahead_of_time: bool = True,
    build: Optional[Callable] = None,
    salt: bytes = b"",
):
    """A callable running ``module`` compiled (at its first call), or None for TorchScript.

    ``ahead_of_time``: AOTInductor, kept under ``cache_dir/compiled``; otherwise
    ``torch.compile`` with inductor's weight freezing, in memory. ``build()``, when given,
    makes the module actually compiled, and only when no earlier run kept its package (int8:
    calibrate and quantize ``module``); ``salt`` is what that module depends on beyond
    ``module`` (the calibration images), part of the package key.
    """
    if any(isinstance(m, torch.jit.ScriptModule) for m in module.modules()):
        return None  # a TorchScript graph is already compiled its own way
    free = free_bytes(cache_dir)
    if free is not None and free < MIN_FREE_TO_COMPILE:
        # inductor's build files and the kept package take hundreds of MB; a full disk during
        # compilation aborts the process (SIGABRT), which no exception handler can catch
        logger.warning(
            "only %d MiB free under %s; compiling needs about %d MiB: running eagerly instead "
            "(free some space to compile)",
            free >> 20,
            cache_dir,
            MIN_FREE_TO_COMPILE >> 20,
        )
        return None
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(cache_dir) / "inductor"))
    if ahead_of_time:
        return AheadOfTime(module, Path(cache_dir) / "compiled", name, build=build, salt=salt)
    return Frozen(build() if build else module)


class Frozen:
    """``torch.compile`` (static shapes) called with inductor's ``freezing`` on: compilation
    happens at the first call, and only a config patch around it (not
    ``torch.compile(options=...)``) lets inductor lower quantized convolutions."""

    def __init__(self, module: torch.nn.Module):
        self.compiled = torch.compile(module, dynamic=False)

    def __call__(self, x: torch.Tensor):
        from torch._inductor import config

        with config.patch(freezing=True):
            return self.compiled(x)


class AheadOfTime:
    """``module`` (or what ``build()`` makes of it) as an AOTInductor package for the shape
    of the first input it is called with, loaded from ``folder`` when a previous run made it,
    else compiled and saved."""

    def __init__(
        self,
        module: torch.nn.Module,
        folder: Path,
        name: str,
        *,
        build: Optional[Callable] = None,
        salt: bytes = b"",
    ):
        self.module, self.folder, self.name = module, folder, name
        self.build, self.salt = build, salt
        self.run = None
        self.path: Optional[Path] = None
        self.loaded = False  # True when the package came from an earlier run

    def __call__(self, x: torch.Tensor):
        if self.run is None:
            self.run = self._build(x)
        return self.run(x)

    def _build(self, x: torch.Tensor):
        key = package_key(self.module, x, self.salt)
        self.path = self.folder / f"{safe_name(self.name)}-{key}.pt2"
        if self.path.is_file():
            try:
                run = torch._inductor.aoti_load_package(str(self.path))
                self.loaded = True
                logger.info("compiled graph loaded from %s", self.path)
                return run
            except Exception as exc:  # a package from another build of torch, or damaged
                logger.warning(
                    "compiled graph %s cannot be loaded (%s); compiling it again",
                    self.path,
                    first_line(exc),
                )
        target = self.build() if self.build else self.module
        try:
            self._compile(target, x)
            return torch._inductor.aoti_load_package(str(self.path))
        except Exception as exc:
            logger.warning(
                "ahead-of-time compilation is not possible here (%s); using "
                "torch.compile in memory (not kept between runs)",
                first_line(exc),
            )
            return Frozen(target)

    def _compile(self, module: torch.nn.Module, x: torch.Tensor) -> None:
        """Export and compile ``module`` for ``x``'s shape; the package appears atomically at
        ``self.path`` (a temporary name first, so a killed run leaves nothing half-written
        under the final name)."""
        import warnings

        self.folder.mkdir(parents=True, exist_ok=True)
        if not os.access(self.folder, os.W_OK):  # say so before compiling, not after
            raise PermissionError(f"{self.folder} is not writable")
        _remove_orphans(self.folder)
        tmp = self.path.with_name(f"{self.path.stem}.tmp{os.getpid()}.pt2")
        logger.info(
            "compiling %s ahead of time for batches of %s (once; kept in %s)",
            self.name,
            tuple(x.shape),
            self.folder,
        )
        try:
            with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                example = x.clone()
                exported = torch.export.export(module, (example,))
                torch._inductor.aoti_compile_and_package(
                    exported, package_path=str(tmp), inductor_configs={"freezing": True}
                )
            os.chmod(tmp, file_mode())
            os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)


def package_key(module: torch.nn.Module, x: torch.Tensor, salt: bytes = b"") -> str:
    """A digest of everything the compiled code depends on: the module's structure and graph
    code, every parameter and buffer, the input's shape, layout and dtype, the torch and xfeat
    versions, the CPU's instruction set, and ``salt``."""
    from xfeat import __version__

    h = hashlib.blake2b(digest_size=10)
    h.update(salt)
    h.update(
        repr(
            (
                PACKAGE_FORMAT,
                __version__,
                torch.__version__,
                platform.machine(),
                torch.backends.cpu.get_cpu_capability(),
                str(x.device),
                str(x.dtype),
                tuple(x.shape),
                x.stride(),
                repr(module),
            )
        ).encode()
    )
    for m in module.modules():
        if isinstance(m, torch.fx.GraphModule):
            h.update(m.code.encode())
    for key, value in module.state_dict().items():
        h.update(f"{key}{tuple(value.shape)}{value.dtype}".encode())
        h.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def first_line(exc: Exception) -> str:
    """The first line of an exception's message (at most 200 characters), or its type."""
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def _remove_orphans(folder: Path) -> None:
    """Temporary packages left by runs that were killed while compiling."""
    for tmp in folder.glob("*.tmp*.pt2"):
        pid = tmp.stem.rsplit(".tmp", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
