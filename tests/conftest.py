"""Shared fixtures: tiny real image trees written to temporary folders (nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from moco_pretrain.fake_data import write_fashion_mnist


def write_image_folder(
    root: Path, *, splits=("train", "val"), classes=2, per_class=32, size=40
) -> Path:
    """An ImageNet-layout tree ``root/<split>/<class>/<n>.png`` of blocky binary patterns.

    Every image is a distinct 6x6 black/colour pattern (its structure survives colour jitter and
    mild crops), and each class has its own colour, so classes are separable too.
    """
    rng = np.random.default_rng(0)
    for split in splits:
        for c in range(classes):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True, exist_ok=True)
            tint = rng.uniform(60, 255, size=3)
            for n in range(per_class):
                blocks = rng.integers(0, 2, size=(6, 6, 1)) * tint  # a binary 6x6 pattern
                pattern = Image.fromarray(blocks.astype(np.uint8)).resize(
                    (size, size), Image.NEAREST
                )
                pattern.save(folder / f"{n}.png")
    return root


@pytest.fixture(scope="session")
def tiny_imagefolder(tmp_path_factory) -> Path:
    """``train/`` and ``val/`` with 2 classes x 32 colour PNGs of 40x40 px."""
    return write_image_folder(tmp_path_factory.mktemp("imagefolder"))


@pytest.fixture(autouse=True)
def _few_threads():
    """Keep each test on few threads: the suite must stay quick on a 2-core machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(min(previous, 2))
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_fashion_mnist(tmp_path_factory) -> Path:
    """10 classes x 8 train / 4 test images, 28x28: class c is a bright band at rows 2c..2c+6."""
    return write_fashion_mnist(tmp_path_factory.mktemp("fashion_mnist"))


def write_converted_resnet50(root: Path, *, drop: str = "") -> Path:
    """A randomly initialised (seed 0) torchvision ResNet-50 saved as ``root/r50.pth`` and
    converted like a user's into ``root/r50.pkl`` (returned); ``drop`` leaves that tensor out."""
    import torchvision

    from moco_pretrain.weights import load_backbone_state_dict
    from transfer.convert import convert_to_detectron2, write_detectron2_pkl

    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet50().state_dict(), root / "r50.pth")
    converted = convert_to_detectron2(load_backbone_state_dict(root / "r50.pth"))
    if drop:
        del converted["model"][drop]
    write_detectron2_pkl(converted, root / "r50.pkl")
    return root / "r50.pkl"


@pytest.fixture(scope="session")
def backbone_pkl(tmp_path_factory) -> Path:
    """:func:`write_converted_resnet50`, once per session (the detectron2 tests' weights)."""
    return write_converted_resnet50(tmp_path_factory.mktemp("weights"))
