"""DeepForest tree crowns: does in-domain MoCo pretraining help detection, and with how many labels?

One command reproduces the study from scratch (needs detectron2 and the deepforest wheel's data,
installed without its dependencies; the package is never imported):

    pip install --no-deps deepforest==2.1.0
    python tools/deepforest_study.py

Steps (each read back when its output exists, so an interrupted study resumes):

1. ``transfer/datasets/deepforest.py``: 400 px tiles with a fixed split by scene area, as a VOC
   tree and as COCO files (train / val / test; val is the one-tile OSBS_029 scene), plus
   unlabelled 192 px patches of the train-area tiles;
2. MoCo v2 ResNet-50 on those patches (``pretrain/deepforest_r50_cpu.yaml``): in-domain
   self-supervision, no labels;
3. ``moco-benchmark --dataset`` on the COCO files, run as its command: random init against the
   MoCo row, Faster R-CNN R50-FPN (the tiles have boxes, no masks) with the same settings for
   both rows, ``--trials`` seeds, each ``--label-fractions`` subset of the training tiles; its
   reports, per fraction, and the AP-against-fraction charts are copied to ``--output``.

``KEY VALUE`` pairs after the options go to every fine-tune (after :data:`FINE_TUNE`, the CPU
budget), ``--pretrain-opts`` to the MoCo run.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from moco_pretrain.files import atomic_write_json
from transfer.benchmark import split_overrides
from transfer.datasets.deepforest import build_deepforest_voc
from transfer.pipeline import Pipeline

PRETRAIN_RECIPE = "pretrain/deepforest_r50_cpu.yaml"
MOCO_ROW = "MoCo v2 (in-domain, unlabelled tiles)"
# A CPU budget for 400 px tiles of 15-65 px crowns, the same for every row and fraction (the
# earlier R50-C4 study's: native scale, small anchors, 32 ROIs per image, batch 2, 100 iterations
# with lr 0.01 and 20 warm-up iterations, x0.1 at 75).
FINE_TUNE = [
    "INPUT.MIN_SIZE_TRAIN", "(400,)", "INPUT.MAX_SIZE_TRAIN", "400",
    "INPUT.MIN_SIZE_TEST", "400", "INPUT.MAX_SIZE_TEST", "400",
    "MODEL.ANCHOR_GENERATOR.SIZES", "[[16], [32], [64], [128], [256]]",
    "MODEL.RPN.POST_NMS_TOPK_TRAIN", "500", "MODEL.RPN.POST_NMS_TOPK_TEST", "150",
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32", "TEST.DETECTIONS_PER_IMAGE", "150",
    "SOLVER.IMS_PER_BATCH", "2", "SOLVER.BASE_LR", "0.01", "SOLVER.WARMUP_ITERS", "20",
    "SOLVER.MAX_ITER", "100", "SOLVER.STEPS", "(75,)", "TEST.PRECISE_BN.NUM_ITER", "10",
    "DATALOADER.NUM_WORKERS", "1",
]  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--source", default=None, help="deepforest wheel or folder (default: installed)"
    )
    parser.add_argument("--trials", type=int, default=3, help="seeds per row and fraction")
    parser.add_argument(
        "--label-fractions", type=float, nargs="+", default=[0.25, 0.5, 1.0], metavar="F"
    )
    parser.add_argument("--pretrain-opts", default="", help="KEY VALUE overrides of the MoCo run")
    parser.add_argument("--work-dir", type=Path, default=Path("output/study/deepforest"))
    parser.add_argument("--output", type=Path, default=Path("results/deepforest_fractions"))
    parser.add_argument(
        "opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides, every fine-tune"
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    options, overrides = split_overrides(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(options)
    args.opts = [*args.opts, *overrides]
    pipeline = Pipeline(args.work_dir, command=shlex.join(sys.argv))
    tiles = pipeline.path("voc")
    if not (tiles / "summary.json").is_file():
        pipeline.timed("tiles", build_deepforest_voc, tiles, args.source)
    summary = {"tiles": json.loads((tiles / "summary.json").read_text())}
    # MoCo on the unlabelled train patches: in-domain self-supervision, no labels
    opts = ["DATA.ROOT", str(tiles), *shlex.split(args.pretrain_opts)]
    moco = pipeline.pretrain(PRETRAIN_RECIPE, "moco", opts)
    summary["moco"] = {k: moco[k] for k in ("epochs", "train_seconds", "checkpoint")}
    benchmark = pipeline.path("benchmark")
    command = [
        "moco-benchmark", "--dataset", str(tiles), "--work-dir", str(benchmark),
        "--weights", f"{MOCO_ROW}={moco['checkpoint']}", "--arch", "resnet50",
        "--trials", str(args.trials), "--label-fractions", *map(str, args.label_fractions),
        "--data-seed", "0", *FINE_TUNE, *args.opts,
    ]  # fmt: skip
    pipeline.timed("benchmark", subprocess.run, command, check=True)
    shutil.copytree(benchmark / "report", args.output, dirs_exist_ok=True)
    summary["benchmark_command"] = shlex.join(command)
    summary["machine"] = pipeline.costs["machine"]
    summary["command"] = pipeline.costs["command"]
    atomic_write_json(args.output / "study.json", summary)


if __name__ == "__main__":
    main()
