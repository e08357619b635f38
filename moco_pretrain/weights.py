"""Load the backbone of any supported checkpoint as a torchvision-named ResNet state dict.

The one place that knows checkpoint layouts; used by the Detectron2 converter
(``transfer/convert.py``) and by linear / kNN evaluation. A layout is detected from the keys: the
network's state dict is taken from the file (``state_dict``, ``model``, DINO's ``teacher``,
VISSL's ``classy_state_dict.base_model.model``, or the file itself), a DistributedDataParallel
``module.`` prefix is removed, and a layout fits when a ResNet root (``conv1.weight``; for
lightly's ``nn.Sequential(*resnet.children()[:-1])`` the numbered ``0.weight`` and
``4.0.conv1.weight``) follows its backbone prefix and every other key is dropped by one of its
rules (head, projector, predictor, prototypes, momentum encoder, queue: the
``docs/transfer.md`` table lists each source). Keys no rule explains are reported, never
silently dropped; where several layouts fit, the error names their prefixes.

Files are read by :func:`moco_pretrain.checkpoint.load_checkpoint` (``weights_only``): the few
plain-data objects that other projects pickle next to their tensors (an argparse ``Namespace``,
OmegaConf configs, mmengine's log buffers, numpy arrays, Lightning's ``AttributeDict``) are
rebuilt as inert :class:`PlainData` records, so none of their code runs and none of those
libraries is needed; any other object refuses the file, as one that could run code.
``.safetensors`` files are read with the ``safetensors`` library.

Deviation from the official scripts (``main_lincls.py``, ``convert-pretrain-to-detectron2.py``):
they ``torch.load`` with full unpickling and keep every key that merely starts with the encoder
prefix, so a head leaks through (``stem.fc.*``). Here every key is either kept, dropped by an
explicit rule, or reported as unknown.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import yaml

from .checkpoint import load_checkpoint
from .files import file_sha256

__all__ = [
    "LAYOUTS",
    "BackboneWeights",
    "CheckpointLayoutError",
    "Layout",
    "PlainData",
    "converted_provenance",
    "load_backbone_state_dict",
]


class CheckpointLayoutError(ValueError):
    """A checkpoint could not be read, or its keys match no supported layout."""


@dataclass(frozen=True)
class BackboneWeights:
    """A ResNet backbone in torchvision names, without ``fc``.

    Attributes:
        state_dict: ``conv1.weight``, ``bn1.*``, ``layer1.0.conv1.weight``, ...,
            ``layerN.0.downsample.{0,1}.*`` -> tensor.
        layout: the source layout's name (:data:`LAYOUTS`, or ``prefix``).
        meta: ``path``, ``sha256`` of the file; ``epoch`` (epochs completed) and ``arch`` when the
            file records them; ``config`` (the recorded config as a dict: our checkpoints store
            the resolved YAML) and ``data`` (the training data's description) when present;
            ``input`` (the layout's input convention) when it has one; ``ignored``: the file's
            other top-level entries (optimizer, arguments, DINO's student, ...).
        dropped: reason (``"projection head"``, ``"key encoder"``, ...) -> dropped source keys.
    """

    state_dict: dict[str, torch.Tensor]
    layout: str
    meta: dict[str, Any]
    dropped: dict[str, list[str]] = field(default_factory=dict)


_BACKBONE_ROOTS = ("conv1.", "bn1.", "layer1.", "layer2.", "layer3.", "layer4.")
# lightly's nn.Sequential(*resnet.children()[:-1]): children 2, 3 and 8 (relu, maxpool, avgpool)
# hold no tensors
_SEQUENTIAL_NAMES = {
    "0": "conv1",
    "1": "bn1",
    "4": "layer1",
    "5": "layer2",
    "6": "layer3",
    "7": "layer4",
}


@dataclass(frozen=True)
class Layout:
    """Where a project's checkpoint keeps its ResNet, and what else it holds.

    Attributes:
        name: recorded as the converted file's ``layout``.
        sources: the projects and files that use it (documentation and messages).
        prefix: the backbone's key prefix inside the network's state dict (``module.`` removed).
        drop: ``(key prefix, reason)`` rules for the keys that are not the backbone; the first
            matching rule wins and is checked before ``prefix``.
        requires: key prefixes of which at least one must be present (tells apart layouts that
            share a backbone prefix); ``excludes``: key prefixes that must be absent.
        container: the path to the network's state dict inside the file, when not the usual
            ``state_dict`` / ``model`` entry or the file itself.
        sequential: the backbone is numbered as lightly's ``nn.Sequential`` of ResNet children.
        method: how the backbone was pretrained, when the layout says so.
        input: the input convention of its images, when not ImageNet mean/std normalisation.
        detect: found from the keys; ``False``: the keys are another layout's, chosen by name.
    """

    name: str
    sources: str
    prefix: str
    drop: tuple[tuple[str, str], ...]
    requires: tuple[str, ...] = ()
    excludes: tuple[str, ...] = ()
    container: tuple[str, ...] = ()
    sequential: bool = False
    method: str | None = None
    input: str | None = None
    detect: bool = True


_MOCO_DROP = (
    ("encoder_q.fc.", "projection head"),
    ("encoder_k.", "key encoder"),
    ("queue", "queue"),
)
# Everything that Lightning modules and mmengine models keep beside a `backbone.` attribute
_BESIDE_BACKBONE = (
    ("projector.", "projection head"),
    ("projection_head", "projection head"),
    ("neck.", "projection head"),
    ("head.", "head"),
    ("prediction_head.", "predictor"),
    ("predictor.", "predictor"),
    ("classifier.", "online classifier"),
    ("online_classifier.", "online classifier"),
    ("momentum_", "momentum encoder"),
    ("backbone_momentum.", "momentum encoder"),
    ("encoder_k.", "momentum encoder"),  # mmselfsup 1.x MoCo: an EMA of Sequential(backbone, neck)
    ("target_", "momentum encoder"),
    ("teacher_", "momentum encoder"),
    ("key_", "momentum encoder"),
    ("online_net.", "alias of the backbone and its neck"),  # OpenSelfSup BYOL
    ("prototypes", "prototypes"),
    ("queue", "queue"),
    ("local_memory", "memory bank"),
    ("criterion.", "loss state"),
    ("dino_loss_func.", "loss state"),  # solo-learn's DINO: the teacher centre
    ("bn.", "loss normalisation"),  # Barlow Twins' affine-free BatchNorm1d of the embeddings
    ("data_preprocessor.", "input normalisation"),
)
_UNNORMALISED = "RGB in [0, 1] without mean/std normalisation"
_LAB_L = "the L channel of Lab images (one input channel)"

LAYOUTS: tuple[Layout, ...] = (
    Layout("moco_v1", "MoCo v1 (official, ours), PCL v1", "encoder_q.", _MOCO_DROP,
           excludes=("encoder_q.fc.0.",), method="moco_v1"),
    Layout("moco_v2", "MoCo v2 (official, ours), PCL v2 (module.encoder_q.)", "encoder_q.",
           _MOCO_DROP, requires=("encoder_q.fc.0.",), method="moco_v2"),
    Layout("moco_v3", "MoCo v3 ResNet", "base_encoder.",
           (("base_encoder.fc.", "projection head"), ("momentum_encoder.", "key encoder"),
            ("predictor.", "predictor")), method="moco_v3"),
    Layout("openselfsup", "DenseCL, OpenSelfSup, mmselfsup 0.x training files (encoder_q.0. = "
           "the ResNet, backbone. / neck. its aliases)", "encoder_q.0.",
           (("encoder_q.1.", "projection head"), ("encoder_k.", "key encoder"), ("queue", "queue"),
            ("backbone.", "alias of encoder_q.0"), ("neck.", "alias of encoder_q.1"))),
    Layout("torchvision", "torchvision, timm (.pth, .bin, .safetensors), backbone-only releases "
           "(DINO, Barlow Twins, VICReg, DenseCL, mmselfsup extracted), SimCLR / BYOL ports", "",
           (("fc.", "classifier"),)),
    Layout("swav", "SwAV, DeepCluster-v2, SeLa-v2 (module. + projection_head, prototypes)", "",
           (("projection_head.", "projection head"), ("prototypes", "prototypes")),
           requires=("prototypes", "projection_head.")),
    Layout("dino", "DINO full checkpoint (teacher / student, [module.]backbone.)", "backbone.",
           (("head.", "projection head"),), container=("teacher",), method="dino"),
    Layout("backbone", "Barlow Twins, VICReg checkpoint.pth; mmselfsup / mmpretrain; solo-learn "
           "and lightly Lightning .ckpt ([module.]backbone.)", "backbone.", _BESIDE_BACKBONE),
    Layout("lightly", "lightly nn.Sequential(*resnet.children()[:-1]) backbone in a module",
           "backbone.", _BESIDE_BACKBONE, sequential=True),
    Layout("sequential", "lightly nn.Sequential(*resnet.children()[:-1]) backbone saved alone",
           "", (), sequential=True),
    Layout("encoder", "PixPro, InfoMin / PIRL (PyContrast), solo-learn before 2022 "
           "([module.]encoder.)", "encoder.",
           (("encoder_k.", "momentum encoder"), ("momentum_", "momentum encoder"),
            ("projector", "projection head"), ("head", "projection head"),
            ("predictor", "predictor"), ("classifier.", "online classifier"),
            ("value_transform.", "pixel propagation"), ("queue", "queue"))),
    Layout("simclr_pytorch", "SimCLR PyTorch port (Spijkervet: encoder. + projector.0/2)",
           "encoder.", (("projector.", "projection head"),), requires=("projector.0.weight",),
           excludes=("classifier.", "momentum_", "head", "encoder_k."), method="simclr",
           input=_UNNORMALISED),
    Layout("cmc", "CMC (PyContrast: module.encoder1. sees L of Lab, encoder2. sees ab)",
           "encoder1.", (("encoder2.", "ab-channel encoder"), ("head", "projection head")),
           method="cmc", input=_LAB_L),
    Layout("cmc_original", "CMC (original: encoder.module.l_to_ab. sees L, ab_to_l. sees ab)",
           "encoder.module.l_to_ab.",
           (("encoder.module.l_to_ab.fc.", "projection head"),
            ("encoder.module.ab_to_l.", "ab-channel encoder")), method="cmc", input=_LAB_L),
    Layout("vissl", "VISSL .torch (classy_state_dict.base_model.model.trunk._feature_blocks.)",
           "trunk._feature_blocks.", (("heads.", "head"),),
           container=("classy_state_dict", "base_model", "model")),
    Layout("simclr_tf", "SimCLR v1 TensorFlow release converted to PyTorch (torchvision keys)",
           "", (("fc.", "classifier"),), method="simclr", input=_UNNORMALISED, detect=False),
    Layout("byol", "BYOL ports: byol-convert of the DeepMind release, byol-pytorch's saved net "
           "(torchvision keys)", "", (("fc.", "classifier"),), method="byol", detect=False),
)  # fmt: skip
_BY_NAME = {layout.name: layout for layout in LAYOUTS}


class PlainData:
    """An inert stand-in for a plain-data object of another library that a checkpoint pickles
    (an argparse ``Namespace``, an OmegaConf node, a numpy array): keeps what the file stores in
    ``args`` and ``state``, runs none of that library's code."""

    def __new__(cls, *args: Any, **kwargs: Any) -> PlainData:
        record = super().__new__(cls)
        record.args = args
        return record

    def __setstate__(self, state: Any) -> None:
        self.state = state


_PLAIN_DATA = (
    "argparse.Namespace",
    "typing.Any",
    *(f"numpy.{core}.multiarray.{name}" for core in ("core", "_core") for name in ("_reconstruct", "scalar")),
    *(f"numpy.{core}.numeric._frombuffer" for core in ("core", "_core")),  # pickle protocol 5
    "numpy.ndarray",
    "numpy.dtype",
    *(f"omegaconf.{name}" for name in (
        "dictconfig.DictConfig", "listconfig.ListConfig", "base.ContainerMetadata",
        "base.Metadata", "nodes.AnyNode", "nodes.StringNode", "nodes.IntegerNode",
        "nodes.FloatNode", "nodes.BooleanNode", "nodes.BytesNode", "nodes.PathNode",
        "nodes.EnumNode",
    )),
    "mmengine.logging.history_buffer.HistoryBuffer",
    "pathlib.PosixPath",
    # types that configs name as values (OmegaConf's ref_type), and getattr, by which pickle
    # names a nested class: stand-ins too, never called
    *(f"builtins.{name}" for name in ("getattr", "int", "float", "str", "bool", "list", "dict", "tuple")),
)  # fmt: skip
# dict subclasses: rebuilt as plain dicts (the unpickler fills only exact dicts)
_PLAIN_DICTS = (
    "lightning.fabric.utilities.data.AttributeDict",
    "pytorch_lightning.utilities.parsing.AttributeDict",
)


def _empty_dict(*args: Any) -> dict:
    """``collections.defaultdict(factory)`` as a plain dict (the unpickler fills only those)."""
    return {}


# torch's allow-list is process-wide while a file loads: other threads loading at the same time
# see these stand-ins too (inert, so harmless)
SAFE_GLOBALS = [
    *((PlainData, name) for name in _PLAIN_DATA),
    *((dict, name) for name in _PLAIN_DICTS),
    (_empty_dict, "collections.defaultdict"),
]


_ALREADY_CONVERTED = (
    "{path}: already a Detectron2 weight file (.pkl); pass it to MODEL.WEIGHTS as it is, no "
    "conversion needed"
)


class _InertUnpickler(pickle.Unpickler):
    """A plain pickle's objects with every global an inert :class:`PlainData` record when it is
    plain data (numpy arrays, ...); any other global refuses, so nothing in the file runs."""

    def find_class(self, module: str, name: str) -> Any:
        if f"{module}.{name}" not in _PLAIN_DATA:
            raise pickle.UnpicklingError(f"{module}.{name} is not plain data")
        return PlainData


def _read_inert(path: Path) -> Any:
    """A plain pickle read with :class:`_InertUnpickler`; None when it is not one or names any
    global that is not plain data."""
    try:
        with open(path, "rb") as f:
            return _InertUnpickler(f, encoding="latin1").load()
    except Exception:  # noqa: BLE001 - not a well-formed plain pickle of plain data
        return None


def _is_detectron2_pkl(path: Path) -> bool:
    """Whether ``path`` is a Detectron2 weight file: a plain pickle of arrays by name, under
    ``model`` (moco-convert, detectron2's checkpoints) or ``blobs``, or at its top level (the
    Caffe2-converted MSRA models)."""
    obj = _read_inert(path)
    arrays = obj.get("model", obj.get("blobs", obj)) if isinstance(obj, dict) else None
    return bool(arrays) and all(isinstance(v, PlainData) for v in arrays.values())


def converted_provenance(path: str | Path) -> dict[str, Any] | None:
    """The ``provenance`` of a ``.pkl`` written by ``moco-convert``, read without running
    anything in the file; None for any other file."""
    obj = _read_inert(Path(path))
    provenance = obj.get("provenance") if isinstance(obj, dict) and "model" in obj else None
    return _plain_json(provenance)


def _read(path: Path) -> dict[str, Any]:
    """The checkpoint dict: ``.safetensors`` through its library, anything else through the
    project's one safe loader (magic-byte check, ``weights_only``) with :data:`SAFE_GLOBALS`."""
    if path.suffix == ".pkl" and path.is_file() and _is_detectron2_pkl(path):
        raise CheckpointLayoutError(_ALREADY_CONVERTED.format(path=path))
    if path.suffix == ".safetensors" and path.is_file():
        try:
            return safetensors.torch.load_file(path, device="cpu")
        except Exception as e:  # noqa: BLE001 - the library raises its own error types
            raise CheckpointLayoutError(f"{path}: not a readable .safetensors file ({e})") from None
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return load_checkpoint(path)
    except ValueError as e:  # not zip/pickle, unreadable, code-running pickle, not a dict
        if _is_detectron2_pkl(path):
            raise CheckpointLayoutError(_ALREADY_CONVERTED.format(path=path)) from None
        reason = str(e).removeprefix(str(path)).lstrip()
        raise CheckpointLayoutError(f"{path}: {reason}") from None


def _network_state(obj: Mapping[str, Any], layout: Layout) -> tuple[Any, list[str]]:
    """The network's state dict for ``layout`` inside the file, and the file's other entries."""
    for container in (layout.container,) if layout.container else (("state_dict",), ("model",), ()):
        found: Any = obj
        for key in container:
            found = found.get(key) if isinstance(found, Mapping) else None
        if isinstance(found, Mapping):
            return found, sorted(str(k) for k in obj if container and k != container[0])
    return None, []


def _flat(state: Mapping[str, Any], stem: str = "") -> dict[str, Any]:
    """Nested state dicts (VISSL's ``trunk`` / ``heads``) as one dict of dotted keys."""
    flat: dict[str, Any] = {}
    for key, value in state.items():
        if isinstance(value, Mapping):
            flat |= _flat(value, f"{stem}{key}.")
        else:
            flat[f"{stem}{key}"] = value
    return flat


def _sequential_to_torchvision(key: str) -> str:
    child, rest = key.split(".", 1)
    return f"{_SEQUENTIAL_NAMES.get(child, child)}.{rest}"


def _has(keys: set[str], prefixes: tuple[str, ...]) -> bool:
    return any(k.startswith(p) for k in keys for p in prefixes)


def _fits(keys: set[str], layout: Layout) -> bool:
    """A ResNet root follows the prefix and the markers agree (unexplained keys are left to
    :func:`_split`, which names them)."""
    root = ("0.weight", "4.0.conv1.weight") if layout.sequential else ("conv1.weight",)
    return (
        all(layout.prefix + r in keys for r in root)
        and (not layout.requires or _has(keys, layout.requires))
        and not _has(keys, layout.excludes)
    )


def _unexplained(keys: set[str], layout: Layout) -> list[str]:
    """Keys neither dropped by a rule nor a ResNet parameter under the backbone prefix."""
    roots = tuple(f"{c}." for c in _SEQUENTIAL_NAMES) if layout.sequential else _BACKBONE_ROOTS
    backbone = tuple(layout.prefix + root for root in roots)
    return sorted(
        k for k in keys if not k.startswith(backbone) and not _has({k}, tuple(p for p, _ in layout.drop))
    )  # fmt: skip


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


def _tensors(found: Any, path: Path) -> dict[str, torch.Tensor]:
    """The state dict's tensors in dotted keys without the DDP ``module.`` prefix."""
    if not isinstance(found, Mapping) or not found:
        raise CheckpointLayoutError(f"{path}: no state dict found (got {type(found).__name__})")
    flat = _flat(found)
    others = sorted(k for k, v in flat.items() if not isinstance(v, torch.Tensor))
    if others:
        raise CheckpointLayoutError(f"{path}: state dict holds non-tensor entries {others[:10]}")
    return {k.removeprefix("module."): v for k, v in flat.items()}


def _recorded_config(config: Any) -> dict[str, Any] | None:
    """A checkpoint's ``config`` as a dict: ours hold the resolved YAML text (``cfg.dump()``);
    None for anything else (other checkpoints' configs are not read)."""
    if isinstance(config, str):
        try:
            config = yaml.safe_load(config)
        except yaml.YAMLError:
            return None
    return dict(config) if isinstance(config, Mapping) else None


def _plain_json(value: Any) -> dict[str, Any] | None:
    """``value`` when it is a mapping of JSON data only (no inert records of other libraries)."""
    if not isinstance(value, Mapping):
        return None
    try:
        return json.loads(json.dumps(dict(value)))
    except (TypeError, ValueError):
        return None


def _detect(obj: Mapping[str, Any], path: Path) -> Layout:
    """The one detectable layout that fits ``obj`` and explains all its keys (where several do,
    the one whose ``requires`` markers are present)."""
    fitting = []
    for layout in LAYOUTS:
        found, _ = _network_state(obj, layout)
        if layout.detect and isinstance(found, Mapping):
            keys = {k.removeprefix("module.") for k in _flat(found)}
            if _fits(keys, layout):
                fitting.append((layout, _unexplained(keys, layout)))
    explained = [layout for layout, unknown in fitting if not unknown]
    marked = [layout for layout in explained if layout.requires]  # the more specific
    if len(explained) == 1 or len(marked) == 1:
        return explained[0] if len(explained) == 1 else marked[0]
    if len(explained) > 1:
        raise CheckpointLayoutError(
            f"{path}: several layouts fit: "
            + ", ".join(
                f"{layout.name} ({layout.prefix!r}: {layout.sources})" for layout in explained
            )
            + "; choose one with --layout or pass the backbone's key prefix with --prefix"
        )
    if fitting:  # a ResNet found, with keys no layout explains: _split names them
        return min(fitting, key=lambda f: len(f[1]))[0]
    found, _ = _network_state(obj, Layout("", "", "", ()))
    keys = sorted(_flat(found)) if isinstance(found, Mapping) else sorted(map(str, obj))
    stems = {k.removesuffix("conv1.weight") for k in keys if k.endswith("conv1.weight")}
    candidates = sorted(s for s in stems if f"{s}layer1.0.conv1.weight" in keys)
    hint = f" ResNet roots under {candidates[:5]};" if candidates else ""
    raise CheckpointLayoutError(
        f"{path}: unknown checkpoint layout (first keys: {keys[:5]});{hint} pass the backbone's "
        "key prefix with --prefix"
    )


def load_backbone_state_dict(
    path: str | Path, *, prefix: str | None = None, layout: str | None = None
) -> BackboneWeights:
    """Read ``path`` and return its ResNet backbone in torchvision names.

    Args:
        path: a ``.pth`` / ``.pth.tar`` / ``.ckpt`` / ``.torch`` / ``.bin`` / ``.safetensors``
            checkpoint (layouts in :data:`LAYOUTS`).
        prefix: take the backbone from the keys under this prefix (after removing ``module.``),
            for layouts that are not auto-detected; ``<prefix>fc.*`` is dropped as the head.
        layout: a :data:`LAYOUTS` name instead of detection (for layouts whose keys are another
            layout's, e.g. ``simclr_tf``, or where several fit).

    Returns:
        :class:`BackboneWeights`. No shape check happens here: that is the consumer's contract
        (e.g. :func:`transfer.convert.convert_to_detectron2` checks the ResNet tensor set).

    Raises:
        CheckpointLayoutError: unreadable file, a pickle that needs code execution, or keys that
            fit no layout (the message names the file and the offending keys).
    """
    path = Path(path)
    obj = _read(path)
    meta: dict[str, Any] = {"path": str(path), "sha256": file_sha256(path)}
    recorded = ("epoch", "arch", "method")  # "method": a checkpoint that names its own
    meta.update({k: obj[k] for k in recorded if isinstance(obj.get(k), (int, str))})
    # our checkpoints' config (YAML text) and data description; kept only as plain JSON data,
    # so that another project's objects never reach a provenance record
    config = _plain_json(_recorded_config(obj.get("config")))
    if config:
        meta["config"] = config
    data = _plain_json(obj.get("data"))
    if data:
        meta["data"] = data

    if prefix is not None:
        chosen = Layout("prefix", "--prefix", prefix, ((prefix + "fc.", "projection head"),))
        found, ignored = _network_state(obj, chosen)
        backbone, dropped = _split(
            _tensors(found, path), prefix, chosen.drop, path, rest="outside prefix"
        )
    else:
        if layout is not None and layout not in _BY_NAME:
            raise CheckpointLayoutError(
                f"{path}: unknown layout {layout!r}; one of {sorted(_BY_NAME)}"
            )
        chosen = _BY_NAME[layout] if layout else _detect(obj, path)
        found, ignored = _network_state(obj, chosen)
        backbone, dropped = _split(_tensors(found, path), chosen.prefix, chosen.drop, path)
        if chosen.sequential:
            backbone = {_sequential_to_torchvision(k): v for k, v in backbone.items()}
    foreign = sorted(k for k in backbone if not k.startswith(_BACKBONE_ROOTS))
    if foreign:
        raise CheckpointLayoutError(
            f"{path}: {len(foreign)} backbone keys are not ResNet parameters: {foreign[:10]}"
        )
    if ignored:
        meta["ignored"] = ignored
    if chosen.input:
        meta["input"] = chosen.input
    if chosen.method and "method" not in meta:
        meta["method"] = chosen.method
    return BackboneWeights(state_dict=backbone, layout=chosen.name, meta=meta, dropped=dropped)
