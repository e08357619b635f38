"""Why facebookresearch/moco#23 diverged: a MoCo backbone under detectron2's keypoint recipe.

The issue: MoCo's R50 (torchvision layout, trained on inputs divided by torchvision's std),
fine-tuned with detectron2's keypoint_rcnn_R_50_FPN_3x.yaml (FrozenBN, FREEZE_AT 2, no FPN norm,
Caffe normalisation: PIXEL_STD 1), went to NaN after about 700 iterations. This study trains the
Fashion-MNIST scenes keypoint variant (Keypoint R-CNN R18-FPN from the MoCo R18) under each
setting of SETTINGS, one seed, and records

1. at iteration 0, on one fixed batch of train scenes, in training mode: the std of the
   normalised input and of every backbone output (res2-res5, p2-p6);
2. every iteration's losses, and the iteration at which training diverged: detectron2 stops a
   run with FloatingPointError on a non-finite loss, or earlier, inside the RPN, on non-finite
   proposals; both are caught here and the iteration is recorded.

    python tools/keypoint_stability.py --scenes SCENES --weights moco.pkl   # ~30 min on 2 cores

SCENES holds ``<split>_keypoints.json`` (transfer.datasets.scenes.write_keypoint_annotations; written there
when missing). Each setting runs in ``--work-dir/<key>``; a finished one (its trace.json) is read
back, not rerun. Writes results.json (every figure, the machine, the command) and table.md into
--output. ``KEY VALUE`` pairs after the options apply to every setting, last.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import detectron2
import torch
from detectron2.data import DatasetCatalog, DatasetMapper
from detectron2.engine import HookBase
from detectron2.utils.env import seed_all_rng
from detectron2.utils.logger import setup_logger

from moco_pretrain.files import atomic_write, atomic_write_json
from moco_pretrain.machine import describe_machine
from moco_pretrain.recipes import resolve_config_file
from transfer.datasets.register import register_datasets
from transfer.datasets.scenes import scene_options
from transfer.preflight import load_verified
from transfer.train_net import Trainer, build_cfg

RECIPE = "detection/fashion_scenes_R_18_FPN_keypoint_moco.yaml"
# detectron2's Base-RCNN-FPN.yaml backbone, as moco#23 ran it. INPUT.FORMAT and STRIDE_IN_1X1 are
# copied for fidelity only: the scenes are grey (the three channels are equal) and a BasicBlock
# has no 1x1 conv, so neither changes anything here.
DETECTRON2_BACKBONE = [
    "MODEL.RESNETS.NORM", "FrozenBN", "MODEL.BACKBONE.FREEZE_AT", "2", "MODEL.FPN.NORM", "",
    "INPUT.FORMAT", "BGR", "MODEL.RESNETS.STRIDE_IN_1X1", "True",
]  # fmt: skip
# Caffe normalisation: the 0-255 mean is subtracted, nothing is divided (PIXEL_MEAN is the
# recipe's, the scenes' pretraining mean, in place of detectron2's ImageNet BGR mean).
CAFFE_STD = ["MODEL.PIXEL_STD", "[1.0, 1.0, 1.0]"]
SETTINGS = {
    "A": ("this repository's recipe: SyncBN backbone + FPN, nothing frozen, pretraining mean/std",
          []),
    "B": ("detectron2's recipe as in moco#23: FrozenBN, FREEZE_AT 2, FPN without norm, PIXEL_STD 1",
          DETECTRON2_BACKBONE + CAFFE_STD),
    "C": ("B with the pretraining mean/std (FrozenBN alone)", DETECTRON2_BACKBONE),
    "D": ("A with PIXEL_STD 1 (does trained BN rescue it?)", CAFFE_STD),
    "E": ("B at a 10x lower lr", DETECTRON2_BACKBONE + CAFFE_STD + ["SOLVER.BASE_LR", "0.002"]),
    "F": ("C at a 10x lower lr", DETECTRON2_BACKBONE + ["SOLVER.BASE_LR", "0.002"]),
    "G": ("C with SyncBN in FPN (frozen backbone BN alone)",
          DETECTRON2_BACKBONE + ["MODEL.FPN.NORM", "SyncBN"]),
}  # fmt: skip
FEATURES = ("res2", "res3", "res4", "res5", "p2", "p3", "p4", "p5", "p6")


def first_non_finite(values: Sequence[float | None]) -> int | None:
    """Index of the first value that is NaN, infinite or missing (``None``); None if all finite."""
    for i, value in enumerate(values):
        if value is None or not math.isfinite(value):
            return i
    return None


def finite_or_none(value: float) -> float | None:
    """JSON has no NaN/inf: a non-finite loss is written as null."""
    return value if math.isfinite(value) else None


class LossTrace(HookBase):
    """Every training iteration's loss terms, read from the model's output (so the iteration that
    detectron2 stops on a non-finite loss is recorded too). Only an iteration's first forward
    counts: PreciseBN's extra forwards at the last iteration are not training steps."""

    def __init__(self) -> None:
        self.losses: dict[int, dict[str, float]] = {}

    def before_train(self) -> None:
        self._handle = self.trainer.model.register_forward_hook(self._record)

    def after_train(self) -> None:
        self._handle.remove()

    def _record(self, module, inputs, output) -> None:
        if module.training and isinstance(output, dict):
            terms = {k: float(v.detach()) for k, v in output.items()}
            self.losses.setdefault(self.trainer.iter, terms)

    def series(self) -> dict[str, list[float | None]]:
        """``{"total": [...], term: [...]}`` over iterations 0..last recorded."""
        iters = sorted(self.losses)
        terms = {
            k: [finite_or_none(self.losses[i][k]) for i in iters] for k in self.losses[iters[0]]
        }
        totals = [sum(self.losses[i].values()) for i in iters]
        return {"total": [finite_or_none(t) for t in totals], **terms}


