"""DeepForest tree crowns: detection transfer from random init vs in-domain MoCo, over seeds.

One command reproduces results/deepforest/ from scratch (needs detectron2 and the deepforest wheel's
data, installed without its dependencies; the package is never imported):

    pip install --no-deps deepforest==2.1.0
    python tools/deepforest_study.py                     # CPU budget: about an hour on 2 cores

Steps (each skipped when its output exists, so an interrupted study resumes):

1. ``tools/deepforest_data.py``: 400 px VOC tiles with a fixed train/test split by scene area,
   plus unlabelled 192 px patches of the train tiles;
2. MoCo v2 ResNet-50 on those patches (pretrain/deepforest_r50_cpu.yaml): in-domain
   self-supervision, no labels;
3. moco-convert to Detectron2 weights;
4. moco-transfer: Faster R-CNN R50-C4 (detection/deepforest_R_50_C4_{random,moco}.yaml, the
   plugin's transfer settings), --trials seeds per initialisation, test AP50/AP/AP75;
5. moco-report: mean +- std table and chart.

``KEY VALUE`` pairs after the options go to every fine-tune, ``--pretrain-opts`` to the MoCo run
(e.g. ``MODEL.DEVICE cuda SOLVER.MAX_ITER 3000 ...`` and ``--pretrain-opts "SOLVER.EPOCHS 200"``
for a GPU budget). The embedded default checkpoint (the Fashion-MNIST demo)
is a ResNet-18 on 32 px grey clothing: it cannot initialise an R50-C4 and is not a row here.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

from deepforest_data import build_deepforest_voc  # tools/, this script's folder, is on sys.path

from moco_pretrain.config import setup_cfg
from moco_pretrain.files import atomic_write_json
from moco_pretrain.machine import describe_machine
from moco_pretrain.pretrain import run_pretraining
from moco_pretrain.weights import load_backbone_state_dict
from transfer import report, train_net
from transfer.convert import convert_to_detectron2, write_detectron2_pkl

PRETRAIN_RECIPE = "pretrain/deepforest_r50_cpu.yaml"
DETECTION_RECIPE = "detection/deepforest_R_50_C4_{init}.yaml"
ROWS = {"random": "random init", "moco": "MoCo v2 (in-domain, unlabelled tiles)"}


def tiles(work: Path, source: str | None) -> dict[str, Any]:
    voc = work / "voc"
    if not (voc / "summary.json").is_file():
        build_deepforest_voc(voc, source)
    return json.loads((voc / "summary.json").read_text())


def pretrain_in_domain(work: Path, opts: list[str]) -> tuple[dict[str, Any], Path]:
    """MoCo on the unlabelled train patches; returns its summary and the Detectron2 weights."""
    out = work / "moco"
    if not (out / "summary.json").is_file():
        overrides = ["DATA.ROOT", str(work / "voc"), *opts, "OUTPUT_DIR", str(out)]
        run_pretraining(setup_cfg(PRETRAIN_RECIPE, overrides))
    summary = json.loads((out / "summary.json").read_text())
    weights = out / "moco_detectron2.pkl"
    if not weights.is_file():
        converted = convert_to_detectron2(load_backbone_state_dict(summary["checkpoint"]))
        write_detectron2_pkl(converted, weights)
    return summary, weights


def fine_tune(work: Path, init: str, *, weights: Path, trials: int, opts: list[str]) -> Path:
    out = work / f"det_{init}"
    voc = str(work / "voc")
    datasets = f"[('deepforest_train', '{voc}', 'train'), ('deepforest_test', '{voc}', 'test')]"
    argv = [
        "--config-file", DETECTION_RECIPE.format(init=init), "--num-trials", str(trials),
        "MOCO.DATASETS.VOC", datasets, "OUTPUT_DIR", str(out),
        *(["MODEL.WEIGHTS", str(weights)] if init == "moco" else []), *opts,
    ]  # fmt: skip
    train_net.main(argv)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--source", default=None, help="deepforest wheel or folder (default: installed)"
    )
    parser.add_argument("--trials", type=int, default=3, help="seeds per initialisation")
    parser.add_argument("--pretrain-opts", default="", help="KEY VALUE overrides of the MoCo run")
    parser.add_argument("--work-dir", type=Path, default=Path("output/study/deepforest"))
    parser.add_argument("--output", type=Path, default=Path("results/deepforest"))
    parser.add_argument(
        "opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides, every fine-tune"
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    summary = {"tiles": tiles(args.work_dir, args.source)}
    moco, weights = pretrain_in_domain(args.work_dir, shlex.split(args.pretrain_opts))
    summary["moco"] = {k: moco[k] for k in ("epochs", "train_seconds", "checkpoint")}
    rows = []
    for init, label in ROWS.items():
        out = fine_tune(args.work_dir, init, weights=weights, trials=args.trials, opts=args.opts)
        rows.append(f"{label}={out}")
    report.main([*rows, "--output", str(args.output), "--random", ROWS["random"]])
    summary["machine"] = describe_machine()
    summary["command"] = " ".join(sys.argv)
    atomic_write_json(args.output / "study.json", summary)


if __name__ == "__main__":
    main()
