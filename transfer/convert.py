"""Convert a ResNet backbone checkpoint to a Detectron2 weight file, verifying every tensor.

``moco-convert INPUT OUTPUT.pkl [--prefix P | --layout NAME] [--arch resnet50]``

The key map is exact (torchvision -> Detectron2 ``ResNet`` names)::

    conv1.weight                     -> stem.conv1.weight
    bn1.{weight,bias,running_*}      -> stem.conv1.norm.*
    layer{i}.{b}.conv{k}.weight      -> res{i+1}.{b}.conv{k}.weight
    layer{i}.{b}.bn{k}.*             -> res{i+1}.{b}.conv{k}.norm.*
    layer{i}.0.downsample.0.weight   -> res{i+1}.0.shortcut.weight
    layer{i}.0.downsample.1.*        -> res{i+1}.0.shortcut.norm.*

Detectron2 places these by suffix matching (``matching_heuristics``): ``res5`` lands in
``roi_heads.res5`` for C4 models and in ``backbone.bottom_up.res5`` for FPN models.

Deviations from the official ``detection/convert-pretrain-to-detectron2.py`` (MoCo, 78b69ca):
it renames every ``module.encoder_q.*`` key by substring replacement, so the projection head
leaks into the file as ``stem.fc.*`` and a checkpoint with other key names silently converts
to (almost) nothing. Here the head and key encoder are dropped by name
(:mod:`moco_pretrain.weights`), every expected tensor must be present with its exact shape,
nothing may be left over, and no file is written on error. ``num_batches_tracked`` counters are
dropped (Detectron2's norms do not use them). The file is written atomically and records its
provenance (``"provenance"``: the source file, how the backbone was pretrained, for how many
epochs, with which seed and data), which ``moco-transfer`` copies into every trial's
``results.json`` and ``moco-report`` matches expected results on. This module does not import
Detectron2.
"""

from __future__ import annotations

import argparse
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torchvision

from moco_pretrain.cli.common import exit_on_user_error
from moco_pretrain.files import atomic_write
from moco_pretrain.weights import LAYOUTS, BackboneWeights, load_backbone_state_dict

__all__ = [
    "ConversionError",
    "convert_to_detectron2",
    "detectron2_key_map",
    "pretraining_method",
    "resnet_tensor_shapes",
    "write_detectron2_pkl",
    "main",
]

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")  # as Detectron2 builds them


class ConversionError(ValueError):
    """The backbone does not match the expected ResNet tensor set."""


def resnet_tensor_shapes(arch: str = "resnet50") -> dict[str, tuple[int, ...]]:
    """torchvision ResNet backbone tensor name -> shape, without ``fc`` and BN counters (from the
    model built on the meta device: no memory, no weights)."""
    if arch not in ARCHS:
        raise ValueError(f"unsupported arch {arch!r}; expected one of {sorted(ARCHS)}")
    with torch.device("meta"):
        model = torchvision.models.get_model(arch)
    return {
        name: tuple(tensor.shape)
        for name, tensor in model.state_dict().items()
        if not name.startswith("fc.") and not name.endswith("num_batches_tracked")
    }


def _rename(name: str) -> str:
    parts = name.split(".")
    if parts[0] == "conv1":
        return "stem.conv1.weight"
    if parts[0] == "bn1":
        return f"stem.conv1.norm.{parts[1]}"
    stage, block, module, *rest = parts  # layer{i}, b, conv{k}|bn{k}|downsample, ...
    prefix = f"res{int(stage[len('layer') :]) + 1}.{block}"
    if module.startswith("conv"):
        return f"{prefix}.{module}.weight"
    if module.startswith("bn"):
        return f"{prefix}.conv{module[2:]}.norm.{rest[0]}"
    index, param = rest  # downsample.0 (conv) / downsample.1 (BN)
    return f"{prefix}.shortcut.{param}" if index == "0" else f"{prefix}.shortcut.norm.{param}"


def detectron2_key_map(arch: str = "resnet50") -> dict[str, str]:
    """The exact torchvision -> Detectron2 name map for every backbone tensor of ``arch``."""
    return {name: _rename(name) for name in resnet_tensor_shapes(arch)}


