"""The run loop's contract with tasks: hooks return metrics, the runner records and saves them."""

from __future__ import annotations

import statistics

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moco_pretrain.checkpoint import Checkpointer, load_checkpoint
from moco_pretrain.engine import Hook, Runner, Task

CPU = torch.device("cpu")


class Recorder(Hook):
    """Records every call; reports the epoch it saw as a metric."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def after_resume(self, runner: Runner) -> None:
        self.calls.append(("resume", runner.start_epoch))

    def before_step(self, runner: Runner) -> None:
        self.calls.append(("step",))

    def after_epoch(self, runner: Runner, epoch: int) -> dict[str, float]:
        self.calls.append(("epoch", epoch))
        return {"seen_epoch": float(epoch)}


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


def test_hook_metrics_are_recorded_and_saved_with_the_epoch(tmp_path):
    recorder = Recorder()
    runner = _runner(_task(recorder), tmp_path)
    runner.train()
    assert [h["seen_epoch"] for h in runner.history] == [0.0, 1.0]
    assert recorder.calls == [*[("step",)] * 3, ("epoch", 0), *[("step",)] * 3, ("epoch", 1)]
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
    assert recorder.calls[0] == ("resume", 1)
    assert recorder.calls[-1] == ("epoch", 1) and ("epoch", 0) not in recorder.calls
    assert [h["epoch"] for h in runner.history] == [1, 2]


class Tagged(Hook):
    """Writes its tag into a log shared with other hooks."""

    def __init__(self, tag: str, log: list[tuple[str, str]]) -> None:
        self.tag, self.log = tag, log

    def before_step(self, runner: Runner) -> None:
        self.log.append((self.tag, "step"))

    def after_epoch(self, runner: Runner, epoch: int) -> dict[str, float]:
        self.log.append((self.tag, "epoch"))
        return {}


def test_registered_hooks_run_after_the_tasks_own(tmp_path):
    log: list[tuple[str, str]] = []
    task_hook, registered = Tagged("task", log), Tagged("registered", log)
    runner = _runner(_task(task_hook), tmp_path, epochs=1)
    runner.register_hooks(registered)
    runner.train()
    step = [("task", "step"), ("registered", "step")]
    assert log == [*step * 3, ("task", "epoch"), ("registered", "epoch")]
    assert runner.hooks == [task_hook, registered]


def test_a_task_that_trains_in_eval_mode_keeps_its_bn_statistics(tmp_path):
    task = _task(train_mode=False)
    before = task.model[1].running_mean.clone()
    _runner(task, tmp_path, epochs=1).train()
    assert torch.equal(task.model[1].running_mean, before)
    assert not torch.equal(task.model[0].weight, _task().model[0].weight)  # yet it trained
