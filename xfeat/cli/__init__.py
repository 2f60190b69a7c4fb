"""Command line: parses options, calls the Python API, prints. No logic lives here.

Only click and :mod:`xfeat.config` are imported up front; each command imports the API it
calls, so ``xfeat --help`` does not load torch. A user error (:class:`~xfeat.errors.XfeatError`)
prints as one line; anything else is a bug and shows its traceback.
"""

from xfeat.cli import features, heads, training  # noqa: F401  (registers the commands)
from xfeat.cli.app import api_errors, cli

__all__ = ["api_errors", "cli", "main"]


def main():  # pragma: no cover - console entry point for `python -m xfeat`
    cli(prog_name="xfeat")
