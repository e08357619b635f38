"""Stop a run whose weights do not set the whole pretrained backbone, before it trains.

detectron2 loads a weight file by name matching and only *warns* about model tensors the file
does not provide; a converter bug or a wrong file then trains a detector from a random backbone
for hours. Here every backbone tensor (``stem``, ``res2``-``res5``; for C4 models ``res5`` lives
in the ROI head) is filled with NaN, the weights are loaded exactly as training will load them,
and any backbone tensor still non-finite afterwards stops the run with its name. This measures
what was really loaded, whatever the file format (our ``.pkl``, detectron2's MSRA ``R-50.pkl``,
a resumed checkpoint) and matching rules.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from torch import nn

__all__ = ["BackboneWeightsError", "backbone_keys", "load_verified"]

# stem / res2..res5 tensors, except the extra norm Res5ROIHeadsExtraNorm adds after res5
_BACKBONE_KEY = re.compile(r"(^|\.)(stem|res[2-5])\.(?!norm\.)")


class BackboneWeightsError(ValueError):
    """The weights left backbone tensors uninitialised."""


def backbone_keys(model: nn.Module) -> list[str]:
    """The floating-point state-dict keys of ``model`` that a pretrained ResNet must provide."""
    return [
        k
        for k, v in model.state_dict().items()
        if _BACKBONE_KEY.search(k) and v.is_floating_point()
    ]


def load_verified(model: nn.Module, load: Callable[[], object], *, weights: str) -> None:
    """Run ``load()`` (which fills ``model``) and check that it set every backbone tensor.

    Args:
        model: the detector (not wrapped in DistributedDataParallel).
        load: loads ``weights`` into ``model`` in place, e.g. the trainer's ``resume_or_load``.
        weights: what is loaded, for the message.

    Raises:
        BackboneWeightsError: naming the backbone tensors that ``load`` left unset (or set to
            non-finite values).
    """
    state = model.state_dict()  # tensors share storage with the parameters and buffers
    keys = backbone_keys(model)
    if not keys:
        raise BackboneWeightsError("the model has no ResNet backbone tensors (stem, res2-res5)")
    with torch.no_grad():
        for k in keys:
            state[k].fill_(float("nan"))
    load()
    unset = [k for k in keys if not torch.isfinite(state[k]).all()]
    if unset:
        source = f"MODEL.WEIGHTS {weights!r}" if weights else "MODEL.WEIGHTS is empty and"
        raise BackboneWeightsError(
            f"{source} left {len(unset)} of {len(keys)} backbone tensors unset (or "
            f"non-finite), e.g. {unset[:8]}. Convert the checkpoint with moco-convert "
            "(it verifies the tensor set), or use a *_random.yaml config / "
            "MOCO.CHECK_BACKBONE_WEIGHTS False for a random backbone."
        )
