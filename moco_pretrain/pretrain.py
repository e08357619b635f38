"""The pretraining task: config -> model, data, optimizer, step and kNN monitor -> :class:`Runner`."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from fvcore.common.config import CfgNode
from torch import nn
from torch.utils.data import DataLoader

from .builder import MoCo
from .config import augmentation_options, dataset_options, validate
from .data import (
    TwoCropsTransform,
    build_dataset,
    build_train_loader,
    limit_samples,
    num_skipped_images,
    pretrain_transform,
)
from .distributed import (
    get_world_size,
    is_main_process,
    per_process_batch_size,
)
from .engine import Hook, Runner, Task, logger, start_run
from .evaluation import backbone_of, knn_metrics_of
from .files import atomic_write_json
from .gpu_augment import DecodeResize, GpuMocoAugment, default_pre_size, device_augment_step
from .models import build_backbone, build_resnet
from .schedules import scaled_lr


def build_moco(cfg: CfgNode, *, moco_class: type[MoCo] = MoCo) -> MoCo:
    """``MODEL.*``'s MoCo (``moco_class``: a subclass, e.g. the speed tool's official update)."""
    encoder = functools.partial(build_resnet, cfg.MODEL.ARCH, small_stem=cfg.MODEL.SMALL_STEM)
    return moco_class(
        encoder,
        cfg.MODEL.DIM,
        cfg.MODEL.K,
        cfg.MODEL.M,
        cfg.MODEL.T,
        cfg.MODEL.MLP,
        bn_splits=cfg.MODEL.BN_SPLITS,
    )


def build_pretrain_loader(cfg: CfgNode) -> DataLoader:
    """Two augmented views per image, or with ``DATA.DEVICE_AUG`` decoded images to augment later."""
    if cfg.DATA.DEVICE_AUG:
        transform = DecodeResize(
            pre_size=cfg.DATA.DEVICE_AUG_PRE_SIZE or default_pre_size(cfg.DATA.IMAGE_SIZE),
            grey=cfg.DATA.DEVICE_AUG_GREY,
        )
    else:
        transform = TwoCropsTransform(pretrain_transform(**augmentation_options(cfg)))
    dataset = build_dataset(
        **dataset_options(cfg), split=cfg.DATA.TRAIN_SPLIT, transform=transform,
        grey_arrays=cfg.DATA.DEVICE_AUG and cfg.DATA.DEVICE_AUG_GREY,
    )  # fmt: skip
    dataset = limit_samples(dataset, cfg.DATA.MAX_SAMPLES)
    batch_size = per_process_batch_size(cfg.SOLVER.BATCH_SIZE)
    if len(dataset) < cfg.SOLVER.BATCH_SIZE:
        raise ValueError(
            f"{len(dataset)} training images are fewer than one batch (SOLVER.BATCH_SIZE="
            f"{cfg.SOLVER.BATCH_SIZE}); lower the batch size or add data"
        )
    return build_train_loader(
        dataset, batch_size=batch_size, seed=cfg.SEED, num_workers=cfg.DATA.NUM_WORKERS,
        drop_last=True,
    )  # fmt: skip


def contrastive_step(model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """InfoNCE loss and contrastive top-1 (is the positive the arg-max of 1+K logits)."""
    (im_q, im_k), _ = batch
    logits, labels = model(im_q, im_k)  # logits: Nx(1+K), labels: N
    loss = F.cross_entropy(logits, labels)
    acc1 = (logits.argmax(dim=1) == labels).float().mean() * 100
    return loss, {"acc1": acc1}


def prepare_model(cfg: CfgNode, model: MoCo, device: torch.device) -> MoCo:
    """Channels-last memory on CUDA and ``torch.compile`` of the encoders, as configured."""
    if device.type == "cuda" and cfg.TRAIN.CHANNELS_LAST:
        model = model.to(memory_format=torch.channels_last)
    if cfg.TRAIN.COMPILE:
        model.encoder_q.compile()  # in place: state-dict keys unchanged
        model.encoder_k.compile()
    return model


def build_optimizer(cfg: CfgNode, model: nn.Module) -> torch.optim.SGD:
    """SGD at the linearly scaled lr, fused (one kernel over all parameters).

    All parameters, as the official code: the key encoder's never get a gradient, so SGD skips
    them, and the optimizer state keeps the official layout.
    """
    return torch.optim.SGD(
        model.parameters(), scaled_lr(cfg.SOLVER.BASE_LR, cfg.SOLVER.BATCH_SIZE),
        momentum=cfg.SOLVER.MOMENTUM, weight_decay=cfg.SOLVER.WEIGHT_DECAY, fused=True,
    )  # fmt: skip


def build_step(cfg: CfgNode, device: torch.device) -> Callable:
    """The contrastive step, behind the device augmentation when ``DATA.DEVICE_AUG`` is on."""
    if cfg.DATA.DEVICE_AUG:
        augment = GpuMocoAugment(**augmentation_options(cfg)).to(device)
        return device_augment_step(contrastive_step, augment)
    return contrastive_step


FEATURE_METRICS = {"knn_top1": "kNN top-1", "linear_top1": "logistic probe top-1"}


def feature_comparison(summary: dict[str, Any]) -> list[str]:
    """One line per ``KNN.FINAL`` metric in ``summary``: the learned vs a random-init encoder."""
    return [
        f"{name}: MoCo {summary[key]:.2f} %, random-init encoder"
        f" {summary[key + '_random_init']:.2f} % (validation split)"
        for key, name in FEATURE_METRICS.items()
        if key in summary
    ]


class KnnMonitor(Hook):
    """kNN top-1 (``knn_top1``) of an encoder every ``period`` epochs and after the last one,
    under a fork of the CPU RNG (building the evaluated copy draws an initialisation), so that
    monitoring does not change the training."""

    def __init__(self, top1: Callable[[], float], *, period: int, epochs: int) -> None:
        self.top1, self.period, self.epochs = top1, period, epochs

    def after_epoch(self, runner: Runner, epoch: int) -> dict[str, float]:
        if self.period <= 0 or ((epoch + 1) % self.period and epoch + 1 < self.epochs):
            return {}
        with torch.random.fork_rng(devices=[]):
            return {"knn_top1": self.top1()}


def pretraining_task(cfg: CfgNode, device: torch.device) -> Task:
    """MoCo, its loader (which fails early on a missing or empty data folder), SGD and the step."""
    loader = build_pretrain_loader(cfg)
    model = prepare_model(cfg, build_moco(cfg).to(device), device)
    optimizer = build_optimizer(cfg, model)
    logger.info(
        "MoCo %s: %d processes x %d images = batch %d, lr %.4g (= %.4g x %d / 256), %d iterations/epoch",
        cfg.MODEL.ARCH, get_world_size(), loader.batch_size, cfg.SOLVER.BATCH_SIZE,
        optimizer.defaults["lr"], cfg.SOLVER.BASE_LR, cfg.SOLVER.BATCH_SIZE, len(loader),
    )  # fmt: skip
    monitor = KnnMonitor(
        lambda: knn_metrics_of(backbone_of(model.encoder_q, cfg), cfg, device)[0]["top1"],
        period=cfg.KNN.MONITOR_PERIOD,
        epochs=cfg.SOLVER.EPOCHS,
    )
    return Task(model, optimizer, loader, build_step(cfg, device), hooks=[monitor])


def run_pretraining(cfg: CfgNode, *, resume: str | None = None) -> dict[str, Any]:
    """Train MoCo as ``cfg`` says; returns a summary (also written to ``OUTPUT_DIR/summary.json``)."""
    validate(cfg, pretraining=True)  # however cfg was loaded: before any work starts
    device = start_run(cfg)
    task = pretraining_task(cfg, device)
    runner = Runner.from_config(cfg, task, device=device)
    runner.resume_or_start(resume, auto=cfg.TRAIN.AUTO_RESUME)
    runner.train()
    knn_history = [
        {"epoch": h["epoch"], "knn_top1": h["knn_top1"]} for h in runner.history if "knn_top1" in h
    ]
    summary: dict[str, Any] = {
        "checkpoint": str(runner.last_saved) if runner.last_saved else None,
        "epochs": runner.history,  # every epoch, also those before a resume
        "knn": knn_history,
        "iterations": runner.log_points,
        "train_seconds": sum(h["seconds"] for h in runner.history),
        "skipped_images": num_skipped_images(task.loader.dataset),
        "data": runner.checkpoint_meta["data"],
    }
    if cfg.KNN.FINAL:  # the learned and a random-init encoder, on the same features
        torch.manual_seed(cfg.SEED)
        random_init = build_backbone(cfg.MODEL.ARCH, small_stem=cfg.MODEL.SMALL_STEM).to(device)
        learned = backbone_of(task.model.encoder_q, cfg)
        for suffix, encoder in (("", learned), ("_random_init", random_init)):
            metrics = knn_metrics_of(encoder, cfg, device, probe=True)[0]
            summary[f"knn_top1{suffix}"] = metrics["top1"]
            summary[f"linear_top1{suffix}"] = metrics["linear_top1"]
    if is_main_process():
        atomic_write_json(Path(cfg.OUTPUT_DIR) / "summary.json", summary)  # whole, or absent
    return summary