def convert_to_detectron2(weights: BackboneWeights, *, arch: str = "resnet50") -> dict[str, Any]:
    """Rename and verify ``weights`` into Detectron2's weight-file dict.

    Returns:
        ``{"model": {detectron2 name: float32 ndarray}, "__author__": "moco-pretrain",
        "matching_heuristics": True, "provenance": {...}}``.

    Raises:
        ConversionError: a missing tensor, a shape mismatch or a key outside ``arch``'s backbone;
            the message names them.
    """
    expected = resnet_tensor_shapes(arch)
    counters = sorted(k for k in weights.state_dict if k.endswith(".num_batches_tracked"))
    state = {k: v for k, v in weights.state_dict.items() if k not in set(counters)}
    missing = sorted(set(expected) - set(state))
    unmapped = sorted(set(state) - set(expected))
    wrong_shape = [
        f"{k}: {tuple(state[k].shape)} != expected {expected[k]}"
        for k in sorted(set(expected) & set(state))
        if tuple(state[k].shape) != expected[k]
    ]
    source = weights.meta.get("path", "<state dict>")
    problems = [
        f"{len(keys)} {what}: {keys[:10]}{' ...' if len(keys) > 10 else ''}"
        for what, keys in (
            ("missing tensors", missing),
            ("tensors with the wrong shape", wrong_shape),
            ("unmapped keys", unmapped),
        )
        if keys
    ]
    if problems:
        recorded = weights.meta.get("arch")
        if recorded in ARCHS and recorded != arch:
            problems.insert(0, f"the checkpoint records arch {recorded!r} (pass --arch {recorded})")
        if "input" in weights.meta:
            problems.insert(0, f"the {weights.layout} backbone takes {weights.meta['input']}")
        raise ConversionError(
            f"{source} (layout {weights.layout}) is not a {arch} backbone: " + "; ".join(problems)
        )
    key_map = detectron2_key_map(arch)
    model = {key_map[k]: v.detach().to(torch.float32).cpu().numpy() for k, v in state.items()}
    dropped = dict(weights.dropped)
    if counters:
        dropped["BN step counters"] = counters
    config = weights.meta.get("config", {})
    provenance = {
        **weights.meta.get("data", {}),  # the training data's description, when recorded
        "source": str(source),
        "source_sha256": weights.meta.get("sha256"),
        "layout": weights.layout,
        "method": pretraining_method(weights),
        "epochs": weights.meta.get("epoch"),  # epochs completed, as the official checkpoints
        "arch": weights.meta.get("arch", arch),
        "converted_as": arch,
        "seed": config.get("SEED"),  # our checkpoints' config; None for others
        "dropped": dropped,  # reason -> source keys dropped by name
        "ignored": weights.meta.get("ignored", []),  # the file's other entries (optimizer, ...)
        "input": weights.meta.get("input"),  # an input convention other than mean/std
    }
    return {
        "model": model,
        "__author__": "moco-pretrain",
        "matching_heuristics": True,
        "provenance": provenance,
    }


def pretraining_method(weights: BackboneWeights) -> str:
    """How the backbone was trained, as ``moco-report`` matches expected results on it.

    The ``method`` a checkpoint records itself (e.g. ``random-bn``,
    :mod:`moco_pretrain.controls`) or its layout implies (``moco_v1`` / ``moco_v2``: the v2 MLP
    head, ``encoder_q.fc.0`` / ``fc.2``, in the keys; ``moco_v3``, ``dino``, ``cmc``,
    ``simclr``), for a ``--prefix`` checkpoint a recorded config's ``MODEL.MLP``, ``supervised``
    for a torchvision-layout classifier (its ``fc`` was dropped), else ``unknown``.
    """
    if isinstance(weights.meta.get("method"), str):
        return weights.meta["method"]
    if weights.layout == "torchvision" and "classifier" in weights.dropped:
        return "supervised"
    model = weights.meta.get("config", {}).get("MODEL")
    mlp = model.get("MLP") if isinstance(model, dict) else None
    if weights.layout == "prefix" and isinstance(mlp, bool):
        return "moco_v2" if mlp else "moco_v1"
    return "unknown"


def write_detectron2_pkl(converted: dict[str, Any], path: str | Path) -> None:
    """Pickle ``converted`` to ``path`` atomically (temp file in the same folder, then rename)."""
    atomic_write(path, lambda f: pickle.dump(converted, f, protocol=pickle.HIGHEST_PROTOCOL))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moco-convert",
        description="Convert a self-supervised (MoCo, SwAV, DINO, Barlow Twins, VICReg, DenseCL, "
        "PixPro, mmselfsup, VISSL, solo-learn, lightly, ...), torchvision / timm or prefixed "
        "ResNet checkpoint to a Detectron2 .pkl weight file, verifying every backbone tensor.",
    )
    parser.add_argument(
        "input", help="checkpoint (.pth, .pth.tar, .ckpt, .torch, .bin, .safetensors)"
    )
    parser.add_argument("output", help="Detectron2 weight file to write (.pkl)")
    layouts = parser.add_mutually_exclusive_group()
    layouts.add_argument("--prefix", default=None, help="backbone key prefix, e.g. 'backbone.'")
    layouts.add_argument(
        "--layout",
        default=None,
        choices=[layout.name for layout in LAYOUTS],
        help="the source layout instead of detecting it (e.g. simclr_tf, whose keys are "
        "torchvision's); docs/transfer.md lists them",
    )
    parser.add_argument("--arch", default="resnet50", choices=ARCHS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.output.endswith(".pkl"):
        parser.error("OUTPUT must end in .pkl (Detectron2 reads it as pickle)")
    with exit_on_user_error("moco-convert"):  # CheckpointLayoutError, ConversionError, no file
        weights = load_backbone_state_dict(args.input, prefix=args.prefix, layout=args.layout)
        converted = convert_to_detectron2(weights, arch=args.arch)
    write_detectron2_pkl(converted, args.output)
    prov = converted["provenance"]
    print(f"source:    {args.input} (sha256 {prov['source_sha256'][:16]}...)")
    print(f"layout:    {prov['layout']}, arch {prov['arch']}")
    epochs = "" if prov["epochs"] is None else f", {prov['epochs']} epochs"
    seed = "" if prov["seed"] is None else f", seed {prov['seed']}"
    print(f"method:    {prov['method']}{epochs}{seed}")
    print(f"converted: {len(converted['model'])} tensors ({args.arch} backbone, all verified)")
    for reason, keys in prov["dropped"].items():
        print(f"skipped:   {len(keys)} {reason} tensors, e.g. {keys[0]}")
    if prov["ignored"]:
        print(f"ignored:   the file's other entries {prov['ignored']}")
    if prov["input"]:
        print(f"input:     the backbone takes {prov['input']}; set MODEL.PIXEL_MEAN / PIXEL_STD")
    print(f"wrote:     {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
