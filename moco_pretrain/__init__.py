"""MoCo v1/v2 self-supervised pretraining.

Importing the package does not import torch: the results contract (:mod:`moco_pretrain.results`),
file helpers and command-line helpers are torch-free, so ``moco-report`` starts without it.
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["MoCo", "build_projection_head", "__version__"]


def __getattr__(name: str) -> Any:
    if name in ("MoCo", "build_projection_head"):
        from . import builder

        return getattr(builder, name)
    raise AttributeError(f"module 'moco_pretrain' has no attribute {name!r}")
