"""The CUDA-only paths of a pretraining step: fp32 and NCHW by default, the opt-in bf16 autocast
(fp32 logits and weights, losses that track fp32's) with channels-last, fused SGD, the vectorised
momentum update, no host sync inside a step, and ``TRAIN.COMPILE``. Skipped without a GPU;
``tools/device_check.py`` runs them on one."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from moco_pretrain.config import setup_cfg
from moco_pretrain.engine import AMP_DTYPES, Runner, Task
from moco_pretrain.pretrain import build_moco, build_optimizer, contrastive_step, prepare_model
from tests.tool_loader import load_tool

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

CUDA = torch.device("cuda")
BATCH = 16
SMALL = [
    "MODEL.ARCH", "resnet18", "DATA.IMAGE_SIZE", "32", "SOLVER.BATCH_SIZE", str(BATCH),
    "MODEL.K", "64", "MODEL.MLP", "True", "MODEL.T", "0.2",
]  # fmt: skip


def small_model(*opts: str):
    """(config, MoCo v2 ResNet-18 on the GPU as ``run_pretraining`` prepares it), seeded."""
    cfg = setup_cfg(None, [*SMALL, *opts])
    torch.manual_seed(0)
    return cfg, prepare_model(cfg, build_moco(cfg).to(CUDA), CUDA)


def synthetic_batch() -> tuple[list[torch.Tensor], torch.Tensor]:
    generator = torch.Generator(device=CUDA).manual_seed(0)
    views = [torch.randn(BATCH, 3, 32, 32, device=CUDA, generator=generator) for _ in range(2)]
    return views, torch.zeros(BATCH, dtype=torch.long, device=CUDA)


def test_bf16_autocast_runs_the_encoders_in_bf16_and_the_logits_in_fp32():
    _, model = small_model()
    (im_q, im_k), _ = synthetic_batch()
    reference = model.encoder_q(im_q)  # fp32
    with torch.autocast("cuda", torch.bfloat16):
        features = model.encoder_q(im_q)
        logits, labels = model(im_q, im_k)
    assert features.dtype == torch.bfloat16
    assert F.cosine_similarity(features.float(), reference).min() > 0.99
    assert logits.dtype == torch.float32 and logits.shape == (BATCH, 1 + 64)
    assert model.queue.dtype == torch.float32 and labels.tolist() == [0] * BATCH


FAST = ("TRAIN.AMP_DTYPE", "bf16", "TRAIN.CHANNELS_LAST", "True")  # the opt-in pair


def test_by_default_an_epoch_runs_in_fp32_and_nchw_as_the_official_code(tmp_path):
    cfg, model = small_model("OUTPUT_DIR", str(tmp_path), "SOLVER.EPOCHS", "1")
    task = Task(model, build_optimizer(cfg, model), [synthetic_batch()] * 3, contrastive_step)
    trainer = Runner.from_config(cfg, task, device=CUDA)
    assert trainer.amp_dtype is None and not trainer.channels_last
    assert not model.encoder_q.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert math.isfinite(trainer.train_one_epoch(0)["loss"])


def _losses(*opts: str, steps: int = 3) -> list[float]:
    """The loss of ``steps`` SGD steps from the seeded model on the same batch."""
    cfg, model = small_model(*opts)
    optimizer = build_optimizer(cfg, model)
    dtype = AMP_DTYPES[cfg.TRAIN.AMP_DTYPE]
    losses = []
    for _ in range(steps):
        with torch.autocast("cuda", dtype, enabled=dtype is not None):  # as the engine
            loss, _ = contrastive_step(model, synthetic_batch())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_bf16_channels_last_steps_track_the_fp32_steps():
    """The opt-in pair changes rounding, not the training: each step's InfoNCE loss within 2 % of
    fp32's (bf16 autocast on a CPU, same model and batch: 0.3-0.5 %)."""
    fp32, fast = _losses(), _losses(*FAST)
    assert fp32 != fast  # bf16 really ran
    for reference, value in zip(fp32, fast, strict=True):
        assert value == pytest.approx(reference, rel=0.02)


def test_a_bf16_channels_last_epoch_keeps_fp32_weights_and_fused_sgd_state(tmp_path):
    cfg, model = small_model("OUTPUT_DIR", str(tmp_path), "SOLVER.EPOCHS", "1", *FAST)
    optimizer = build_optimizer(cfg, model)
    task = Task(model, optimizer, [synthetic_batch()] * 3, contrastive_step)
    trainer = Runner.from_config(cfg, task, device=CUDA)
    assert trainer.amp_dtype == torch.bfloat16 and trainer.channels_last
    assert optimizer.defaults["fused"]
    assert model.encoder_q.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    summary = trainer.train_one_epoch(0)
    assert math.isfinite(summary["loss"])
    assert summary["images_per_s"] == pytest.approx(3 * BATCH / summary["seconds"])  # 3 batches
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    buffers = [state["momentum_buffer"] for state in optimizer.state.values()]
    assert len(buffers) == len(list(model.encoder_q.parameters()))  # the key encoder's: no grads
    assert {b.dtype for b in buffers} == {torch.float32}


def test_fused_sgd_equals_the_foreach_implementation():
    cfg, model = small_model()
    copy = {name: p.detach().clone().requires_grad_() for name, p in model.named_parameters()}
    fused = build_optimizer(cfg, model)
    foreach = torch.optim.SGD(copy.values(), **{**fused.defaults, "fused": None, "foreach": True})
    generator = torch.Generator(device=CUDA).manual_seed(0)
    for _ in range(3):  # the first step creates the momentum buffers, later ones use them
        for name, param in model.encoder_q.named_parameters():
            param.grad = torch.randn(param.shape, device=CUDA, generator=generator)
            copy[f"encoder_q.{name}"].grad = param.grad.clone()
        fused.step()
        foreach.step()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param, copy[name], rtol=1e-6, atol=1e-7)


def test_momentum_update_rounds_like_the_official_loop_on_the_gpu():
    _, model = small_model()
    with torch.no_grad():
        for param in model.encoder_q.parameters():
            param.add_(torch.randn_like(param))
    official = load_tool("pretrain_speed").OfficialMoCo._momentum_update_key_encoder
    key_before = {k: v.clone() for k, v in model.encoder_k.state_dict().items()}
    model._momentum_update_key_encoder()
    ours = {k: v.clone() for k, v in model.encoder_k.state_dict().items()}
    model.encoder_k.load_state_dict(key_before)
    official(model)
    for key, value in model.encoder_k.state_dict().items():
        assert torch.equal(value, ours[key]), key


def test_a_training_step_needs_no_host_sync():
    """Forward, loss, backward and the fused step stay on the device (one process, no split
    BN: with ``MODEL.BN_SPLITS`` > 1 the key shuffle copies a CPU permutation to the GPU)."""
    cfg, model = small_model()
    optimizer = build_optimizer(cfg, model)
    batch = synthetic_batch()

    def step() -> None:
        with torch.autocast("cuda", torch.bfloat16):
            loss, _ = contrastive_step(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()  # creates the momentum buffers and runs the cuDNN set-up
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_compiled_encoders_keep_their_keys_and_match_eager():
    _, eager = small_model()
    _, compiled = small_model("TRAIN.COMPILE", "True")
    assert compiled.state_dict().keys() == eager.state_dict().keys()
    (im_q, _), _ = synthetic_batch()
    with torch.no_grad():
        torch.testing.assert_close(
            compiled.encoder_q(im_q), eager.encoder_q(im_q), rtol=1e-3, atol=1e-3
        )
