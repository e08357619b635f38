"""Wiring of a pretraining run: config -> model, data, optimizer -> :class:`Trainer`."""

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
from .checkpoint import atomic_write_json
from .data import (
    build_dataset,
    build_eval_loader,
    build_pretrain_transform,
    build_train_loader,
    limit_samples,
    num_classes_of,
    num_skipped_images,
)
from .distributed import (
    get_world_size,
    is_main_process,
    per_process_batch_size,
)
from .engine import build_trainer, logger, start_run, wrap_distributed
from .gpu_augment import DecodeResize, build_device_augment, default_pre_size, device_augment_step
from .knn import extract_features, knn_accuracy, knn_evaluate
from .models import build_backbone, build_resnet
from .probe import linear_probe
from .schedules import scaled_lr


def build_moco(cfg: CfgNode) -> MoCo:
    encoder = functools.partial(build_resnet, cfg.MODEL.ARCH, small_stem=cfg.MODEL.SMALL_STEM)
    return MoCo(
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
            pre_size=cfg.DATA.DEVICE_AUG_PRE_SIZE or default_pre_size(cfg.DATA.IMAGE_SIZE)
        )
    else:
        transform = build_pretrain_transform(cfg)
    dataset = build_dataset(cfg, split=cfg.DATA.TRAIN_SPLIT, transform=transform)
    dataset = limit_samples(dataset, cfg.DATA.MAX_SAMPLES)
    batch_size = per_process_batch_size(cfg.SOLVER.BATCH_SIZE)
    if get_world_size() == 1 and batch_size % cfg.MODEL.BN_SPLITS:
        raise ValueError(
            f"batch {batch_size} is not divisible by MODEL.BN_SPLITS={cfg.MODEL.BN_SPLITS}"
        )
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


def build_step_fn(cfg: CfgNode, model: nn.Module, device: torch.device) -> Callable:
    """The contrastive step, behind the device augmentation when ``DATA.DEVICE_AUG`` is on."""
    step_fn = functools.partial(contrastive_step, model)
    if cfg.DATA.DEVICE_AUG:
        step_fn = device_augment_step(step_fn, build_device_augment(cfg).to(device))
    return step_fn


def backbone_of(model: MoCo, cfg: CfgNode) -> nn.Module:
    """The query encoder without its projection head (pooled features), for kNN evaluation."""
    backbone = build_backbone(cfg.MODEL.ARCH, small_stem=cfg.MODEL.SMALL_STEM)
    state = {k: v for k, v in model.encoder_q.state_dict().items() if not k.startswith("fc.")}
    backbone.load_state_dict(state)
    return backbone.to(model.queue.device)


def knn_metrics_of(
    backbone: nn.Module, cfg: CfgNode, device: torch.device, *, probe: bool = False
) -> tuple[dict[str, float], int]:
    """Weighted kNN top-1/top-5 (%) on ``DATA.VAL_SPLIT`` with a bank from ``DATA.TRAIN_SPLIT``.

    With ``probe``, also ``linear_top1``: a linear probe on the same features
    (:func:`moco_pretrain.probe.linear_probe`), from one extraction. Returns the metrics and the
    number of bank images.
    """
    bank = build_eval_loader(
        cfg,
        split=cfg.DATA.TRAIN_SPLIT,
        batch_size=cfg.KNN.BATCH_SIZE,
        max_samples=cfg.KNN.BANK_SIZE,
    )
    val = build_eval_loader(cfg, split=cfg.DATA.VAL_SPLIT, batch_size=cfg.KNN.BATCH_SIZE)
    knn_options = {
        "num_classes": num_classes_of(val.dataset),
        "k": cfg.KNN.K,
        "temperature": cfg.KNN.T,
    }
    if not probe:
        metrics = knn_evaluate(
            backbone, bank, val, device=device, **knn_options,
            # An ImageNet bank (1.28M x 2048) is 5.2 GB in fp16; CPU banks stay fp32 (slow fp16).
            feature_dtype=torch.float16 if device.type == "cuda" else torch.float32,
        )  # fmt: skip
        return metrics, len(bank.dataset)
    bank_x, bank_y = extract_features(backbone, bank, device=device, normalize=False)  # [N, D]
    val_x, val_y = extract_features(backbone, val, device=device, normalize=False)  # [M, D]
    metrics = knn_accuracy(
        F.normalize(bank_x, dim=1), bank_y, F.normalize(val_x, dim=1), val_y, **knn_options
    )
    probed = linear_probe(
        bank_x, bank_y, val_x, val_y, num_classes=knn_options["num_classes"], seed=cfg.SEED
    )
    metrics["linear_top1"] = probed["top1"]
    return metrics, len(bank.dataset)


