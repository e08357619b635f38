"""The epoch loop shared by pretraining and linear classification.

A task supplies a ``step_fn(batch) -> (loss, metrics)``; the :class:`Trainer` owns everything
else: lr per epoch, autocast, backward and optimizer step, progress bar, TensorBoard, the
non-finite-loss guard, atomic checkpoints and exact resume.
"""

from __future__ import annotations

import functools
import logging
import math
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from fvcore.common.config import CfgNode
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from .checkpoint import (
    FORMAT_VERSION,
    Checkpointer,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    with_ddp_prefix,
    without_ddp_prefix,
)
from .distributed import (
    all_reduce_mean,
    get_world_size,
    init_distributed,
    is_main_process,
    seed_all,
)
from .schedules import lr_at_epoch

logger = logging.getLogger("moco_pretrain")

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "": None}  # TRAIN.AMP_DTYPE
StepFn = Callable[[Any], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def setup_logging(output_dir: str | Path | None = None) -> None:
    """Log to stdout on rank 0 (and to ``output_dir/log.txt``); warnings only on other ranks."""
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.INFO if is_main_process() else logging.WARNING)
    formatter = logging.Formatter("[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if output_dir and is_main_process():
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(Path(output_dir) / "log.txt"))
    for handler in handlers:
        handler.setFormatter(formatter)
        logger.addHandler(handler)


