"""``moco-pretrain``: MoCo pretraining from a recipe (default: the Fashion-MNIST demo).

One process: ``moco-pretrain --config-file pretrain/moco_v2_200ep.yaml DATA.ROOT /data/imagenet``.
Several GPUs / nodes: ``torchrun --nproc_per_node 8 --no-python moco-pretrain ...``.
"""

from __future__ import annotations

import argparse

from moco_pretrain.cli.common import config_parser, exit_on_user_error
from moco_pretrain.config import setup_cfg
from moco_pretrain.distributed import is_main_process
from moco_pretrain.pretrain import feature_comparison, run_pretraining

DEMO_RECIPE = "pretrain/fashion_mnist_demo.yaml"


def get_parser(*, add_help: bool = True) -> argparse.ArgumentParser:
    parser = config_parser(__doc__, default_recipe=DEMO_RECIPE, add_help=add_help)
    parser.add_argument("--resume", default="", help="checkpoint to resume from (default: auto)")
    return parser


def print_summary(summary: dict, *, cfg) -> None:
    """What a newcomer wants to know at the end of a run, and what to run next."""
    last = summary["epochs"][-1] if summary["epochs"] else {}
    print(f"\ncheckpoint: {summary['checkpoint']}")
    if "acc1" in last:
        print(
            f"instance discrimination (contrastive top-1 of 1+K, last epoch): {last['acc1']:.1f} %"
            f" (chance {100 / (cfg.MODEL.K + 1):.3f} %)"
        )
    for line in feature_comparison(summary):
        print(line)
    if summary.get("skipped_images"):
        print(f"unreadable images skipped: {summary['skipped_images']}")
    if not summary["checkpoint"]:
        return
    fits_the_scenes = cfg.DATA.NAME == "fashion_mnist" and cfg.MODEL.ARCH == "resnet18"
    if fits_the_scenes and not cfg.MODEL.SMALL_STEM:  # the backbone of fashion_scenes_R_18_FPN
        # the benchmark is class-disjoint: it takes a backbone of its source classes only
        reuse = (
            f"moco-benchmark --pretrained {summary['checkpoint']} --source-classes"
            f" {','.join(map(str, cfg.DATA.CLASSES))} --target-classes <the other classes>"
            if cfg.DATA.CLASSES
            else "moco-benchmark (it pretrains on its source classes itself; to pass a checkpoint"
            " with --pretrained, pretrain it with DATA.CLASSES set to them)"
        )
        print(
            "next: the transfer benchmark (Fashion-MNIST scenes, detection and instance"
            f" segmentation, MoCo vs supervised vs random init): {reuse}"
        )
    else:  # the detection configs (configs/detection/README.md) take any converted ResNet
        print(
            f"next: moco-convert {summary['checkpoint']} {cfg.OUTPUT_DIR}/moco_detectron2.pkl"
            f" --arch {cfg.MODEL.ARCH}, then moco-transfer (configs/detection/README.md)"
        )


def main(argv: list[str] | None = None) -> None:
    with exit_on_user_error("moco-pretrain"):
        args = get_parser().parse_args(argv)
        cfg = setup_cfg(args.config_file, args.opts)
        summary = run_pretraining(cfg, resume=args.resume or None)  # validates it for pretraining
        if is_main_process():
            print_summary(summary, cfg=cfg)


if __name__ == "__main__":
    main()
