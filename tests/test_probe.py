"""The logistic probe on frozen features: separable data, invariance to feature scale, held-out choice."""

from __future__ import annotations

import torch

from moco_pretrain.evaluation import logistic_probe


def clusters(n_per_class: int, *, spread: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """3 classes around orthogonal centres in 8 dimensions."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(3).repeat_interleave(n_per_class)
    centres = torch.eye(8)[:3] * 4
    return centres[labels] + spread * torch.randn(len(labels), 8, generator=g), labels


def test_separable_clusters_are_classified_perfectly():
    x, y = clusters(100, spread=0.3, seed=0)
    test_x, test_y = clusters(50, spread=0.3, seed=1)
    result = logistic_probe(x, y, test_x, test_y, num_classes=3)
    assert result["top1"] == 100.0 and result["val_top1"] == 100.0


def test_the_probe_standardises_features_so_scale_and_offset_do_not_matter():
    x, y = clusters(100, spread=2.0, seed=0)  # overlapping: accuracy well below 100 %
    test_x, test_y = clusters(100, spread=2.0, seed=1)
    plain = logistic_probe(x, y, test_x, test_y, num_classes=3)
    scaled = logistic_probe(1000 * x + 7, y, 1000 * test_x + 7, test_y, num_classes=3)
    assert plain["top1"] < 100.0
    assert scaled["top1"] == plain["top1"] and scaled["weight_decay"] == plain["weight_decay"]


def test_the_weight_is_chosen_on_held_out_training_features_not_on_test():
    x, y = clusters(100, spread=2.0, seed=0)
    test_x, test_y = clusters(100, spread=2.0, seed=1)
    shuffled = test_y[torch.randperm(len(test_y), generator=torch.Generator().manual_seed(0))]
    honest = logistic_probe(x, y, test_x, test_y, num_classes=3, weight_decays=(1e-4, 10.0))
    scrambled = logistic_probe(x, y, test_x, shuffled, num_classes=3, weight_decays=(1e-4, 10.0))
    # the test labels change the test score but never the choice or its held-out score
    assert scrambled["weight_decay"] == honest["weight_decay"]
    assert scrambled["val_top1"] == honest["val_top1"]
    assert scrambled["top1"] != honest["top1"]
