"""Datasets and augmentation recipes for pretraining and evaluation.

Recipes follow the official ``main_moco.py``: v1 is InstDisc's augmentation, v2 ("aug+") adds
SimCLR-style colour jitter with p=0.8 and Gaussian blur with p=0.5.
"""

from __future__ import annotations

import gzip
import multiprocessing
import random
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter
from torch.utils.data import Dataset, Subset
from torchvision import datasets, transforms

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip


class GaussianBlur:
    """PIL Gaussian blur with a radius drawn uniformly from ``sigma`` (SimCLR, MoCo v2)."""

    def __init__(self, *, sigma: Sequence[float] = (0.1, 2.0)) -> None:
        self.sigma = tuple(sigma)

    def __call__(self, image: Image.Image) -> Image.Image:
        return image.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.sigma)))


class TwoCropsTransform:
    """Two independent augmentations of one image: the query and the key."""

    def __init__(self, base_transform: Callable) -> None:
        self.base_transform = base_transform

    def __call__(self, image):
        return [self.base_transform(image), self.base_transform(image)]


def pretrain_transform(
    *,
    size: int,
    recipe: str,
    mean: Sequence[float],
    std: Sequence[float],
    min_scale: float = 0.2,
    blur: bool = True,
) -> transforms.Compose:
    """One view of the MoCo v1 or v2 augmentation, on a PIL RGB image."""
    crop = transforms.RandomResizedCrop(size, scale=(min_scale, 1.0))
    if recipe == "v1":
        augment = [
            crop,
            transforms.RandomGrayscale(p=0.2),
            transforms.ColorJitter(0.4, 0.4, 0.4, 0.4),
            transforms.RandomHorizontalFlip(),
        ]
    elif recipe == "v2":
        augment = [
            crop,
            transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            transforms.RandomGrayscale(p=0.2),
        ]
        if blur:
            augment.append(transforms.RandomApply([GaussianBlur()], p=0.5))
        augment.append(transforms.RandomHorizontalFlip())
    else:
        raise ValueError(f"unknown augmentation recipe {recipe!r} (expected 'v1' or 'v2')")
    return transforms.Compose([*augment, transforms.ToTensor(), transforms.Normalize(mean, std)])


def linear_train_transform(
    *, size: int, mean: Sequence[float], std: Sequence[float]
) -> transforms.Compose:
    """The linear-classification training augmentation: RandomResizedCrop (0.08-1) and a flip."""
    return transforms.Compose(
        [
            transforms.RandomResizedCrop(size),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ]
    )


def eval_transform(*, size: int, mean: Sequence[float], std: Sequence[float]) -> transforms.Compose:
    """Resize (the ImageNet 256/224 ratio) and centre crop, for kNN and linear evaluation."""
    return transforms.Compose(
        [
            transforms.Resize(round(size * 256 / 224)),
            transforms.CenterCrop(size),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ]
    )


def _load_rgb(path: str) -> Image.Image:
    with open(path, "rb") as f:
        return Image.open(f).convert("RGB")


class RobustImageFolder(datasets.ImageFolder):
    """``ImageFolder`` that skips unreadable images with a warning instead of crashing.

    An image that fails to decode is replaced by the next readable one, so batch sizes stay
    equal on every rank; the failures are counted in :attr:`num_skipped` (shared with workers).
    """

    def __init__(self, root: str | Path, transform: Callable | None = None) -> None:
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"image folder {root} does not exist")
        try:
            super().__init__(str(root), transform=transform, loader=_load_rgb)
        except FileNotFoundError as err:  # no class folder, or no image in any of them
            raise FileNotFoundError(f"image folder {root} holds no images: {err}") from None
        self._skipped = multiprocessing.get_context().Value("i", 0)

    @property
    def num_skipped(self) -> int:
        return self._skipped.value

    def __getitem__(self, index: int):
        for attempt in range(len(self.samples)):
            path, target = self.samples[(index + attempt) % len(self.samples)]
            try:
                image = self.loader(path)
            except (OSError, ValueError, Image.DecompressionBombError) as err:
                with self._skipped.get_lock():
                    self._skipped.value += 1
                warnings.warn(f"skipping unreadable image {path}: {err}", stacklevel=2)
                continue
            return (self.transform(image) if self.transform else image), target
        raise RuntimeError(f"no readable image in {self.root}")


