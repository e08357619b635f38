"""The shared checkpoint-layout loader: safe reading, layout detection, errors that name keys."""

from __future__ import annotations

import hashlib

import pytest
import torch
from torch import nn

from moco_pretrain.weights import CheckpointLayoutError, load_backbone_state_dict


def _tiny_resnet_state() -> dict[str, torch.Tensor]:
    """Enough ResNet-like keys for layout detection (shapes are checked by consumers, not here)."""
    conv, bn = nn.Conv2d(3, 4, 1, bias=False), nn.BatchNorm2d(4)
    state = {f"conv1.{k}": v for k, v in conv.state_dict().items()}
    state |= {f"bn1.{k}": v for k, v in bn.state_dict().items()}
    state |= {f"layer1.0.conv1.{k}": v for k, v in conv.state_dict().items()}
    return state


def test_not_a_checkpoint_is_reported_as_unreadable(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_text("these are not weights")
    with pytest.raises(CheckpointLayoutError, match=r"notes.pth: .*not a readable PyTorch checkp"):
        load_backbone_state_dict(path)
    truncated = tmp_path / "truncated.pth"
    torch.save(_tiny_resnet_state(), truncated)
    truncated.write_bytes(truncated.read_bytes()[:100])
    with pytest.raises(CheckpointLayoutError, match="truncated.pth: .*not a readable"):
        load_backbone_state_dict(truncated)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_backbone_state_dict(tmp_path / "absent.pth")


class _RunsCode:
    def __reduce__(self):
        return (print, ("unpickling ran code",))


def test_code_running_pickle_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": _tiny_resnet_state(), "hook": _RunsCode()}, path)
    with pytest.raises(CheckpointLayoutError, match="evil.pth: .*could run code"):
        load_backbone_state_dict(path)
    assert "unpickling ran code" not in capsys.readouterr().out


def test_layouts_and_meta(tmp_path):
    state = _tiny_resnet_state()
    path = tmp_path / "tv.pth"
    torch.save(state | {"fc.weight": torch.zeros(2, 4)}, path)
    weights = load_backbone_state_dict(path)
    assert weights.layout == "torchvision" and set(weights.state_dict) == set(state)
    assert weights.dropped == {"classifier": ["fc.weight"]}
    assert weights.meta["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()

    moco = {f"module.encoder_q.{k}": v for k, v in state.items()}
    moco |= {"module.encoder_q.fc.weight": torch.zeros(2, 4), "module.queue": torch.zeros(2, 8)}
    torch.save({"epoch": 3, "arch": "resnet50", "state_dict": moco}, path)
    weights = load_backbone_state_dict(path)
    assert weights.layout == "moco_v1" and set(weights.state_dict) == set(state)
    assert (weights.meta["epoch"], weights.meta["arch"]) == (3, "resnet50")


def test_unexplained_and_non_tensor_keys_are_named(tmp_path):
    path = tmp_path / "odd.pth"
    moco = {f"module.encoder_q.{k}": v for k, v in _tiny_resnet_state().items()}
    torch.save({"state_dict": moco | {"module.mystery.weight": torch.zeros(1)}}, path)
    with pytest.raises(CheckpointLayoutError, match=r"no rule explains: \['mystery.weight'\]"):
        load_backbone_state_dict(path)
    torch.save({"state_dict": moco | {"module.encoder_q.layer9.x": torch.zeros(1)}}, path)
    with pytest.raises(CheckpointLayoutError, match=r"not ResNet parameters: \['layer9.x'\]"):
        load_backbone_state_dict(path)
    torch.save({"state_dict": moco | {"note": "text"}}, path)
    with pytest.raises(CheckpointLayoutError, match=r"non-tensor entries \['note'\]"):
        load_backbone_state_dict(path)
    torch.save([1, 2], path)
    with pytest.raises(CheckpointLayoutError, match="holds a list, expected a dict"):
        load_backbone_state_dict(path)
