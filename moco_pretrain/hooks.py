"""The run loop's hooks (detectron2's ``engine/hooks.py``): the :class:`Hook` a task extends and
the :class:`~moco_pretrain.engine.Runner`'s own, which it places before the task's hooks
(:class:`LRScheduler`, :class:`NonFiniteGuard`, :class:`Progress`) and after them (the
:data:`WRITERS`), so that every hook's metrics reach TensorBoard and the checkpoint.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from .distributed import is_main_process

if TYPE_CHECKING:
    from .engine import Runner

logger = logging.getLogger("moco_pretrain")


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; the last checkpoint on disk is untouched."""


class Hook:
    """Something added to the loop, as detectron2's ``HookBase`` with epochs. Every event is
    optional. A hook reads the runner (``epoch``, ``iter``, ``num_iters``, ``lr``, ``window``,
    ``history``) and hands metrics to it by returning them from :meth:`after_epoch`."""

    def before_train(self, runner: Runner) -> None:
        """Before the first epoch :meth:`Runner.train` runs (after any resume)."""

    def after_resume(self, runner: Runner) -> None:
        """After a checkpoint was loaded into the model (e.g. check what must not have moved)."""

    def before_epoch(self, runner: Runner, epoch: int) -> None:
        """Before the first step of epoch ``epoch`` (0-based); ``runner.num_iters`` is set."""

    def before_step(self, runner: Runner) -> None:
        """Before each training step; the batch is already on the device."""

    def after_step(self, runner: Runner) -> None:
        """After each optimizer step. At a log point (every ``log_period`` steps and the epoch's
        last) ``runner.window`` holds the mean values since the previous one, else None."""

    def after_epoch(self, runner: Runner, epoch: int) -> dict[str, float]:
        """After epoch ``epoch`` trained and its history entry was added.

        Returns metrics for that entry: logged, seen by the hooks after this one (TensorBoard
        writes them as ``epoch/<name>``) and saved with the epoch's checkpoint.
        """
        return {}

    def after_train(self, runner: Runner) -> None:
        """After the last epoch, and also when a step or a hook raised (the writer closes)."""


class LRScheduler(Hook):
    """Sets every param group's lr to ``lr_at_epoch(epoch)`` before each epoch."""

    def __init__(self, lr_at_epoch: Callable[[int], float]) -> None:
        self.lr_at_epoch = lr_at_epoch

    def before_epoch(self, runner: Runner, epoch: int) -> None:
        lr = self.lr_at_epoch(epoch)
        for group in runner.optimizer.param_groups:
            group["lr"] = lr


class NonFiniteGuard(Hook):
    """Stops the run with :class:`NonFiniteLossError`, naming every value, when a log point's
    means are NaN or infinite (as MAE's ``engine_pretrain.py``), before the hooks after it show
    or save them."""

    def after_step(self, runner: Runner) -> None:
        if runner.window is None or all(math.isfinite(v) for v in runner.window.values()):
            return
        values = ", ".join(f"{k}={v}" for k, v in runner.window.items())
        raise NonFiniteLossError(
            f"non-finite training values at epoch {runner.epoch + 1}, iteration {runner.iter + 1}"
            f" (lr {runner.lr:g}): {values}; stopping. The last checkpoint"
            f" ({runner.last_saved or 'none written yet'}) is intact."
        )


class Progress(Hook):
    """A progress bar per epoch on rank 0's stdout, with the means and img/s of each log point."""

    bar: tqdm | None = None

    def before_epoch(self, runner: Runner, epoch: int) -> None:
        self.after_train(runner)  # a loader that ended early left the last bar open
        self.bar = tqdm(
            total=runner.num_iters,
            desc=f"epoch {epoch + 1}/{runner.epochs}",
            disable=not is_main_process(),
            dynamic_ncols=True,
            mininterval=0.5 if sys.stdout.isatty() else 30.0,
            file=sys.stdout,
        )

    def after_step(self, runner: Runner) -> None:
        self.bar.update(1)
        if runner.window is not None:
            postfix = {k: f"{v:.4g}" for k, v in runner.window.items()}
            self.bar.set_postfix({**postfix, "img/s": f"{runner.window_images_per_s:.0f}"})
        if runner.iter + 1 == runner.num_iters:
            self.after_train(runner)  # closed before the epoch's line is logged

    def after_train(self, runner: Runner) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class TensorBoardWriter(Hook):
    """On rank 0: each log point's means, lr and img/s as ``train/<name>`` (x: iteration), and
    each epoch's history entry, hooks' metrics included, as ``epoch/<name>`` (x: epoch, 1-based).
    """

    def __init__(self, log_dir: str | Path | None) -> None:
        self.log_dir, self.writer = log_dir, None

    def before_train(self, runner: Runner) -> None:
        if self.log_dir and is_main_process():
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.log_dir))

    def write(self, prefix: str, values: dict[str, float], step: int) -> None:
        for name, value in values.items():
            self.writer.add_scalar(f"{prefix}/{name}", value, step)

    def after_step(self, runner: Runner) -> None:
        if self.writer and runner.window is not None:
            values = {**runner.window, "lr": runner.lr, "images_per_s": runner.window_images_per_s}
            self.write("train", values, runner.log_points[-1]["iteration"])

    def after_epoch(self, runner: Runner, epoch: int) -> dict[str, float]:
        if self.writer:
            self.write(
                "epoch", {k: v for k, v in runner.history[-1].items() if k != "epoch"}, epoch + 1
            )
        return {}

    def after_train(self, runner: Runner) -> None:
        if self.writer:
            self.writer.close()
            self.writer = None


class PeriodicCheckpointer(Hook):
    """Saves :meth:`Runner.state` every ``period`` epochs and after the last one (the runner's
    ``checkpointer`` writes atomically on rank 0; every rank takes part in the RNG gather)."""

    def __init__(self, period: int) -> None:
        self.period = max(1, period)

    def after_epoch(self, runner: Runner, epoch: int) -> dict[str, float]:
        if (epoch + 1) % self.period == 0 or epoch + 1 == runner.epochs:
            state = runner.state(epoch)  # collective
            if is_main_process():
                logger.info("saved %s", runner.checkpointer.save(state, epoch=epoch))
            runner.last_saved = runner.checkpointer.path_for(epoch)  # on every rank
        return {}


WRITERS = (TensorBoardWriter, PeriodicCheckpointer)  # last: they write every hook's metrics