def move_to_device(batch: Any, device: torch.device, *, channels_last: bool = False) -> Any:
    """Tensors in nested lists/tuples to ``device``; 4-D ones channels-last if asked."""
    if isinstance(batch, torch.Tensor):
        fmt = torch.channels_last if channels_last and batch.dim() == 4 else torch.preserve_format
        return batch.to(device, non_blocking=True, memory_format=fmt)
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(b, device, channels_last=channels_last) for b in batch)
    return batch


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; the last checkpoint on disk is untouched."""


class Trainer:
    """Runs epochs ``start_epoch .. epochs-1`` of ``step_fn`` over ``loader``.

    Args:
        model: the (possibly DDP-wrapped) model whose ``state_dict`` is checkpointed.
        optimizer: its optimizer; every param group gets ``lr_at_epoch(epoch)`` each epoch.
        loader: training batches; its sampler's ``set_epoch`` is called if it has one.
        step_fn: batch (already on ``device``) -> (scalar loss, dict of scalar metric tensors).
        epochs: total number of epochs.
        checkpointer: where checkpoints go.
        arch: stored as ``arch`` in checkpoints.
        device: the device batches are moved to.
        amp_dtype: autocast dtype on CUDA (None: fp32). fp16 uses a gradient scaler.
        channels_last: move 4-D inputs to channels-last memory format.
        log_period: iterations between progress updates and TensorBoard points.
        checkpoint_period: epochs between checkpoints (the last epoch is always saved).
        max_iters_per_epoch: >0 cuts epochs short.
        config_yaml: the resolved config, stored in checkpoints.
        train_mode: puts the model in training mode (lincls keeps its backbone in eval mode).
        extra_state: extra entries for the checkpoint (and restored by the caller).
        tensorboard_dir: where rank 0 writes TensorBoard events (None: none).
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loader: DataLoader,
        step_fn: StepFn,
        lr_at_epoch: Callable[[int], float],
        epochs: int,
        checkpointer: Checkpointer,
        arch: str,
        device: torch.device,
        amp_dtype: torch.dtype | None = None,
        channels_last: bool = False,
        log_period: int = 20,
        checkpoint_period: int = 1,
        max_iters_per_epoch: int = 0,
        config_yaml: str = "",
        train_mode: Callable[[], None] | None = None,
        extra_state: Callable[[], dict[str, Any]] | None = None,
        tensorboard_dir: str | Path | None = None,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.loader = loader
        self.step_fn = step_fn
        self.lr_at_epoch = lr_at_epoch
        self.epochs = epochs
        self.checkpointer = checkpointer
        self.arch = arch
        self.device = device
        self.amp_dtype = amp_dtype if device.type == "cuda" else None
        self.channels_last = channels_last
        self.log_period = max(1, log_period)
        self.checkpoint_period = max(1, checkpoint_period)
        self.max_iters_per_epoch = max_iters_per_epoch
        self.config_yaml = config_yaml
        self.train_mode = train_mode or model.train
        self.extra_state = extra_state or dict
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)
        self.start_epoch = 0
        self.last_saved: Path | None = None
        # per epoch: mean metrics, lr, seconds, images_per_s (+ whatever epoch-end hooks add);
        # per log point: the window's mean metrics. Both are saved in checkpoints.
        self.history: list[dict[str, float]] = []
        self.log_points: list[dict[str, float]] = []
        self.writer = None
        if tensorboard_dir and is_main_process():
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(tensorboard_dir))

    # ----------------------------------------------------------------- checkpoints
    def state(self, epoch: int) -> dict[str, Any]:
        """The checkpoint after ``epoch`` (0-based) completed; collective (RNG of all ranks)."""
        return {
            "epoch": epoch + 1,
            "arch": self.arch,
            "state_dict": with_ddp_prefix(unwrap(self.model).state_dict()),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "config": self.config_yaml,
            "rng": capture_rng_state(),
            "format_version": FORMAT_VERSION,
            "history": self.history,
            "log_points": self.log_points,
            **self.extra_state(),
        }

    def resume(self, path: str | Path) -> dict[str, Any]:
        """Load model, optimizer, scaler, RNG and epoch from ``path``; returns the checkpoint."""
        checkpoint = load_checkpoint(path)
        missing = [key for key in ("epoch", "state_dict", "optimizer") if key not in checkpoint]
        if missing:
            raise KeyError(f"checkpoint {path} lacks {missing}; cannot resume from it")
        state_dict = without_ddp_prefix(checkpoint["state_dict"])
        try:
            unwrap(self.model).load_state_dict(state_dict)
        except RuntimeError as err:
            raise ValueError(f"checkpoint {path} does not fit this model: {err}") from None
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        if checkpoint.get("scaler"):
            self.scaler.load_state_dict(checkpoint["scaler"])
        if "rng" in checkpoint and not restore_rng_state(checkpoint["rng"]):
            logger.warning("world size changed since %s: RNG streams start afresh", path)
        self.start_epoch = int(checkpoint["epoch"])
        self.history = list(checkpoint.get("history", []))
        self.log_points = list(checkpoint.get("log_points", []))
        self.last_saved = Path(path)
        logger.info("resumed from %s (epoch %d done)", path, self.start_epoch)
        return checkpoint

    # ----------------------------------------------------------------- training
    def train(self, *, epoch_end_hooks: Iterable[Callable[[int], None]] = ()) -> None:
        """Train the remaining epochs. Hooks run after each epoch, before its checkpoint is saved,
        so what they add to ``history[-1]`` (e.g. a kNN accuracy) is saved with it."""
        hooks = list(epoch_end_hooks)
        for epoch in range(self.start_epoch, self.epochs):
            self.train_one_epoch(epoch)
            for hook in hooks:
                hook(epoch)
            if (epoch + 1) % self.checkpoint_period == 0 or epoch + 1 == self.epochs:
                state = self.state(epoch)  # every rank takes part (RNG gather)
                if is_main_process():
                    logger.info("saved %s", self.checkpointer.save(state, epoch=epoch))
                self.last_saved = self.checkpointer.path_for(epoch)  # on every rank
        if self.writer:
            self.writer.close()

    def _set_lr(self, epoch: int) -> float:
        lr = self.lr_at_epoch(epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def train_one_epoch(self, epoch: int) -> dict[str, float]:
        self.train_mode()
        sampler = getattr(self.loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        lr = self._set_lr(epoch)
        num_iters = len(self.loader)
        if self.max_iters_per_epoch > 0:
            num_iters = min(num_iters, self.max_iters_per_epoch)
        bar = tqdm(
            total=num_iters,
            desc=f"epoch {epoch + 1}/{self.epochs}",
            disable=not is_main_process(),
            dynamic_ncols=True,
            mininterval=0.5 if sys.stdout.isatty() else 30.0,
            file=sys.stdout,
        )
        epoch_sums: dict[str, torch.Tensor] = {}
        epoch_start, epoch_images = time.perf_counter(), 0
        window_sums: dict[str, torch.Tensor] = {}
        window_start, window_images, window_iters = time.perf_counter(), 0, 0
        # range first: zip stops before fetching a batch that would not be used.
        for it, batch in zip(range(num_iters), self.loader, strict=False):
            batch = move_to_device(batch, self.device, channels_last=self.channels_last)
            with torch.autocast(
                self.device.type, self.amp_dtype, enabled=self.amp_dtype is not None
            ):
                loss, metrics = self.step_fn(batch)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()

            # Accumulate on the device: no host sync until the next log point.
            for name, value in {"loss": loss, **metrics}.items():
                value = value.detach().float()
                window_sums[name] = window_sums.get(name, 0) + value
                epoch_sums[name] = epoch_sums.get(name, 0) + value
            images = _batch_size(batch) * get_world_size()
            window_images += images
            epoch_images += images
            window_iters += 1
            bar.update(1)
            if (it + 1) % self.log_period == 0 or it + 1 == num_iters:
                means = {k: float(v) / window_iters for k, v in window_sums.items()}
                self._check_finite(means, epoch=epoch, it=it, lr=lr)
                speed = window_images / max(time.perf_counter() - window_start, 1e-9)
                bar.set_postfix(
                    {**{k: f"{v:.4g}" for k, v in means.items()}, "img/s": f"{speed:.0f}"}
                )
                step = epoch * num_iters + it + 1
                self.log_points.append({"iteration": step, **means, "lr": lr})
                if self.writer:
                    for name, value in means.items():
                        self.writer.add_scalar(f"train/{name}", value, step)
                    self.writer.add_scalar("train/lr", lr, step)
                    self.writer.add_scalar("train/images_per_s", speed, step)
                window_sums, window_start, window_images, window_iters = (
                    {},
                    time.perf_counter(),
                    0,
                    0,
                )
        bar.close()
        summary = {k: float(all_reduce_mean(v / num_iters)) for k, v in epoch_sums.items()}
        seconds = time.perf_counter() - epoch_start
        summary.update(lr=lr, seconds=seconds)
        summary["images_per_s"] = epoch_images / seconds
        self.history.append({"epoch": epoch + 1, **summary})
        logger.info(
            "epoch %d/%d: %s",
            epoch + 1,
            self.epochs,
            "  ".join(f"{k} {v:.4g}" for k, v in summary.items()),
        )
        if self.writer:
            for name, value in summary.items():
                self.writer.add_scalar(f"epoch/{name}", value, epoch + 1)
        return summary

    def _check_finite(self, means: dict[str, float], *, epoch: int, it: int, lr: float) -> None:
        if all(math.isfinite(v) for v in means.values()):
            return
        values = ", ".join(f"{k}={v}" for k, v in means.items())
        last = self.last_saved or "none written yet"
        raise NonFiniteLossError(
            f"non-finite training values at epoch {epoch + 1}, iteration {it + 1} (lr {lr:g}): "
            f"{values}; stopping. The last checkpoint ({last}) is intact."
        )


def _batch_size(batch: Any) -> int:
    first = batch[0] if isinstance(batch, (list, tuple)) else batch
    while isinstance(first, (list, tuple)):
        first = first[0]
    return int(first.shape[0])


# --------------------------------------------------------------------- config-driven runs
def start_run(cfg: CfgNode) -> torch.device:
    """Join the process group (if any), log to ``OUTPUT_DIR``, seed, write the resolved config."""
    device = init_distributed()
    output_dir = Path(cfg.OUTPUT_DIR)
    setup_logging(output_dir)
    seed_all(cfg.SEED)
    if is_main_process():
        (output_dir / "config.yaml").write_text(cfg.dump())
    return device


def wrap_distributed(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` in DistributedDataParallel when there are several processes, else as is."""
    if get_world_size() == 1:
        return model
    return nn.parallel.DistributedDataParallel(
        model, device_ids=[device] if device.type == "cuda" else None
    )


def build_trainer(
    cfg: CfgNode,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    step_fn: StepFn,
    device: torch.device,
    **options: Any,
) -> Trainer:
    """A :class:`Trainer` with the schedule, precision, logging and checkpoint keys of ``cfg``.

    The lr schedule starts from the optimizer's lr; ``options`` are further Trainer arguments.
    """
    schedule = functools.partial(
        lr_at_epoch, optimizer.defaults["lr"], schedule=cfg.SOLVER.LR_SCHEDULE,
        epochs=cfg.SOLVER.EPOCHS, steps=cfg.SOLVER.STEPS, gamma=cfg.SOLVER.GAMMA,
    )  # fmt: skip
    return Trainer(
        model=model,
        optimizer=optimizer,
        loader=loader,
        step_fn=step_fn,
        lr_at_epoch=schedule,
        epochs=cfg.SOLVER.EPOCHS,
        checkpointer=Checkpointer(cfg.OUTPUT_DIR, keep_last=cfg.TRAIN.KEEP_LAST),
        arch=cfg.MODEL.ARCH,
        device=device,
        amp_dtype=AMP_DTYPES[cfg.TRAIN.AMP_DTYPE],
        channels_last=device.type == "cuda" and cfg.TRAIN.CHANNELS_LAST,
        log_period=cfg.TRAIN.LOG_PERIOD,
        checkpoint_period=cfg.TRAIN.CHECKPOINT_PERIOD,
        max_iters_per_epoch=cfg.SOLVER.MAX_ITERS_PER_EPOCH,
        config_yaml=cfg.dump(),
        tensorboard_dir=Path(cfg.OUTPUT_DIR) / "tensorboard",
        **options,
    )
