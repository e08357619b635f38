"""Control initialisations of a transfer study: what a pretrained backbone's gain is not.

:func:`run_random_bn` writes a random-init ResNet whose batch-norm statistics are calibrated on the
pretraining images: forward passes in training mode, no gradient, no weight changed. Against it a
pretrained row's gain cannot come from input statistics alone (``moco-benchmark --controls``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from fvcore.common.config import CfgNode
from torch import nn
from torch.utils.data import DataLoader

from .checkpoint import atomic_save
from .data import data_record
from .distributed import get_world_size, init_distributed
from .engine import logger, setup_logging
from .evaluation import build_eval_loader_of
from .models import build_backbone

__all__ = ["RANDOM_BN_FILE", "RANDOM_BN_METHOD", "calibrate_bn", "run_random_bn"]

RANDOM_BN_FILE = "random_bn.pth.tar"  # in OUTPUT_DIR
RANDOM_BN_METHOD = "random-bn"  # the checkpoint's "method", kept by moco-convert's provenance


@torch.no_grad()
def calibrate_bn(model: nn.Module, loader: DataLoader, *, device: torch.device) -> int:
    """Set every BN layer's running mean and variance to their averages over ``loader``'s batches
    (momentum None: a cumulative average, as precise BN), in training mode; returns the number of
    images. Weights and BN affine parameters stay as they are."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    model.train()
    images = 0
    for batch, _ in loader:
        model(batch.to(device))
        images += len(batch)
    for norm, momentum in zip(norms, momenta, strict=True):
        norm.momentum = momentum
    return images


def run_random_bn(cfg: CfgNode) -> Path:
    """``MODEL.ARCH`` at its random initialisation (drawn from ``SEED``), BN statistics calibrated
    on the un-augmented ``DATA.TRAIN_SPLIT`` (``DATA.CLASSES``, ``DATA.HOLDOUT`` applied); saved
    as ``OUTPUT_DIR/random_bn.pth.tar`` (torchvision keys under ``state_dict``, the config and the
    image set's record), which ``moco-convert`` reads. Returns the path; an existing file is kept.
    """
    path = Path(cfg.OUTPUT_DIR) / RANDOM_BN_FILE
    if path.is_file():
        return path
    device = init_distributed()
    if get_world_size() > 1:  # each process would calibrate on its own shard
        raise ValueError("the calibrated random init runs in one process (no torchrun)")
    setup_logging(cfg.OUTPUT_DIR)
    torch.manual_seed(cfg.SEED)
    model = build_backbone(cfg.MODEL.ARCH, small_stem=cfg.MODEL.SMALL_STEM).to(device)
    loader = build_eval_loader_of(
        cfg, split=cfg.DATA.TRAIN_SPLIT, batch_size=cfg.KNN.BATCH_SIZE_PER_PROCESS
    )
    images = calibrate_bn(model, loader, device=device)
    logger.info("random init (seed %d): BN statistics calibrated on %d images", cfg.SEED, images)
    state = {k: v.cpu() for k, v in model.state_dict().items()}
    atomic_save(
        {
            "arch": cfg.MODEL.ARCH, "method": RANDOM_BN_METHOD, "state_dict": state,
            "config": cfg.dump(),
            "data": data_record(loader.dataset, name=cfg.DATA.NAME, split=cfg.DATA.TRAIN_SPLIT),
        },
        path,
    )  # fmt: skip
    return path
