"""PreciseBN under several processes: every process ends with the same BN statistics.

fvcore's ``update_bn_stats`` weights each batch by its size on that process; with images of other
shapes on each process the statistics differ (detectron2#5398), so each process would evaluate
another model. ``transfer.train_net`` averages them over the processes right after PreciseBN.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from torch import nn

pytest.importorskip("detectron2")

from fvcore.nn.precise_bn import update_bn_stats  # noqa: E402

from transfer.train_net import AverageBNStatistics  # noqa: E402

from .distributed_utils import run_on_gloo  # noqa: E402


def _statistics(bn: nn.BatchNorm2d) -> list[torch.Tensor]:
    """This process's running mean and variance, and every process's."""
    local = torch.cat([bn.running_mean, bn.running_var])
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    return gathered


def _precise_bn_then_average(rank: int) -> None:
    torch.manual_seed(0)  # the same weights in both processes
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train()
    bn = model[1]
    generator = torch.Generator().manual_seed(rank)
    size = 10 + 6 * rank  # other image shapes per process, as detection batches have
    batches = [torch.randn(2, 3, size, size, generator=generator) + rank for _ in range(3)]
    update_bn_stats(model, batches, num_iters=3)
    before = _statistics(bn)
    assert not torch.allclose(before[0], before[1])  # the bug: each process has its own

    hook = AverageBNStatistics(period=0, bn_layers=[bn])
    hook.trainer = SimpleNamespace(iter=3, max_iter=10)  # not the last iteration: nothing
    hook.after_step()
    assert torch.equal(_statistics(bn)[rank], before[rank])
    hook.trainer = SimpleNamespace(iter=9, max_iter=10)  # the last iteration: averaged
    hook.after_step()
    after = _statistics(bn)
    assert torch.equal(after[0], after[1])
    # pooled as one population of two equal parts: E[mean], E[var + mean^2] - E[mean]^2
    (m0, v0), (m1, v1) = (b.split(4) for b in before)
    mean = (m0 + m1) / 2
    torch.testing.assert_close(
        after[rank], torch.cat([mean, (v0 + m0**2 + v1 + m1**2) / 2 - mean**2])
    )


@pytest.mark.ddp
@pytest.mark.slow  # two processes
def test_every_process_ends_precise_bn_with_the_same_statistics():
    run_on_gloo(_precise_bn_then_average)
