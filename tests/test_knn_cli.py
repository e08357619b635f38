"""``moco-knn`` end to end on a tiny ImageFolder, in one process and on a 2-process gloo group."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from moco_pretrain.cli.knn import main

from .distributed_utils import run_on_gloo
from .test_lincls import _image_folder, _moco_checkpoint

OPTS = ["MODEL.ARCH", "resnet18", "DATA.IMAGE_SIZE", "16", "DATA.NUM_WORKERS", "0",
        "KNN.NEIGHBORS", "5", "KNN.BATCH_SIZE_PER_PROCESS", "5"]  # fmt: skip


def _run(tmp_path) -> None:
    main(
        ["--config-file", "lincls/imagenet_r50.yaml", "--pretrained", str(tmp_path / "moco.pth"),
         "OUTPUT_DIR", str(tmp_path / "out"), "DATA.ROOT", str(tmp_path / "data"), *OPTS]
    )  # fmt: skip


def _setup(tmp_path) -> None:
    _image_folder(tmp_path / "data", per_class=3)  # a bank of 9, 9 queries
    torch.save(_moco_checkpoint(mlp=True), tmp_path / "moco.pth")


def _check_results(tmp_path) -> dict:
    result = json.loads((tmp_path / "out" / "knn" / "results.json").read_text())
    assert result["task"] == "knn" and set(result["metrics"]) == {"top1", "top5"}
    assert result["metrics"]["top5"] == 100.0  # 3 classes
    digest = hashlib.sha256((tmp_path / "moco.pth").read_bytes()).hexdigest()
    assert result["checkpoint_sha256"] == digest
    assert (result["k"], result["bank_size"], result["config"]["KNN"]["NEIGHBORS"]) == (5, 9, 5)
    return result


def test_knn_cli_writes_results(tmp_path, capsys):
    torch.set_num_threads(1)
    _setup(tmp_path)
    _run(tmp_path)
    _check_results(tmp_path)
    assert "kNN (k=5, T=0.07, bank 9): top-1" in capsys.readouterr().out


def _ddp_worker(rank: int, tmp_path) -> None:
    torch.set_num_threads(1)
    _run(tmp_path)  # init_distributed() finds the group the helper made from the torchrun env


@pytest.mark.ddp
@pytest.mark.slow  # a whole task on two processes
def test_knn_cli_two_processes_match_one(tmp_path):
    _setup(tmp_path)
    run_on_gloo(_ddp_worker, tmp_path)
    ddp = _check_results(tmp_path)
    _run(tmp_path)  # one process, same data: the same numbers
    assert _check_results(tmp_path)["metrics"] == ddp["metrics"]
