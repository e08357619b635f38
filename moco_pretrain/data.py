"""Datasets and augmentation recipes for pretraining and evaluation.

Recipes follow the official ``main_moco.py``: v1 is InstDisc's augmentation, v2 ("aug+") adds
SimCLR-style colour jitter with p=0.8 and Gaussian blur with p=0.5.
"""

from __future__ import annotations

import gzip
import hashlib
import multiprocessing
import random
import struct
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFilter
from torch.utils.data import Dataset, DistributedSampler, Sampler, Subset
from torchvision import datasets, transforms

from .config import HOLDOUT_SPLIT

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

    Images are returned as RGB PIL images (grey replicated), so the normal pipeline applies; with
    ``arrays``, as the stored 28x28 uint8 arrays (for transforms that take them, such as
    :class:`moco_pretrain.gpu_augment.DecodeResize` with ``grey``: no PIL round trip).
    """

    classes = FASHION_MNIST_CLASSES

    def __init__(
        self,
        root: str | Path,
        *,
        split: str,
        transform: Callable | None = None,
        arrays: bool = False,
    ) -> None:
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
        self.transform, self.arrays = transform, arrays

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        image = self.images[index]  # 28x28 uint8
        if not self.arrays:
            image = Image.fromarray(image, mode="L").convert("RGB")
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


class Selection(Dataset):
    """The samples ``indices`` of ``dataset``; with ``classes`` (indices into
    ``dataset.classes``), labels renumbered to positions in ``classes``, so that a classifier
    over the selected classes has ``len(classes)`` outputs."""

    def __init__(self, dataset: Dataset, indices: Sequence[int], classes: Sequence[int]) -> None:
        self.dataset, self.indices = dataset, list(indices)
        self.label_of = {c: i for i, c in enumerate(classes)} if classes else None
        self.classes = [dataset.classes[c] for c in classes] if classes else list(dataset.classes)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int):
        sample, target = self.dataset[self.indices[index]]
        return sample, (self.label_of[target] if self.label_of else target)


def _select(dataset: Dataset, *, classes: Sequence[int], holdout: int, part: str) -> Dataset:
    """The images of ``classes`` (all when empty), then of those ``holdout`` drawn at random with
    a fixed seed, whatever the run's ``SEED`` (``part`` "holdout"), or all but them ("train");
    both in stored order. Random, not the last ones: an image folder is sorted by class."""
    targets = np.asarray(dataset.targets)
    for c in classes:
        if not 0 <= c < len(dataset.classes):
            raise ValueError(
                f"DATA.CLASSES holds {c}, not a class index of this data set (0 to"
                f" {len(dataset.classes) - 1}: {', '.join(dataset.classes)})"
            )
    indices = np.flatnonzero(np.isin(targets, classes)) if classes else np.arange(len(targets))
    if holdout >= len(indices):
        raise ValueError(
            f"DATA.HOLDOUT {holdout} leaves none of the {len(indices)} training images"
        )
    if holdout:
        held = np.zeros(len(indices), dtype=bool)
        held[np.random.default_rng(0).permutation(len(indices))[:holdout]] = True
        indices = indices[held] if part == HOLDOUT_SPLIT else indices[~held]
    return Selection(dataset, indices.tolist(), classes)


def build_dataset(
    name: str,
    root: str,
    *,
    split: str,
    transform: Callable | None,
    download: bool = False,
    grey_arrays: bool = False,
    classes: Sequence[int] = (),
    holdout: int = 0,
    train_split: str = "train",
) -> Dataset:
    """The ``split`` of dataset ``name`` (``DATA.NAME``) under ``root`` (``DATA.ROOT``); a missing
    or empty folder fails here, early. ``grey_arrays``: a data set held in memory as grey arrays
    (Fashion-MNIST) passes them to ``transform`` as they are; the others pass PIL images.

    ``classes`` (``DATA.CLASSES``) keeps only those classes' images, labelled ``0..len-1`` in
    that order. ``holdout`` (``DATA.HOLDOUT``) sets aside ``holdout`` random images of
    ``train_split`` (after the class selection; the same ones for every seed): ``train_split``
    no longer holds them, and the split :data:`HOLDOUT_SPLIT` is them (validation without the
    test images)."""
    stored = train_split if split == HOLDOUT_SPLIT else split
    if name == "fashion_mnist":
        dataset = FashionMNIST(
            fashion_mnist_root(root, download=download), split=stored, transform=transform,
            arrays=grey_arrays,
        )  # fmt: skip
    elif name == "imagefolder":
        if not root:
            raise ValueError("DATA.ROOT is empty: give the folder holding the image splits")
        dataset = RobustImageFolder(Path(root) / stored, transform=transform)
    else:
        raise ValueError(f"unknown DATA.NAME {name!r} ('imagefolder' or 'fashion_mnist')")
    if split == HOLDOUT_SPLIT and not holdout:
        raise ValueError(f"split {HOLDOUT_SPLIT!r} needs DATA.HOLDOUT > 0 (held-out images)")
    if not classes and not (holdout and stored == train_split):
        return dataset
    return _select(dataset, classes=classes, holdout=holdout if stored == train_split else 0,
                   part=split)  # fmt: skip


def limit_samples(dataset: Dataset, max_samples: int) -> Dataset:
    """The first ``max_samples`` samples of ``dataset`` (all of them when 0)."""
    if max_samples <= 0 or max_samples >= len(dataset):
        return dataset
    return Subset(dataset, range(max_samples))


def _innermost(dataset: Dataset, wrappers: tuple[type, ...] | None = None) -> Dataset:
    """The dataset under any :class:`Subset`, :class:`SeededSamples` and :class:`Selection`
    wrappers (or only ``wrappers``)."""
    while isinstance(dataset, wrappers or (Subset, SeededSamples, Selection)):
        dataset = dataset.dataset
    return dataset


def num_skipped_images(dataset: Dataset) -> int:
    """Unreadable images skipped so far (0 for datasets that cannot have any)."""
    return getattr(_innermost(dataset), "num_skipped", 0)


def num_classes_of(dataset: Dataset) -> int:
    """Classes of ``dataset``: those of its :class:`Selection`, if it is one."""
    return len(_innermost(dataset, (Subset, SeededSamples)).classes)


def image_ids(dataset: Dataset) -> list[int]:
    """The indices, in the stored split, of the images ``dataset`` yields (through
    :class:`Subset`, :class:`Selection` and :class:`SeededSamples`)."""
    if isinstance(dataset, SeededSamples):
        return image_ids(dataset.dataset)
    if isinstance(dataset, (Subset, Selection)):
        inner = image_ids(dataset.dataset)
        return [inner[i] for i in dataset.indices]
    return list(range(len(dataset)))


def data_record(dataset: Dataset, *, name: str, split: str) -> dict[str, Any]:
    """What a run trained on: the data set and split, its classes, the number of images and the
    SHA-256 of ``name:split:classes:ids`` (``image_ids``, comma-separated), which shows two runs'
    image sets equal or not (disjointness needs the ids or the classes themselves)."""
    ids = image_ids(dataset)
    classes = list(_innermost(dataset, (Subset, SeededSamples)).classes)
    identity = f"{name}:{split}:{','.join(classes)}:{','.join(map(str, ids))}"
    digest = hashlib.sha256(identity.encode()).hexdigest()
    return {"name": name, "split": split, "classes": classes, "images": len(ids),
            "images_sha256": digest}  # fmt: skip


# ------------------------------------------------------------------ seeded samples
def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 64-bit seed for sample ``index`` in ``epoch`` of a run seeded ``seed`` (BLAKE2b of the
    three numbers: unrelated streams for neighbouring samples, epochs and seeds)."""
    digest = hashlib.blake2b(struct.pack("<qqq", seed, epoch, index), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def seed_rng(seed: int) -> None:
    """Seed Python's ``random`` and torch's CPU generator, the RNGs that torchvision's transforms
    and :class:`GaussianBlur` draw from (NumPy's global RNG is not touched)."""
    random.seed(seed)
    torch.default_generator.manual_seed(seed)


@contextmanager
def preserved_rng() -> Iterator[None]:
    """The states of the RNGs that :func:`seed_rng` seeds, restored after the block."""
    python_state, torch_state = random.getstate(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(python_state)
        torch.set_rng_state(torch_state)


class SeededSamples(Dataset):
    """``dataset[index]`` drawn after :func:`seed_rng` of ``sample_seed(seed, epoch, index)``.

    Indexed by ``(epoch, index)`` pairs (:class:`EpochIndexSampler`), so that the epoch reaches
    persistent loader workers. Every random augmentation of a sample is then a function of those
    three numbers alone: the same with any number of workers, processes or batch size, and a run
    resumed at an epoch boundary draws what the uninterrupted run drew. In the training process
    (no workers) the RNG states are restored after each batch (``__getitems__``, which the
    DataLoader calls per batch), so that its own streams do not move.
    """

    def __init__(self, dataset: Dataset, *, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: list[tuple[int, int]]) -> list:
        in_worker = torch.utils.data.get_worker_info() is not None  # nothing else draws there
        with nullcontext() if in_worker else preserved_rng():
            samples = []
            for epoch, index in keys:
                seed_rng(sample_seed(self.seed, epoch, index))
                samples.append(self.dataset[index])
            return samples


class EpochIndexSampler(Sampler):
    """A :class:`DistributedSampler`'s indices as ``(epoch, index)`` pairs, for
    :class:`SeededSamples`; ``set_epoch`` reaches both."""

    def __init__(self, sampler: DistributedSampler) -> None:
        self.sampler, self.epoch = sampler, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        return ((epoch, index) for index in self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


def build_train_loader(
    dataset: Dataset, *, batch_size: int, seed: int, num_workers: int, drop_last: bool
) -> torch.utils.data.DataLoader:
    """Shuffled, augmented batches for one process, a function of ``seed`` and the epoch alone.

    A seeded DistributedSampler, also in one process, makes every epoch's order a function of
    (seed, epoch); :class:`SeededSamples` makes every sample's augmentation a function of
    (seed, epoch, index); and the loader draws its own worker seeds from a generator of its own,
    so that iterating it never moves the training process's RNG (which the model's Shuffle-BN
    permutations use). A resumed run therefore sees the uninterrupted run's batches bit for bit,
    with any ``num_workers``.
    """
    from .distributed import get_rank, get_world_size

    sampler = DistributedSampler(
        dataset, num_replicas=get_world_size(), rank=get_rank(), shuffle=True, seed=seed,
        drop_last=drop_last,
    )  # fmt: skip
    return torch.utils.data.DataLoader(
        SeededSamples(dataset, seed=seed),
        batch_size=batch_size,
        sampler=EpochIndexSampler(sampler),
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        drop_last=drop_last,
        persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(seed),
    )


def build_eval_loader(
    dataset: Dataset, *, batch_size: int, num_workers: int
) -> torch.utils.data.DataLoader:
    """Deterministic batches of ``dataset`` (sharded across ranks if distributed); iterating it
    leaves the process's RNG alone (a monitor between epochs does not change the training)."""
    from .distributed import get_world_size

    sampler = DistributedSampler(dataset, shuffle=False) if get_world_size() > 1 else None
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        generator=torch.Generator(),
    )
