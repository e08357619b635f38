"""MoCo v1/v2 self-supervised pretraining."""

from .builder import MoCo, build_projection_head

__version__ = "0.1.0"
__all__ = ["MoCo", "build_projection_head", "__version__"]
