"""The one run loop of every task: pretraining, linear classification, supervised training.

A task supplies a :class:`Task` (its model, optimizer, training batches, step and hooks); the
:class:`Runner` owns the loop: DDP wrapping, autocast, backward and optimizer step, the history of
epochs and log points, checkpoint state and exact resume. The lr schedule, the non-finite-loss
guard, the progress bar, TensorBoard and the periodic checkpoints are its default hooks
(:mod:`moco_pretrain.hooks`); a task's hooks run between them and *return* metrics (a kNN monitor,
a validation), which the runner records in the epoch's history, saved with its checkpoint.
Modelled on detectron2's ``TrainerBase`` and ``HookBase``, with epochs instead of iterations, as
the official MoCo scripts count.
"""

from __future__ import annotations

import functools
import logging
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from fvcore.common.config import CfgNode
from torch import nn

from .checkpoint import (
    Checkpointer,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    with_ddp_prefix,
    without_ddp_prefix,
)
from .config import run_differences
from .data import data_record
from .distributed import (
    all_reduce_mean,
    get_world_size,
    init_distributed,
    is_main_process,
    seed_all,
)
from .files import atomic_write
from .hooks import (
    WRITERS,
    Hook,
    LRScheduler,
    NonFiniteGuard,
    PeriodicCheckpointer,
    Progress,
    TensorBoardWriter,
)
from .hooks import NonFiniteLossError as NonFiniteLossError  # re-exported: the loop's error
from .schedules import lr_at_epoch, scaled_lr

logger = logging.getLogger("moco_pretrain")

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "": None}  # TRAIN.AMP_DTYPE
Metrics = dict[str, torch.Tensor]
StepFn = Callable[[nn.Module, Any], tuple[torch.Tensor, Metrics]]


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


