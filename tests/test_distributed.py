"""Collectives and Shuffle-BN on a real 2-process gloo group, and their one-process paths."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from moco_pretrain import MoCo
from moco_pretrain.distributed import concat_all_gather, get_rank, get_world_size

from .distributed_utils import run_on_gloo
from .test_builder import TinyEncoder


class BNEncoder(nn.Module):
    """A tiny encoder with batch norm, so Shuffle-BN matters."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1)
        )
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x):
        return self.fc(self.body(x).flatten(1))


def test_one_process_collectives_are_identities():
    x = torch.randn(3, 2)
    assert get_world_size() == 1 and get_rank() == 0
    assert concat_all_gather(x) is x


def _gather_and_shuffle(rank: int) -> None:
    x = torch.full((3, 2), float(rank))
    gathered = concat_all_gather(x)
    assert gathered.tolist() == [[0.0, 0.0]] * 3 + [[1.0, 1.0]] * 3

    torch.manual_seed(rank)  # different RNG per rank: the permutation must come from rank 0
    model = MoCo(TinyEncoder, dim=4, K=12)
    batch = torch.arange(3 * 12, dtype=torch.float32).view(3, 12) + 100 * rank
    shuffled, idx_unshuffle = model._batch_shuffle(batch)
    all_shuffled = concat_all_gather(shuffled)
    all_batches = concat_all_gather(batch)
    # The shuffled global batch is a permutation of the global batch ...
    assert sorted(all_shuffled[:, 0].tolist()) == sorted(all_batches[:, 0].tolist())
    # ... the same on every rank (broadcast from rank 0) ...
    assert torch.equal(concat_all_gather(idx_unshuffle), idx_unshuffle.repeat(2))
    # ... and unshuffling restores this rank's own samples in order.
    assert torch.equal(model._batch_unshuffle(shuffled, idx_unshuffle), batch)


def _ddp_training_step(rank: int) -> None:
    torch.manual_seed(0)  # same initial weights and queue on both ranks, as DDP requires
    model = MoCo(BNEncoder, dim=8, K=16, m=0.99, T=0.2, mlp=True)
    ddp = nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    torch.manual_seed(100 + rank)  # each rank gets its own images
    im_q, im_k = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    logits, labels = ddp(im_q, im_k)
    loss = F.cross_entropy(logits, labels)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    assert logits.shape == (4, 17) and torch.isfinite(loss)
    # The queue received the keys of both ranks (2 x 4) and is identical everywhere.
    assert model.queue_ptr.tolist() == [8]
    assert torch.equal(concat_all_gather(model.queue[None]), model.queue[None].repeat(2, 1, 1))
    # Gradients were averaged: the query encoders are still identical after the step.
    flat = torch.cat([p.detach().flatten() for p in model.encoder_q.parameters()])
    assert torch.equal(concat_all_gather(flat[None])[0], concat_all_gather(flat[None])[1])
    assert all(p.grad is None for p in model.encoder_k.parameters())


@pytest.mark.ddp
def test_gather_shuffle_unshuffle_on_two_processes():
    run_on_gloo(_gather_and_shuffle)


@pytest.mark.ddp
def test_full_ddp_training_step_on_two_processes():
    run_on_gloo(_ddp_training_step)


def _pretrain_two_processes(rank: int, data_root: str, output_dir: str) -> None:
    from moco_pretrain.checkpoint import load_checkpoint
    from moco_pretrain.pretrain import run_pretraining

    from .test_training import tiny_cfg

    options = ("SOLVER.EPOCHS", "1", "MODEL.BN_SPLITS", "1", "MODEL.K", "24")
    summary = run_pretraining(tiny_cfg(data_root, output_dir, *options))
    dist.barrier()
    checkpoint = load_checkpoint(summary["checkpoint"])
    assert len(checkpoint["rng"]) == 2  # each rank's RNG state, for an exact resume
    # 64 images, global batch 8 (4 per process): 8 iterations enqueue 64 keys into K=24 slots.
    assert checkpoint["state_dict"]["module.queue_ptr"].tolist() == [64 % 24]


@pytest.mark.ddp
@pytest.mark.slow  # a whole task on two processes
def test_pretraining_run_on_two_processes(tiny_imagefolder, tmp_path):
    """The whole engine under torchrun-like env://: DDP, sharded sampler, one checkpoint writer."""
    run_on_gloo(_pretrain_two_processes, str(tiny_imagefolder), str(tmp_path))
    assert sorted(p.name for p in tmp_path.glob("*.pth.tar")) == ["checkpoint_0000.pth.tar"]
