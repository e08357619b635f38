"""Argument parsing and error reporting shared by every command line (``transfer/``'s and the
tools' too), with no torch import."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager


def config_parser(
    description: str, *, default_recipe: str, add_help: bool = True
) -> argparse.ArgumentParser:
    """A parser with ``--config-file`` (a path or a recipe name) and trailing ``KEY VALUE`` overrides."""
    parser = argparse.ArgumentParser(
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        add_help=add_help,
    )
    parser.add_argument(
        "--config-file",
        default=default_recipe,
        help="recipe YAML: a path, or a name under configs/ (default: %(default)s)",
    )
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    return parser


def add_pretrained_arguments(parser: argparse.ArgumentParser) -> None:
    """``--pretrained`` and ``--prefix``: a checkpoint in any layout the converter accepts."""
    parser.add_argument("--pretrained", required=True, help="pretrained checkpoint (any layout)")
    parser.add_argument("--prefix", default=None, help="backbone key prefix of other layouts")


USER_ERRORS = (FileNotFoundError, ValueError, KeyError, FloatingPointError)


@contextmanager
def exit_on_user_error(prog: str) -> Iterator[None]:
    """Report bad input (missing files, bad config, unreadable checkpoints, a diverged run) as one
    line on stderr and exit with status 2; ``MOCO_DEBUG=1`` shows the traceback instead."""
    try:
        yield
    except USER_ERRORS as err:
        if os.environ.get("MOCO_DEBUG"):
            raise
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"{prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None
