"""Weighted kNN (Wu et al. 2018) and distributed feature extraction."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset

from moco_pretrain.evaluation import (
    extract_features,
    knn_accuracy,
    knn_scores,
    topk_accuracy,
)

from .distributed_utils import run_on_gloo


def _unit(*angles_deg: float) -> torch.Tensor:
    """Unit vectors in the plane at the given angles: ``[len(angles), 2]``."""
    rad = torch.tensor(angles_deg, dtype=torch.float64) * math.pi / 180
    return torch.stack([rad.cos(), rad.sin()], dim=1).float()


# A bank of four 2-D unit vectors at 0, 60, 90 and 180 degrees with labels 0, 1, 1, 2, and two
# queries at 0 and 170 degrees. cos(0)=1, cos(60)=0.5, cos(90)=0, cos(180)=-1.
BANK = _unit(0, 60, 90, 180)
BANK_LABELS = torch.tensor([0, 1, 1, 2])
QUERIES = _unit(0, 170)


def test_hand_computed_scores_and_predictions():
    # query 0 (0 deg): k=3 neighbours 0 (s=1), 60 (s=0.5), 90 (s=0); T=0.5 -> weights e^2, e^1, e^0
    #   class 0: e^2 = 7.389; class 1: e^1 + e^0 = 3.718; class 2: 0 -> predicts 0
    # query 1 (170 deg): similarities cos(170)=-0.985, cos(110)=-0.342, cos(80)=0.174, cos(10)=0.985
    #   neighbours 180 (0.9848), 90 (0.1736), 60 (-0.3420); class 1: e^0.3473 + e^-0.6840 = 1.9198,
    #   class 2: e^1.9696 = 7.1679 -> predicts 2
    scores = knn_scores(BANK, BANK_LABELS, QUERIES, num_classes=3, k=3, temperature=0.5)
    c10, c80, c110 = (math.cos(math.radians(a)) for a in (10, 80, 110))
    expected = torch.tensor(
        [
            [math.e**2, math.e + 1.0, 0.0],
            [0.0, math.exp(c80 / 0.5) + math.exp(c110 / 0.5), math.exp(c10 / 0.5)],
        ]
    )
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-6)
    assert scores[0].tolist() == pytest.approx([7.389056, 3.718282, 0.0], rel=1e-6)
    assert scores[1].tolist() == pytest.approx([0.0, 1.919810, 7.167920], rel=1e-5)
    assert scores.argmax(dim=1).tolist() == [0, 2]  # the predicted classes


def test_weights_beat_majority():
    # k=4 at 170 deg: class 1 has two votes, class 2 one, but the close neighbour's weight wins
    # with a small temperature; with a huge temperature the weights flatten into a majority vote.
    sharp = knn_scores(BANK, BANK_LABELS, QUERIES[1:], num_classes=3, k=4, temperature=0.07)
    flat = knn_scores(BANK, BANK_LABELS, QUERIES[1:], num_classes=3, k=4, temperature=1e4)
    assert sharp.argmax(dim=1).tolist() == [2]
    assert flat.argmax(dim=1).tolist() == [1]


def test_k1_is_nearest_neighbour():
    torch.manual_seed(0)
    bank = F.normalize(torch.randn(50, 8), dim=1)
    labels = torch.randint(0, 5, (50,))
    queries = F.normalize(torch.randn(20, 8), dim=1)
    preds = knn_scores(bank, labels, queries, num_classes=5, k=1).argmax(dim=1)
    assert torch.equal(preds, labels[(queries @ bank.T).argmax(dim=1)])


@pytest.mark.parametrize(("chunk_size", "bank_chunk_size"), [(1, 7), (7, 1000), (16, 5), (3, 1)])
def test_chunked_equals_unchunked(chunk_size, bank_chunk_size):
    torch.manual_seed(0)
    bank = F.normalize(torch.randn(103, 16), dim=1)
    labels = torch.randint(0, 10, (103,))
    queries = F.normalize(torch.randn(37, 16), dim=1)
    ref = knn_scores(
        bank, labels, queries, num_classes=10, k=20, chunk_size=10**6, bank_chunk_size=10**6
    )
    got = knn_scores(
        bank,
        labels,
        queries,
        num_classes=10,
        k=20,
        chunk_size=chunk_size,
        bank_chunk_size=bank_chunk_size,
    )
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=0)
    assert torch.equal(got.argmax(1), ref.argmax(1))


def test_fp16_bank_matches_fp32():
    torch.manual_seed(0)
    bank = F.normalize(torch.randn(200, 32), dim=1)
    labels = torch.randint(0, 4, (200,))
    queries = F.normalize(torch.randn(50, 32), dim=1)
    ref = knn_scores(bank, labels, queries, num_classes=4, k=10)
    half = knn_scores(bank.half(), labels, queries.half(), num_classes=4, k=10, bank_chunk_size=64)
    assert half.dtype == torch.float32 and torch.isfinite(half).all()  # exp(1/0.07) > fp16 max
    torch.testing.assert_close(half, ref, rtol=2e-2, atol=0)


def test_accuracy_top1_top5():
    # query 0 (label 1): predicted 0, second is 1 -> wrong at top-1, right at top-2
    # query 1 (label 2): predicted 2
    acc = knn_accuracy(
        BANK,
        BANK_LABELS,
        QUERIES,
        torch.tensor([1, 2]),
        num_classes=3,
        k=3,
        temperature=0.5,
        topk=(1, 2, 5),
    )
    assert acc == {"top1": 50.0, "top2": 100.0, "top5": 100.0}
    labels = torch.tensor([0, 2])
    assert knn_accuracy(BANK, BANK_LABELS, QUERIES, labels, num_classes=3, k=3, topk=(1,)) == {
        "top1": 100.0
    }


def test_k_larger_than_bank_raises():
    with pytest.raises(ValueError, match=r"k=5 must be between 1 and the bank size N=4"):
        knn_scores(BANK, BANK_LABELS, QUERIES, num_classes=3, k=5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"k": 0}, "k=0 must be between 1"),
        ({"temperature": 0.0}, "temperature must be positive"),
        ({"chunk_size": 0}, "chunk sizes must be positive"),
        ({"num_classes": 2}, r"train_labels must lie in \[0, num_classes=2\)"),
    ],
)
def test_invalid_arguments_raise(kwargs, match):
    args = {"num_classes": 3, "k": 2} | kwargs
    with pytest.raises(ValueError, match=match):
        knn_scores(BANK, BANK_LABELS, QUERIES, **args)


def test_dimension_mismatch_raises():
    with pytest.raises(ValueError, match="feature dimensions differ: bank D=2, test D=3"):
        knn_scores(BANK, BANK_LABELS, torch.ones(1, 3), num_classes=3, k=1)


class _Scale(nn.Module):
    """A deterministic "model": features = 2 * flattened input; a BN layer tracks eval mode."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(3, affine=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(2 * x.flatten(1))


