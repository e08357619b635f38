"""The kNN task: weighted kNN top-1/top-5 of frozen pretrained features (Wu et al. 2018).

A bank of un-augmented ``DATA.TRAIN_SPLIT`` features (the first ``KNN.BANK_SIZE`` images when > 0)
votes for each ``DATA.VAL_SPLIT`` image with ``KNN.NEIGHBORS`` neighbours and temperature
``KNN.TEMPERATURE``.
Nothing trains, so there is no :class:`~moco_pretrain.engine.Runner`; under ``torchrun`` each
process extracts a shard.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from fvcore.common.config import CfgNode
from torch import nn

from .data import num_classes_of
from .distributed import init_distributed, is_main_process
from .engine import setup_logging
from .knn import extract_features, knn_accuracy, knn_evaluate
from .lincls import (
    build_eval_loader_of,
    build_frozen_backbone,
    load_pretrained,
    write_task_results,
)
from .probe import linear_probe


def knn_metrics_of(
    backbone: nn.Module, cfg: CfgNode, device: torch.device, *, probe: bool = False
) -> tuple[dict[str, float], int]:
    """Weighted kNN top-1/top-5 (%) on ``DATA.VAL_SPLIT`` with a bank from ``DATA.TRAIN_SPLIT``.

    With ``probe``, also ``linear_top1``: a linear probe on the same features
    (:func:`moco_pretrain.probe.linear_probe`), from one extraction. Returns the metrics and the
    number of bank images.
    """
    bank = build_eval_loader_of(
        cfg,
        split=cfg.DATA.TRAIN_SPLIT,
        batch_size=cfg.KNN.BATCH_SIZE_PER_PROCESS,
        max_samples=cfg.KNN.BANK_SIZE,
    )
    val = build_eval_loader_of(
        cfg, split=cfg.DATA.VAL_SPLIT, batch_size=cfg.KNN.BATCH_SIZE_PER_PROCESS
    )
    knn_options = {
        "num_classes": num_classes_of(val.dataset),
        "k": cfg.KNN.NEIGHBORS,
        "temperature": cfg.KNN.TEMPERATURE,
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


def run_knn(cfg: CfgNode, *, pretrained: str | Path, prefix: str | None = None) -> dict[str, Any]:
    """kNN accuracy of the backbone in ``pretrained``; writes ``OUTPUT_DIR/knn/results.json``."""
    device = init_distributed()
    output_dir = Path(cfg.OUTPUT_DIR) / "knn"
    setup_logging(output_dir)
    weights = load_pretrained(cfg, pretrained, prefix=prefix)
    backbone = build_frozen_backbone(cfg, weights).to(device)
    metrics, bank_size = knn_metrics_of(backbone, cfg, device)
    extra = {"k": cfg.KNN.NEIGHBORS, "temperature": cfg.KNN.TEMPERATURE, "bank_size": bank_size}
    if is_main_process():
        write_task_results(
            cfg, task="knn", metrics=metrics, weights=weights, output_dir=output_dir, **extra
        )
    return {"task": "knn", "metrics": metrics, **extra}
