"""``moco-benchmark``: the transfer benchmark on Fashion-MNIST scenes, end to end, in one command.

    moco-benchmark                                   # quick start: 1 trial, short schedule
    moco-benchmark --trials 3 --schedules short long # the committed study (results/fashion_scenes)

The MoCo paper's Table 2 protocol, done small: one backbone per initialisation, the same Mask
R-CNN R18-FPN fine-tuned from each (``detection/fashion_scenes_R_18_FPN_{sup,moco,random}.yaml``),
several trials, box and mask AP on held-out scenes, mean ± std and differences. Steps, each read
back when its output exists, so an interrupted run resumes where it stopped:

1. the scenes (:mod:`transfer.scenes`): train/val from 1,300 labelled training garments, test from
   the test set, COCO format;
2. MoCo v2 on the 60k training images without labels (``pretrain/fashion_mnist_demo.yaml``, with
   its kNN and linear probe of MoCo vs random-init features), or ``--pretrained CKPT``;
3. the supervised baseline: the same ResNet-18 trained with the 60k labels for as many epochs
   (``supervised/fashion_mnist.yaml``, 2 epochs);
4. ``moco-convert`` of both;
5. ``moco-transfer`` per initialisation, schedule and trial (``--eval-split val`` evaluates on the
   validation scenes instead, for choosing settings without looking at the test scenes);
6. ``moco-report`` per schedule: table, CSV and chart.

``--task sem_seg`` fine-tunes the paper's FCN on the scenes' per-pixel labels instead
(``segmentation/fashion_scenes_R_18_FCN_*.yaml``, mIoU), ``--task keypoints`` Keypoint R-CNN on
each garment's extreme points (``detection/fashion_scenes_R_18_FPN_keypoint_*.yaml``, keypoint
AP); runs and reports go to ``<task>/<schedule>/`` and ``report/<task>/<schedule>/``.

Without detectron2 it runs step 2, prints the feature-level comparison and how to install
detectron2. ``KEY VALUE`` pairs after the options go to every fine-tune.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from moco_pretrain.checkpoint import Checkpointer
from moco_pretrain.commandline import exit_on_user_error
from moco_pretrain.config import resolve_config_file, setup_cfg
from moco_pretrain.data import FASHION_MNIST_DIR
from moco_pretrain.files import atomic_write_json
from moco_pretrain.pretrain import feature_comparison, run_pretraining
from moco_pretrain.results import RESULTS_FILE
from moco_pretrain.weights import load_backbone_state_dict

from . import report
from .convert import convert_to_detectron2, write_detectron2_pkl
from .scenes import SUMMARY_FILE, build_fashion_scenes, scene_options

PRETRAIN_RECIPE = "pretrain/fashion_mnist_demo.yaml"
SUPERVISED_RECIPE = "supervised/fashion_mnist.yaml"
# The recipe's 3 epochs cut to the MoCo demo's 2: the same passes over the 60k images for both
# pretrained rows, and the quick start within its 25-minute budget on 2 cores.
SUPERVISED_EPOCHS = ["SOLVER.EPOCHS", "2"]
# Per task: the fine-tuning recipe and the folder name of its runs and reports.
RECIPES = {
    "detection": "detection/fashion_scenes_R_18_FPN_{init}.yaml",  # box and mask AP
    "sem_seg": "segmentation/fashion_scenes_R_18_FCN_{init}.yaml",  # mIoU
    "keypoints": "detection/fashion_scenes_R_18_FPN_keypoint_{init}.yaml",  # keypoint AP
}
TASK_DIRS = {"detection": "det", "sem_seg": "sem_seg", "keypoints": "keypoints"}
ARCH = "resnet18"
ROWS = {"sup": "supervised", "moco": "MoCo v2", "random": "random init"}  # config suffix: label
SCHEDULES = {"short": 1, "long": 3}  # factor on the config's SOLVER.MAX_ITER and SOLVER.STEPS
DETECTRON2_INSTALL = (
    "pip install 'setuptools<81' && pip install --no-build-isolation "
    "'git+https://github.com/facebookresearch/detectron2.git'"
)


class Timer:
    """Seconds spent per step, summed over resumed runs, in ``benchmark.json``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.record: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
        self.record.setdefault("seconds", {})

    def run(self, step: str, fn, *args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:  # an interrupted step keeps the time it spent
            spent = time.perf_counter() - start + self.record["seconds"].get(step, 0.0)
            self.record["seconds"][step] = round(spent, 1)
            atomic_write_json(self.path, self.record)


def pretrain(work: Path, opts: list[str], timer: Timer) -> dict[str, Any]:
    out = work / "moco"
    if not (out / "summary.json").is_file():
        cfg = setup_cfg(PRETRAIN_RECIPE, [*opts, "OUTPUT_DIR", str(out)])
        timer.run("pretrain", run_pretraining, cfg)
    return json.loads((out / "summary.json").read_text())


def train_supervised(work: Path, opts: list[str], timer: Timer) -> Path:
    """The supervised ResNet-18; returns its last checkpoint."""
    from moco_pretrain.supervised import run_supervised

    out = work / "supervised"
    if not (out / RESULTS_FILE).is_file():
        cfg = setup_cfg(SUPERVISED_RECIPE, [*SUPERVISED_EPOCHS, *opts, "OUTPUT_DIR", str(out)])
        timer.run("supervised", run_supervised, cfg)
    return Checkpointer(out).last_checkpoint()


def convert(checkpoint: str | Path, path: Path) -> Path:
    """Detectron2 weights of a ResNet-18 checkpoint; one line if it holds another architecture."""
    if not path.is_file():
        backbone = load_backbone_state_dict(checkpoint)
        write_detectron2_pkl(convert_to_detectron2(backbone, arch=ARCH), path)
    return path


def check_scenes(scenes: Path, counts: dict[str, int]) -> None:
    """Refuse to mix runs over scenes built from other garment counts."""
    built = json.loads((scenes / SUMMARY_FILE).read_text())["counts"]
    if built != counts:
        raise ValueError(
            f"{scenes} holds scenes built with {built}, not {counts}: choose another --work-dir"
        )


def scaled_schedule(recipe: str, factor: int, opts: list[str]) -> list[str]:
    """``SOLVER.MAX_ITER`` / ``SOLVER.STEPS`` overrides: the config's (after ``opts``) x factor."""
    from . import train_net

    config_file = str(resolve_config_file(recipe))
    cfg = train_net.build_cfg(argparse.Namespace(config_file=config_file, opts=opts))
    steps = tuple(s * factor for s in cfg.SOLVER.STEPS)
    return ["SOLVER.MAX_ITER", str(cfg.SOLVER.MAX_ITER * factor), "SOLVER.STEPS", str(steps)]


def fine_tune(
    out: Path, init: str, *, task: str, scenes: list[str], weights: Path | None, trials: int,
    factor: int, opts: list[str],
) -> None:  # fmt: skip
    """``task``'s row ``init``: ``trials`` fine-tunes into ``out``; ``scenes`` are the overrides
    that register the scenes (:func:`transfer.scenes.scene_options`)."""
    from . import train_net

    recipe = RECIPES[task].format(init=init)
    argv = [
        "--config-file", recipe, "--num-trials", str(trials), *scenes, "OUTPUT_DIR", str(out),
        *(["MODEL.WEIGHTS", str(weights)] if weights else []),
        *opts, *scaled_schedule(recipe, factor, opts),
    ]  # fmt: skip
    train_net.main(argv)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moco-benchmark",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--work-dir", type=Path, default=Path("output/fashion_scenes"))
    parser.add_argument(
        "--data-root", type=Path, default=None,
        help=f"Fashion-MNIST IDX folder (default: {FASHION_MNIST_DIR})",
    )  # fmt: skip
    parser.add_argument(
        "--labelled", type=int, default=1000,
        help="labelled training garments in the train scenes (class-balanced)",
    )  # fmt: skip
    parser.add_argument("--val-garments", type=int, default=300, help="garments, val scenes")
    parser.add_argument("--test-garments", type=int, default=1500, help="garments, test scenes")
    parser.add_argument(
        "--task", choices=list(RECIPES), default="detection",
        help="detection: Mask R-CNN, box and mask AP; sem_seg: the FCN, mIoU; keypoints: "
        "Keypoint R-CNN on the garments' extreme points, keypoint AP",
    )  # fmt: skip
    parser.add_argument("--trials", type=int, default=1, help="fine-tunes per initialisation")
    parser.add_argument(
        "--schedules", nargs="+", choices=list(SCHEDULES), default=["short"],
        help="short: the config's schedule; long: 3x its iterations and lr steps",
    )  # fmt: skip
    parser.add_argument(
        "--eval-split", choices=("test", "val"), default="test",
        help="val: evaluate on the validation scenes (choose settings there, never on test)",
    )  # fmt: skip
    parser.add_argument("--pretrained", default=None, help="a MoCo ResNet-18 checkpoint to reuse")
    parser.add_argument("--pretrain-opts", default="", help="KEY VALUE overrides of the MoCo run")
    parser.add_argument("--supervised-opts", default="", help="KEY VALUE overrides, supervised run")
    parser.add_argument("--name", default="", help="suffix of the fine-tune folders (sweeps)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE, every fine-tune")
    return parser


