"""``moco-knn`` end to end on a tiny ImageFolder, in one process and on a 2-process gloo group."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torchvision import datasets, transforms

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


def _expected_top1(tmp_path, *, k: int = 5, temperature: float = 0.07) -> float:
    """Top-1 (%) of Wu et al.'s weighted kNN, recomputed here without the package: torchvision's
    ResNet-18 with the checkpoint's query encoder, resize 18 + centre crop 16, and one dense
    vote per val image over the whole train bank.

    On this data the answer is 5 of 9; an unweighted vote, unnormalised features, shuffled bank
    labels, k=1 or a random encoder give 4 or 3 of 9, a bank of the val images 9 of 9.
    """
    state = torch.load(tmp_path / "moco.pth", weights_only=True)["state_dict"]
    prefix = "module.encoder_q."
    net = torchvision.models.resnet18()
    net.fc = torch.nn.Identity()  # pooled 512-d features; the MLP head is not the backbone
    net.load_state_dict(
        {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)
         and not k.startswith(f"{prefix}fc.")}
    )  # fmt: skip
    net.eval()
    transform = transforms.Compose([
        transforms.Resize(18), transforms.CenterCrop(16), transforms.ToTensor(),
        transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    ])  # fmt: skip

    def features(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        folder = datasets.ImageFolder(tmp_path / "data" / split, transform=transform)
        images = torch.stack([image for image, _ in folder])  # [9, 3, 16, 16]
        with torch.no_grad():
            return F.normalize(net(images), dim=1), torch.tensor(folder.targets)  # [9, 512], [9]

    bank, bank_labels = features("train")
    queries, labels = features("val")
    hits = 0
    for query, label in zip(queries, labels, strict=True):
        similarity, neighbours = (bank @ query).topk(k)  # [k]
        votes = bank_labels[neighbours]  # [k]
        scores = [float(torch.exp(similarity[votes == c] / temperature).sum()) for c in range(3)]
        hits += scores.index(max(scores)) == int(label)
    return 100.0 * hits / len(labels)


def _check_results(tmp_path) -> dict:
    result = json.loads((tmp_path / "out" / "knn" / "results.json").read_text())
    assert result["task"] == "knn" and set(result["metrics"]) == {"top1", "top5"}
    assert result["metrics"]["top1"] == pytest.approx(_expected_top1(tmp_path), abs=1e-9)
    assert result["metrics"]["top5"] == 100.0  # 3 classes: every label is among the top 5
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
