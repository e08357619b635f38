"""``moco-lincls``: linear classification on frozen pretrained features (the MoCo protocol).

One process: ``moco-lincls --pretrained CKPT`` (default recipe: the Fashion-MNIST demo).
ImageNet on 8 GPUs: ``torchrun --nproc_per_node 8 --no-python moco-lincls --config-file
lincls/imagenet_r50.yaml --pretrained CKPT DATA.ROOT /data/imagenet``.
CKPT: our or the official MoCo v1/v2 checkpoint, MoCo v3 ResNet-50, or torchvision weights.
"""

from __future__ import annotations

import argparse

from moco_pretrain.cli.common import add_pretrained_arguments, config_parser, exit_on_user_error
from moco_pretrain.config import setup_cfg
from moco_pretrain.distributed import is_main_process
from moco_pretrain.lincls import run_lincls
from moco_pretrain.results import RESULTS_FILE

DEMO_RECIPE = "lincls/fashion_mnist_demo.yaml"


def get_parser() -> argparse.ArgumentParser:
    parser = config_parser(__doc__, default_recipe=DEMO_RECIPE)
    add_pretrained_arguments(parser)
    parser.add_argument("--resume", default="", help="lincls checkpoint to resume (default: auto)")
    parser.add_argument("--evaluate", action="store_true", help="only evaluate the classifier")
    return parser


def main(argv: list[str] | None = None) -> None:
    with exit_on_user_error("moco-lincls"):
        args = get_parser().parse_args(argv)
        cfg = setup_cfg(args.config_file, args.opts)
        result = run_lincls(
            cfg,
            pretrained=args.pretrained,
            prefix=args.prefix,
            resume=args.resume or None,
            evaluate_only=args.evaluate,
        )
        if is_main_process():
            metrics = result["metrics"]
            print(
                f"\nlinear classification, epoch {result['epoch']}: top-1 {metrics['top1']:.2f} %,"
                f" top-5 {metrics['top5']:.2f} % (best top-1 {result['best_top1']:.2f} %)"
                f"\nresults: {cfg.OUTPUT_DIR}/{RESULTS_FILE}"
            )


if __name__ == "__main__":
    main()
