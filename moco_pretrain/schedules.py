"""Learning-rate schedules as small pure functions of the epoch (applied once per epoch)."""

from __future__ import annotations

import math
from collections.abc import Sequence


def step_lr(base_lr: float, epoch: int, *, steps: Sequence[int], gamma: float = 0.1) -> float:
    """``base_lr`` times ``gamma`` for every milestone in ``steps`` that ``epoch`` has reached."""
    return base_lr * gamma ** sum(epoch >= milestone for milestone in steps)


def cosine_lr(base_lr: float, epoch: int, *, epochs: int) -> float:
    """Half-cosine decay from ``base_lr`` at epoch 0 towards 0 at ``epochs`` (MoCo v2 ``--cos``)."""
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))


def lr_at_epoch(
    base_lr: float, epoch: int, *, schedule: str, epochs: int, steps: Sequence[int], gamma: float
) -> float:
    if schedule == "step":
        return step_lr(base_lr, epoch, steps=steps, gamma=gamma)
    if schedule == "cos":
        return cosine_lr(base_lr, epoch, epochs=epochs)
    raise ValueError(f"unknown lr schedule {schedule!r} (expected 'step' or 'cos')")


def scaled_lr(base_lr: float, batch_size: int, *, reference_batch: int = 256) -> float:
    """Linear scaling rule (Goyal et al. 2017): ``base_lr`` is the lr for ``reference_batch``."""
    return base_lr * batch_size / reference_batch
