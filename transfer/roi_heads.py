"""``Res5ROIHeadsExtraNorm``: the C4 ROI heads with a norm layer after res5 (MoCo paper, Sec. 4.2).

Deviation from the official ``detection/train_net.py`` (MoCo, 78b69ca): there the class overrides
detectron2's private ``_build_res5_block`` (detectron2 still carries a compatibility shim for it).
Here it customises only the public ``from_config``; the module is still named ``res5.norm``, so
state-dict keys are the official ones.
"""

from __future__ import annotations

from detectron2.layers import ShapeSpec, get_norm
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, Res5ROIHeads

__all__ = ["Res5ROIHeadsExtraNorm"]


@ROI_HEADS_REGISTRY.register()
class Res5ROIHeadsExtraNorm(Res5ROIHeads):
    """:class:`Res5ROIHeads` whose res5 block ends in ``get_norm(MODEL.RESNETS.NORM, C)``.

    With a tuned BN backbone the res5 head's output is otherwise unnormalised before the box and
    mask predictors; the extra norm over res5's C output channels fixes that.
    """

    @classmethod
    def from_config(cls, cfg, input_shape: dict[str, ShapeSpec]) -> dict:
        ret = super().from_config(cfg, input_shape)
        norm = get_norm(cfg.MODEL.RESNETS.NORM, ret["res5"][-1].out_channels)  # C = 2048 for R50
        if norm is not None:
            ret["res5"].add_module("norm", norm)  # res5: Sequential(block0, block1, block2, norm)
        return ret