def run(args: argparse.Namespace) -> None:
    work: Path = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    timer = Timer(work / "benchmark.json")
    timer.record["command"] = shlex.join(["moco-benchmark", *sys.argv[1:]])
    data = ["DATA.ROOT", str(args.data_root)] if args.data_root else []
    has_detectron2 = importlib.util.find_spec("detectron2") is not None
    if has_detectron2:
        scenes = work / "scenes"
        counts = {"num_labelled": args.labelled, "num_val": args.val_garments,
                  "num_test": args.test_garments}  # fmt: skip
        if not (scenes / SUMMARY_FILE).is_file():  # rebuilt whole when unfinished
            root = args.data_root or FASHION_MNIST_DIR
            timer.run("scenes", build_fashion_scenes, scenes, root=root, **counts)
        check_scenes(scenes, counts)
    if args.pretrained:
        checkpoint = args.pretrained
    else:
        summary = pretrain(work, [*data, *shlex.split(args.pretrain_opts)], timer)
        print("\n".join(feature_comparison(summary)))
        checkpoint = summary["checkpoint"]
    if not has_detectron2:
        print(
            "moco-benchmark: detectron2 is not installed, so the detection benchmark did not run;"
            f" install it with: {DETECTRON2_INSTALL}"
        )
        return
    moco = convert(checkpoint, work / "weights" / "moco.pkl")  # before anything else trains
    supervised = train_supervised(work, [*data, *shlex.split(args.supervised_opts)], timer)
    weights = {"sup": convert(supervised, work / "weights" / "supervised.pkl"), "moco": moco}
    scene_opts = scene_options(args.task, scenes, args.eval_split)  # labels derived once
    for schedule in args.schedules:
        run_name = schedule + ("-val" if args.eval_split == "val" else "") + args.name
        task_dir = TASK_DIRS[args.task]
        step = run_name if args.task == "detection" else f"{task_dir}/{run_name}"
        rows = []
        for init, label in ROWS.items():
            out = work / task_dir / run_name / init
            timer.run(
                f"fine_tune/{step}/{init}", fine_tune, out, init, task=args.task,
                scenes=scene_opts, weights=weights.get(init), trials=args.trials,
                factor=SCHEDULES[schedule], opts=args.opts,
            )  # fmt: skip
            rows.append(f"{label}={out}")
        print(
            f"\n# Fashion-MNIST scenes, {args.task}, {schedule} schedule, {args.eval_split} scenes\n"
        )
        report.main([*rows, "--output", str(work / "report" / step),
                     "--supervised", ROWS["sup"], "--random", ROWS["random"]])  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    with exit_on_user_error("moco-benchmark"):
        if args.trials < 1:
            raise ValueError(f"--trials must be at least 1, got {args.trials}")
        run(args)


if __name__ == "__main__":
    main()
