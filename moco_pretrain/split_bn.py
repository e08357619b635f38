"""Split batch normalisation: BN statistics over sub-batches, to emulate multi-GPU BN in one process.

Shuffle-BN needs the query and key batches to be normalised over *different* groups of samples;
otherwise the model can "cheat" by recognising the positive through shared batch statistics
(MoCo, Sec. 3.3). With one GPU the MoCo authors emulate several GPUs by splitting the batch into
``num_splits`` sub-batches that each get their own statistics (their one-GPU CIFAR recipe). Running
statistics are averaged over the splits, and evaluation behaves exactly like ``nn.BatchNorm2d``,
whose state-dict keys are kept.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SplitBatchNorm(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose training statistics are computed over ``num_splits`` sub-batches.

    Sample ``n`` of a batch falls into sub-batch ``n % num_splits``.
    """

    def __init__(self, num_features: int, *, num_splits: int, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        if num_splits < 1:
            raise ValueError(f"num_splits must be >= 1, got {num_splits}")
        if self.momentum is None:
            raise ValueError(
                "SplitBatchNorm needs a fixed momentum (cumulative averaging unsupported)"
            )
        self.num_splits = num_splits

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training or self.num_splits == 1:
            return super().forward(input)
        n, c, h, w = input.shape
        splits = self.num_splits
        if n % splits:
            raise ValueError(f"batch of {n} samples cannot be split into {splits} BN sub-batches")
        running_mean = self.running_mean.repeat(splits)  # (S*C)
        running_var = self.running_var.repeat(splits)  # (S*C)
        out = F.batch_norm(
            input.reshape(n // splits, c * splits, h, w),
            running_mean,
            running_var,
            self.weight.repeat(splits),
            self.bias.repeat(splits),
            True,
            self.momentum,
            self.eps,
        ).reshape(n, c, h, w)
        with torch.no_grad():
            self.running_mean.copy_(running_mean.view(splits, c).mean(dim=0))
            self.running_var.copy_(running_var.view(splits, c).mean(dim=0))
            self.num_batches_tracked.add_(1)
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_splits={self.num_splits}"


def convert_split_batchnorm(module: nn.Module, *, num_splits: int) -> nn.Module:
    """Replace every ``nn.BatchNorm2d`` in ``module`` by a ``SplitBatchNorm`` with the same state."""
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, SplitBatchNorm):
        split = SplitBatchNorm(
            module.num_features,
            num_splits=num_splits,
            eps=module.eps,
            momentum=module.momentum,
            affine=module.affine,
            track_running_stats=module.track_running_stats,
        )
        split.load_state_dict(module.state_dict())
        return split.to(device=module.weight.device if module.affine else None)
    for name, child in module.named_children():
        setattr(module, name, convert_split_batchnorm(child, num_splits=num_splits))
    return module
