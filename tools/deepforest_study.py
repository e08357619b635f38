"""DeepForest tree crowns: detection transfer from random init vs in-domain MoCo, over seeds.

One command reproduces results/deepforest/ from scratch (needs detectron2 and the deepforest wheel's
data, installed without its dependencies; the package is never imported):

    pip install --no-deps deepforest==2.1.0
    python tools/deepforest_study.py                     # CPU budget: about an hour on 2 cores

Steps (each skipped when its output exists, so an interrupted study resumes):

1. ``transfer/datasets/deepforest.py``: 400 px VOC tiles with a fixed train/test split by scene area,
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

from moco_pretrain.files import atomic_write_json
from transfer.datasets.deepforest import build_deepforest_voc
from transfer.pipeline import Pipeline

PRETRAIN_RECIPE = "pretrain/deepforest_r50_cpu.yaml"
DETECTION_RECIPE = "detection/deepforest_R_50_C4_{init}.yaml"
ROWS = {"random": "random init", "moco": "MoCo v2 (in-domain, unlabelled tiles)"}


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
    pipeline = Pipeline(args.work_dir, command=shlex.join(sys.argv))
    voc = pipeline.path("voc")
    if not (voc / "summary.json").is_file():
        pipeline.timed("tiles", build_deepforest_voc, voc, args.source)
    summary = {"tiles": json.loads((voc / "summary.json").read_text())}
    # MoCo on the unlabelled train patches: in-domain self-supervision, no labels
    opts = ["DATA.ROOT", str(voc), *shlex.split(args.pretrain_opts)]
    moco = pipeline.pretrain(PRETRAIN_RECIPE, "moco", opts)
    summary["moco"] = {k: moco[k] for k in ("epochs", "train_seconds", "checkpoint")}
    weights = pipeline.convert(moco["checkpoint"], "moco/moco_detectron2.pkl")
    datasets = f"[('deepforest_train', '{voc}', 'train'), ('deepforest_test', '{voc}', 'test')]"
    rows = [
        (label, pipeline.fine_tune(
            DETECTION_RECIPE.format(init=init), f"det_{init}", trials=args.trials,
            weights=weights if init == "moco" else None,
            opts=["MOCO.DATASETS.VOC", datasets, *args.opts], step=f"fine_tune/{init}",
        ))
        for init, label in ROWS.items()
    ]  # fmt: skip
    pipeline.report(rows, args.output.resolve(), random=ROWS["random"])
    summary["machine"] = pipeline.costs["machine"]
    summary["command"] = pipeline.costs["command"]
    atomic_write_json(args.output / "study.json", summary)


if __name__ == "__main__":
    main()
