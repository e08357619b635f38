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
* On CUDA the training forward runs in fp32 as the official script's, or, opted in, under the
  engine's autocast (``TRAIN.AMP_DTYPE bf16``); validation always runs in fp32.
* The official script saves a checkpoint every epoch and copies the best one; here the engine's
  ``checkpoint_NNNN.pth.tar`` files (atomic, ``TRAIN.KEEP_LAST``) and an atomic
  ``model_best.pth.tar``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from fvcore.common.config import CfgNode
from torch import nn
from torch.utils.data import DataLoader

from .checkpoint import atomic_save, load_checkpoint, with_ddp_prefix
from .config import PRETRAINING_ONLY
from .data import num_classes_of
from .distributed import get_world_size, is_main_process, per_process_batch_size
from .engine import Hook, Runner, Task, logger, start_run, unwrap
from .evaluation import (
    build_classifier_train_loader,
    build_eval_loader_of,
    classification_step,
    evaluate_classifier,
    load_backbone_into,
    load_pretrained,
    write_task_results,
)
from .models import build_resnet
from .schedules import scaled_lr
from .weights import BackboneWeights

INIT_STD = 0.01  # std of the new linear layer's weights (official protocol)
BEST_CHECKPOINT = "model_best.pth.tar"


class FrozenBackboneError(RuntimeError):
    """A backbone tensor (parameter or BN buffer) changed during linear classification."""


# ------------------------------------------------------------------ the classifier
def build_linear_classifier(
    cfg: CfgNode, weights: BackboneWeights, *, num_classes: int
) -> nn.Module:
    """A torchvision ResNet: pretrained frozen backbone, new ``fc`` ~ N(0, 0.01), zero bias."""
    model = build_resnet(cfg.MODEL.ARCH, num_classes=num_classes, small_stem=cfg.MODEL.SMALL_STEM)
    load_backbone_into(model, weights, head={"fc.weight", "fc.bias"})
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


# ------------------------------------------------------------------ the task
class Validation(Hook):
    """Top-1/top-5 on the validation split after every epoch (``val_top1``, ``val_top5``); keeps
    ``model_best.pth.tar``; checks the frozen backbone after a resume and after the first epoch."""

    def __init__(
        self,
        model: nn.Module,
        loader: DataLoader,
        reference: dict[str, torch.Tensor],
        *,
        best_path: Path,
        arch: str,
        pretrained: str | Path,
    ) -> None:
        self.model, self.loader, self.reference = model, loader, reference
        self.best_path, self.arch, self.pretrained = best_path, arch, pretrained
        self.best_top1: float | None = None  # of this run: a resume reads it back
        self.last: dict[str, float] | None = None  # the newest validation of this process

    def evaluate(self) -> dict[str, float]:
        return evaluate_classifier(
            self.model, self.loader, device=next(self.model.parameters()).device
        )

    def after_resume(self, runner: Runner) -> None:
        if self.best_path.is_file():
            self.best_top1 = load_checkpoint(self.best_path)["best_acc1"]
        try:
            check_backbone_unchanged(self.model, self.reference)
        except FrozenBackboneError as err:
            raise FrozenBackboneError(
                f"{runner.last_saved} holds a classifier trained on other pretrained weights than"
                f" {self.pretrained}: {err}"
            ) from None

    def after_epoch(self, runner: Runner, epoch: int) -> dict[str, float]:
        metrics = self.evaluate()
        self.last = {"epoch": epoch + 1, **metrics}
        if epoch == runner.start_epoch:
            check_backbone_unchanged(self.model, self.reference)
        if self.best_top1 is None or metrics["top1"] > self.best_top1:
            self.best_top1 = metrics["top1"]
            if is_main_process():
                atomic_save(
                    {
                        "epoch": epoch + 1,
                        "arch": self.arch,
                        "state_dict": with_ddp_prefix(self.model.state_dict()),
                        "best_acc1": metrics["top1"],
                        "top5": metrics["top5"],
                    },
                    self.best_path,
                )
        return {f"val_{name}": value for name, value in metrics.items()}


def lincls_task(
    cfg: CfgNode, device: torch.device, *, weights: BackboneWeights, pretrained: str | Path
) -> Task:
    """A linear classifier on the frozen backbone of ``weights``, SGD on ``fc`` only, the whole
    model in eval mode, and its :class:`Validation` hook."""
    reference = {k: v.clone() for k, v in weights.state_dict.items()}  # for the sanity check
    loader = build_classifier_train_loader(cfg)
    val_loader = build_eval_loader_of(
        cfg, split=cfg.DATA.VAL_SPLIT, batch_size=per_process_batch_size(cfg.SOLVER.BATCH_SIZE)
    )
    model = build_linear_classifier(cfg, weights, num_classes=num_classes_of(loader.dataset))
    model = model.to(device)
    if device.type == "cuda" and cfg.TRAIN.CHANNELS_LAST:
        model.to(memory_format=torch.channels_last)
    if cfg.TRAIN.COMPILE:
        model.compile()
    params = [p for p in model.parameters() if p.requires_grad]  # fc.weight, fc.bias
    lr = scaled_lr(cfg.SOLVER.BASE_LR, cfg.SOLVER.BATCH_SIZE)
    optimizer = torch.optim.SGD(
        params, lr, momentum=cfg.SOLVER.MOMENTUM, weight_decay=cfg.SOLVER.WEIGHT_DECAY
    )
    logger.info(
        "linear classification: %d processes x %d images = batch %d, lr %.4g (= %.4g x %d / 256)",
        get_world_size(), loader.batch_size, cfg.SOLVER.BATCH_SIZE, lr, cfg.SOLVER.BASE_LR,
        cfg.SOLVER.BATCH_SIZE,
    )  # fmt: skip
    validation = Validation(
        model, val_loader, reference, best_path=Path(cfg.OUTPUT_DIR) / BEST_CHECKPOINT,
        arch=cfg.MODEL.ARCH, pretrained=pretrained,
    )  # fmt: skip
    # train_mode False: the whole model, BN included, stays in eval mode
    return Task(
        model, optimizer, loader, classification_step, hooks=[validation], train_mode=False,
        unread_config_keys=PRETRAINING_ONLY,
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
    weights = load_pretrained(cfg, pretrained, prefix=prefix)
    task = lincls_task(cfg, device, weights=weights, pretrained=pretrained)
    (validation,) = task.hooks
    runner = Runner.from_config(cfg, task, device=device)
    runner.resume_or_start(resume, auto=cfg.TRAIN.AUTO_RESUME)
    if evaluate_only and runner.start_epoch == 0:
        raise ValueError(
            "--evaluate needs a trained classifier: pass --resume or use the OUTPUT_DIR of a run"
        )
    if not evaluate_only:
        runner.train()
    # --evaluate, or resumed from a finished run: evaluate the classifier as it is
    final = validation.last or {"epoch": runner.start_epoch, **validation.evaluate()}
    check_backbone_unchanged(task.model, validation.reference)
    metrics = {"top1": final["top1"], "top5": final["top5"]}
    best_top1 = validation.best_top1 if validation.best_top1 is not None else final["top1"]
    extra = {"epoch": final["epoch"], "best_top1": best_top1}
    if is_main_process():
        write_task_results(cfg, task="lincls", metrics=metrics, weights=weights, **extra)
    return {"task": "lincls", "metrics": metrics, **extra}
