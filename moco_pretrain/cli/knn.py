"""``moco-knn``: weighted kNN top-1/top-5 of frozen pretrained features (Wu et al. 2018).

A bank of un-augmented ``DATA.TRAIN_SPLIT`` features (the first ``KNN.BANK_SIZE`` images when > 0)
votes for each ``DATA.VAL_SPLIT`` image with ``KNN.NEIGHBORS`` neighbours and temperature
``KNN.TEMPERATURE``.
Writes ``OUTPUT_DIR/knn/results.json``. Under ``torchrun`` each process extracts a shard.
"""

from __future__ import annotations

import argparse

from moco_pretrain.cli.common import add_pretrained_arguments, config_parser, exit_on_user_error
from moco_pretrain.config import setup_cfg
from moco_pretrain.distributed import is_main_process
from moco_pretrain.knn_task import run_knn

DEMO_RECIPE = "lincls/fashion_mnist_demo.yaml"


def get_parser() -> argparse.ArgumentParser:
    parser = config_parser(__doc__, default_recipe=DEMO_RECIPE)
    add_pretrained_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> None:
    with exit_on_user_error("moco-knn"):
        args = get_parser().parse_args(argv)
        cfg = setup_cfg(args.config_file, args.opts)
        result = run_knn(cfg, pretrained=args.pretrained, prefix=args.prefix)
        if is_main_process():
            top1, top5 = result["metrics"]["top1"], result["metrics"]["top5"]
            print(
                f"\nkNN (k={result['k']}, T={result['temperature']}, bank {result['bank_size']}):"
                f" top-1 {top1:.2f} %, top-5 {top5:.2f} %"
                f"\nresults: {cfg.OUTPUT_DIR}/knn/results.json"
            )


if __name__ == "__main__":
    main()
