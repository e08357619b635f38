"""The MoCo model: InfoNCE logits, queue, momentum update, gradients, split BN, checkpoint keys."""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from moco_pretrain import MoCo, build_projection_head
from moco_pretrain.models import build_resnet
from moco_pretrain.split_bn import SplitBatchNorm, convert_split_batchnorm


class TinyEncoder(nn.Module):
    """A BN-free encoder with an ``fc``, as ``base_encoder(num_classes=dim)`` must provide."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.body = nn.Linear(12, 8)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.body(x.flatten(1))))


def tiny_moco(**kwargs) -> MoCo:
    torch.manual_seed(0)
    options = {"dim": 4, "K": 10, "m": 0.9, "T": 0.5} | kwargs
    return MoCo(TinyEncoder, **options)


def test_logits_are_infonce_terms_over_temperature():
    model = tiny_moco()
    x_q, x_k = torch.randn(3, 12), torch.randn(3, 12)
    queue_before = model.queue.clone()
    logits, labels = model(x_q, x_k)
    q = F.normalize(model.encoder_q(x_q), dim=1)
    k = F.normalize(model.encoder_k(x_k), dim=1)  # encoder_k already momentum-updated
    expected = torch.cat([(q * k).sum(1, keepdim=True), q @ queue_before], dim=1) / 0.5
    assert logits.shape == (3, 1 + 10)
    torch.testing.assert_close(logits, expected)
    assert labels.tolist() == [0, 0, 0]


def test_loss_equals_log_k_plus_one_when_all_keys_coincide():
    """q = k and every negative equal to k: all 1+K logits tie, so InfoNCE = log(K+1)."""
    model = tiny_moco(m=1.0)
    x = torch.randn(1, 12)
    with torch.no_grad():
        k = F.normalize(model.encoder_k(x), dim=1)
        model.queue.copy_(k.T.expand(-1, model.K))
    logits, labels = model(x, x)
    loss = F.cross_entropy(logits, labels)
    assert math.isclose(loss.item(), math.log(model.K + 1), rel_tol=1e-6)


def test_loss_of_an_orthogonal_queue_is_analytic():
    """Negatives orthogonal to q = k: logits [1/T, 0, ..., 0], loss = log(1 + K e^{-1/T})."""
    model = tiny_moco(m=1.0, dim=4, K=6, T=0.2)
    x = torch.randn(1, 12)
    with torch.no_grad():
        k = F.normalize(model.encoder_k(x), dim=1)[0]
        ortho = torch.linalg.svd(k[None, :]).Vh[1]  # a unit vector orthogonal to k
        model.queue.copy_(ortho[:, None].expand(-1, model.K))
    logits, labels = model(x, x)
    torch.testing.assert_close(logits[0, 0], torch.tensor(1 / 0.2))
    torch.testing.assert_close(logits[0, 1:], torch.zeros(6), atol=1e-6, rtol=0)
    expected = math.log(1 + 6 * math.exp(-1 / 0.2))
    assert math.isclose(F.cross_entropy(logits, labels).item(), expected, rel_tol=1e-5)


def test_queue_is_a_ring_buffer_for_any_batch_size():
    model = tiny_moco(K=10)
    written = []
    for step in range(3):  # 4 + 4 + 4 keys: the third write wraps to slots 8, 9, 0, 1
        x = torch.randn(4, 12)
        model(x, x + 0.01 * step)
        written.append(model.queue.clone())
        expected_ptr = (4 * (step + 1)) % 10
        assert model.queue_ptr.tolist() == [expected_ptr]
    third_keys = written[2][:, [8, 9, 0, 1]]
    torch.testing.assert_close(written[2][:, 2:8], written[1][:, 2:8])  # untouched slots
    assert not torch.allclose(third_keys, written[1][:, [8, 9, 0, 1]])
    torch.testing.assert_close(third_keys.norm(dim=0), torch.ones(4))  # normalised keys


def test_batch_larger_than_queue_is_rejected():
    model = tiny_moco(K=4)
    with pytest.raises(ValueError, match="exceeds the queue size K=4"):
        model(torch.randn(5, 12), torch.randn(5, 12))


@pytest.mark.parametrize("bad", [{"K": 0}, {"m": 1.5}, {"T": 0.0}, {"bn_splits": 0}])
def test_invalid_hyperparameters_raise_at_construction(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        tiny_moco(**bad)


def test_momentum_update_formula_and_no_gradient_to_keys():
    model = tiny_moco(m=0.9)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(3):  # move encoder_q away from encoder_k
        x = torch.randn(4, 12)
        logits, labels = model(x, x.flip(0))
        optimizer.zero_grad()
        F.cross_entropy(logits, labels).backward()
        optimizer.step()
    assert all(p.grad is None and not p.requires_grad for p in model.encoder_k.parameters())
    q_before = [p.detach().clone() for p in model.encoder_q.parameters()]
    k_before = [p.detach().clone() for p in model.encoder_k.parameters()]
    model(torch.randn(2, 12), torch.randn(2, 12))
    for p_k, k0, q0 in zip(model.encoder_k.parameters(), k_before, q_before, strict=True):
        assert torch.equal(p_k, k0 * 0.9 + q0 * (1 - 0.9))  # the official rounding, bit for bit


def test_key_encoder_starts_as_a_copy():
    model = tiny_moco()
    for p_q, p_k in zip(model.encoder_q.parameters(), model.encoder_k.parameters(), strict=True):
        assert torch.equal(p_q, p_k)


def test_state_dict_keys_match_the_official_layout():
    model = MoCo(torchvision.models.resnet18, 128, 64, 0.999, 0.2, True)
    keys = set(model.state_dict())
    for encoder in ("encoder_q", "encoder_k"):
        assert {
            f"{encoder}.fc.0.weight",
            f"{encoder}.fc.2.bias",
            f"{encoder}.layer4.1.bn2.running_var",
        } <= keys
    assert {"queue", "queue_ptr"} <= keys
    assert model.queue.shape == (128, 64)
    v1 = MoCo(torchvision.models.resnet18, 128, 64)
    assert {"encoder_q.fc.weight", "encoder_q.fc.bias"} <= set(v1.state_dict())


def test_projection_heads():
    assert isinstance(build_projection_head(512, 128, mlp=False), nn.Linear)
    mlp = build_projection_head(512, 128, mlp=True)
    assert [type(m) for m in mlp] == [nn.Linear, nn.ReLU, nn.Linear]
    assert mlp[0].weight.shape == (512, 512) and mlp[2].weight.shape == (128, 512)


def test_small_stem_keeps_parameter_names():
    standard, small = build_resnet("resnet18"), build_resnet("resnet18", small_stem=True)
    assert set(standard.state_dict()) == set(small.state_dict())
    assert small.conv1.weight.shape == (64, 3, 3, 3) and isinstance(small.maxpool, nn.Identity)
    assert small(torch.randn(2, 3, 32, 32)).shape == (2, 1000)
    with pytest.raises(ValueError, match="unknown ResNet"):
        build_resnet("vit_b_16")


def test_split_batchnorm_normalises_each_sub_batch():
    torch.manual_seed(0)
    bn = SplitBatchNorm(3, num_splits=2, momentum=0.1)
    x = torch.randn(8, 3, 5, 5) * 3 + 1
    out = bn(x)
    for s in range(2):  # sample n belongs to sub-batch n % 2
        sub = x[s::2]
        expected = (sub - sub.mean((0, 2, 3), keepdim=True)) / torch.sqrt(
            sub.var((0, 2, 3), unbiased=False, keepdim=True) + bn.eps
        )
        torch.testing.assert_close(out[s::2], expected, atol=1e-5, rtol=1e-5)
    sub_means = torch.stack([x[s::2].mean((0, 2, 3)) for s in range(2)])
    torch.testing.assert_close(bn.running_mean, 0.1 * sub_means.mean(0))
    bn.eval()
    reference = nn.BatchNorm2d(3)
    reference.load_state_dict(bn.state_dict())
    reference.eval()
    torch.testing.assert_close(bn(x), reference(x))
    with pytest.raises(ValueError, match="cannot be split into 2"):
        bn.train()(torch.randn(3, 3, 2, 2))


def test_split_bn_model_shuffles_keys_and_converts_every_bn():
    torch.manual_seed(0)
    model = MoCo(functools.partial(build_resnet, "resnet18", small_stem=True), 16, 32, bn_splits=4)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(isinstance(m, SplitBatchNorm) and m.num_splits == 4 for m in bns)
    converted = convert_split_batchnorm(torchvision.models.resnet18(), num_splits=2)
    assert set(converted.state_dict()) == set(torchvision.models.resnet18().state_dict())
    logits, _ = model(torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16))
    assert logits.shape == (8, 33) and torch.isfinite(logits).all()
