"""What ran a measurement or study: written next to every figure the tools report.

``python -m moco_pretrain.machine [PATH]`` writes the machine and its CUDA stack as JSON (to PATH,
else to stdout); ``tools/device_check.py`` runs it first, in a process of its own.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import platform
import subprocess
import sys
from typing import Any

import torch

__all__ = ["cpu_name", "describe_machine", "describe_cuda_stack"]


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


def describe_cuda_stack() -> dict[str, Any]:
    """CUDA as torch sees it, the driver (``nvidia-smi``), the GPU's memory, and why detectron2's
    compiled part does not import ("" when it does: a build against another torch fails here)."""
    info: dict[str, Any] = {
        "cuda_available": torch.cuda.is_available(), "cuda": torch.version.cuda,
        "driver": None, "gpu_memory_gib": None, "detectron2_error": "",
    }  # fmt: skip
    if info["cuda_available"]:
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            run = subprocess.run(query, capture_output=True, text=True, timeout=30, check=True)
            info["driver"] = run.stdout.split("\n")[0]
    try:
        importlib.import_module("detectron2._C")
    except ImportError as err:
        info["detectron2_error"] = f"{type(err).__name__}: {err}"[:200]
    return info


if __name__ == "__main__":
    text = json.dumps({**describe_machine(), **describe_cuda_stack()}, indent=2)
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as f:
            f.write(text + "\n")
    print(text)
