"""The packaged recipes: ``configs/`` of every task (pretraining, linear classification,
supervised, detectron2 fine-tuning) and ``expected.yaml``, found by name.

An installed wheel carries them as ``moco_pretrain/_configs`` (``setup.py``); an editable install
or a checkout reads the repository's ``configs/``.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["config_root", "resolve_config_file"]


def config_root() -> Path:
    """The recipes folder: the installed copy (a wheel's), else the repository's configs/."""
    packaged = Path(__file__).resolve().parent / "_configs"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[1] / "configs"


def resolve_config_file(name: str) -> Path:
    """A path as given if it exists, else a recipe name such as ``pretrain/moco_v2_200ep.yaml``."""
    path = Path(name)
    if path.is_file():
        return path
    packaged = config_root() / name
    if packaged.is_file():
        return packaged
    raise FileNotFoundError(f"config file {name!r} not found (nor under {config_root()})")
