"""``moco-submit``: start ``moco-pretrain`` on a SLURM cluster (needs ``pip install moco-pretrain[slurm]``).

Example, 4 nodes x 8 GPUs, MoCo v2 800 epochs, requeued on preemption and auto-resumed:
  moco-submit --nodes 4 --gpus-per-node 8 --partition learnfair --timeout 4320 \\
    --config-file pretrain/moco_v2_800ep.yaml DATA.ROOT /datasets/imagenet OUTPUT_DIR /checkpoint/me/v2
"""

from __future__ import annotations

import argparse

from moco_pretrain.cli.common import exit_on_user_error
from moco_pretrain.cli.pretrain import get_parser as get_pretrain_parser
from moco_pretrain.config import setup_cfg, validate
from moco_pretrain.recipes import resolve_config_file
from moco_pretrain.slurm import submit


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[get_pretrain_parser(add_help=False)],
    )
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument(
        "--timeout", type=int, default=4320, help="minutes per job (default 3 days)"
    )
    parser.add_argument("--partition", default="", help="SLURM partition")
    parser.add_argument("--job-dir", default="./output/slurm", help="submitit logs and pickles")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = get_parser().parse_args(argv)
    with exit_on_user_error("moco-submit"):  # a bad recipe fails here, not in the queue
        config_file = str(resolve_config_file(args.config_file).resolve())
        cfg = setup_cfg(config_file, args.opts)
        validate(cfg, world_size=args.nodes * args.gpus_per_node, pretraining=True)
    job = submit(
        config_file,
        args.opts,
        resume=args.resume or None,
        job_dir=args.job_dir,
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        timeout_min=args.timeout,
        partition=args.partition,
    )
    print(f"submitted job {job.job_id}; logs in {args.job_dir}")


if __name__ == "__main__":
    main()