@torch.no_grad()
def activation_std(model: torch.nn.Module, batch: list[dict[str, Any]]) -> dict[str, float]:
    """Std of the normalised input and of every backbone output on ``batch``, in training mode
    (BN layers that train normalise with the batch's statistics, as in the first step). Run on a
    copy: the BN running statistics of ``model`` are left as loaded."""
    model = copy.deepcopy(model).train()
    images = model.preprocess_image(batch).tensor  # N x 3 x H x W, normalised and padded
    stds = {"input": images.std().item()}
    stds.update({k: v.std().item() for k, v in model.backbone.bottom_up(images).items()})
    stds.update({k: v.std().item() for k, v in model.backbone(images).items()})
    return stds


def fixed_batch(cfg, size: int) -> list[dict[str, Any]]:
    """The first ``size`` train scenes, mapped without augmentation (same pixels for every row)."""
    dicts = DatasetCatalog.get(cfg.DATASETS.TRAIN[0])[:size]
    mapper = DatasetMapper(cfg, is_train=False)
    return [mapper(copy.deepcopy(d)) for d in dicts]


def run_setting(out: Path, opts: list[str]) -> dict[str, Any]:
    """Train one setting in ``out``; its trace (activation std, losses, outcome)."""
    cfg = build_cfg(str(resolve_config_file(RECIPE)), opts)
    cfg.OUTPUT_DIR = str(out)
    cfg.freeze()
    register_datasets(cfg)
    seed_all_rng(cfg.SEED)
    trainer = Trainer(cfg)
    load_verified(
        trainer.model, lambda: trainer.resume_or_load(resume=False), weights=cfg.MODEL.WEIGHTS
    )
    stds = activation_std(trainer.model, fixed_batch(cfg, cfg.SOLVER.IMS_PER_BATCH))
    trace = LossTrace()
    trainer.register_hooks([trace])
    start, error, diverged_at = time.perf_counter(), None, None
    try:
        trainer.train()
    except FloatingPointError as exc:  # a non-finite loss, or non-finite RPN proposals
        error, diverged_at = str(exc).splitlines()[0], trainer.iter
    losses = trace.series()
    return {
        "activation_std": {k: stds[k] for k in ("input", *FEATURES)},
        "losses": losses,
        "first_non_finite": first_non_finite(losses["total"]),
        "diverged_at": diverged_at,
        "error": error,
        "iterations": len(losses["total"]),
        "max_total": max(v for v in losses["total"] if v is not None),
        "seconds": time.perf_counter() - start,
        "base_lr": cfg.SOLVER.BASE_LR,
    }


