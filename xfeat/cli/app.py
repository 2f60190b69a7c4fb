"""The ``xfeat`` click group and the one place where user errors become one-line messages."""

from __future__ import annotations

import functools
import logging
import sys

import click

from xfeat import __version__
from xfeat.errors import XfeatError

INTERRUPTED = 130  # the shell's status for a command ended by Ctrl-C (128 + SIGINT)


def api_errors(f):
    """Turn the API's user-facing exceptions into one-line CLI errors (exit status 1), and
    Ctrl-C into a line that says how to go on (exit status 130)."""

    @functools.wraps(f)
    def wrapper(*args, **kwargs):
        try:
            return f(*args, **kwargs)
        except XfeatError as exc:
            raise click.ClickException(str(exc)) from None
        except KeyboardInterrupt:
            click.echo(
                "xfeat: interrupted; run the same command again to resume (work already "
                "finished is kept and reused)",
                err=True,
            )
            sys.exit(INTERRUPTED)

    return wrapper


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
