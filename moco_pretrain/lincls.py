"""Linear classification on frozen features, the MoCo evaluation protocol.

Protocol of the official ``main_lincls.py`` (He et al. 2020, section 4.1): a ResNet whose pretrained
backbone is frozen *and kept in eval mode* (BN statistics are part of the model and must not move),
a new ``fc`` initialised N(0, 0.01) with zero bias, SGD (momentum 0.9, weight decay 0) on ``fc``
only, lr 30 for batch 256, 100 epochs with lr x0.1 at epochs 60 and 80, RandomResizedCrop + flip
for training, resize + centre crop for validation, top-1/top-5. The classifier is a plain
torchvision ResNet, so its checkpoint is an ordinary classifier state dict (``module.`` names).

Deviations from the official script, on purpose:

* The lr follows the linear scaling rule of pretraining (``SOLVER.BASE_LR`` is per 256 images);
  at the protocol's batch of 256 it is the official lr.
* Under DDP the official script evaluates the whole validation set on every rank; here each rank
  evaluates a shard and the logits are gathered, each image counted once (same numbers, W x less
  work).
* The sanity check compares against the backbone as loaded (any supported checkpoint layout) after
  the first epoch, after a resume and at the end; the official one re-reads the MoCo file once.
* ``results.json`` reports the last epoch's top-1/top-5 (the official script prints, and saves the
  model of, the best epoch; ``best_top1`` is reported as well).
* On CUDA the training forward runs under the engine's autocast (``TRAIN.AMP_DTYPE``, bf16 by
  default; ``""`` gives the official fp32); validation always runs in fp32.
* The official script saves a checkpoint every epoch and copies the best one; here the engine's
  ``checkpoint_NNNN.pth.tar`` files (atomic, ``TRAIN.KEEP_LAST``) and an atomic
  ``model_best.pth.tar``.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from fvcore.common.config import CfgNode
from torch import nn
from torch.utils.data import DataLoader

from .checkpoint import atomic_save, atomic_write_json, load_checkpoint, with_ddp_prefix
from .data import (
    build_dataset,
    build_eval_loader,
    build_train_loader,
    limit_samples,
    linear_train_transform,
    num_classes_of,
)
from .distributed import (
    get_world_size,
    is_main_process,
    per_process_batch_size,
)
from .engine import Trainer, build_trainer, logger, start_run, unwrap, wrap_distributed
from .knn import extract_features, topk_accuracy
from .models import build_backbone, build_resnet
from .schedules import scaled_lr
from .weights import BackboneWeights, load_backbone_state_dict

INIT_STD = 0.01  # std of the new linear layer's weights (official protocol)
BEST_CHECKPOINT = "model_best.pth.tar"
RESULTS_FILE = "results.json"


class FrozenBackboneError(RuntimeError):
    """A backbone tensor (parameter or BN buffer) changed during linear classification."""


# ------------------------------------------------------------------ frozen pretrained backbone
def load_pretrained(
    cfg: CfgNode, path: str | Path, *, prefix: str | None = None
) -> BackboneWeights:
    """The backbone of checkpoint ``path`` (any layout :mod:`moco_pretrain.weights` reads).

    Raises:
        ValueError: the checkpoint records an ``arch`` other than ``cfg.MODEL.ARCH``.
    """
    weights = load_backbone_state_dict(path, prefix=prefix)
    recorded = weights.meta.get("arch")
    if recorded and recorded != cfg.MODEL.ARCH:
        raise ValueError(
            f"{path} holds a {recorded} backbone but MODEL.ARCH is {cfg.MODEL.ARCH}:"
            f" set MODEL.ARCH {recorded}"
        )
    logger.info(
        "pretrained backbone: %s (layout %s, sha256 %s, %d tensors)",
        path, weights.layout, weights.meta["sha256"][:12], len(weights.state_dict),
    )  # fmt: skip
    return weights


def _load_into(model: nn.Module, weights: BackboneWeights, *, head: set[str]) -> None:
    """Load the backbone strictly: only the ``head`` keys may be missing, nothing unexpected."""
    try:
        result = model.load_state_dict(weights.state_dict, strict=False)
    except RuntimeError as err:  # shape mismatch, e.g. SMALL_STEM or ARCH differ
        raise ValueError(
            f"{weights.meta['path']} does not fit the configured backbone (check MODEL.ARCH and"
            f" MODEL.SMALL_STEM): {err}"
        ) from None
    if set(result.missing_keys) != head or result.unexpected_keys:
        raise ValueError(
            f"{weights.meta['path']}: backbone keys do not match the model: missing"
            f" {sorted(set(result.missing_keys) - head)[:10]}, unexpected"
            f" {sorted(result.unexpected_keys)[:10]}"
        )


def build_frozen_backbone(cfg: CfgNode, weights: BackboneWeights) -> nn.Module:
    """The pretrained ResNet returning pooled features ``[B, D]``, frozen, in eval mode."""
    model = build_backbone(cfg.MODEL.ARCH, small_stem=cfg.MODEL.SMALL_STEM)
    _load_into(model, weights, head=set())
    return model.requires_grad_(False).eval()


def build_linear_classifier(
    cfg: CfgNode, weights: BackboneWeights, *, num_classes: int
) -> nn.Module:
    """A torchvision ResNet: pretrained frozen backbone, new ``fc`` ~ N(0, 0.01), zero bias."""
    model = build_resnet(cfg.MODEL.ARCH, num_classes=num_classes, small_stem=cfg.MODEL.SMALL_STEM)
    _load_into(model, weights, head={"fc.weight", "fc.bias"})
    for name, param in model.named_parameters():
        param.requires_grad = name in ("fc.weight", "fc.bias")
    nn.init.normal_(model.fc.weight, mean=0.0, std=INIT_STD)
    nn.init.zeros_(model.fc.bias)
    return model


def check_backbone_unchanged(model: nn.Module, reference: dict[str, torch.Tensor]) -> None:
    """Every backbone tensor of ``model`` (all but ``fc.*``) equals ``reference`` exactly.

    Raises:
        FrozenBackboneError: naming the changed (or missing) tensors, e.g. BN running statistics
            updated because the backbone ran in training mode.
    """
    state = {k: v for k, v in unwrap(model).state_dict().items() if not k.startswith("fc.")}
    changed = sorted(
        k for k, v in state.items() if k not in reference or not torch.equal(v.cpu(), reference[k])
    )
    missing = sorted(set(reference) - set(state))
    if changed or missing:
        raise FrozenBackboneError(
            f"the frozen backbone changed during linear classification: {len(changed)} tensors"
            f" differ from the pretrained ones {changed[:10]}, missing {missing[:10]}"
        )
    logger.info("sanity check passed: all %d backbone tensors unchanged", len(state))


# ------------------------------------------------------------------ data, step, evaluation
def build_lincls_train_loader(cfg: CfgNode) -> DataLoader:
    transform = linear_train_transform(
        size=cfg.DATA.IMAGE_SIZE, mean=cfg.DATA.MEAN, std=cfg.DATA.STD
    )
    dataset = build_dataset(cfg, split=cfg.DATA.TRAIN_SPLIT, transform=transform)
    return build_train_loader(
        limit_samples(dataset, cfg.DATA.MAX_SAMPLES),
        batch_size=per_process_batch_size(cfg.SOLVER.BATCH_SIZE),
        seed=cfg.SEED,
        num_workers=cfg.DATA.NUM_WORKERS,
        drop_last=False,
    )


def linear_step(model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Cross-entropy of the linear classifier and the batch's top-1 (%)."""
    images, target = batch  # images: Bx3xHxW, target: B
    logits = model(images)  # logits: BxC
    loss = F.cross_entropy(logits, target)
    return loss, {"acc1": (logits.argmax(dim=1) == target).float().mean() * 100}