def _toy_dataset(n: int) -> TensorDataset:
    x = torch.arange(3 * n, dtype=torch.float32).view(n, 3).sin() + 0.1
    return TensorDataset(x, torch.arange(n) % 4)


def test_extract_features_single_process_order_and_mode():
    ds = _toy_dataset(7)
    model = _Scale().train()
    feats, labels = extract_features(model, DataLoader(ds, batch_size=3), device="cpu")
    assert model.training  # mode restored
    assert torch.equal(model.bn.running_mean, torch.zeros(3))  # eval mode: stats untouched
    torch.testing.assert_close(feats, F.normalize(2 * ds.tensors[0], dim=1))
    assert torch.equal(labels, ds.tensors[1])
    raw, _ = extract_features(
        model, DataLoader(ds, batch_size=3), device="cpu", normalize=False, dtype=torch.float16
    )
    assert raw.dtype == torch.float16
    torch.testing.assert_close(raw.float(), 2 * ds.tensors[0], rtol=1e-3, atol=1e-3)


def test_extract_features_rejects_random_order_and_dropped_samples():
    ds = _toy_dataset(7)
    with pytest.raises(ValueError, match="RandomSampler: use shuffle=False"):
        extract_features(_Scale(), DataLoader(ds, batch_size=2, shuffle=True), device="cpu")
    with pytest.raises(ValueError, match="covers 6 of the 7 samples"):
        extract_features(_Scale(), DataLoader(ds, batch_size=2, drop_last=True), device="cpu")


class _Indexed(Dataset):
    """A dataset whose features encode the index, to check order and de-duplication."""

    def __len__(self) -> int:
        return 7

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return torch.tensor([float(i), 1.0, -1.0]), i % 3


def _gather_worker(rank: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    ds = _Indexed()
    loaders = {
        # 7 samples over 2 ranks: DistributedSampler pads with one duplicate (4 + 4 rows).
        "sequential": DataLoader(ds, batch_size=3, sampler=DistributedSampler(ds, shuffle=False)),
        "shuffled": DataLoader(ds, batch_size=3, sampler=DistributedSampler(ds, shuffle=True)),
        # Uneven shards (5 + 2 rows): the gather pads and drops the padding.
        "uneven": DataLoader(ds, batch_size=2, sampler=[[4, 0, 1, 2, 3], [6, 5]][rank]),
    }
    result = {}
    for name, loader in loaders.items():
        result[name] = extract_features(nn.Identity(), loader, device="cpu", normalize=False)
    result["half"] = extract_features(
        nn.Identity(), loaders["shuffled"], device="cpu", dtype=torch.float16
    )
    torch.save(result, f"{out_dir}/rank{rank}.pt")


@pytest.mark.ddp
def test_extract_features_gathers_each_sample_once(tmp_path):
    run_on_gloo(_gather_worker, str(tmp_path))
    ds = _Indexed()
    expected = torch.stack([ds[i][0] for i in range(len(ds))])  # [7, 3] in dataset order
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for name in ("sequential", "shuffled", "uneven"):
            feats, labels = got[name]
            assert torch.equal(feats, expected), name
            assert labels.tolist() == [i % 3 for i in range(7)], name
        half, _ = got["half"]
        assert half.dtype == torch.float16
        torch.testing.assert_close(half.float(), F.normalize(expected, dim=1), rtol=1e-3, atol=1e-3)


def test_topk_accuracy_contract():
    scores = torch.tensor([[0.1, 0.7, 0.2], [0.6, 0.3, 0.1]])  # rankings [1, 2, 0], [0, 1, 2]
    assert topk_accuracy(scores, torch.tensor([2, 0]), topk=(1, 2)) == {"top1": 50.0, "top2": 100.0}
    assert topk_accuracy(scores, torch.tensor([0, 2]), topk=(1, 2, 3))["top3"] == 100.0
    with pytest.raises(ValueError, match=r"expected scores \[M, C\] and labels \[M\]"):
        topk_accuracy(scores, torch.tensor([0]))
