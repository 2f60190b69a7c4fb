"""Command line: parses options, calls the Python API, prints. No logic lives here.

Only click and :mod:`xfeat.config` are imported up front; each command imports the API it
calls, so ``xfeat --help`` does not load torch. A user error (:class:`~xfeat.errors.XfeatError`)
prints as one line; anything else is a bug and shows its traceback.
"""

from xfeat.cli import app, features, heads, training  # noqa: F401  (registers the commands)
from xfeat.cli.app import api_errors, cli
from xfeat.cli.fast_exit import leave

__all__ = ["api_errors", "cli", "main"]


def main(args=None):
    """The console entry point (``xfeat``, ``python -m xfeat``): run one command, then end the
    process without the interpreter's module teardown where that is safe
    (:mod:`xfeat.cli.fast_exit`). The command's imports run with the garbage collector paused
    (:func:`~xfeat.cli.app.api_imports`)."""
    app._console_process = True
    try:
        cli(args=args, prog_name="xfeat")  # click's standalone mode always ends in SystemExit
    except SystemExit as exc:
        leave(exc.code)  # returns when the normal exit is needed
        raise
