"""The run loop's contract with tasks: hooks get the loop's events in order and return metrics,
which the runner records and its writers save; a hook that raises stops the run cleanly."""

from __future__ import annotations

import statistics

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moco_pretrain.checkpoint import Checkpointer, load_checkpoint
from moco_pretrain.engine import Hook, NonFiniteLossError, Runner, Task
from moco_pretrain.hooks import (
    LRScheduler,
    NonFiniteGuard,
    PeriodicCheckpointer,
    Progress,
    TensorBoardWriter,
)

CPU = torch.device("cpu")


class Recorder(Hook):
    """Records every event; reports the epoch it saw as a metric."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def before_train(self, runner: Runner) -> None:
        self.calls.append(("train",))

    def after_resume(self, runner: Runner) -> None:
        self.calls.append(("resume", runner.start_epoch))

    def before_epoch(self, runner: Runner, epoch: int) -> None:
        self.calls.append(
            ("epoch", epoch, runner.num_iters, runner.optimizer.param_groups[0]["lr"])
        )

    def before_step(self, runner: Runner) -> None:
        self.calls.append(("step", runner.iter))

    def after_step(self, runner: Runner) -> None:
        self.calls.append(("stepped", runner.iter, runner.window is not None))

    def after_epoch(self, runner: Runner, epoch: int) -> dict[str, float]:
        self.calls.append(("epoch done", epoch, runner.history[-1]["epoch"]))
        return {"seen_epoch": float(epoch)}

    def after_train(self, runner: Runner) -> None:
        self.calls.append(("train done",))


def _task(*hooks: Hook, train_mode: bool = True, losses: list[float] | None = None) -> Task:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    batches = [(torch.randn(8, 4), torch.randint(0, 3, (8,))) for _ in range(3)]

    def step(model: nn.Module, batch):
        images, target = batch
        logits = model(images)
        loss = F.cross_entropy(logits, target)
        if losses is not None:
            losses.append(loss.item())
        return loss, {"acc1": (logits.argmax(dim=1) == target).float().mean() * 100}

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return Task(model, optimizer, batches, step, hooks=hooks, train_mode=train_mode)


def _runner(task: Task, tmp_path, *, epochs: int = 2) -> Runner:
    return Runner(
        task, device=CPU, epochs=epochs, lr_at_epoch=lambda epoch: 0.1 / (epoch + 1),
        checkpointer=Checkpointer(tmp_path), log_period=2,
    )  # fmt: skip


def _epoch_calls(epoch: int, lr: float) -> list[tuple]:
    """A Recorder's calls for one epoch of 3 steps with log period 2."""
    steps = [call for i in range(3) for call in (("step", i), ("stepped", i, i in (1, 2)))]
    return [("epoch", epoch, 3, lr), *steps, ("epoch done", epoch, epoch + 1)]


def test_a_tasks_hook_gets_every_event_in_order(tmp_path):
    recorder = Recorder()
    runner = _runner(_task(recorder), tmp_path)
    runner.train()
    # the lr is set before the epoch's hooks run; the history entry is there before after_epoch
    expected = [("train",), *_epoch_calls(0, 0.1), *_epoch_calls(1, 0.05), ("train done",)]
    assert recorder.calls == expected


def test_hook_metrics_are_recorded_and_saved_with_the_epoch(tmp_path):
    runner = _runner(_task(Recorder()), tmp_path)
    runner.train()
    assert [h["seen_epoch"] for h in runner.history] == [0.0, 1.0]
    saved = load_checkpoint(tmp_path / "checkpoint_0000.pth.tar")
    assert saved["history"] == runner.history[:1]  # the hook ran before the checkpoint
    assert [h["lr"] for h in runner.history] == [0.1, 0.05]


def test_epoch_metrics_are_the_means_of_its_steps(tmp_path):
    losses: list[float] = []
    runner = _runner(_task(losses=losses), tmp_path, epochs=1)
    runner.train()
    assert runner.history[0]["loss"] == pytest.approx(statistics.fmean(losses), rel=1e-6)
    # log points every 2 steps and at the epoch's end: steps 1-2, then step 3 alone
    assert [p["iteration"] for p in runner.log_points] == [2, 3]
    assert runner.log_points[1]["loss"] == pytest.approx(losses[2], rel=1e-6)


def test_resume_tells_the_hooks_and_trains_only_what_is_left(tmp_path):
    _runner(_task(), tmp_path, epochs=1).train()
    recorder = Recorder()
    runner = _runner(_task(recorder), tmp_path, epochs=2)
    runner.resume_or_start()
    runner.train()
    assert recorder.calls[:2] == [("resume", 1), ("train",)]
    assert recorder.calls[2:] == [*_epoch_calls(1, 0.05), ("train done",)]
    assert [h["epoch"] for h in runner.history] == [1, 2]


class Tagged(Hook):
    """Writes its tag into a log shared with other hooks; returns a metric named after it."""

    def __init__(self, tag: str, log: list[tuple[str, str]]) -> None:
        self.tag, self.log = tag, log

    def before_step(self, runner: Runner) -> None:
        self.log.append((self.tag, "step"))

    def after_step(self, runner: Runner) -> None:
        self.log.append((self.tag, "stepped"))

    def after_epoch(self, runner: Runner, epoch: int) -> dict[str, float]:
        self.log.append((self.tag, "epoch"))
        return {f"{self.tag}_metric": 1.0}


