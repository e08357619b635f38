"""Load the backbone of any supported checkpoint as a torchvision-named ResNet state dict.

The one place that knows checkpoint layouts; used by the Detectron2 converter
(``transfer/convert.py``) and by linear / kNN evaluation. Supported sources, detected from the keys:

==============  =================================  ===========================================
layout          backbone keys                      dropped by name
==============  =================================  ===========================================
``moco_v1``     ``[module.]encoder_q.*``           ``encoder_q.fc.{weight,bias}`` (head),
                                                   ``encoder_k.*``, ``queue``, ``queue_ptr``
``moco_v2``     ``[module.]encoder_q.*``           ``encoder_q.fc.{0,2}.*`` (MLP head), as above
``moco_v3``     ``[module.]base_encoder.*``        ``base_encoder.fc.*`` (head),
                                                   ``momentum_encoder.*``, ``predictor.*``
``torchvision`` ``conv1.*``, ``layer1.*`` ...      ``fc.*`` (classifier)
``prefix``      ``<prefix>*`` (``--prefix``)       every key outside the prefix, ``<prefix>fc.*``
==============  =================================  ===========================================

Our own pretraining checkpoints use the official MoCo v1/v2 file layout
(``{"epoch", "arch", "state_dict", "optimizer", ...}``), so they load as ``moco_v1``/``moco_v2``.
A ``state_dict`` or ``model`` wrapper and a DistributedDataParallel ``module.`` prefix are removed.

Deviation from the official scripts (``main_lincls.py``, ``convert-pretrain-to-detectron2.py``):
they ``torch.load`` with full unpickling and keep every key that merely starts with the encoder
prefix, so a head leaks through (``stem.fc.*``). Here the file is read by
:func:`moco_pretrain.checkpoint.load_checkpoint` (``weights_only``: a checkpoint that would run
code is refused; a file that is neither zip nor pickle is reported as unreadable) and every key is either kept, dropped by an explicit rule, or
reported as unknown.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from .checkpoint import load_checkpoint
from .files import file_sha256

__all__ = ["BackboneWeights", "CheckpointLayoutError", "load_backbone_state_dict"]


class CheckpointLayoutError(ValueError):
    """A checkpoint could not be read, or its keys match no supported layout."""


@dataclass(frozen=True)
class BackboneWeights:
    """A ResNet backbone in torchvision names, without ``fc``.

    Attributes:
        state_dict: ``conv1.weight``, ``bn1.*``, ``layer1.0.conv1.weight``, ...,
            ``layerN.0.downsample.{0,1}.*`` -> tensor.
        layout: the detected source layout (see the module docstring).
        meta: ``path``, ``sha256`` of the file; ``epoch`` (epochs completed) and ``arch`` when the
            file records them; ``config`` (the recorded config as a dict: our checkpoints store
            the resolved YAML) and ``data`` (the training data's description) when present.
        dropped: reason (``"projection head"``, ``"key encoder"``, ...) -> dropped source keys.
    """

    state_dict: dict[str, torch.Tensor]
    layout: str
    meta: dict[str, Any]
    dropped: dict[str, list[str]] = field(default_factory=dict)


_BACKBONE_ROOTS = ("conv1.", "bn1.", "layer1.", "layer2.", "layer3.", "layer4.")

# layout -> (backbone prefix, ordered (prefix, reason) rules for keys dropped by name)
_MOCO_V1_V2 = (
    "encoder_q.",
    (("encoder_q.fc.", "projection head"), ("encoder_k.", "key encoder"), ("queue", "queue")),
)
_RULES: dict[str, tuple[str, tuple[tuple[str, str], ...]]] = {
    "moco_v1": _MOCO_V1_V2,
    "moco_v2": _MOCO_V1_V2,
    "moco_v3": (
        "base_encoder.",
        (
            ("base_encoder.fc.", "projection head"),
            ("momentum_encoder.", "key encoder"),
            ("predictor.", "predictor"),
        ),
    ),
    "torchvision": ("", (("fc.", "classifier"),)),
}


def _read(path: Path) -> dict[str, Any]:
    """The checkpoint dict, via the project's one safe loader (magic-byte check, weights_only)."""
    try:
        return load_checkpoint(path)
    except ValueError as e:  # not zip/pickle, unreadable, code-running pickle, not a dict
        reason = str(e).removeprefix(str(path)).lstrip()
        raise CheckpointLayoutError(f"{path}: {reason}") from None


def _unwrap(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """The tensor dict inside ``{"state_dict": ...}`` / ``{"model": ...}`` / a bare state dict."""
    if isinstance(obj, Mapping):
        for wrapper in ("state_dict", "model"):
            if isinstance(obj.get(wrapper), Mapping):
                obj = obj[wrapper]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointLayoutError(f"{path}: no state dict found (got {type(obj).__name__})")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if len(tensors) != len(obj):
        others = sorted(str(k) for k in obj if k not in tensors)
        raise CheckpointLayoutError(f"{path}: state dict holds non-tensor entries {others[:10]}")
    return {k.removeprefix("module."): v for k, v in tensors.items()}


def _split(
    state: dict[str, torch.Tensor],
    prefix: str,
    rules: tuple[tuple[str, str], ...],
    path: Path,
    *,
    rest: str | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
    """Drop keys matching ``rules`` (first match wins), keep ``prefix*`` (prefix removed).

    Keys matching neither are dropped as ``rest`` when given, otherwise they raise.
    """
    backbone: dict[str, torch.Tensor] = {}
    dropped: dict[str, list[str]] = {}
    unknown = []
    for key, value in state.items():
        reason = next((r for p, r in rules if key.startswith(p)), None)
        if reason is None and key.startswith(prefix):
            backbone[key[len(prefix) :]] = value
            continue
        reason = reason or rest
        if reason is None:
            unknown.append(key)
        else:
            dropped.setdefault(reason, []).append(key)
    if unknown:
        raise CheckpointLayoutError(
            f"{path}: {len(unknown)} keys outside the backbone ({prefix!r}) that no rule explains: "
            f"{sorted(unknown)[:10]}"
        )
    if not backbone:
        raise CheckpointLayoutError(f"{path}: no backbone keys under prefix {prefix!r}")
    return backbone, dropped


def _recorded_config(config: Any) -> dict[str, Any] | None:
    """A checkpoint's ``config`` as a dict: ours hold the resolved YAML text (``cfg.dump()``);
    None for anything else (other checkpoints' configs are not read)."""
    if isinstance(config, str):
        try:
            config = yaml.safe_load(config)
        except yaml.YAMLError:
            return None
    return dict(config) if isinstance(config, Mapping) else None


def _detect(state: dict[str, torch.Tensor]) -> str | None:
    if any(k.startswith("encoder_q.") for k in state):
        return "moco_v2" if "encoder_q.fc.0.weight" in state else "moco_v1"
    if any(k.startswith("base_encoder.") for k in state):
        return "moco_v3"
    if "conv1.weight" in state and any(k.startswith("layer1.") for k in state):
        return "torchvision"
    return None


def load_backbone_state_dict(path: str | Path, *, prefix: str | None = None) -> BackboneWeights:
    """Read ``path`` and return its ResNet backbone in torchvision names.

    Args:
        path: a ``.pth``/``.pth.tar`` checkpoint (layouts in the module docstring).
        prefix: take the backbone from the keys under this prefix (after removing ``module.``),
            for layouts that are not auto-detected; ``<prefix>fc.*`` is dropped as the head.

    Returns:
        :class:`BackboneWeights`. No shape check happens here: that is the consumer's contract
        (e.g. :func:`transfer.convert.convert_to_detectron2` checks the ResNet-50 tensor set).

    Raises:
        CheckpointLayoutError: unreadable file, a pickle that needs code execution, or keys that
            fit no layout (the message names the file and the offending keys).
    """
    path = Path(path)
    obj = _read(path)
    state = _unwrap(obj, path)
    meta: dict[str, Any] = {"path": str(path), "sha256": file_sha256(path)}
    if isinstance(obj, Mapping):
        recorded = ("epoch", "arch", "method")  # "method": a checkpoint that names its own
        meta.update({k: obj[k] for k in recorded if isinstance(obj.get(k), (int, str))})
        config = _recorded_config(obj.get("config"))
        if config:
            meta["config"] = config
        if isinstance(obj.get("data"), Mapping):
            meta["data"] = dict(obj["data"])

    if prefix is not None:
        layout = "prefix"
        rules = ((prefix + "fc.", "projection head"),)
        backbone, dropped = _split(state, prefix, rules, path, rest="outside prefix")
    else:
        layout = _detect(state)
        if layout is None:
            raise CheckpointLayoutError(
                f"{path}: unknown checkpoint layout (first keys: {sorted(state)[:5]}); "
                "pass the backbone's key prefix with --prefix"
            )
        backbone, dropped = _split(state, *_RULES[layout], path)
    foreign = sorted(k for k in backbone if not k.startswith(_BACKBONE_ROOTS))
    if foreign:
        raise CheckpointLayoutError(
            f"{path}: {len(foreign)} backbone keys are not ResNet parameters: {foreign[:10]}"
        )
    return BackboneWeights(state_dict=backbone, layout=layout, meta=meta, dropped=dropped)
