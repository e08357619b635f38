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
import torch.nn.functional as F
import yaml
from fvcore.common.config import CfgNode
from torch import nn
from torch.utils.data import DataLoader

from .checkpoint import atomic_save, load_checkpoint, with_ddp_prefix
from .config import PRETRAINING_ONLY, dataset_options, eval_transform_options
from .data import (
    build_dataset,
    build_eval_loader,
    build_train_loader,
    eval_transform,
    limit_samples,
    linear_train_transform,
    num_classes_of,
)
from .distributed import (
    get_world_size,
    is_main_process,
    per_process_batch_size,
)
from .engine import Hook, Runner, Task, logger, start_run, unwrap
from .knn import extract_features, topk_accuracy
from .models import build_backbone, build_resnet
from .results import write_results
from .schedules import scaled_lr
from .weights import BackboneWeights, load_backbone_state_dict

INIT_STD = 0.01  # std of the new linear layer's weights (official protocol)
BEST_CHECKPOINT = "model_best.pth.tar"


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
    """``DATA.TRAIN_SPLIT`` with RandomResizedCrop + flip, shuffled per epoch."""
    transform = linear_train_transform(**eval_transform_options(cfg))
    dataset = build_dataset(**dataset_options(cfg), split=cfg.DATA.TRAIN_SPLIT, transform=transform)
    return build_train_loader(
        limit_samples(dataset, cfg.DATA.MAX_SAMPLES),
        batch_size=per_process_batch_size(cfg.SOLVER.BATCH_SIZE),
        seed=cfg.SEED,
        num_workers=cfg.DATA.NUM_WORKERS,
        drop_last=False,
    )


def build_eval_loader_of(
    cfg: CfgNode, *, split: str, batch_size: int, max_samples: int = 0
) -> DataLoader:
    """Un-augmented batches of ``split`` (its first ``max_samples`` images when > 0)."""
    transform = eval_transform(**eval_transform_options(cfg))
    dataset = build_dataset(**dataset_options(cfg), split=split, transform=transform)
    return build_eval_loader(
        limit_samples(dataset, max_samples), batch_size=batch_size,
        num_workers=cfg.DATA.NUM_WORKERS,
    )  # fmt: skip


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


def write_task_results(
    cfg: CfgNode,
    *,
    task: str,
    metrics: dict[str, float],
    weights: BackboneWeights | None = None,
    output_dir: str | Path | None = None,
    **extra: Any,
) -> Path:
    """``results.json`` (:mod:`moco_pretrain.results`) of a classification or kNN task, with the
    provenance of the pretrained ``weights``, in ``output_dir`` (default ``OUTPUT_DIR``)."""
    provenance = None
    if weights is not None:
        provenance = {
            "checkpoint": str(Path(weights.meta["path"]).resolve()),
            "checkpoint_sha256": weights.meta["sha256"],
            "layout": weights.layout,
        }
    return write_results(
        output_dir or cfg.OUTPUT_DIR, task=task, metrics=metrics,
        config=yaml.safe_load(cfg.dump()), weights=provenance, **extra,
    )  # fmt: skip


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
        return evaluate(self.model, self.loader, device=next(self.model.parameters()).device)

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
    loader = build_lincls_train_loader(cfg)
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
        model, optimizer, loader, linear_step, hooks=[validation], train_mode=False,
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