FEATURE_METRICS = {"knn_top1": "kNN top-1", "linear_top1": "linear probe top-1"}


def feature_comparison(summary: dict[str, Any]) -> list[str]:
    """One line per ``KNN.FINAL`` metric in ``summary``: the learned vs a random-init encoder."""
    return [
        f"{name}: MoCo {summary[key]:.2f} %, random-init encoder"
        f" {summary[key + '_random_init']:.2f} % (validation split)"
        for key, name in FEATURE_METRICS.items()
        if key in summary
    ]


def run_pretraining(cfg: CfgNode, *, resume: str | None = None) -> dict[str, Any]:
    """Train MoCo as ``cfg`` says; returns a summary (also written to ``OUTPUT_DIR/summary.json``)."""
    device = start_run(cfg)
    output_dir = Path(cfg.OUTPUT_DIR)
    loader = build_pretrain_loader(cfg)  # fails early on a missing/empty data folder

    model = prepare_model(cfg, build_moco(cfg).to(device), device)
    optimizer = build_optimizer(cfg, model)
    lr = optimizer.defaults["lr"]
    train_model = wrap_distributed(model, device)
    logger.info(
        "MoCo %s: %d processes x %d images = batch %d, lr %.4g (= %.4g x %d / 256), %d iterations/epoch",
        cfg.MODEL.ARCH, get_world_size(), loader.batch_size, cfg.SOLVER.BATCH_SIZE, lr,
        cfg.SOLVER.BASE_LR, cfg.SOLVER.BATCH_SIZE, len(loader),
    )  # fmt: skip
    trainer = build_trainer(
        cfg, model=train_model, optimizer=optimizer, loader=loader,
        step_fn=build_step_fn(cfg, train_model, device), device=device,
    )  # fmt: skip
    resume = resume or (cfg.TRAIN.AUTO_RESUME and trainer.checkpointer.last_checkpoint())
    if resume:
        trainer.resume(resume)

    def knn_monitor(epoch: int) -> None:
        period = cfg.KNN.MONITOR_PERIOD
        if period > 0 and ((epoch + 1) % period == 0 or epoch + 1 == cfg.SOLVER.EPOCHS):
            top1 = knn_metrics_of(backbone_of(model, cfg), cfg, device)[0]["top1"]
            trainer.history[-1]["knn_top1"] = top1  # saved with the epoch's checkpoint
            logger.info("epoch %d: kNN top-1 %.2f %%", epoch + 1, top1)
            if trainer.writer:
                trainer.writer.add_scalar("epoch/knn_top1", top1, epoch + 1)

    trainer.train(epoch_end_hooks=[knn_monitor])
    knn_history = [
        {"epoch": h["epoch"], "knn_top1": h["knn_top1"]} for h in trainer.history if "knn_top1" in h
    ]
    summary: dict[str, Any] = {
        "checkpoint": str(trainer.last_saved) if trainer.last_saved else None,
        "epochs": trainer.history,  # every epoch, also those before a resume
        "knn": knn_history,
        "iterations": trainer.log_points,
        "train_seconds": sum(h["seconds"] for h in trainer.history),
        "skipped_images": num_skipped_images(loader.dataset),
    }
    if cfg.KNN.FINAL:  # the learned and a random-init encoder, on the same features
        torch.manual_seed(cfg.SEED)
        random_init = build_backbone(cfg.MODEL.ARCH, small_stem=cfg.MODEL.SMALL_STEM).to(device)
        for suffix, encoder in (("", backbone_of(model, cfg)), ("_random_init", random_init)):
            metrics = knn_metrics_of(encoder, cfg, device, probe=True)[0]
            summary[f"knn_top1{suffix}"] = metrics["top1"]
            summary[f"linear_top1{suffix}"] = metrics["linear_top1"]
    if is_main_process():
        atomic_write_json(output_dir / "summary.json", summary)  # whole, or absent
    return summary
