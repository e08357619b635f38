"""Argument parsing shared by the command-line entry points."""

from __future__ import annotations

import argparse


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