def summary_table(rows: dict[str, dict[str, Any]], terms: Sequence[str]) -> str:
    """Markdown: activation std at iteration 0 and the loss outcome per setting."""
    head = [
        "setting",
        "lr",
        "input std",
        *(f"{k} std" for k in FEATURES),
        "outcome",
        *(f"{t}, last 10 it." for t in terms),
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, row in rows.items():
        stds = [f"{row['activation_std'][k]:.3g}" for k in ("input", *FEATURES)]
        k = row["diverged_at"]
        outcome = f"diverged at iteration {k}" if k is not None else "finite"
        outcome += f", max total loss {row['max_total']:.3g}"
        tail = [f"{_last_mean(row['losses'][t]):.3g}" for t in terms]
        lines.append("| " + " | ".join([key, f"{row['base_lr']:g}", *stds, outcome, *tail]) + " |")
    return "\n".join(lines) + "\n"


def _last_mean(values: list[float | None], n: int = 10) -> float:
    """Mean of the last ``n`` finite values (NaN if none)."""
    finite = [v for v in values if v is not None][-n:]
    return sum(finite) / len(finite) if finite else math.nan


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scenes", type=Path, required=True, help="Fashion-MNIST scenes folder")
    parser.add_argument("--weights", type=Path, required=True, help="converted MoCo R18 .pkl")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--iters", type=int, default=60, help="training iterations per setting")
    parser.add_argument("--work-dir", type=Path, default=Path("output/keypoint_stability"))
    parser.add_argument("--output", type=Path, default=Path("results/keypoint_stability"))
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides, every setting")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    setup_logger(output=str(args.work_dir / "log.txt"), name="detectron2")
    # Batch 8 at lr 0.02 (detectron2's batch-16 lr, 2x its linear scaling to batch 8), linear
    # warm-up over the first third of the run from 0.001 x lr, no lr drop, a fixed seed. No
    # evaluation and no precise BN: the question is whether training stays finite.
    common = [
        *scene_options("keypoints", args.scenes, "val"), "MODEL.WEIGHTS", str(args.weights),
        "SOLVER.IMS_PER_BATCH", "8", "SOLVER.BASE_LR", "0.02", "SOLVER.MAX_ITER", str(args.iters),
        "SOLVER.WARMUP_ITERS", str(args.iters // 3), "SOLVER.STEPS", "()", "SEED", "0",
        "DATASETS.TEST", "()", "TEST.PRECISE_BN.ENABLED", "False",
    ]  # fmt: skip
    rows = {}
    for key in args.settings:
        label, opts = SETTINGS[key]
        out = args.work_dir / key
        done = out / "trace.json"
        if not done.is_file():
            trace = run_setting(out, [*common, *opts, *args.opts])
            atomic_write_json(done, {"label": label, "opts": opts, **trace})
        rows[key] = json.loads(done.read_text())
    terms = ["total", "loss_keypoint"]
    table = summary_table(rows, terms)
    atomic_write(args.output / "table.md", lambda f: f.write(table.encode()))
    machine = {**describe_machine("cpu"), "detectron2": detectron2.__version__}
    summary = {"settings": rows, "common_opts": common, "machine": machine}
    summary["command"] = " ".join(["python", *sys.argv])
    atomic_write_json(args.output / "results.json", summary)
    print(table)


if __name__ == "__main__":
    main()
