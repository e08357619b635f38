"""Time the quick start as a new user meets it: ``moco-benchmark`` with no arguments, in a fresh
clone, from nothing.

    python tools/time_quick_start.py                       # this checkout's HEAD
    python tools/time_quick_start.py --commit f425fc7      # an earlier release, for the ratio

Clones this repository at ``--commit`` into a temporary folder and runs ``moco-benchmark`` there
(the clone's modules and recipes first on ``PYTHONPATH``, the installed packages otherwise), then
prints one JSON line: the wall seconds, the step seconds of its ``costs.json``, the commit and
the machine; ``--output`` also writes it. Run it alone on an idle machine: two jobs at once halve
both.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from moco_pretrain.files import atomic_write_json
from moco_pretrain.machine import describe_machine

ROOT = Path(__file__).resolve().parents[1]


def time_quick_start(commit: str) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        clone = Path(folder) / "clone"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
        subprocess.run(["git", "-C", str(clone), "checkout", "-q", commit], check=True)
        revision = subprocess.run(["git", "-C", str(clone), "rev-parse", "HEAD"], check=True,
                                  capture_output=True, text=True).stdout.strip()  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(clone)}
        start = time.perf_counter()
        with (Path(folder) / "log.txt").open("w") as log:
            subprocess.run([sys.executable, "-m", "transfer.benchmark"], cwd=clone, env=env,
                           stdout=log, stderr=subprocess.STDOUT, check=True)  # fmt: skip
        seconds = time.perf_counter() - start
        out = clone / "output/fashion_scenes"
        costs = out / "costs.json" if (out / "costs.json").is_file() else out / "benchmark.json"
        steps = json.loads(costs.read_text())["seconds"]  # benchmark.json: older commits
    return {"commit": revision, "seconds": round(seconds, 1), "steps": steps,
            "machine": describe_machine("cpu")}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--commit", default="HEAD", help="the revision to time (default: HEAD)")
    parser.add_argument("--output", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args()
    record = time_quick_start(args.commit)
    if args.output:
        atomic_write_json(args.output, record)
    print(json.dumps(record))


if __name__ == "__main__":
    main()
