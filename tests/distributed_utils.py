"""Run a function on a 2-process gloo group on the CPU (used by the DDP tests)."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )  # fmt: skip
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        fn(rank, *args)
    finally:
        dist.destroy_process_group()


def run_on_gloo(fn: Callable, *args, world_size: int = 2) -> None:
    """Spawn ``world_size`` processes that each call ``fn(rank, *args)`` inside a gloo group.

    ``fn`` must be importable (module level); an assertion failing in any process fails the call.
    """
    mp.spawn(_worker, args=(world_size, _free_port(), fn, args), nprocs=world_size, join=True)
