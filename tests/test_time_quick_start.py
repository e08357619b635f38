"""tools/time_quick_start.py: the quick start runs in a clone of the commit asked for."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from tests.tool_loader import load_tool


def test_the_benchmark_runs_in_a_clone_at_the_commit_and_its_steps_are_kept(monkeypatch):
    tool = load_tool("time_quick_start")
    real_run = subprocess.run
    seen = {}

    def run(command, **kwargs):
        if command[0] == "git":
            return real_run(command, **kwargs)
        started = time.perf_counter()
        clone = Path(kwargs["cwd"])  # the benchmark: record where and how it ran
        seen.update(command=command[1:], pythonpath=kwargs["env"]["PYTHONPATH"], clone=clone)
        seen["head"] = real_run(["git", "-C", str(clone), "rev-parse", "HEAD"],
                                capture_output=True, text=True).stdout.strip()  # fmt: skip
        out = clone / "output/fashion_scenes"
        out.mkdir(parents=True)
        (out / "costs.json").write_text(json.dumps({"seconds": {"scenes": 1.5}}))
        time.sleep(0.3)  # a benchmark that takes a while, so the tool has something to time
        seen["benchmark_seconds"] = time.perf_counter() - started
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(tool.subprocess, "run", run)
    head = real_run(["git", "-C", str(tool.ROOT), "rev-parse", "HEAD"], capture_output=True,
                    text=True, check=True).stdout.strip()  # fmt: skip
    start = time.perf_counter()
    record = tool.time_quick_start("HEAD")
    wall = time.perf_counter() - start
    assert seen["command"] == ["-m", "transfer.benchmark"]
    assert seen["pythonpath"] == str(seen["clone"]) and seen["head"] == head == record["commit"]
    assert record["steps"] == {"scenes": 1.5}
    # the benchmark's wall time (to 0.1 s): at least the fake's, at most the whole call's
    assert seen["benchmark_seconds"] - 0.05 <= record["seconds"] <= wall + 0.05
    assert record["machine"]["cpu_count"] >= 1
    assert not seen["clone"].exists()  # the clone is removed
