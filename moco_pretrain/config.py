"""The pretraining config: every key with its default and meaning, detectron2-style.

A recipe is a small YAML diff (optionally ``_BASE_: other.yaml``) over these defaults; ``KEY VALUE``
pairs on the command line override it; the resolved config is written to ``OUTPUT_DIR``.
Defaults are MoCo v1 on ImageNet (ResNet-50, 200 epochs), as in the official ``main_moco.py``.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml
from fvcore.common.config import CfgNode as CN

from .recipes import resolve_config_file

# DATA.VAL_SPLIT naming the images DATA.HOLDOUT sets aside from the training split.
HOLDOUT_SPLIT = "holdout"

_C = CN()
_C.VERSION = 1
_C.OUTPUT_DIR = "./output/moco"  # checkpoints, config.yaml, log.txt, TensorBoard events
_C.SEED = 0  # seeds Python/NumPy/torch (offset by rank) and the sampler's shuffling

_C.MODEL = CN()
_C.MODEL.ARCH = "resnet50"  # any torchvision ResNet
_C.MODEL.SMALL_STEM = False  # 3x3 stride-1 conv1, no max-pool: for 28-64 px images
_C.MODEL.DIM = 128  # feature dimension of queries and keys
_C.MODEL.K = 65536  # queue size (number of negatives); the official --moco-k
_C.MODEL.M = 0.999  # key-encoder momentum
_C.MODEL.T = 0.07  # softmax temperature (v2: 0.2); the official --moco-t
_C.MODEL.MLP = False  # v2 MLP projection head
# One process only: BN statistics over this many sub-batches plus a local key shuffle (the
# one-GPU emulation of Shuffle-BN). Under torchrun the official cross-rank shuffle is used.
_C.MODEL.BN_SPLITS = 1

_C.DATA = CN()
_C.DATA.NAME = "imagefolder"  # "imagefolder" (ImageNet layout) | "fashion_mnist"
_C.DATA.ROOT = ""  # imagefolder: folder with TRAIN_SPLIT/ and VAL_SPLIT/; fashion_mnist: idx dir
_C.DATA.TRAIN_SPLIT = "train"
_C.DATA.VAL_SPLIT = "val"  # used by the kNN monitor and evaluation
_C.DATA.IMAGE_SIZE = 224  # crop size fed to the network
_C.DATA.AUG = "v1"  # "v1" (InstDisc augmentation) | "v2" (aug+: jitter p=0.8, blur p=0.5)
_C.DATA.CROP_MIN_SCALE = 0.2  # RandomResizedCrop scale=(CROP_MIN_SCALE, 1)
_C.DATA.BLUR = True  # v2 only: Gaussian blur (sigma 0.1-2, p=0.5); off for tiny images
# Augment on the training device (moco_pretrain.gpu_augment, same recipe and DATA.* keys): loader
# workers only decode and resize to DEVICE_AUG_PRE_SIZE (0: 1.5 x IMAGE_SIZE). For fast GPUs
# that the CPU cores cannot feed.
_C.DATA.DEVICE_AUG = False
_C.DATA.DEVICE_AUG_PRE_SIZE = 0
# DEVICE_AUG on grey images (e.g. Fashion-MNIST): decode one channel and skip saturation, hue and
# grayscale, identities on grey pixels; the views still have 3 channels. Colour images would
# lose their colour: only for data sets that are grey.
_C.DATA.DEVICE_AUG_GREY = False
_C.DATA.MEAN = [0.485, 0.456, 0.406]
_C.DATA.STD = [0.229, 0.224, 0.225]
_C.DATA.NUM_WORKERS = 8  # per process; results do not depend on it (per-sample seeded augmentation)
_C.DATA.MAX_SAMPLES = 0  # >0: use only the first N training samples (quick trials)
# Class indices to keep, in every split (labels become 0..len-1 in this order); []: all. The
# Fashion-MNIST benchmark pretrains on its source classes only (transfer.benchmark).
_C.DATA.CLASSES = []
# >0: N random images of TRAIN_SPLIT (after DATA.CLASSES; the same for every SEED) are held out of
# training; VAL_SPLIT "holdout" evaluates on them, so that monitors and probes read no test image.
_C.DATA.HOLDOUT = 0
_C.DATA.DOWNLOAD = False  # fashion_mnist only: let torchvision download it when not installed

_C.SOLVER = CN()
_C.SOLVER.EPOCHS = 200
_C.SOLVER.BATCH_SIZE = 256  # global, over all processes
_C.SOLVER.BASE_LR = 0.03  # per 256 images: lr = BASE_LR * BATCH_SIZE / 256 (linear scaling)
_C.SOLVER.LR_SCHEDULE = "step"  # "step" | "cos"; applied per epoch as in the official code
_C.SOLVER.STEPS = (120, 160)  # epochs at which "step" multiplies the lr by GAMMA
_C.SOLVER.GAMMA = 0.1
_C.SOLVER.MOMENTUM = 0.9
_C.SOLVER.WEIGHT_DECAY = 1e-4
_C.SOLVER.MAX_ITERS_PER_EPOCH = 0  # >0: cut every epoch short (smoke runs, speed measurements)

_C.TRAIN = CN()
# fp32 and NCHW by default, as the official code. Opt-in speed-up on CUDA, a deviation not yet
# validated on a GPU (tools/device_check.py): TRAIN.AMP_DTYPE bf16 TRAIN.CHANNELS_LAST True.
_C.TRAIN.AMP_DTYPE = ""  # CUDA autocast dtype: "bf16" | "fp16" | "" (fp32); CPU is always fp32
_C.TRAIN.CHANNELS_LAST = False  # channels-last memory format, CUDA only
_C.TRAIN.COMPILE = False  # torch.compile the encoders
_C.TRAIN.CHECKPOINT_PERIOD = 1  # epochs between checkpoints (the last epoch is always saved)
_C.TRAIN.KEEP_LAST = 3  # checkpoints kept in OUTPUT_DIR (0: keep all)
_C.TRAIN.AUTO_RESUME = True  # continue from OUTPUT_DIR's last checkpoint if there is one
_C.TRAIN.LOG_PERIOD = 20  # iterations between log lines / TensorBoard points

_C.KNN = CN()
_C.KNN.MONITOR_PERIOD = 0  # >0: kNN top-1 on DATA.VAL_SPLIT every N epochs, logged
_C.KNN.FINAL = False  # after training: kNN top-1 and logistic probe, learned vs random-init encoder
_C.KNN.NEIGHBORS = 200  # neighbours of the weighted kNN (Wu et al. 2018); not MODEL.K
_C.KNN.TEMPERATURE = 0.07  # temperature of the neighbour weights; not MODEL.T
_C.KNN.BANK_SIZE = 0  # >0: use only the first N training images as the feature bank
_C.KNN.BATCH_SIZE_PER_PROCESS = 256  # feature extraction; SOLVER.BATCH_SIZE is global


def get_cfg() -> CN:
    """A fresh copy of the defaults."""
    return _C.clone()


def setup_cfg(
    config_file: str | None, opts: list[str] | None = None, *, pretraining: bool = False
) -> CN:
    """Defaults, merged with ``config_file`` then ``opts`` (``KEY VALUE`` pairs); validated (with
    the pretraining checks when ``pretraining``), frozen."""
    cfg = get_cfg()
    if config_file:
        path = resolve_config_file(config_file)
        with _config_errors(str(path)):
            _check_is_mapping(path)
            cfg.merge_from_file(str(path))
    if opts:
        if len(opts) % 2:
            raise ValueError(f"overrides must be KEY VALUE pairs, got an odd number: {opts}")
        with _config_errors("command line"):
            cfg.merge_from_list(opts)
    validate(cfg, pretraining=pretraining)
    cfg.freeze()
    return cfg


# Keys that name one of a few choices, and the choices.
CHOICES = {
    "DATA.NAME": ("imagefolder", "fashion_mnist"),
    "DATA.AUG": ("v1", "v2"),
    "SOLVER.LR_SCHEDULE": ("step", "cos"),
    "TRAIN.AMP_DTYPE": ("bf16", "fp16", ""),
}
# Keys that count something, and the least each may be.
MINIMUM = {
    "SOLVER.BATCH_SIZE": 1, "MODEL.K": 1, "MODEL.BN_SPLITS": 1, "DATA.NUM_WORKERS": 0,
    "DATA.HOLDOUT": 0,
}  # fmt: skip


def validate(cfg: CN, *, world_size: int | None = None, pretraining: bool = False) -> None:
    """Reject values that cannot run, before any work starts: one ``ValueError`` naming them all.

    ``world_size`` defaults to torchrun's ``WORLD_SIZE`` (1 without it). ``pretraining`` adds the
    checks of the batch against the queue and the split-BN groups (other tasks ignore both keys).
    """
    problems = []
    for key, least in MINIMUM.items():
        value = _value(cfg, key)
        if value < least:
            problems.append(f"{key} is {value}, expected {'at least 1' if least else '0 or more'}")
    for key, choices in CHOICES.items():
        value = _value(cfg, key)
        if value not in choices:
            problems.append(f"{key} is {value!r}, expected one of {choices}")
    classes = list(cfg.DATA.CLASSES)
    if any(not isinstance(c, int) or c < 0 for c in classes) or len(set(classes)) < len(classes):
        problems.append(f"DATA.CLASSES is {classes}, expected distinct class indices (0 or more)")
    if cfg.DATA.VAL_SPLIT == HOLDOUT_SPLIT and cfg.DATA.HOLDOUT < 1:
        problems.append(f"DATA.VAL_SPLIT is {HOLDOUT_SPLIT!r} but DATA.HOLDOUT is 0 (no images)")
    if not problems:
        world_size = world_size or int(os.environ.get("WORLD_SIZE", "1"))
        problems += _batch_problems(cfg, world_size, pretraining=pretraining)
    if problems:
        raise ValueError(f"invalid config: {'; '.join(problems)}")


def _batch_problems(cfg: CN, world_size: int, *, pretraining: bool) -> list[str]:
    """The global batch against the processes and, for pretraining, the queue and the split-BN
    groups."""
    batch, splits = cfg.SOLVER.BATCH_SIZE, cfg.MODEL.BN_SPLITS
    problems = []
    if pretraining and cfg.MODEL.K < batch:
        problems.append(
            f"MODEL.K is {cfg.MODEL.K}, smaller than one global batch (SOLVER.BATCH_SIZE {batch})"
        )
    if batch % world_size:
        problems.append(f"SOLVER.BATCH_SIZE {batch} is not divisible by the {world_size} processes")
    elif pretraining and splits > 1 and world_size > 1:
        problems.append(
            f"MODEL.BN_SPLITS is {splits} under {world_size} processes: split BN emulates"
            " Shuffle-BN in one process; with several, the official cross-process shuffle runs"
            " (set MODEL.BN_SPLITS 1)"
        )
    elif pretraining and batch % splits:
        problems.append(f"SOLVER.BATCH_SIZE {batch} is not divisible by MODEL.BN_SPLITS {splits}")
    if pretraining and cfg.DATA.DEVICE_AUG_GREY and not cfg.DATA.DEVICE_AUG:
        problems.append("DATA.DEVICE_AUG_GREY is True but DATA.DEVICE_AUG is False (it needs it)")
    return problems


# Keys that a rerun in the same OUTPUT_DIR may change without making another run: where the data
# is, how fast it loads, what is logged and kept, what is evaluated (the validation split and the
# kNN monitor and comparison, which leave the training's RNG alone), and the number of epochs
# (extending a run; with "cos" the later epochs follow the new schedule). Any other key, SEED
# included, names another run, which auto-resume refuses to continue.
RESUMABLE_CHANGES = (
    "OUTPUT_DIR", "DATA.ROOT", "DATA.DOWNLOAD", "DATA.NUM_WORKERS", "DATA.VAL_SPLIT",
    "SOLVER.EPOCHS", "TRAIN.AUTO_RESUME", "TRAIN.CHECKPOINT_PERIOD", "TRAIN.KEEP_LAST",
    "TRAIN.LOG_PERIOD", "KNN.MONITOR_PERIOD", "KNN.FINAL", "KNN.NEIGHBORS", "KNN.TEMPERATURE",
    "KNN.BANK_SIZE", "KNN.BATCH_SIZE_PER_PROCESS",
)  # fmt: skip
# Keys that only pretraining reads (the linear and supervised tasks ignore them).
PRETRAINING_ONLY = (
    "MODEL.DIM", "MODEL.K", "MODEL.M", "MODEL.T", "MODEL.MLP", "MODEL.BN_SPLITS", "DATA.AUG",
    "DATA.CROP_MIN_SCALE", "DATA.BLUR", "DATA.DEVICE_AUG", "DATA.DEVICE_AUG_PRE_SIZE",
    "DATA.DEVICE_AUG_GREY",
)  # fmt: skip


def run_differences(saved: str, current: str, *, unread: tuple[str, ...] = ()) -> list[str]:
    """The keys of two resolved configs (YAML dumps) that make them different runs, each as
    ``KEY saved-value vs current-value``: all but :data:`RESUMABLE_CHANGES` and the keys the task
    does not read (``unread``). Keys that only one of them has are not compared (a checkpoint of
    an older release)."""
    before = flatten_config(yaml.safe_load(saved) or {})
    after = flatten_config(yaml.safe_load(current) or {})
    free = set(RESUMABLE_CHANGES) | set(unread)
    return [
        f"{key} {before[key]!r} vs {after[key]!r}"
        for key in sorted(before.keys() & after.keys())
        if key not in free and before[key] != after[key]
    ]


def flatten_config(tree: dict, prefix: str = "", *, sep: str = ".") -> dict[str, Any]:
    """A nested config mapping as ``{"SOLVER.BASE_LR": 0.03, ...}`` (keys joined by ``sep``)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten_config(value, f"{prefix}{key}{sep}", sep=sep))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _value(cfg: CN, key: str):
    """``cfg.SOLVER.BATCH_SIZE`` for ``key="SOLVER.BATCH_SIZE"``."""
    return functools.reduce(getattr, key.split("."), cfg)