def wrap_distributed(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` in DistributedDataParallel when there are several processes, else as is."""
    if get_world_size() == 1:
        return model
    return nn.parallel.DistributedDataParallel(
        model, device_ids=[device] if device.type == "cuda" else None
    )


@dataclass
class Task:
    """What a task supplies to the :class:`Runner`.

    Args:
        model: the model to train and checkpoint (not DDP-wrapped: the runner does that).
        optimizer: its optimizer; the runner's :class:`LRScheduler` sets its lr each epoch.
        loader: training batches; its sampler's ``set_epoch`` is called if it has one.
        step: ``step(model, batch) -> (scalar loss, {name: scalar tensor})``, the batch on the
            device, ``model`` the DDP-wrapped model under several processes.
        hooks: see :class:`Hook`; they run after the runner's lr, guard and progress hooks and
            before its writers, in this order.
        train_mode: False keeps the whole model in eval mode while it trains (linear
            classification: the frozen backbone's BN statistics must not move).
        unread_config_keys: config keys the task never reads; auto-resume lets them differ.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    loader: Iterable[Any]
    step: StepFn
    hooks: Sequence[Hook] = ()
    train_mode: bool = True
    unread_config_keys: tuple[str, ...] = ()


class Runner:
    """Runs epochs ``start_epoch .. epochs-1`` of ``task``; see the module docstring.

    Its hooks, in order: :class:`LRScheduler`, :class:`NonFiniteGuard`, :class:`Progress`, the
    task's, those of :meth:`register_hooks`, :class:`TensorBoardWriter` and
    :class:`PeriodicCheckpointer` (see :mod:`moco_pretrain.hooks`).

    Args:
        task: what to train.
        device: the device batches are moved to.
        epochs: total number of epochs.
        lr_at_epoch: the lr of each epoch (0-based).
        checkpointer: where checkpoints go.
        checkpoint_meta: constant checkpoint entries (``arch``, the resolved ``config``).
        amp_dtype: autocast dtype on CUDA (None: fp32). fp16 uses a gradient scaler.
        channels_last: move 4-D inputs to channels-last memory format.
        log_period: iterations between log points (progress, ``log_points``, TensorBoard).
        checkpoint_period: epochs between checkpoints (the last epoch is always saved).
        max_iters_per_epoch: >0 cuts epochs short.
        tensorboard_dir: where rank 0 writes TensorBoard events (None: none).
    """

    def __init__(
        self,
        task: Task,
        *,
        device: torch.device,
        epochs: int,
        lr_at_epoch: Callable[[int], float],
        checkpointer: Checkpointer,
        checkpoint_meta: dict[str, Any] | None = None,
        amp_dtype: torch.dtype | None = None,
        channels_last: bool = False,
        log_period: int = 20,
        checkpoint_period: int = 1,
        max_iters_per_epoch: int = 0,
        tensorboard_dir: str | Path | None = None,
    ) -> None:
        self.task = task
        self.model = task.model
        self.train_model = wrap_distributed(task.model, device)
        self.optimizer = task.optimizer
        self.device = device
        self.epochs = epochs
        self.checkpointer = checkpointer
        self.checkpoint_meta = checkpoint_meta or {}
        self.amp_dtype = amp_dtype if device.type == "cuda" else None
        self.channels_last = channels_last
        self.log_period = max(1, log_period)
        self.max_iters_per_epoch = max_iters_per_epoch
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)
        self.start_epoch = 0
        self.last_saved: Path | None = None
        # per epoch: mean metrics, lr, seconds, images_per_s and the hooks' metrics;
        # per log point: the window's mean metrics. Both are saved in checkpoints.
        self.history: list[dict[str, float]] = []
        self.log_points: list[dict[str, float]] = []
        # the loop's position, for hooks (see Hook)
        self.epoch = self.iter = self.num_iters = 0
        self.lr = 0.0
        self.window: dict[str, float] | None = None
        self.window_images_per_s = 0.0
        self.hooks: list[Hook] = [
            LRScheduler(lr_at_epoch), NonFiniteGuard(), Progress(),
            TensorBoardWriter(tensorboard_dir), PeriodicCheckpointer(checkpoint_period),
        ]  # fmt: skip
        self.register_hooks(*task.hooks)

    @classmethod
    def from_config(cls, cfg: CfgNode, task: Task, *, device: torch.device) -> Runner:
        """A runner with the schedule, precision, logging and checkpoint keys of ``cfg``; the lr
        schedule starts from ``SOLVER.BASE_LR`` scaled linearly to ``SOLVER.BATCH_SIZE``."""
        schedule = functools.partial(
            lr_at_epoch, scaled_lr(cfg.SOLVER.BASE_LR, cfg.SOLVER.BATCH_SIZE),
            schedule=cfg.SOLVER.LR_SCHEDULE,
            epochs=cfg.SOLVER.EPOCHS, steps=cfg.SOLVER.STEPS, gamma=cfg.SOLVER.GAMMA,
        )  # fmt: skip
        return cls(
            task,
            device=device,
            epochs=cfg.SOLVER.EPOCHS,
            lr_at_epoch=schedule,
            checkpointer=Checkpointer(cfg.OUTPUT_DIR, keep_last=cfg.TRAIN.KEEP_LAST),
            checkpoint_meta={
                "arch": cfg.MODEL.ARCH,
                "config": cfg.dump(),
                "data": data_record(
                    task.loader.dataset, name=cfg.DATA.NAME, split=cfg.DATA.TRAIN_SPLIT
                ),
            },  # fmt: skip
            amp_dtype=AMP_DTYPES[cfg.TRAIN.AMP_DTYPE],
            channels_last=device.type == "cuda" and cfg.TRAIN.CHANNELS_LAST,
            log_period=cfg.TRAIN.LOG_PERIOD,
            checkpoint_period=cfg.TRAIN.CHECKPOINT_PERIOD,
            max_iters_per_epoch=cfg.SOLVER.MAX_ITERS_PER_EPOCH,
            tensorboard_dir=Path(cfg.OUTPUT_DIR) / "tensorboard",
        )

    def register_hooks(self, *hooks: Hook) -> None:
        """Add hooks after those added before (the task's own first; e.g. a profiler) and before
        the writers (:data:`WRITERS`), which thus write and save their metrics too."""
        at = next((i for i, h in enumerate(self.hooks) if isinstance(h, WRITERS)), len(self.hooks))
        self.hooks[at:at] = hooks

    # ----------------------------------------------------------------- checkpoints
    def state(self, epoch: int) -> dict[str, Any]:
        """The checkpoint after ``epoch`` (0-based) completed; collective (RNG of all ranks)."""
        return {
            "epoch": epoch + 1,
            "arch": self.checkpoint_meta.get("arch", ""),
            "state_dict": with_ddp_prefix(self.model.state_dict()),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "config": self.checkpoint_meta.get("config", ""),
            "data": self.checkpoint_meta.get("data", {}),
            "rng": capture_rng_state(),
            "history": self.history,
            "log_points": self.log_points,
        }

    def resume(self, path: str | Path, *, check_same_run: bool = False) -> None:
        """Load model, optimizer, scaler, RNG, epoch and history from ``path``; with
        ``check_same_run``, first refuse a checkpoint of another run (:meth:`resume_or_start`)."""
        checkpoint = load_checkpoint(path)
        if check_same_run:
            self._check_same_run(checkpoint, path)
        missing = [key for key in ("epoch", "state_dict", "optimizer") if key not in checkpoint]
        if missing:
            raise KeyError(f"checkpoint {path} lacks {missing}; cannot resume from it")
        state_dict = without_ddp_prefix(checkpoint["state_dict"])
        try:
            self.model.load_state_dict(state_dict)
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
        for hook in self.hooks:
            hook.after_resume(self)

    def resume_or_start(self, path: str | Path | None = None, *, auto: bool = True) -> None:
        """Resume from ``path``, else (with ``auto``) from the newest checkpoint of the output
        directory, else start at epoch 0; then write the run's ``config.yaml``.

        Raises:
            ValueError: auto-resume found a checkpoint of another run (another ``SEED`` or
                recipe, :func:`moco_pretrain.config.run_differences`), naming both values; nothing
                is loaded or written. An explicit ``path`` may start from any checkpoint.
        """
        found = None if path else auto and self.checkpointer.last_checkpoint()
        if path or found:
            self.resume(path or found, check_same_run=bool(found))
        if is_main_process() and self.checkpoint_meta.get("config"):
            config = self.checkpoint_meta["config"].encode()
            atomic_write(self.checkpointer.output_dir / "config.yaml", lambda f: f.write(config))

    def _check_same_run(self, checkpoint: dict[str, Any], path: str | Path) -> None:
        saved = checkpoint.get("config")
        current = self.checkpoint_meta.get("config")
        unread = self.task.unread_config_keys
        differences = run_differences(saved, current, unread=unread) if saved and current else []
        if differences:
            raise ValueError(
                f"auto-resume: {path} belongs to another run ({'; '.join(differences)}:"
                f" checkpoint vs this command); choose another OUTPUT_DIR, or resume from it on"
                f" purpose with --resume"
            )

    # ----------------------------------------------------------------- training
    def train(self) -> None:
        """Train the remaining epochs between the hooks' ``before_train`` and ``after_train``
        (which also runs when a step or a hook raised; the exception then propagates)."""
        try:
            for hook in self.hooks:
                hook.before_train(self)
            for epoch in range(self.start_epoch, self.epochs):
                self.train_one_epoch(epoch)
                for hook in self.hooks:
                    self.record(epoch, hook.after_epoch(self, epoch))
        finally:
            for hook in self.hooks:
                hook.after_train(self)

    def record(self, epoch: int, metrics: dict[str, float]) -> None:
        """Add a hook's ``metrics`` to epoch ``epoch``'s history entry and log them."""
        if metrics:
            self.history[-1].update(metrics)
            logger.info("epoch %d: %s", epoch + 1, _format(metrics))

    def train_one_epoch(self, epoch: int) -> dict[str, float]:
        """The hooks' ``before_epoch``, then one epoch of steps, each between the hooks'
        ``before_step`` and ``after_step``; returns (and appends to ``history``) its means."""
        self.train_model.train(self.task.train_mode)
        sampler = getattr(self.task.loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        self.epoch, self.num_iters = epoch, len(self.task.loader)
        if self.max_iters_per_epoch > 0:
            self.num_iters = min(self.num_iters, self.max_iters_per_epoch)
        for hook in self.hooks:
            hook.before_epoch(self, epoch)
        self.lr = self.optimizer.param_groups[0]["lr"]
        epoch_meter, window = MetricMeter(), MetricMeter()
        # range first: zip stops before fetching a batch that would not be used.
        for it, batch in zip(range(self.num_iters), self.task.loader, strict=False):
            self.iter = it
            batch = move_to_device(batch, self.device, channels_last=self.channels_last)
            for hook in self.hooks:
                hook.before_step(self)
            with torch.autocast(
                self.device.type, self.amp_dtype, enabled=self.amp_dtype is not None
            ):
                loss, metrics = self.task.step(self.train_model, batch)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()

            values = {"loss": loss, **metrics}
            images = _batch_size(batch) * get_world_size()
            epoch_meter.add(values, images=images)
            window.add(values, images=images)
            self.window = None
            if (it + 1) % self.log_period == 0 or it + 1 == self.num_iters:  # a log point
                self.window = {k: float(v) / window.steps for k, v in window.sums.items()}  # sync
                self.window_images_per_s = window.images / max(window.seconds(), 1e-9)
                step = epoch * self.num_iters + it + 1
                self.log_points.append({"iteration": step, **self.window, "lr": self.lr})
            for hook in self.hooks:
                hook.after_step(self)
            if self.window is not None:
                window = MetricMeter()
        self.window = None
        summary = {k: float(all_reduce_mean(v)) for k, v in epoch_meter.means().items()}
        seconds = epoch_meter.seconds()
        summary.update(lr=self.lr, seconds=seconds, images_per_s=epoch_meter.images / seconds)
        self.history.append({"epoch": epoch + 1, **summary})
        logger.info("epoch %d/%d: %s", epoch + 1, self.epochs, _format(summary))
        return summary


class MetricMeter:
    """Sums of per-step metric tensors on the device (no host sync), images and wall time."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = self.images = 0
        self.start = time.perf_counter()

    def add(self, values: Metrics, *, images: int) -> None:
        for name, value in values.items():
            value = value.detach().float()
            self.sums[name] = self.sums[name] + value if name in self.sums else value
        self.steps += 1
        self.images += images

    def means(self) -> Metrics:
        return {name: total / self.steps for name, total in self.sums.items()}

    def seconds(self) -> float:
        return time.perf_counter() - self.start


def _format(metrics: dict[str, float]) -> str:
    return "  ".join(f"{k} {v:.4g}" for k, v in metrics.items())


def _batch_size(batch: Any) -> int:
    first = batch[0] if isinstance(batch, (list, tuple)) else batch
    while isinstance(first, (list, tuple)):
        first = first[0]
    return int(first.shape[0])


def start_run(cfg: CfgNode) -> torch.device:
    """Join the process group (if any), log to ``OUTPUT_DIR`` and seed. The resolved config is
    written by :meth:`Runner.resume_or_start`, once it knows the run may continue there."""
    device = init_distributed()
    setup_logging(Path(cfg.OUTPUT_DIR))
    seed_all(cfg.SEED)
    return device
