"""Detectron2 transfer of MoCo backbones: converter, plugin, training entry point, datasets and
the pipeline of every study.

``import transfer`` does not import Detectron2; the converter (:mod:`transfer.convert`) and the
dataset builders (:mod:`transfer.datasets`) work without it. Detectron2 is imported when the
plugin is used.
"""

from __future__ import annotations

from typing import Any

__all__ = ["add_moco_config"]


def add_moco_config(cfg: Any) -> None:
    """Add the plugin's ``MOCO.*`` keys to a detectron2 config and register its modules.

    Registers ``Res5ROIHeadsExtraNorm`` in ``ROI_HEADS_REGISTRY``. Needs Detectron2.
    """
    from .config import add_moco_config as _add_moco_config

    _add_moco_config(cfg)
