"""Supervised pretraining: the same ResNet trained from random init with labels.

Same data, transforms, loss and engine as linear classification (:mod:`moco_pretrain.lincls`; both
take them from :mod:`moco_pretrain.evaluation`), but every layer trains (BN in training mode) and
there is no pretrained checkpoint. Reports the classifier's top-1/top-5 and the weighted-kNN top-1
of its pooled features (``KNN.*``), so that it sits in the same table as the self-supervised
encoders.
"""

from __future__ import annotations

from typing import Any

import torch
from fvcore.common.config import CfgNode

from .config import PRETRAINING_ONLY
from .data import num_classes_of
from .distributed import get_world_size, is_main_process, per_process_batch_size
from .engine import Runner, Task, logger, start_run
from .evaluation import (
    backbone_of,
    build_classifier_train_loader,
    build_eval_loader_of,
    classification_step,
    evaluate_classifier,
    knn_metrics_of,
    write_task_results,
)
from .models import build_resnet
from .schedules import scaled_lr

__all__ = ["run_supervised"]


def supervised_task(cfg: CfgNode, device: torch.device) -> Task:
    """``MODEL.ARCH`` with a new classifier, every layer trained with labels, SGD."""
    loader = build_classifier_train_loader(cfg)
    model = build_resnet(
        cfg.MODEL.ARCH, num_classes=num_classes_of(loader.dataset), small_stem=cfg.MODEL.SMALL_STEM
    ).to(device)
    lr = scaled_lr(cfg.SOLVER.BASE_LR, cfg.SOLVER.BATCH_SIZE)
    optimizer = torch.optim.SGD(
        model.parameters(), lr, momentum=cfg.SOLVER.MOMENTUM, weight_decay=cfg.SOLVER.WEIGHT_DECAY
    )
    logger.info(
        "supervised %s: %d processes x %d images = batch %d, lr %.4g",
        cfg.MODEL.ARCH, get_world_size(), loader.batch_size, cfg.SOLVER.BATCH_SIZE, lr,
    )  # fmt: skip
    return Task(model, optimizer, loader, classification_step, unread_config_keys=PRETRAINING_ONLY)


def run_supervised(cfg: CfgNode) -> dict[str, Any]:
    """Train ``MODEL.ARCH`` with labels on ``DATA.TRAIN_SPLIT``; evaluate on ``DATA.VAL_SPLIT``.

    Auto-resumes from ``OUTPUT_DIR``. Writes ``OUTPUT_DIR/results.json`` (task ``supervised``,
    metrics ``top1``, ``top5``, ``knn_top1``) and returns its essentials.
    """
    device = start_run(cfg)
    task = supervised_task(cfg, device)
    runner = Runner.from_config(cfg, task, device=device)
    runner.resume_or_start(auto=cfg.TRAIN.AUTO_RESUME)
    runner.train()
    val_loader = build_eval_loader_of(
        cfg, split=cfg.DATA.VAL_SPLIT, batch_size=per_process_batch_size(cfg.SOLVER.BATCH_SIZE)
    )
    metrics = evaluate_classifier(task.model, val_loader, device=device)
    knn, bank_size = knn_metrics_of(backbone_of(task.model, cfg), cfg, device)
    metrics["knn_top1"] = knn["top1"]
    logger.info("supervised: top-1 %.2f %%, kNN top-1 %.2f %%", metrics["top1"], knn["top1"])
    extra = {
        "epochs": runner.history, "k": cfg.KNN.NEIGHBORS, "temperature": cfg.KNN.TEMPERATURE,
        "data": runner.checkpoint_meta["data"],
    }  # fmt: skip
    if is_main_process():
        write_task_results(cfg, task="supervised", metrics=metrics, **extra)
    return {"task": "supervised", "metrics": metrics, "bank_size": bank_size, **extra}
