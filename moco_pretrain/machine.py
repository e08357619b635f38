"""What ran a measurement or study: written next to every figure the tools report."""

from __future__ import annotations

import contextlib
import os
import platform
from typing import Any

import torch

__all__ = ["cpu_name", "describe_machine"]


def cpu_name() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def describe_machine(device: torch.device | str | None = None) -> dict[str, Any]:
    """Device type and name (GPU or CPU model), CPU model and count, torch threads and version."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    return {
        "device": device.type,
        "name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "cpu": cpu_name(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "python": platform.python_version(),
    }  # fmt: skip
