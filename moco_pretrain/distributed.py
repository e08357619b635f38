"""Process-group helpers with a one-process path for every collective.

The official code calls ``torch.distributed`` unconditionally; here each helper works in a plain
single process (identity / rank 0) so the model and the engine run and are tested on a laptop CPU.
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main_process() -> bool:
    return get_rank() == 0


@torch.no_grad()
def concat_all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from every rank along dim 0 (rank order); no gradient flows.

    Every rank must pass a tensor of the same shape, as in the official implementation.
    """
    world_size = get_world_size()
    if world_size == 1:
        return tensor
    gathered = [torch.empty_like(tensor) for _ in range(world_size)]
    dist.all_gather(gathered, tensor.contiguous())
    return torch.cat(gathered, dim=0)


def broadcast_(tensor: torch.Tensor, *, src: int = 0) -> torch.Tensor:
    """In-place broadcast from ``src``; a no-op in one process."""
    if get_world_size() > 1:
        dist.broadcast(tensor, src=src)
    return tensor


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of ``tensor`` over ranks (a copy); identity in one process."""
    if get_world_size() == 1:
        return tensor
    reduced = tensor.clone()
    dist.all_reduce(reduced)
    return reduced / get_world_size()


def per_process_batch_size(global_batch_size: int) -> int:
    """The equal share of a global batch that each process gets; a clear error if none exists."""
    world_size = get_world_size()
    batch, remainder = divmod(global_batch_size, world_size)
    if remainder or batch == 0:
        raise ValueError(
            f"SOLVER.BATCH_SIZE={global_batch_size} is not divisible by the {world_size} processes"
        )
    return batch


def init_distributed(*, backend: str | None = None) -> torch.device:
    """Join the process group described by torchrun's environment (env://), if any.

    Returns the device this process should use: ``cuda:LOCAL_RANK`` when CUDA is available,
    otherwise the CPU (gloo). Without ``WORLD_SIZE`` in the environment nothing is initialised.
    """
    use_cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size > 1 and not is_distributed():
        dist.init_process_group(
            backend=backend or ("nccl" if use_cuda else "gloo"),
            init_method="env://",
            device_id=device if use_cuda else None,
        )
    return device


def seed_all(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) with ``seed`` offset by the rank."""
    seed = seed + get_rank()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