def evaluate(model: nn.Module, loader: DataLoader, *, device: torch.device) -> dict[str, float]:
    """Top-1/top-5 (%) over ``loader``'s dataset, each image once (logits gathered under DDP)."""
    logits, labels = extract_features(unwrap(model), loader, device=device, normalize=False)
    return topk_accuracy(logits, labels, topk=(1, 5))  # logits: NxC, labels: N


def write_results(
    output_dir: str | Path,
    *,
    task: str,
    metrics: dict[str, float],
    cfg: CfgNode,
    weights: BackboneWeights | None = None,
    **extra: Any,
) -> Path:
    """``results.json``: ``task``, ``metrics``, the resolved ``config``, any ``extra`` entries and,
    for pretrained ``weights``, their ``checkpoint`` path, ``checkpoint_sha256`` and ``layout``."""
    result: dict[str, Any] = {"task": task, "metrics": metrics}
    if weights is not None:
        result.update(
            checkpoint=str(Path(weights.meta["path"]).resolve()),
            checkpoint_sha256=weights.meta["sha256"],
            layout=weights.layout,
        )
    result.update(config=yaml.safe_load(cfg.dump()), **extra)
    path = Path(output_dir) / RESULTS_FILE
    atomic_write_json(path, result)
    return path


# ------------------------------------------------------------------ the run
def build_lincls_trainer(
    cfg: CfgNode, model: nn.Module, *, loader: DataLoader, device: torch.device
) -> Trainer:
    """SGD on ``fc`` only, (DDP,) and the shared :class:`Trainer` with the whole model in eval mode."""
    if device.type == "cuda" and cfg.TRAIN.CHANNELS_LAST:
        model.to(memory_format=torch.channels_last)
    if cfg.TRAIN.COMPILE:
        model.compile()
    params = [p for p in model.parameters() if p.requires_grad]  # fc.weight, fc.bias
    lr = scaled_lr(cfg.SOLVER.BASE_LR, cfg.SOLVER.BATCH_SIZE)
    optimizer = torch.optim.SGD(
        params, lr, momentum=cfg.SOLVER.MOMENTUM, weight_decay=cfg.SOLVER.WEIGHT_DECAY
    )
    train_model = wrap_distributed(model, device)
    logger.info(
        "linear classification: %d processes x %d images = batch %d, lr %.4g (= %.4g x %d / 256)",
        get_world_size(), loader.batch_size, cfg.SOLVER.BATCH_SIZE, lr, cfg.SOLVER.BASE_LR,
        cfg.SOLVER.BATCH_SIZE,
    )  # fmt: skip
    return build_trainer(
        cfg, model=train_model, optimizer=optimizer, loader=loader,
        step_fn=functools.partial(linear_step, train_model), device=device,
        train_mode=train_model.eval,  # the whole model, BN included, stays in eval mode
    )  # fmt: skip