def _check_is_mapping(path: Path) -> None:
    """A recipe is a mapping (fvcore fails on an empty file or a list with a bare TypeError)."""
    with path.open(encoding="utf-8") as stream:
        document = yaml.safe_load(stream)
    if not isinstance(document, dict):
        got = "an empty file" if document is None else f"a YAML {type(document).__name__}"
        raise ValueError(f"expected a mapping of config keys such as 'SOLVER:', got {got}")


def _yaml_error_line(err: yaml.YAMLError) -> str:
    """PyYAML's multi-line report as ``file:line:column: problem (context at line:column)``."""
    mark = getattr(err, "problem_mark", None)
    if mark is None:  # errors without a position (e.g. undecodable bytes): their text, on one line
        return " ".join(str(err).split())
    line = f"{mark.name}:{mark.line + 1}:{mark.column + 1}: {err.problem}"
    if err.context:
        opened = err.context_mark
        where = f" at {opened.line + 1}:{opened.column + 1}" if opened else ""
        line += f" ({err.context}{where})"
    return line


@contextmanager
def _config_errors(source: str) -> Iterator[None]:
    """Turn YAML syntax errors and yacs' bare KeyError/AssertionError/ValueError into one line
    naming the source (a YAML error names the file, as ``_BASE_`` recipes may hold it)."""
    try:
        yield
    except yaml.YAMLError as err:
        raise ValueError(_yaml_error_line(err)) from None
    except (KeyError, AssertionError, ValueError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        raise ValueError(f"invalid config ({source}): {message}") from None


# ------------------------------------------------------------------ values for the layers below
# The data, augmentation and model code takes plain values; these read them from the config.
def dataset_options(cfg: CN) -> dict[str, Any]:
    """``DATA.*`` as the arguments of :func:`moco_pretrain.data.build_dataset`."""
    return {
        "name": cfg.DATA.NAME, "root": cfg.DATA.ROOT, "download": cfg.DATA.DOWNLOAD,
        "classes": tuple(cfg.DATA.CLASSES), "holdout": cfg.DATA.HOLDOUT,
        "train_split": cfg.DATA.TRAIN_SPLIT,
    }  # fmt: skip


def augmentation_options(cfg: CN) -> dict[str, Any]:
    """The pretraining recipe's ``DATA.*`` keys as the arguments of
    :func:`moco_pretrain.data.pretrain_transform` and of the device augmentation alike."""
    return {
        "size": cfg.DATA.IMAGE_SIZE,
        "recipe": cfg.DATA.AUG,
        "mean": cfg.DATA.MEAN,
        "std": cfg.DATA.STD,
        "min_scale": cfg.DATA.CROP_MIN_SCALE,
        "blur": cfg.DATA.BLUR,
    }


def eval_transform_options(cfg: CN) -> dict[str, Any]:
    """``DATA.*`` as the arguments of :func:`moco_pretrain.data.eval_transform`."""
    return {"size": cfg.DATA.IMAGE_SIZE, "mean": cfg.DATA.MEAN, "std": cfg.DATA.STD}
