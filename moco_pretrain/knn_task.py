"""The kNN task: weighted kNN top-1/top-5 of frozen pretrained features (Wu et al. 2018).

A bank of un-augmented ``DATA.TRAIN_SPLIT`` features (the first ``KNN.BANK_SIZE`` images when > 0)
votes for each ``DATA.VAL_SPLIT`` image with ``KNN.NEIGHBORS`` neighbours and temperature
``KNN.TEMPERATURE`` (:func:`moco_pretrain.evaluation.knn_metrics_of`, also pretraining's monitor).
Nothing trains, so there is no :class:`~moco_pretrain.engine.Runner`; under ``torchrun`` each
process extracts a shard.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fvcore.common.config import CfgNode

from .distributed import init_distributed, is_main_process
from .engine import setup_logging
from .evaluation import build_frozen_backbone, knn_metrics_of, load_pretrained, write_task_results


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