def run_lincls(
    cfg: CfgNode,
    *,
    pretrained: str | Path,
    prefix: str | None = None,
    resume: str | Path | None = None,
    evaluate_only: bool = False,
) -> dict[str, Any]:
    """Train (or with ``evaluate_only``, only evaluate) a linear classifier on frozen features.

    Validates after every epoch, keeps ``model_best.pth.tar``, checks the backbone after the first
    epoch, after a resume and at the end. Returns the essentials of ``OUTPUT_DIR/results.json``
    (written by rank 0).
    """
    device = start_run(cfg)
    output_dir = Path(cfg.OUTPUT_DIR)
    weights = load_pretrained(cfg, pretrained, prefix=prefix)
    reference = {k: v.clone() for k, v in weights.state_dict.items()}  # for the sanity check
    loader = build_lincls_train_loader(cfg)
    val_loader = build_eval_loader(
        cfg, split=cfg.DATA.VAL_SPLIT, batch_size=per_process_batch_size(cfg.SOLVER.BATCH_SIZE)
    )
    model = build_linear_classifier(cfg, weights, num_classes=num_classes_of(loader.dataset))
    model = model.to(device)
    trainer = build_lincls_trainer(cfg, model, loader=loader, device=device)
    resume = resume or (cfg.TRAIN.AUTO_RESUME and trainer.checkpointer.last_checkpoint())
    if resume:
        trainer.resume(resume)
        try:
            check_backbone_unchanged(model, reference)
        except FrozenBackboneError as err:
            raise FrozenBackboneError(
                f"{resume} holds a classifier trained on other pretrained weights than"
                f" {pretrained}: {err}"
            ) from None
    elif evaluate_only:
        raise ValueError(
            "--evaluate needs a trained classifier: pass --resume or use the OUTPUT_DIR of a run"
        )
    best_path = output_dir / BEST_CHECKPOINT
    best = {"top1": load_checkpoint(best_path)["best_acc1"]} if best_path.is_file() else {}
    history: list[dict[str, float]] = []

    def validate(epoch: int) -> None:
        metrics = evaluate(model, val_loader, device=device)
        history.append({"epoch": epoch + 1, **metrics})
        logger.info("epoch %d: val top-1 %.2f %%, top-5 %.2f %%", epoch + 1, *metrics.values())
        if trainer.writer:
            for name, value in metrics.items():
                trainer.writer.add_scalar(f"val/{name}", value, epoch + 1)
        if epoch == trainer.start_epoch:
            check_backbone_unchanged(model, reference)
        if metrics["top1"] > best.get("top1", -1.0):
            best["top1"] = metrics["top1"]
            if is_main_process():
                atomic_save(
                    {
                        "epoch": epoch + 1,
                        "arch": cfg.MODEL.ARCH,
                        "state_dict": with_ddp_prefix(model.state_dict()),
                        "best_acc1": metrics["top1"],
                        "top5": metrics["top5"],
                    },
                    best_path,
                )

    if not evaluate_only:
        trainer.train(epoch_end_hooks=[validate])
    if not history:  # --evaluate, or resumed from a finished run
        history.append({"epoch": trainer.start_epoch, **evaluate(model, val_loader, device=device)})
    check_backbone_unchanged(model, reference)
    final = history[-1]
    metrics = {"top1": final["top1"], "top5": final["top5"]}
    extra = {"epoch": final["epoch"], "best_top1": best.get("top1", final["top1"])}
    if is_main_process():
        write_results(output_dir, task="lincls", metrics=metrics, weights=weights, cfg=cfg, **extra)
    return {"task": "lincls", "metrics": metrics, **extra}
