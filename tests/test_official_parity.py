"""Numerical parity with the official implementation (facebookresearch/moco, commit 78b69ca).

The official code is not vendored: point ``MOCO_REFERENCE_DIR`` at a checkout of it (the folder
holding ``moco/builder.py``) to run this test. It runs the official model on a 1-process gloo
group (its ``.cuda()`` calls made no-ops) and ours with the same weights and inputs through several
SGD steps, and compares logits, labels, both encoders, the queue and its pointer.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from moco_pretrain import MoCo
from moco_pretrain.models import build_resnet

from .distributed_utils import run_on_gloo

REFERENCE = os.environ.get("MOCO_REFERENCE_DIR", "")
pytestmark = pytest.mark.skipif(
    not (REFERENCE and (Path(REFERENCE) / "moco" / "builder.py").is_file()),
    reason="set MOCO_REFERENCE_DIR to a checkout of facebookresearch/moco@78b69ca to compare",
)


def _official_builder():
    spec = importlib.util.spec_from_file_location(
        "official_moco_builder", Path(REFERENCE) / "moco" / "builder.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _compare(rank: int, mlp: bool) -> None:
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # the official code moves to CUDA
    encoder = functools.partial(build_resnet, "resnet18", small_stem=True)
    torch.manual_seed(0)
    official = _official_builder().MoCo(encoder, 32, 24, 0.99, 0.2, mlp)
    ours = MoCo(encoder, 32, 24, 0.99, 0.2, mlp)
    ours.load_state_dict(official.state_dict())  # same weights and queue, key for key
    opt_official = torch.optim.SGD(official.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    opt_ours = torch.optim.SGD(ours.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    for step in range(4):  # 4 x 8 keys into K=24 slots: the queue wraps (K % 8 == 0, as official)
        im_q, im_k = torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)
        results = []
        for model, optimizer in ((official, opt_official), (ours, opt_ours)):
            torch.manual_seed(100 + step)  # same shuffle permutation
            logits, labels = model(im_q, im_k)
            loss = F.cross_entropy(logits, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            results.append((logits.detach(), labels))
        (logits_a, labels_a), (logits_b, labels_b) = results
        assert torch.equal(labels_a, labels_b)
        torch.testing.assert_close(logits_b, logits_a, rtol=1e-5, atol=1e-5)
    state_a, state_b = official.state_dict(), ours.state_dict()
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        torch.testing.assert_close(state_b[key], state_a[key], rtol=1e-5, atol=1e-5, msg=key)
    assert torch.equal(state_a["queue_ptr"], state_b["queue_ptr"])


@pytest.mark.ddp
@pytest.mark.parametrize("mlp", [False, True], ids=["v1", "v2"])
def test_same_numerics_as_the_official_moco(mlp):
    run_on_gloo(_compare, mlp, world_size=1)
