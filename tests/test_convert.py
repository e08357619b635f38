"""moco-convert: exact key sets for every source layout, verification errors, no partial output.

Checkpoints are built here from torchvision ResNet-50s (nothing is downloaded); none of these
tests needs detectron2.
"""

from __future__ import annotations

import pickle
import re
import subprocess
import sys

import pytest
import torch
import torchvision

from moco_pretrain import MoCo
from moco_pretrain.checkpoint import with_ddp_prefix
from moco_pretrain.config import setup_cfg
from moco_pretrain.weights import load_backbone_state_dict
from transfer.convert import (
    ConversionError,
    convert_to_detectron2,
    detectron2_key_map,
    main,
    pretraining_method,
    resnet_tensor_shapes,
)


@pytest.fixture(scope="module")
def resnet50_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return torchvision.models.resnet50().state_dict()


def _backbone(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """torchvision names without the classifier and BN step counters: what must be converted."""
    return {k: v for k, v in state.items() if not k.startswith("fc.") and "num_batches" not in k}


def _d2_names() -> set[str]:
    return set(detectron2_key_map("resnet50").values())


def test_key_map_is_exact_for_resnet50(resnet50_state):
    shapes = resnet_tensor_shapes("resnet50")
    assert shapes == {k: tuple(v.shape) for k, v in _backbone(resnet50_state).items()}
    names = detectron2_key_map("resnet50")
    assert len(names) == len(set(names.values())) == 265  # 53 convs + 53 BNs x 4
    assert names["conv1.weight"] == "stem.conv1.weight"
    assert names["bn1.running_var"] == "stem.conv1.norm.running_var"
    assert names["layer1.0.conv3.weight"] == "res2.0.conv3.weight"
    assert names["layer3.5.bn2.bias"] == "res4.5.conv2.norm.bias"
    assert names["layer4.0.downsample.0.weight"] == "res5.0.shortcut.weight"
    assert names["layer4.0.downsample.1.running_mean"] == "res5.0.shortcut.norm.running_mean"
    # convs x 5 tensors (weight + BN's 4): stem + blocks x convs per block + shortcuts
    assert len(resnet_tensor_shapes("resnet18")) == 5 * (1 + 8 * 2 + 3)
    assert len(resnet_tensor_shapes("resnet101")) == 5 * (1 + 33 * 3 + 4)


def _moco_checkpoint(tmp_path, *, mlp: bool, state_dict=None):
    """Our pretraining checkpoint layout: epoch, arch, DDP-named state_dict, optimizer."""
    torch.manual_seed(0)
    model = MoCo(torchvision.models.resnet50, dim=16, K=32, mlp=mlp)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    path = tmp_path / "checkpoint_0199.pth.tar"
    torch.save(
        {
            "epoch": 200,
            "arch": "resnet50",
            "state_dict": with_ddp_prefix(state_dict or model.state_dict()),
            "optimizer": optimizer.state_dict(),
        },
        path,
    )
    return path, model


@pytest.mark.parametrize("mlp, layout, head", [(False, "moco_v1", 2), (True, "moco_v2", 4)])
def test_our_moco_checkpoints(tmp_path, mlp, layout, head):
    path, model = _moco_checkpoint(tmp_path, mlp=mlp)
    weights = load_backbone_state_dict(path)
    assert weights.layout == layout and weights.meta["epoch"] == 200
    converted = convert_to_detectron2(weights)
    assert set(converted["model"]) == _d2_names()
    assert not any(".fc." in k or k.startswith("fc.") for k in converted["model"])
    query = model.encoder_q.state_dict()
    assert torch.equal(
        torch.from_numpy(converted["model"]["res3.1.conv2.weight"]),
        query["layer2.1.conv2.weight"],
    )
    dropped = converted["provenance"]["dropped"]
    assert len(dropped["projection head"]) == head  # by name: module.encoder_q.fc.*
    assert all(k.startswith("encoder_q.fc.") for k in dropped["projection head"])
    assert len(dropped["key encoder"]) == len(model.encoder_k.state_dict())
    assert dropped["queue"] == ["queue", "queue_ptr"]
    assert converted["matching_heuristics"] is True and converted["__author__"]
    prov = converted["provenance"]
    assert (prov["layout"], prov["epochs"], prov["arch"]) == (layout, 200, "resnet50")
    assert (prov["method"], prov["seed"]) == (layout, None)  # no recorded config
    assert len(prov["source_sha256"]) == 64


def test_provenance_of_our_checkpoints_names_method_epochs_seed_and_data(tmp_path):
    """Our checkpoints record the resolved config (YAML text) and, on the main branch, the
    training data; the .pkl's provenance copies the seed and merges the data."""
    _, model = _moco_checkpoint(tmp_path, mlp=True)
    path = tmp_path / "checkpoint_0009.pth.tar"
    data = {"classes": ["shirt", "shoe"], "images_sha256": "ab" * 32}
    config = setup_cfg(None, ["MODEL.MLP", "True", "SEED", "7"]).dump()
    state = with_ddp_prefix(model.state_dict())
    torch.save({"epoch": 10, "arch": "resnet50", "state_dict": state, "config": config,
                "data": data}, path)  # fmt: skip
    prov = convert_to_detectron2(load_backbone_state_dict(path))["provenance"]
    assert (prov["method"], prov["epochs"], prov["seed"], prov["arch"]) == (
        "moco_v2", 10, 7, "resnet50",
    )  # fmt: skip
    assert prov["classes"] == ["shirt", "shoe"] and prov["images_sha256"] == "ab" * 32
    # a config that is not YAML is not read: the conversion goes on without a seed
    torch.save({"epoch": 10, "state_dict": state, "config": "a: b: c"}, path)
    prov = convert_to_detectron2(load_backbone_state_dict(path))["provenance"]
    assert (prov["method"], prov["seed"]) == ("moco_v2", None) and "classes" not in prov


def test_official_moco_v2_layout(tmp_path, resnet50_state):
    """Released MoCo v1/v2 files: module.encoder_q.* (official head names fc.0 / fc.2)."""
    state = {f"module.encoder_q.{k}": v for k, v in _backbone(resnet50_state).items()}
    state |= {"module.encoder_q.fc.0.weight": torch.zeros(2048, 2048)}
    state |= {"module.encoder_q.fc.0.bias": torch.zeros(2048)}
    state |= {"module.encoder_q.fc.2.weight": torch.zeros(128, 2048)}
    state |= {"module.encoder_q.fc.2.bias": torch.zeros(128)}
    path = tmp_path / "moco_v2_800ep_pretrain.pth.tar"
    torch.save({"epoch": 800, "arch": "resnet50", "state_dict": state}, path)
    converted = convert_to_detectron2(load_backbone_state_dict(path))
    assert set(converted["model"]) == _d2_names()
    prov = converted["provenance"]
    assert (prov["layout"], prov["method"], prov["epochs"]) == ("moco_v2", "moco_v2", 800)


def test_moco_v3_layout(tmp_path, resnet50_state):
    backbone = _backbone(resnet50_state)
    state = {f"module.base_encoder.{k}": v for k, v in backbone.items()}
    state |= {f"module.momentum_encoder.{k}": v for k, v in backbone.items()}
    for net in ("base_encoder.fc", "momentum_encoder.fc", "predictor"):
        state |= {
            f"module.{net}.0.weight": torch.zeros(4, 4),
            f"module.{net}.1.bias": torch.zeros(4),
        }
    path = tmp_path / "r-50-300ep.pth.tar"
    torch.save({"epoch": 300, "arch": "resnet50", "state_dict": state}, path)
    converted = convert_to_detectron2(load_backbone_state_dict(path))
    assert set(converted["model"]) == _d2_names()
    dropped = converted["provenance"]["dropped"]
    assert set(dropped) == {"projection head", "key encoder", "predictor"}
    assert sorted(dropped["projection head"]) == [
        "base_encoder.fc.0.weight",
        "base_encoder.fc.1.bias",
    ]
    assert (converted["provenance"]["method"], converted["provenance"]["epochs"]) == (
        "moco_v3",
        300,
    )


@pytest.mark.parametrize("wrap", [None, "state_dict", "model"])
def test_torchvision_and_plain_state_dicts(tmp_path, resnet50_state, wrap):
    path = tmp_path / "resnet50.pth"
    torch.save(resnet50_state if wrap is None else {wrap: resnet50_state}, path)
    converted = convert_to_detectron2(load_backbone_state_dict(path))
    assert set(converted["model"]) == _d2_names()
    dropped = converted["provenance"]["dropped"]
    assert dropped["classifier"] == ["fc.weight", "fc.bias"]
    assert len(dropped["BN step counters"]) == 53
    assert converted["model"]["stem.conv1.weight"].dtype.name == "float32"
    prov = converted["provenance"]  # a supervised classifier, of unknown schedule and seed
    assert (prov["method"], prov["epochs"], prov["seed"]) == ("supervised", None, None)


def test_a_backbone_without_classifier_is_of_unknown_method(tmp_path, resnet50_state):
    torch.save(_backbone(resnet50_state), tmp_path / "backbone.pth")
    converted = convert_to_detectron2(load_backbone_state_dict(tmp_path / "backbone.pth"))
    assert converted["provenance"]["method"] == "unknown"


def test_prefix_for_other_layouts(tmp_path, resnet50_state):
    state = {f"backbone.net.{k}": v for k, v in resnet50_state.items()}
    state["backbone.net.fc.weight"] = state.pop("backbone.net.fc.weight")
    state["decoder.weight"] = torch.zeros(3)
    path = tmp_path / "other.pth"
    torch.save({"model": state}, path)
    with pytest.raises(ValueError, match="unknown checkpoint layout.*--prefix"):
        load_backbone_state_dict(path)
    weights = load_backbone_state_dict(path, prefix="backbone.net.")
    assert weights.layout == "prefix"
    assert weights.dropped["outside prefix"] == ["decoder.weight"]
    assert sorted(weights.dropped["projection head"]) == [
        "backbone.net.fc.bias",
        "backbone.net.fc.weight",
    ]
    assert set(convert_to_detectron2(weights)["model"]) == _d2_names()
    assert pretraining_method(weights) == "unknown"  # neither the keys nor a config say


@pytest.mark.parametrize("mlp, method", [(False, "moco_v1"), (True, "moco_v2")])
def test_a_prefixed_checkpoint_takes_its_method_from_the_recorded_config(
    tmp_path, resnet50_state, mlp, method
):
    state = {f"net.{k}": v for k, v in resnet50_state.items()}
    config = setup_cfg(None, ["MODEL.MLP", str(mlp)]).dump()
    torch.save({"model": state, "config": config, "epoch": 3}, tmp_path / "other.pth")
    weights = load_backbone_state_dict(tmp_path / "other.pth", prefix="net.")
    prov = convert_to_detectron2(weights)["provenance"]
    assert (prov["layout"], prov["method"], prov["epochs"], prov["seed"]) == (
        "prefix", method, 3, 0,
    )  # fmt: skip


def test_missing_and_misshapen_tensors_are_named(tmp_path, resnet50_state):
    state = dict(resnet50_state)
    del state["layer3.2.bn1.running_var"]
    state["layer4.1.conv2.weight"] = torch.zeros(512, 512, 1, 1)
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    weights = load_backbone_state_dict(path)
    with pytest.raises(ConversionError) as err:
        convert_to_detectron2(weights)
    message = str(err.value)
    assert "1 missing tensors: ['layer3.2.bn1.running_var']" in message
    assert "layer4.1.conv2.weight: (512, 512, 1, 1) != expected (512, 512, 3, 3)" in message
    assert "broken.pth" in message


def test_leftover_keys_are_named(tmp_path, resnet50_state):
    """A ResNet-101 read as ResNet-50 leaves layer3.6..22 unmapped; a ResNet-18 misses tensors."""
    torch.save(torchvision.models.resnet101().state_dict(), tmp_path / "r101.pth")
    with pytest.raises(ConversionError, match=r"unmapped keys: \['layer3\.10\.bn1\.bias'"):
        convert_to_detectron2(load_backbone_state_dict(tmp_path / "r101.pth"))
    weights = load_backbone_state_dict(tmp_path / "r101.pth")
    assert set(convert_to_detectron2(weights, arch="resnet101")["model"]) == set(
        detectron2_key_map("resnet101").values()
    )


def test_recorded_arch_is_suggested(tmp_path):
    """A ResNet-18 MoCo checkpoint read as ResNet-50 names the --arch that fits, then converts."""
    state = {
        f"module.encoder_q.{k}": v for k, v in torchvision.models.resnet18().state_dict().items()
    }
    torch.save({"epoch": 2, "arch": "resnet18", "state_dict": state}, tmp_path / "r18.pth.tar")
    weights = load_backbone_state_dict(tmp_path / "r18.pth.tar")
    with pytest.raises(ConversionError, match=r"records arch 'resnet18' \(pass --arch resnet18\)"):
        convert_to_detectron2(weights)
    converted = convert_to_detectron2(weights, arch="resnet18")
    assert set(converted["model"]) == set(detectron2_key_map("resnet18").values())
    assert converted["provenance"]["epochs"] == 2


def test_cli_writes_a_verified_pkl(tmp_path, capsys):
    path, _ = _moco_checkpoint(tmp_path, mlp=True)
    out = tmp_path / "d2" / "moco.pkl"
    assert main([str(path), str(out)]) == 0
    with open(out, "rb") as f:
        data = pickle.load(f)
    assert set(data["model"]) == _d2_names() and data["matching_heuristics"] is True
    assert data["provenance"]["method"] == "moco_v2"
    printed = capsys.readouterr().out
    assert "converted: 265 tensors" in printed and "projection head" in printed
    assert "layout:    moco_v2, arch resnet50\nmethod:    moco_v2, 200 epochs\n" in printed
    assert [p.name for p in out.parent.iterdir()] == ["moco.pkl"]  # no temporary file left


def _fails(capsys, argv: list[str], pattern: str) -> None:
    """The CLI's contract for bad input: exit status 2 and the reason on stderr."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert re.search(pattern, capsys.readouterr().err)


def test_cli_errors_leave_no_output(tmp_path, resnet50_state, capsys):
    state = dict(resnet50_state)
    del state["layer1.0.conv1.weight"]
    torch.save(state, tmp_path / "short.pth")
    out = str(tmp_path / "out.pkl")
    _fails(
        capsys, [str(tmp_path / "short.pth"), out], "moco-convert: error: .*layer1.0.conv1.weight"
    )
    _fails(capsys, [str(tmp_path / "short.pth"), str(tmp_path / "out.pth")], "must end in .pkl")
    _fails(capsys, [str(tmp_path / "absent.pth"), out], "moco-convert: error: .*does not exist")
    assert list(tmp_path.glob("out*")) == []


class _RunsCode:
    def __reduce__(self):
        return (print, ("unpickling ran code",))


def test_code_running_checkpoints_are_refused(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}, "extra": _RunsCode()}, path)
    out = tmp_path / "evil.pkl"
    _fails(capsys, [str(path), str(out)], "moco-convert: error: .*could run code")
    assert not out.exists()


def test_console_script_runs_without_detectron2(tmp_path):
    """``import transfer`` and the converter never import detectron2."""
    code = "import sys, transfer, transfer.convert; assert 'detectron2' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
