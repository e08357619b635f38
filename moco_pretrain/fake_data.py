"""Small fake datasets written to disk, in the real ones' layouts, for tests and rehearsals.

No torch import: ``tools/device_check.py`` writes its inputs with these in a process that never
imports torch.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["write_fashion_mnist", "write_jpeg_folder"]


def write_idx(path: Path, array: np.ndarray) -> None:
    """``array`` as a gzipped IDX file of unsigned bytes (Fashion-MNIST's format)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(n).to_bytes(4, "big") for n in array.shape
    )
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_fashion_mnist(root: Path, *, train_per_class: int = 8, test_per_class: int = 4) -> Path:
    """Fashion-MNIST's four IDX files in ``root``: 10 classes of 28x28 px images, class c a bright
    band at rows 2c..2c+6 on dark noise (separable by a kNN on raw pixels). Returns ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, per_class in (("train", train_per_class), ("t10k", test_per_class)):
        labels = np.repeat(np.arange(10), per_class)
        images = rng.integers(0, 60, size=(len(labels), 28, 28))
        for i, c in enumerate(labels):
            images[i, 2 * c : 2 * c + 6] += 180
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return root


def write_jpeg_folder(root: Path, *, images: int, unique: int, size: tuple[int, int]) -> Path:
    """``root/train/synthetic/<n>.jpg`` (an ImageNet-layout split of one class): ``unique`` smooth
    random JPEGs of ``size`` (width, height) px, hard-linked up to ``images`` files, so that a
    loader decodes ``images`` files while the disk holds ``unique``. Returns ``root``."""
    folder = root / "train" / "synthetic"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for n in range(min(unique, images)):
        coarse = rng.integers(0, 256, (size[1] // 16 + 1, size[0] // 16 + 1, 3), dtype=np.uint8)
        Image.fromarray(coarse).resize(size, Image.BICUBIC).save(folder / f"{n}.jpg", quality=90)
    for n in range(unique, images):
        os.link(folder / f"{n % unique}.jpg", folder / f"{n}.jpg")
    return root
