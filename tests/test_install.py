"""The installed package: its console commands, its recipes, and a working torchvision."""

from __future__ import annotations

import shutil
import subprocess

import torch
import torchvision.ops

from moco_pretrain.config import config_root

COMMANDS = (
    "moco-pretrain",
    "moco-lincls",
    "moco-knn",
    "moco-submit",
    "moco-convert",
    "moco-transfer",
    "moco-report",
    "moco-benchmark",
)


def test_torchvision_ops_load():
    """A torchvision built against another torch fails exactly here ('operator ... nms')."""
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    keep = torchvision.ops.nms(boxes, torch.tensor([0.9, 0.8, 0.7]), iou_threshold=0.5)
    assert keep.tolist() == [0, 2]


def test_console_commands_are_installed_and_answer_help():
    for command in COMMANDS:
        path = shutil.which(command)
        assert path, f"{command} is not on PATH: pip install -e ."
    result = subprocess.run(
        ["moco-pretrain", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and "--config-file" in result.stdout


def test_recipes_are_reachable_from_the_package():
    assert (config_root() / "pretrain" / "fashion_mnist_demo.yaml").is_file()
    assert (config_root() / "detection").is_dir()
