"""Every supported self-supervised checkpoint layout, from a fixture with its project's real key
names and file structure (a seeded torchvision ResNet-18 under those names: nobody's weights),
converted to Detectron2 names and checked tensor by tensor.

Objects that other projects pickle beside their tensors (OmegaConf configs, mmengine's log
buffers, Lightning's AttributeDict) are written here by stand-in classes registered under the
real module paths while saving, and unregistered before loading: reading the file needs none of
those libraries and runs none of their code.
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
import torchvision

from moco_pretrain.weights import (
    LAYOUTS,
    CheckpointLayoutError,
    converted_provenance,
    load_backbone_state_dict,
)
from transfer.convert import (
    ConversionError,
    convert_to_detectron2,
    detectron2_key_map,
    main,
    pretraining_method,
    write_detectron2_pkl,
)

ARCH = "resnet18"


@pytest.fixture(scope="module")
def resnet() -> dict[str, torch.Tensor]:
    """A ResNet-18's backbone (BN counters included, as saved; no ``fc``)."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    for module in model.modules():  # distinct running statistics, so that a mix-up shows
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
    return {k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}


def _under(prefix: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {prefix + k: v.clone() for k, v in state.items()}


def _mlp(prefix: str, *layers: int) -> dict[str, torch.Tensor]:
    return {f"{prefix}{i}.weight": torch.randn(4, 4) for i in layers} | {
        f"{prefix}{layers[0]}.bias": torch.randn(4)
    }


def _sequential(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """lightly's ``nn.Sequential(*resnet.children()[:-1])`` numbering."""
    index = {"conv1": "0", "bn1": "1", "layer1": "4", "layer2": "5", "layer3": "6", "layer4": "7"}
    return {f"{index[k.split('.')[0]]}.{k.split('.', 1)[1]}": v for k, v in state.items()}


@pytest.fixture
def foreign(monkeypatch):
    """``foreign("omegaconf.dictconfig.DictConfig")``: a class pickled under that path, as the
    library writes it (``base=dict`` for a dict subclass)."""

    def make(path: str, base: type = object) -> type:
        module_name, name = path.rsplit(".", 1)
        parts = module_name.split(".")
        for depth in range(1, len(parts) + 1):
            parent = ".".join(parts[:depth])
            if parent not in sys.modules:
                monkeypatch.setitem(sys.modules, parent, types.ModuleType(parent))
        cls = type(name, (base,), {"__module__": module_name, "__qualname__": name})
        setattr(sys.modules[module_name], name, cls)
        return cls

    return make


def _history_buffer(foreign) -> object:
    buffer = foreign("mmengine.logging.history_buffer.HistoryBuffer")()
    buffer.__dict__.update(
        max_length=1000000, _log_history=np.arange(3.0), _count_history=np.ones(3)
    )
    return buffer


def _namespace() -> argparse.Namespace:
    return argparse.Namespace(arch="resnet18", epochs=100, lr=0.3)


# name -> (file suffix, build(backbone, foreign) -> object saved, expected layout, method or None)
def _fixtures():
    def swav(r, f):  # the released file: a bare DDP state dict
        return (
            _under("module.", r)
            | _mlp("module.projection_head.", 0, 3)
            | {
                "module.projection_head.1.running_mean": torch.zeros(4),
                "module.prototypes.weight": torch.randn(8, 4),
            }
        )

    def deepcluster_v2(r, f):  # training file; MultiPrototypes
        return {"epoch": 400, "optimizer": {"state": {}, "param_groups": []}, "state_dict": (
            _under("module.", r) | _mlp("module.projection_head.", 0, 3)
            | {f"module.prototypes.prototypes{i}.weight": torch.randn(8, 4) for i in range(3)}
        )}  # fmt: skip

    def dino_full(r, f):
        def network(prefix):
            return (
                _under(f"{prefix}backbone.", r)
                | _mlp(f"{prefix}head.mlp.", 0, 2, 4)
                | {
                    f"{prefix}head.last_layer.weight_g": torch.ones(8, 1),
                    f"{prefix}head.last_layer.weight_v": torch.randn(8, 4),
                }
            )

        student = {k: v + 1 for k, v in network("module.").items()}  # a different network
        return {"student": student, "teacher": network("module."), "epoch": 100,
                "optimizer": {"state": {}, "param_groups": []}, "args": _namespace(),
                "dino_loss": {"center": torch.zeros(1, 8)}}  # fmt: skip

    def barlow_twins(r, f):
        model = (
            _under("module.backbone.", r)
            | _mlp("module.projector.", 0, 3, 6)
            | {
                "module.projector.1.running_mean": torch.zeros(4),
                "module.bn.running_mean": torch.zeros(8),
                "module.bn.running_var": torch.ones(8),
                "module.bn.num_batches_tracked": torch.tensor(5),
            }
        )
        return {"epoch": 1000, "model": model, "optimizer": {"state": {}, "param_groups": []}}

    def vicreg(r, f):
        model = _under("module.backbone.", r) | _mlp("module.projector.", 0, 3, 6)
        return {"epoch": 1000, "model": model, "optimizer": {"state": {}, "param_groups": []}}

    def densecl(r, f):  # encoder_q = Sequential(backbone, neck); backbone is its alias
        state = {
            "queue": torch.randn(4, 16),
            "queue_ptr": torch.zeros(1, dtype=torch.long),
            "queue2": torch.randn(4, 16),
            "queue2_ptr": torch.zeros(1, dtype=torch.long),
        }
        state |= (
            _under("encoder_q.0.", r)
            | _mlp("encoder_q.1.mlp.", 0, 2)
            | _mlp("encoder_q.1.mlp2.", 0, 2)
        )
        state |= _under("encoder_k.0.", r) | _mlp("encoder_k.1.mlp.", 0, 2) | _under("backbone.", r)
        meta = {
            "epoch": 200,
            "iter": 1000,
            "mmcv_version": "1.0.3",
            "time": "Sat Jan 2",
            "openselfsup_version": "0.2.0",
            "config": "model = dict(type='DenseCL')",
        }
        return {"meta": meta, "state_dict": state, "optimizer": {"state": {}, "param_groups": []}}

    def openselfsup_byol(r, f):
        state = _under("online_net.0.", r) | _mlp("online_net.1.mlp.", 0, 1, 3)
        state |= _under("target_net.0.", r) | _mlp("target_net.1.mlp.", 0, 1, 3)
        state |= _under("backbone.", r) | _mlp("head.predictor.mlp.", 0, 1, 3)
        return {"meta": {"epoch": 300}, "state_dict": state, "optimizer": {}}

    def pixpro(r, f):
        def projector(prefix):
            return (
                _mlp(f"{prefix}.linear1.", 0)
                | _mlp(f"{prefix}.linear2.", 0)
                | {f"{prefix}.bn1.running_mean": torch.zeros(4)}
            )

        model = _under("module.encoder.", r) | _under("module.encoder_k.", r)
        model |= projector("module.projector") | projector("module.projector_k")
        model |= {
            "module.value_transform.weight": torch.randn(4, 4, 1, 1),
            "module.value_transform.bias": torch.zeros(4),
        }
        return {
            "opt": _namespace(),
            "model": model,
            "epoch": 400,
            "optimizer": {"state": {}, "param_groups": []},
            "scheduler": {"last_epoch": 3},
        }

    def mmselfsup_moco(r, f):  # mmselfsup 1.x: the momentum encoder is an EMA module
        state = _under("backbone.", r) | _mlp("neck.mlp.", 0, 2)
        state |= _under("encoder_k.module.0.", r) | _mlp("encoder_k.module.1.mlp.", 0, 2)
        state |= {
            "encoder_k.steps": torch.tensor(9),
            "queue": torch.randn(4, 16),
            "queue_ptr": torch.zeros(1, dtype=torch.long),
        }
        hub = {
            "log_scalars": {"train/loss": _history_buffer(f)},
            "runtime_info": {"epoch": 200},
            "resumed_keys": {"epoch": True},
        }
        meta = {"epoch": 200, "iter": 1000, "seed": 0, "mmengine_version": "0.10.7", "cfg": "..."}
        return {
            "meta": meta,
            "state_dict": state,
            "message_hub": hub,
            "optimizer": {"state": {}, "param_groups": []},
            "param_schedulers": [{}],
        }

    def mmselfsup_byol(r, f):
        state = _under("backbone.", r) | _mlp("neck.fc0.", 0) | _mlp("head.predictor.fc0.", 0)
        state |= _under("target_net.module.0.", r) | {"target_net.steps": torch.tensor(9)}
        return {"meta": {"epoch": 200}, "state_dict": state}

    def vissl(r, f):
        model = {"trunk": _under("_feature_blocks.", r), "heads": _mlp("0.clf.", 0)}
        loss = {"queue": torch.randn(4, 16)} | _under("moco_encoder.trunk._feature_blocks.", r)
        return {
            "phase_idx": 3,
            "iteration": 100,
            "loss": loss,
            "iteration_num": 100,
            "train_phase_idx": 3,
            "type": "consolidated",
            "classy_state_dict": {
                "base_model": {"model": model, "meta": {"trunk": {}, "heads": []}},
                "loss": loss,
                "optimizer": {},
                "phase_idx": 3,
            },
        }

    def solo_learn(r, f):  # BYOL; no hyper_parameters (solo-learn keeps its cfg out of the file)
        state = _under("backbone.", r) | _mlp("projector.", 0, 1, 3) | _mlp("predictor.", 0, 1, 3)
        state |= _under("momentum_backbone.", r) | _mlp("momentum_projector.", 0, 1, 3)
        state |= {"classifier.weight": torch.randn(10, 4), "classifier.bias": torch.zeros(10)}
        return {
            "epoch": 400,
            "global_step": 1000,
            "pytorch-lightning_version": "2.4.0",
            "state_dict": state,
            "optimizer_states": [],
            "lr_schedulers": [],
            "callbacks": {},
            "loops": {},
        }

    def solo_learn_dino(r, f):
        state = _under("backbone.", r) | _mlp("head.mlp.", 0, 2) | _under("momentum_backbone.", r)
        state |= _mlp("momentum_head.mlp.", 0, 2) | {"dino_loss_func.center": torch.zeros(1, 8)}
        state |= {"classifier.weight": torch.randn(10, 4), "classifier.bias": torch.zeros(10)}
        return {"epoch": 400, "state_dict": state, "loops": {}, "callbacks": {}}

    def solo_learn_swav(r, f):
        state = _under("backbone.", r) | _mlp("projector.", 0, 1, 3)
        state |= {
            "prototypes.weight_g": torch.ones(8, 1),
            "prototypes.weight_v": torch.randn(8, 4),
            "queue": torch.randn(2, 8, 4),
        }
        return {"epoch": 400, "state_dict": state, "loops": {}, "callbacks": {}}

    def lightly(r, f):  # the examples' nn.Sequential backbone
        state = _under("backbone.", _sequential(r)) | _mlp("projection_head.layers.", 0, 3)
        state |= _under("backbone_momentum.", _sequential(r)) | _mlp("prediction_head.layers.", 0)
        state |= _mlp("projection_head_momentum.layers.", 0, 3)
        return {"epoch": 10, "global_step": 100, "state_dict": state, "loops": {}}

    def lightly_benchmark(r, f):  # benchmarks/imagenet/resnet50: a torchvision backbone
        state = _under("backbone.", r) | _mlp("projection_head.layers.", 0, 3)
        state |= _under("key_backbone.", r) | _mlp("key_projection_head.layers.", 0, 3)
        state |= _mlp("online_classifier.classification_head.", 0)
        return {
            "epoch": 100,
            "state_dict": state,
            "hparams_name": "kwargs",
            "hyper_parameters": {"batch_size_per_device": 128, "num_classes": 1000},
        }

    def lightly_backbone(r, f):
        return _sequential(r)

    def timm_bin(r, f):
        return r | {"fc.weight": torch.randn(10, 512), "fc.bias": torch.zeros(10)}

    def timm_training(r, f):
        return {
            "epoch": 100,
            "arch": ARCH,
            "version": 2,
            "args": _namespace(),
            "state_dict": timm_bin(r, f),
            "state_dict_ema": timm_bin(r, f),
            "optimizer": {},
        }

    def infomin(r, f):  # PyContrast (InfoMin, PIRL: head_jig); model_ema has no module.
        model = _under("module.encoder.", r) | _mlp("module.head.", 0, 2)
        model |= _mlp("module.head_jig.fc1.", 0) | _mlp("module.head_jig.fc2.", 0)
        return {
            "model": model,
            "model_ema": _under("encoder.", r) | _mlp("head.", 0, 2),
            "contrast": {"memory": torch.randn(16, 4)},
            "epoch": 800,
            "optimizer": {"state": {}, "param_groups": []},
        }

    def simclr_pytorch(r, f):  # Spijkervet/SimCLR's checkpoint_100.tar: the bare module
        return _under("encoder.", r) | {
            "projector.0.weight": torch.randn(4, 512),
            "projector.2.weight": torch.randn(4, 4),
        }

    def pcl(r, f):
        state = _under("module.encoder_q.", r) | _mlp("module.encoder_q.fc.", 0, 2)
        state |= _under("module.encoder_k.", r) | {"module.queue_0": torch.randn(4, 16)}
        return {"epoch": 200, "arch": ARCH, "state_dict": state, "optimizer": {}}

    def moco_v1(r, f):  # the official release
        head = {"fc.weight": torch.randn(8, 512), "fc.bias": torch.zeros(8)}
        state = _under("module.encoder_q.", r | head) | _under("module.encoder_k.", r | head)
        state |= {"module.queue": torch.randn(4, 16), "module.queue_ptr": torch.zeros(1)}
        return {"epoch": 200, "arch": ARCH, "state_dict": state, "optimizer": {}}

    def moco_v3(r, f):
        state = _under("module.base_encoder.", r) | _mlp("module.base_encoder.fc.", 0, 3)
        state |= _under("module.momentum_encoder.", r) | _mlp("module.predictor.", 0, 3)
        return {"epoch": 300, "arch": ARCH, "state_dict": state, "optimizer": {}}

    return {
        "swav": (".pth.tar", swav, "swav", None),
        "deepcluster_v2": (".pth", deepcluster_v2, "swav", None),
        "dino_full": (".pth", dino_full, "dino", "dino"),
        "barlow_twins": (".pth", barlow_twins, "backbone", None),
        "vicreg": (".pth", vicreg, "backbone", None),
        "densecl": (".pth", densecl, "openselfsup", None),
        "openselfsup_byol": (".pth", openselfsup_byol, "backbone", None),
        "pixpro": (".pth", pixpro, "encoder", None),
        "mmselfsup_moco": (".pth", mmselfsup_moco, "backbone", None),
        "mmselfsup_byol": (".pth", mmselfsup_byol, "backbone", None),
        "vissl": (".torch", vissl, "vissl", None),
        "solo_learn": (".ckpt", solo_learn, "backbone", None),
        "solo_learn_swav": (".ckpt", solo_learn_swav, "backbone", None),
        "solo_learn_dino": (".ckpt", solo_learn_dino, "backbone", None),
        "lightly": (".ckpt", lightly, "lightly", None),
        "lightly_benchmark": (".ckpt", lightly_benchmark, "backbone", None),
        "lightly_backbone": (".pth", lightly_backbone, "sequential", None),
        "timm_bin": (".bin", timm_bin, "torchvision", "supervised"),
        "timm_training": (".pth.tar", timm_training, "torchvision", "supervised"),
        "infomin_pirl": (".pth", infomin, "encoder", None),
        "simclr_pytorch": (".tar", simclr_pytorch, "simclr_pytorch", "simclr"),
        "pcl": (".pth.tar", pcl, "moco_v2", "moco_v2"),
        "moco_v1": (".pth.tar", moco_v1, "moco_v1", "moco_v1"),
        "moco_v3": (".pth.tar", moco_v3, "moco_v3", "moco_v3"),
    }


FIXTURES = _fixtures()


def _save(obj, path, monkeypatch) -> None:
    torch.save(obj, path)
    monkeypatch.undo()  # the stand-in modules go: loading must not need them


def _check_converted(weights, resnet) -> None:
    converted = convert_to_detectron2(weights, arch=ARCH)
    names = detectron2_key_map(ARCH)
    expected = {k: v for k, v in resnet.items() if "num_batches" not in k}
    assert set(converted["model"]) == {names[k] for k in expected}
    for key, tensor in expected.items():
        np.testing.assert_array_equal(converted["model"][names[key]], tensor.numpy(), err_msg=key)


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_layout_converts_tensor_by_tensor(name, resnet, foreign, tmp_path, monkeypatch):
    suffix, build, layout, method = FIXTURES[name]
    path = tmp_path / f"{name}{suffix}"
    _save(build(resnet, foreign), path, monkeypatch)
    modules = set(sys.modules)
    weights = load_backbone_state_dict(path)
    libraries = ("omegaconf", "mmengine", "lightning", "pytorch_lightning")
    assert not {m for m in set(sys.modules) - modules if m.startswith(libraries)}
    assert weights.layout == layout
    _check_converted(weights, resnet)
    assert set(weights.state_dict) == set(resnet)  # BN counters too: the converter drops them
    converted = convert_to_detectron2(weights, arch=ARCH)
    assert converted["provenance"]["method"] == (method or "unknown")


def test_every_detected_layout_has_a_fixture():
    detected = {layout.name for layout in LAYOUTS if layout.detect}
    covered = {layout for _, _, layout, _ in FIXTURES.values()}
    assert detected - covered == {"cmc", "cmc_original"}  # test_cmc_is_refused_with_its_input


def test_dino_keeps_the_teacher_and_lists_the_rest(resnet, foreign, tmp_path, monkeypatch):
    path = tmp_path / "dino.pth"
    _save(FIXTURES["dino_full"][1](resnet, foreign), path, monkeypatch)
    weights = load_backbone_state_dict(path)
    assert weights.meta["ignored"] == ["args", "dino_loss", "epoch", "optimizer", "student"]
    assert {k: sorted(v) for k, v in weights.dropped.items()} == {"projection head": [
        "head.last_layer.weight_g", "head.last_layer.weight_v", "head.mlp.0.bias",
        "head.mlp.0.weight", "head.mlp.2.weight", "head.mlp.4.weight",
    ]}  # fmt: skip
    _check_converted(weights, resnet)  # the teacher: the student's tensors differ by 1


def test_safetensors(resnet, tmp_path):
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file(FIXTURES["timm_bin"][1](resnet, None), path)
    weights = load_backbone_state_dict(path)
    assert weights.layout == "torchvision"
    assert sorted(weights.dropped["classifier"]) == ["fc.bias", "fc.weight"]
    _check_converted(weights, resnet)
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(
        CheckpointLayoutError, match="model.safetensors: not a readable .safetensors"
    ):
        load_backbone_state_dict(path)


def test_simclr_tf_port_is_named_and_records_its_input(resnet, tmp_path, capsys):
    path = tmp_path / "resnet50-1x.pth"
    torch.save({"state_dict": resnet | {"fc.weight": torch.randn(10, 512)}}, path)
    assert load_backbone_state_dict(path).layout == "torchvision"  # the keys cannot tell
    weights = load_backbone_state_dict(path, layout="simclr_tf")
    assert weights.layout == "simclr_tf"
    provenance = convert_to_detectron2(weights, arch=ARCH)["provenance"]
    assert provenance["method"] == "simclr" and "without mean/std" in provenance["input"]
    assert (
        main([str(path), str(tmp_path / "out.pkl"), "--layout", "simclr_tf", "--arch", ARCH]) == 0
    )
    assert "input:     the backbone takes RGB in [0, 1] without mean/std" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("layout", "l_prefix", "ab_prefix", "heads"),
    [
        ("cmc", "module.encoder1.", "module.encoder2.", ("module.head1.", "module.head2.")),
        ("cmc_original", "encoder.module.l_to_ab.", "encoder.module.ab_to_l.", ()),
    ],
)
def test_cmc_is_refused_with_its_input(resnet, tmp_path, layout, l_prefix, ab_prefix, heads):
    grey = resnet | {"conv1.weight": torch.randn(64, 1, 7, 7)}
    ab = resnet | {"conv1.weight": torch.randn(64, 2, 7, 7)}
    model = _under(l_prefix, grey) | _under(ab_prefix, ab)
    for head in heads:
        model |= _mlp(head, 0)
    if layout == "cmc_original":  # its fc is the 128-d projection
        model |= {
            f"{l_prefix}fc.weight": torch.randn(128, 512),
            f"{ab_prefix}fc.bias": torch.zeros(128),
        }
    path = tmp_path / "cmc.pth"
    torch.save({"opt": _namespace(), "model": model, "contrast": {}, "epoch": 240}, path)
    weights = load_backbone_state_dict(path)
    assert weights.layout == layout and weights.meta["method"] == "cmc"
    with pytest.raises(
        ConversionError,
        match=rf"layout {layout}\) is not a resnet18 backbone: the {layout} backbone takes the L "
        r"channel of Lab images .*conv1.weight: \(64, 1, 7, 7\)",
    ):
        convert_to_detectron2(weights, arch=ARCH)


def test_byol_port_is_named(resnet, tmp_path):
    """byol-convert writes torchvision keys with the classifier and no BN counters."""
    path = tmp_path / "pretrain_res50x1.pth.tar"
    state = {k: v for k, v in resnet.items() if "num_batches" not in k}
    torch.save(state | {"fc.weight": torch.randn(10, 512), "fc.bias": torch.zeros(10)}, path)
    assert pretraining_method(load_backbone_state_dict(path)) == "supervised"  # keys cannot tell
    weights = load_backbone_state_dict(path, layout="byol")
    assert (weights.layout, pretraining_method(weights)) == ("byol", "byol")
    assert "input" not in weights.meta  # ImageNet mean/std, as detectron2 feeds
    _check_converted(weights, resnet)


def test_several_resnets_are_named_with_their_prefixes(resnet, tmp_path):
    path = tmp_path / "byol.pth"
    state = _under("online_network.encoder.", resnet) | _under("target_network.encoder.", resnet)
    torch.save({"model": state}, path)
    with pytest.raises(
        CheckpointLayoutError,
        match=r"unknown checkpoint layout .*ResNet roots under \['online_network.encoder.', "
        r"'target_network.encoder.'\]; pass the backbone's key prefix with --prefix",
    ):
        load_backbone_state_dict(path)
    weights = load_backbone_state_dict(path, prefix="online_network.encoder.")
    assert sorted(weights.dropped["outside prefix"]) == sorted(
        _under("target_network.encoder.", resnet)
    )


def test_a_detectron2_weight_file_gets_its_own_message(resnet, tmp_path, capsys):
    source = tmp_path / "tv.pth"
    torch.save(resnet, source)
    pkl = tmp_path / "converted.pkl"
    write_detectron2_pkl(convert_to_detectron2(load_backbone_state_dict(source), arch=ARCH), pkl)
    with pytest.raises(CheckpointLayoutError, match=r"converted.pkl: already a Detectron2 weight"):
        load_backbone_state_dict(pkl)
    msra = tmp_path / "R-50.pkl"
    with open(msra, "wb") as f:
        pickle.dump({"model": {"stem.conv1.weight": np.zeros(2)}, "__author__": "Detectron"}, f)
    with pytest.raises(SystemExit, match="2"):
        main([str(msra), str(tmp_path / "again.pkl")])
    assert "already a Detectron2 weight file" in capsys.readouterr().err
    notes = tmp_path / "notes.pkl"  # the markers, but not as a weight file's keys
    with open(notes, "wb") as f:
        pickle.dump({"about": {"__author__": "someone"}, "values": np.zeros(2)}, f)
    with pytest.raises(CheckpointLayoutError, match="notes.pkl: ") as error:
        load_backbone_state_dict(notes)
    assert "Detectron2" not in str(error.value)


def test_plain_data_written_by_the_real_libraries():
    """``tests/data/plain_data.ckpt`` (6 KB, tiny tensors) was written with the libraries
    themselves (omegaconf 2.4.0, mmengine 0.10.7, lightning 2.6.6, torch 2.13.0): an OmegaConf
    ``cfg`` in ``hyper_parameters`` beside both AttributeDicts, an mmengine ``MessageHub`` state
    (HistoryBuffers of numpy arrays) and an argparse ``Namespace``."""
    path = Path(__file__).parent / "data" / "plain_data.ckpt"
    weights = load_backbone_state_dict(path)
    assert weights.layout == "backbone" and weights.meta["epoch"] == 3
    assert sorted(weights.state_dict) == ["bn1.weight", "conv1.weight", "layer1.0.conv1.weight"]
    assert weights.state_dict["conv1.weight"].flatten().tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert weights.dropped == {
        "projection head": ["projector.0.weight"],
        "momentum encoder": ["momentum_backbone.conv1.weight"],
    }
    assert weights.meta["ignored"] == ["args", "epoch", "hyper_parameters", "message_hub"]


class _RunsCode:
    def __reduce__(self):
        return (print, ("unpickling ran code",))


def test_code_beside_plain_data_is_still_refused(resnet, foreign, tmp_path, monkeypatch, capsys):
    path = tmp_path / "mmselfsup.pth"
    checkpoint = FIXTURES["mmselfsup_moco"][1](resnet, foreign)
    checkpoint["callbacks"] = {"hook": _RunsCode()}
    _save(checkpoint, path, monkeypatch)
    with pytest.raises(CheckpointLayoutError, match="mmselfsup.pth: .*could run code"):
        load_backbone_state_dict(path)
    assert "unpickling ran code" not in capsys.readouterr().out


def test_fine_tuning_warns_about_the_input_convention(resnet, tmp_path):
    train_net = pytest.importorskip("transfer.train_net", exc_type=ImportError)
    source = tmp_path / "resnet50-1x.pth"
    torch.save({"state_dict": resnet}, source)
    plain, simclr = tmp_path / "plain.pkl", tmp_path / "simclr.pkl"
    for layout, pkl in ((None, plain), ("simclr_tf", simclr)):
        weights = load_backbone_state_dict(source, layout=layout)
        write_detectron2_pkl(convert_to_detectron2(weights, arch=ARCH), pkl)
    mean, std = [103.53, 116.28, 123.675], [1.0, 1.0, 1.0]
    note = train_net.input_convention_note
    assert note(converted_provenance(plain), str(plain), mean, std) is None
    assert note(converted_provenance(simclr), str(simclr), mean, std) == (
        f"{simclr}: the backbone takes RGB in [0, 1] without mean/std normalisation; this run "
        "normalises pixels with MODEL.PIXEL_MEAN [103.53, 116.28, 123.675] and MODEL.PIXEL_STD "
        "[1.0, 1.0, 1.0]"
    )


def test_a_crafted_pickle_is_one_readable_error(resnet, foreign, tmp_path, monkeypatch):
    """A dict subclass stand-in given object state: torch's unpickler fails inside; one line."""
    attribute_dict = foreign("lightning.fabric.utilities.data.AttributeDict", base=dict)
    attribute_dict.__reduce__ = lambda self: (type(self), (), {"lr": 0.1})
    path = tmp_path / "crafted.ckpt"
    _save(
        {"state_dict": _under("backbone.", resnet), "hyper_parameters": attribute_dict()},
        path,
        monkeypatch,
    )
    with pytest.raises(
        CheckpointLayoutError,
        match=r"crafted.ckpt: is not a readable PyTorch checkpoint: .dict. object",
    ):
        load_backbone_state_dict(path)


def test_other_projects_data_never_reaches_the_provenance(resnet, tmp_path):
    path = tmp_path / "foreign.pth"
    torch.save(
        {"state_dict": resnet, "data": {"run": _namespace()}, "config": {"x": _namespace()}}, path
    )
    weights = load_backbone_state_dict(path)
    assert "data" not in weights.meta and "config" not in weights.meta
    provenance = convert_to_detectron2(weights, arch=ARCH)["provenance"]
    json.dumps(provenance)  # plain JSON, as moco-transfer copies it into results.json
    torch.save({"state_dict": resnet, "data": {"classes": ["Trouser"], "images": 40}}, path)
    assert load_backbone_state_dict(path).meta["data"] == {"classes": ["Trouser"], "images": 40}