def _read_idx(path: Path) -> np.ndarray:
    """An IDX array (the MNIST file format), optionally gzipped."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape}, file holds {array.size} values")
    return array.reshape(shape)


class FashionMNIST(Dataset):
    """Fashion-MNIST from its IDX files (``train``: 60k, ``test``: 10k, 28x28 grey, 10 classes).

    Images are returned as RGB PIL images (grey replicated), so the normal pipeline applies.
    """

    classes = FASHION_MNIST_CLASSES

    def __init__(self, root: str | Path, *, split: str, transform: Callable | None = None) -> None:
        prefix = {"train": "train", "test": "t10k", "val": "t10k"}.get(split)
        if prefix is None:
            raise ValueError(f"Fashion-MNIST split must be 'train' or 'test', got {split!r}")
        root = Path(root)
        images = _find_idx(root, f"{prefix}-images-idx3-ubyte")
        labels = _find_idx(root, f"{prefix}-labels-idx1-ubyte")
        self.images = _read_idx(images)  # Nx28x28 uint8
        self.targets = torch.from_numpy(_read_idx(labels).astype(np.int64))  # N
        if len(self.images) != len(self.targets):
            raise ValueError(f"{images} and {labels} hold different numbers of samples")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        image = Image.fromarray(self.images[index], mode="L").convert("RGB")
        target = int(self.targets[index])
        return (self.transform(image) if self.transform else image), target


def _find_idx(root: Path, stem: str) -> Path:
    for candidate in (root / f"{stem}.gz", root / stem):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"Fashion-MNIST file {stem}(.gz) not found in {root}: install Debian's "
        "dataset-fashion-mnist package (apt-get install dataset-fashion-mnist), point DATA.ROOT "
        "at the IDX files, or set DATA.DOWNLOAD True to let torchvision download them"
    )


def fashion_mnist_root(root: str, *, download: bool = False) -> Path:
    """``root`` if given, else Debian's install, else (with ``download``) torchvision's copy."""
    if root:
        return Path(root)
    if (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file() or not download:
        return FASHION_MNIST_DIR
    cache = Path.home() / ".cache" / "moco_pretrain"
    for train in (True, False):  # torchvision's own download of the same IDX files
        datasets.FashionMNIST(str(cache), train=train, download=True)
    return cache / "FashionMNIST" / "raw"


def build_dataset(
    name: str, root: str, *, split: str, transform: Callable | None, download: bool = False
) -> Dataset:
    """The ``split`` of dataset ``name`` (``DATA.NAME``) under ``root`` (``DATA.ROOT``); a missing
    or empty folder fails here, early."""
    if name == "fashion_mnist":
        return FashionMNIST(
            fashion_mnist_root(root, download=download), split=split, transform=transform
        )
    if name == "imagefolder":
        if not root:
            raise ValueError("DATA.ROOT is empty: give the folder holding the image splits")
        return RobustImageFolder(Path(root) / split, transform=transform)
    raise ValueError(f"unknown DATA.NAME {name!r} ('imagefolder' or 'fashion_mnist')")


def limit_samples(dataset: Dataset, max_samples: int) -> Dataset:
    """The first ``max_samples`` samples of ``dataset`` (all of them when 0)."""
    if max_samples <= 0 or max_samples >= len(dataset):
        return dataset
    return Subset(dataset, range(max_samples))


def num_skipped_images(dataset: Dataset) -> int:
    """Unreadable images skipped so far (0 for datasets that cannot have any)."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return getattr(dataset, "num_skipped", 0)


def num_classes_of(dataset: Dataset) -> int:
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return len(dataset.classes)


def build_train_loader(
    dataset: Dataset, *, batch_size: int, seed: int, num_workers: int, drop_last: bool
) -> torch.utils.data.DataLoader:
    """Shuffled batches for one process.

    A seeded DistributedSampler, also in one process, makes every epoch's order a function of
    (seed, epoch), so a resumed run sees the same batches as an uninterrupted one.
    """
    from .distributed import get_rank, get_world_size

    sampler = torch.utils.data.DistributedSampler(
        dataset, num_replicas=get_world_size(), rank=get_rank(), shuffle=True, seed=seed,
        drop_last=drop_last,
    )  # fmt: skip
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        drop_last=drop_last,
        persistent_workers=num_workers > 0,
    )


def build_eval_loader(
    dataset: Dataset, *, batch_size: int, num_workers: int
) -> torch.utils.data.DataLoader:
    """Deterministic batches of ``dataset`` (sharded across ranks if distributed)."""
    from .distributed import get_world_size

    sampler = (
        torch.utils.data.DistributedSampler(dataset, shuffle=False)
        if get_world_size() > 1
        else None
    )
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
    )
