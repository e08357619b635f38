"""One resumable pipeline for every study: data, pretrain, supervised, convert, fine-tune, report.

Each step writes its output into the study's work folder and is read back, never rerun, when that
output exists, so an interrupted study resumes by rerunning its command. The seconds each step
spent are summed over resumed runs in ``<work>/costs.json``, with the command and the machine.
``moco-benchmark`` (:mod:`transfer.benchmark`), ``tools/deepforest_study.py``,
``tools/fashion_mnist_study.py`` and ``tools/choose_on_holdout.py`` are its inputs: recipes,
overrides and folders.

    pipeline = Pipeline(Path("work"), command="...")
    summary = pipeline.pretrain("pretrain/fashion_mnist_demo.yaml", "moco", ["SEED", "0"])
    weights = pipeline.convert(summary["checkpoint"], "weights/moco.pkl", arch="resnet18")
    runs = pipeline.fine_tune("detection/fashion_scenes_R_18_FPN_moco.yaml", "det/moco",
                              weights=weights, trials=3, opts=[...])
    pipeline.report([("MoCo v2", runs), ...], "report")
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from moco_pretrain.checkpoint import Checkpointer
from moco_pretrain.config import setup_cfg
from moco_pretrain.files import atomic_write_json
from moco_pretrain.machine import describe_machine
from moco_pretrain.recipes import resolve_config_file
from moco_pretrain.report import write_report
from moco_pretrain.results import RESULTS_FILE
from moco_pretrain.weights import load_backbone_state_dict

from .convert import convert_to_detectron2, write_detectron2_pkl

COSTS_FILE = "costs.json"
PRETRAIN_SUMMARY = "summary.json"  # what a pretraining run writes last


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


class Pipeline:
    """The steps of a study in ``work``; relative output paths are below it."""

    def __init__(self, work: Path, *, command: str) -> None:
        self.work = Path(work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.costs_path = self.work / COSTS_FILE
        record = json.loads(self.costs_path.read_text()) if self.costs_path.is_file() else {}
        self.costs: dict[str, Any] = {"seconds": {}, **record, "command": command}
        self.costs["machine"] = describe_machine()
        atomic_write_json(self.costs_path, self.costs)

    def path(self, out: str | Path) -> Path:
        """``out`` below the work folder (an absolute ``out`` as it is)."""
        out = Path(out)
        if (
            not out.is_absolute()
            and self.work.parts
            and out.parts[: len(self.work.parts)] == (self.work.parts)
        ):
            raise ValueError(
                f"{out} names the work folder {self.work} again: give it relative to it"
            )
        return self.work / out

    def timed(self, step: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)``; its seconds are added to ``step``'s, even when it fails."""
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            seconds = self.costs["seconds"]
            seconds[step] = round(seconds.get(step, 0.0) + time.perf_counter() - start, 1)
            atomic_write_json(self.costs_path, self.costs)

    def run(
        self, task: Callable[[Any], Any], recipe: str, out: str | Path, opts: Sequence[str], *,
        done: str, step: str,
    ) -> Path:  # fmt: skip
        """``task(cfg)`` on ``recipe`` with ``opts`` into ``out``, unless ``out/done`` exists;
        returns that file."""
        out = self.path(out)
        if not (out / done).is_file():
            cfg = setup_cfg(recipe, [*opts, "OUTPUT_DIR", str(out)])
            self.timed(step, task, cfg)
        return out / done

    def pretrain(
        self, recipe: str, out: str | Path, opts: Sequence[str] = (), *, step: str = "pretrain"
    ) -> dict[str, Any]:
        """A MoCo run; its ``summary.json`` (``checkpoint``: the last checkpoint)."""
        from moco_pretrain.pretrain import run_pretraining

        return read_json(
            self.run(run_pretraining, recipe, out, opts, done=PRETRAIN_SUMMARY, step=step)
        )

    def supervised(
        self, recipe: str, out: str | Path, opts: Sequence[str] = (), *, step: str = "supervised"
    ) -> Path:
        """A supervised classifier run; its last checkpoint."""
        from moco_pretrain.supervised import run_supervised

        self.run(run_supervised, recipe, out, opts, done=RESULTS_FILE, step=step)
        return Checkpointer(self.path(out)).last_checkpoint()

    def evaluate(
        self, task: Callable[..., Any], recipe: str, out: str | Path, opts: Sequence[str] = (),
        *, pretrained: str | Path, step: str, done: str = RESULTS_FILE,
    ) -> dict[str, Any]:  # fmt: skip
        """A frozen-backbone evaluation of ``pretrained`` (``run_lincls``; ``run_knn`` writes
        ``knn/results.json``); its results."""
        run = partial(task, pretrained=str(pretrained))
        return read_json(self.run(run, recipe, out, opts, done=done, step=step))

    def convert(
        self, checkpoint: str | Path, path: str | Path, *, arch: str = "resnet50",
        check: Callable[[dict[str, Any]], None] | None = None,
    ) -> Path:  # fmt: skip
        """Detectron2 weights of ``checkpoint``'s backbone at ``path``; ``check`` (given the
        weights' provenance) raises before anything is written."""
        path = self.path(path)
        if not path.is_file():
            converted = convert_to_detectron2(load_backbone_state_dict(checkpoint), arch=arch)
            if check is not None:
                check(converted["provenance"])
            write_detectron2_pkl(converted, path)
        return path

    def fine_tune(
        self, recipe: str, out: str | Path, *, trials: int, weights: Path | None = None,
        opts: Sequence[str] = (), step: str = "fine_tune",
    ) -> Path:  # fmt: skip
        """Trials ``0..trials-1`` of the detectron2 ``recipe`` into ``out/trial_k`` (finished
        ones skipped); returns ``out``."""
        from .train_net import FineTune, fine_tune

        out = self.path(out)
        overrides = [*(["MODEL.WEIGHTS", str(weights)] if weights else []), *opts]
        job = FineTune(str(resolve_config_file(recipe)), [*overrides, "OUTPUT_DIR", str(out)])
        self.timed(step, fine_tune, job, trials=range(trials))
        return out

    def report(self, rows: Sequence[tuple[str, Path]], output: str | Path, **options: Any) -> str:
        """``moco-report`` of ``(label, folder)`` rows into ``output`` (:func:`write_report`)."""
        return write_report(rows, self.path(output), **options)
