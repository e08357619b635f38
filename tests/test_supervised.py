"""The supervised upper bound: all layers train from random init, results like moco-lincls'."""

from __future__ import annotations

import json

import torch

from moco_pretrain.config import setup_cfg
from moco_pretrain.evaluation import backbone_of, knn_metrics_of
from moco_pretrain.models import build_resnet
from moco_pretrain.results import RESULTS_FILE
from moco_pretrain.supervised import run_supervised


def supervised_cfg(root, output, *opts):
    return setup_cfg(
        "pretrain/moco_v2_cpu_trial.yaml",
        [
            "DATA.ROOT", str(root), "DATA.IMAGE_SIZE", "32", "DATA.NUM_WORKERS", "0",
            "SOLVER.BATCH_SIZE", "8", "SOLVER.BASE_LR", "0.2", "SOLVER.EPOCHS", "4",
            "KNN.NEIGHBORS", "5", "KNN.BATCH_SIZE_PER_PROCESS", "32", "OUTPUT_DIR", str(output), *opts,
        ],
    )  # fmt: skip


def test_supervised_trains_every_layer_and_reports(tiny_imagefolder, tmp_path):
    # the fixture's val classes have other colours than its train classes: evaluate on 16 train
    # images held out of training (and out of the kNN bank), which have their class's colour
    cfg = supervised_cfg(
        tiny_imagefolder, tmp_path, "DATA.VAL_SPLIT", "holdout", "DATA.HOLDOUT", "16"
    )
    result = run_supervised(cfg)
    written = json.loads((tmp_path / RESULTS_FILE).read_text())
    assert written["task"] == "supervised" and "checkpoint" not in written
    assert written["metrics"] == result["metrics"]
    assert set(result["metrics"]) == {"top1", "top5", "knn_top1"}
    assert result["bank_size"] == 64 - 16  # the queries are not in the bank
    # two colour-coded classes: trained with labels, the classifier tells the unseen images apart.
    # An untrained classifier scores 37.5-50 % on them; 14 or more of 16 by chance has p = 0.2 %.
    assert result["metrics"]["top1"] >= 87.5
    assert [e["epoch"] for e in result["epochs"]] == [1, 2, 3, 4]
    # every layer trains, BN in training mode: the stem's weights and statistics move
    third, final = (
        torch.load(tmp_path / f"checkpoint_000{e}.pth.tar", weights_only=False)["state_dict"]
        for e in (2, 3)
    )
    for key in ("module.conv1.weight", "module.bn1.running_mean", "module.fc.weight"):
        assert not torch.equal(third[key], final[key]), key
    # the kNN figure is that of the trained encoder's features on the held-out images (a random
    # encoder also scores 94-100 % on these colours: the kNN figure alone cannot tell them apart)
    classifier = build_resnet(cfg.MODEL.ARCH, num_classes=2, small_stem=cfg.MODEL.SMALL_STEM)
    classifier.load_state_dict({k.removeprefix("module."): v for k, v in final.items()})
    knn, _ = knn_metrics_of(backbone_of(classifier, cfg), cfg, torch.device("cpu"))
    assert result["metrics"]["knn_top1"] == knn["top1"] >= 87.5


def test_backbone_of_drops_only_the_head():
    cfg = setup_cfg("pretrain/moco_v2_cpu_trial.yaml", [])
    classifier = build_resnet(cfg.MODEL.ARCH, num_classes=3).eval()
    backbone = backbone_of(classifier, cfg)
    images = torch.randn(2, 3, 32, 32)
    features = backbone(images)  # 2 x 512
    assert torch.allclose(classifier.fc(features), classifier(images), atol=1e-5)
