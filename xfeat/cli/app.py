"""The ``xfeat`` click group and the one place where user errors become one-line messages."""

from __future__ import annotations

import contextlib
import errno
import functools
import gc
import logging
import sys

import click

from xfeat import __version__
from xfeat.errors import XfeatError

INTERRUPTED = 130  # the shell's status for a command ended by Ctrl-C (128 + SIGINT)

# True in the ``xfeat`` console process (:func:`xfeat.cli.main`), never in a notebook or a test
# that calls :data:`cli` in-process: see :func:`api_imports`.
_console_process = False


@contextlib.contextmanager
def api_imports():
    """Where a command imports the API it calls.

    In the ``xfeat`` console process the cyclic garbage collector is paused for the imports and
    resumes after them with everything imported so far frozen out of its scans
    (:func:`gc.freeze`): importing scikit-learn and scipy creates some 100,000 objects that live
    as long as the process, and scanning them again and again while they are made costs about
    a tenth of a second, on a 2-core CPU, of a cache-hit ``fit-head`` that takes two. Anywhere
    else this does nothing, so that a long-lived Python session keeps its own collector
    settings.
    """
    if not _console_process or not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        gc.enable()


def api_errors(f):
    """Turn the API's user-facing exceptions and permission errors into one-line CLI errors
    (exit status 1), and Ctrl-C into a line that says how to go on (exit status 130)."""

    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        try:
            return f(*args, **kwargs)
        except XfeatError as exc:
            raise click.ClickException(str(exc)) from None
        except PermissionError as exc:  # a file or folder this user may not read or search
            raise click.ClickException(
                f"permission denied: {exc.filename or exc}; make it readable (and its folders "
                "searchable) by this user, or choose another path"
            ) from None
        except (MemoryError, RuntimeError, OSError) as exc:
            hint = resource_hint(exc, kwargs.get("batch_size"), kwargs.get("num_workers"))
            if hint is None:
                raise  # not a resource limit: a bug, with its traceback
            raise click.ClickException(hint) from None
        except KeyboardInterrupt:
            click.echo(
                "xfeat: interrupted; run the same command again to resume (work already "
                "finished is kept and reused)",
                err=True,
            )
            sys.exit(INTERRUPTED)

    return wrapper


_OUT_OF_MEMORY = ("out of memory", "can't allocate memory", "cannot allocate memory", "std::bad_alloc")
_RESOURCE_ERRNOS = {
    errno.ENOMEM: "out of memory",
    errno.EMFILE: "too many open files",
    errno.EAGAIN: "no more threads or processes",
}


def resource_hint(exc: BaseException, batch_size=None, num_workers=None):
    """A one-line message for a memory or resource limit (what ran out, and which options
    lower the need), or None when ``exc`` is something else."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, MemoryError):
        what = "out of memory"
    elif isinstance(exc, OSError) and exc.errno in _RESOURCE_ERRNOS:
        what = _RESOURCE_ERRNOS[exc.errno]
    elif isinstance(exc, RuntimeError) and any(m in text.lower() for m in _OUT_OF_MEMORY):
        what = "out of memory"
    else:
        return None
    size = f" (now {batch_size})" if batch_size else ""
    workers = f" (now {num_workers})" if num_workers is not None else ""
    return (
        f"{what}: {text[:200]}; rerun the same command with a smaller --batch-size{size} or "
        f"fewer --num-workers{workers} (finished work is kept), or raise the limit (ulimit)"
    )


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="xfeat")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
@click.pass_context
def cli(ctx, verbose, quiet):
    """xfeat: transfer learning on medical images with cached backbone features."""
    import os

    main_rank = int(os.environ.get("RANK", 0)) == 0  # under torchrun only rank 0 reports
    quiet = quiet or not main_rank
    level = logging.WARNING if quiet else logging.DEBUG if verbose > 1 else logging.INFO
    logging.basicConfig(
        level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True
    )
    ctx.ensure_object(dict)
    ctx.obj["progress"] = not quiet
    ctx.obj["report"] = main_rank