def test_hooks_run_in_order_between_the_runners_own(tmp_path):
    log: list[tuple[str, str]] = []
    task_hook, registered = Tagged("task", log), Tagged("registered", log)
    runner = _runner(_task(task_hook), tmp_path, epochs=1)
    runner.register_hooks(registered)
    kinds = [type(hook) for hook in runner.hooks]
    assert kinds == [
        LRScheduler, NonFiniteGuard, Progress, Tagged, Tagged, TensorBoardWriter,
        PeriodicCheckpointer,
    ]  # fmt: skip
    assert runner.hooks[3:5] == [task_hook, registered]
    runner.train()
    step = [(tag, event) for event in ("step", "stepped") for tag in ("task", "registered")]
    assert log == [*step * 3, ("task", "epoch"), ("registered", "epoch")]
    # both metrics reached the checkpoint: the writers run after every other hook
    saved = load_checkpoint(tmp_path / "checkpoint_0000.pth.tar")
    assert saved["history"][0]["task_metric"] == saved["history"][0]["registered_metric"] == 1.0


def test_tensorboard_gets_log_points_and_every_epoch_metric(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runner = Runner(
        _task(Recorder()), device=CPU, epochs=2, lr_at_epoch=lambda epoch: 0.1,
        checkpointer=Checkpointer(tmp_path), log_period=2, tensorboard_dir=tmp_path / "tb",
    )  # fmt: skip
    runner.train()
    (events,) = (tmp_path / "tb").glob("events.out.tfevents.*")
    scalars = EventAccumulator(str(events)).Reload()
    train = {"train/" + k for k in ("loss", "acc1", "lr", "images_per_s")}
    epoch = {"epoch/" + k for k in ("loss", "acc1", "lr", "seconds", "images_per_s", "seen_epoch")}
    assert set(scalars.Tags()["scalars"]) == train | epoch
    assert [e.step for e in scalars.Scalars("train/loss")] == [2, 3, 5, 6]
    assert [(e.step, e.value) for e in scalars.Scalars("epoch/seen_epoch")] == [(1, 0.0), (2, 1.0)]


class Failing(Hook):
    """Raises in ``event`` of epoch ``epoch``; counts ``after_train``."""

    def __init__(self, event: str, epoch: int) -> None:
        self.event, self.epoch, self.finished = event, epoch, 0

    def after_step(self, runner: Runner) -> None:
        if self.event == "after_step" and runner.epoch == self.epoch and runner.iter == 1:
            raise RuntimeError("hook failed")

    def after_epoch(self, runner: Runner, epoch: int) -> dict[str, float]:
        if self.event == "after_epoch" and epoch == self.epoch:
            raise RuntimeError("hook failed")
        return {}

    def after_train(self, runner: Runner) -> None:
        self.finished += 1


@pytest.mark.parametrize("event", ["after_step", "after_epoch"])
def test_a_hook_that_raises_stops_the_run_cleanly(event, tmp_path):
    """The error propagates; no checkpoint of the failed epoch, the last one intact; every hook's
    ``after_train`` ran (the progress bar and TensorBoard writer are closed)."""
    failing = Failing(event, epoch=1)
    runner = Runner(
        _task(failing), device=CPU, epochs=3, lr_at_epoch=lambda epoch: 0.1,
        checkpointer=Checkpointer(tmp_path), log_period=2, tensorboard_dir=tmp_path / "tb",
    )  # fmt: skip
    with pytest.raises(RuntimeError, match="hook failed"):
        runner.train()
    assert sorted(p.name for p in tmp_path.glob("*.pth.tar")) == ["checkpoint_0000.pth.tar"]
    assert runner.last_saved == tmp_path / "checkpoint_0000.pth.tar"
    assert failing.finished == 1
    progress, writer = runner.hooks[2], runner.hooks[-2]
    assert progress.bar is None and writer.writer is None


def test_a_non_finite_loss_stops_the_run_naming_every_value(tmp_path):
    task, calls = _task(), []
    step = task.step

    def diverging(model, batch):  # from the second epoch's first step (the 4th) on
        calls.append(batch)
        loss, metrics = step(model, batch)
        return loss * float("nan") if len(calls) > 3 else loss, metrics

    task.step = diverging
    runner = _runner(task, tmp_path, epochs=2)
    with pytest.raises(NonFiniteLossError) as error:
        runner.train()
    message = str(error.value)
    assert message.startswith(
        "non-finite training values at epoch 2, iteration 2 (lr 0.05): loss=nan, acc1="
    )
    assert message.endswith(
        f"; stopping. The last checkpoint ({tmp_path / 'checkpoint_0000.pth.tar'}) is intact."
    )
    assert not (tmp_path / "checkpoint_0001.pth.tar").exists()


def test_a_task_that_trains_in_eval_mode_keeps_its_bn_statistics(tmp_path):
    task = _task(train_mode=False)
    before = task.model[1].running_mean.clone()
    _runner(task, tmp_path, epochs=1).train()
    assert torch.equal(task.model[1].running_mean, before)
    assert not torch.equal(task.model[0].weight, _task().model[0].weight)  # yet it trained
