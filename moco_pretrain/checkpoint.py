"""Checkpoints: the official MoCo layout, written atomically, with what an exact resume needs.

Layout (the official ``main_moco.py`` keys first): ``epoch`` (epochs completed), ``arch``,
``state_dict`` (DDP names: ``module.encoder_q.*``, ``module.encoder_k.*``, ``module.queue``,
``module.queue_ptr``, also when trained in one process), ``optimizer``; then ``scaler``,
``config`` (the resolved YAML), ``rng`` (one entry per rank), and the run's ``history`` (per
epoch) and ``log_points`` (per log period).
"""

from __future__ import annotations

import pickle
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from .distributed import get_rank, get_world_size
from .files import atomic_write

_CHECKPOINT_RE = re.compile(r"checkpoint_(\d{4,})\.pth\.tar$")


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` through :func:`atomic_write`."""
    atomic_write(path, lambda f: torch.save(obj, f))


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint on the CPU with ``weights_only=True``: files that would run code fail."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    with open(path, "rb") as f:
        magic = f.read(4)
    if not (magic.startswith(b"PK\x03\x04") or magic[:1] == b"\x80"):  # zip, or legacy pickle
        raise ValueError(f"{path} is not a readable PyTorch checkpoint (neither zip nor pickle)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{path} holds objects that only a full unpickle can rebuild, which could run code; "
            f"refusing to load it ({str(err).splitlines()[0]})"
        ) from None
    except MemoryError:
        raise
    except Exception as err:  # noqa: BLE001 - any other failure: a corrupt or crafted file
        raise ValueError(f"{path} is not a readable PyTorch checkpoint: {err}") from err
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path} holds a {type(checkpoint).__name__}, expected a dict")
    return checkpoint


def with_ddp_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """State-dict keys as DistributedDataParallel names them (``module.`` prefix)."""
    return {k if k.startswith("module.") else f"module.{k}": v for k, v in state_dict.items()}


def without_ddp_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix("module."): v for k, v in state_dict.items()}


def capture_rng_state() -> list[dict[str, Any]]:
    """The RNG states of every rank (collective under a process group)."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    if get_world_size() == 1:
        return [state]
    states: list[Any] = [None] * get_world_size()
    dist.all_gather_object(states, state)
    return states


def restore_rng_state(states: list[dict[str, Any]]) -> bool:
    """Restore this rank's RNG state; False (nothing restored) if the world size changed."""
    if len(states) != get_world_size():
        return False
    state = states[get_rank()]
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    return True


class Checkpointer:
    """``checkpoint_NNNN.pth.tar`` files in ``output_dir`` (NNNN: 0-based epoch, as official).

    Keeps the newest ``keep_last`` (0: all) and a ``last_checkpoint`` file naming the newest.
    """

    def __init__(self, output_dir: str | Path, *, keep_last: int = 0) -> None:
        self.output_dir = Path(output_dir)
        self.keep_last = keep_last

    def path_for(self, epoch: int) -> Path:
        return self.output_dir / f"checkpoint_{epoch:04d}.pth.tar"

    def save(self, state: dict[str, Any], *, epoch: int) -> Path:
        path = self.path_for(epoch)
        atomic_save(state, path)
        atomic_write(
            self.output_dir / "last_checkpoint", lambda f: f.write(f"{path.name}\n".encode())
        )
        self._prune()
        return path

    def _all(self) -> list[Path]:
        found = [
            p for p in self.output_dir.glob("checkpoint_*.pth.tar") if _CHECKPOINT_RE.search(p.name)
        ]
        return sorted(found, key=lambda p: int(_CHECKPOINT_RE.search(p.name).group(1)))

    def _prune(self) -> None:
        if self.keep_last > 0:
            for old in self._all()[: -self.keep_last]:
                old.unlink(missing_ok=True)

    def last_checkpoint(self) -> Path | None:
        """The newest complete checkpoint, or None."""
        marker = self.output_dir / "last_checkpoint"
        if marker.is_file():
            named = self.output_dir / marker.read_text().strip()
            if named.is_file():
                return named
        found = self._all()
        return found[-1] if found else None
