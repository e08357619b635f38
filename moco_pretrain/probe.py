"""A linear probe on frozen, precomputed features: a seconds-long companion of the kNN monitor.

Multinomial logistic regression on standardised pooled features (full batch, L-BFGS), with the L2
weight chosen on a held-out part of the training features, then refitted on all of them. This is
not the official linear-classification protocol (:mod:`moco_pretrain.lincls`: 100 epochs of SGD
with random-resized-crop augmentation on the frozen backbone); it reads the same features as the
kNN evaluation, without augmentation, so that a run can report both at the cost of one extraction.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["linear_probe"]


def _fit(
    x: torch.Tensor, y: torch.Tensor, *, num_classes: int, weight_decay: float, max_iter: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights ``[D, C]`` and bias ``[C]`` minimising mean cross-entropy + wd/2 * ||W||^2."""
    weight = torch.zeros(x.shape[1], num_classes, dtype=x.dtype, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=x.dtype, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias], lr=1, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight + bias, y) + weight_decay / 2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach(), bias.detach()


def _top1(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> float:
    return 100.0 * float(((x @ weight + bias).argmax(dim=1) == y).float().mean())


def linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    num_classes: int,
    weight_decays: Sequence[float] = (1e-4, 1e-3, 1e-2),
    val_fraction: float = 1 / 6,
    max_iter: int = 100,
    seed: int = 0,
) -> dict[str, float]:
    """Test top-1 (%) of a linear classifier whose L2 weight is chosen on held-out train features.

    Args:
        train_features: ``[N, D]`` features of the labelled training images (not normalised).
        train_labels: ``[N]`` their classes.
        test_features: ``[M, D]`` features of the test images.
        test_labels: ``[M]`` their classes.
        num_classes: C.
        weight_decays: candidate L2 weights; the one with the best held-out top-1 is refitted on
            all training features (ties: the first).
        val_fraction: share of the training features held out to choose the weight.
        max_iter: L-BFGS iterations per fit.
        seed: seed of the held-out split.

    Returns:
        ``{"top1": test top-1, "val_top1": its held-out top-1, "weight_decay": the chosen one}``.
    """
    x = train_features.detach().float().cpu()
    y = train_labels.detach().long().cpu()
    mean, std = x.mean(dim=0), x.std(dim=0).clamp_min(1e-6)  # [D]; from training features only
    x = (x - mean) / std
    test_x = (test_features.detach().float().cpu() - mean) / std
    test_y = test_labels.detach().long().cpu()

    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    held = order[: max(1, int(len(x) * val_fraction))]
    fit = order[len(held) :]
    scores = []
    for wd in weight_decays:
        weight, bias = _fit(
            x[fit], y[fit], num_classes=num_classes, weight_decay=wd, max_iter=max_iter
        )
        scores.append(_top1(x[held], y[held], weight, bias))
    best = max(range(len(scores)), key=scores.__getitem__)
    weight, bias = _fit(
        x, y, num_classes=num_classes, weight_decay=weight_decays[best], max_iter=max_iter
    )
    return {
        "top1": _top1(test_x, test_y, weight, bias),
        "val_top1": scores[best],
        "weight_decay": weight_decays[best],
    }
