"""tools/device_check.py: a check over its time cap is killed and recorded with its cap, the files
go where ``--output`` says (by default the current folder), targets are judged against their
bounds; the dry run end to end on the CPU (every check at toy sizes) is a slow case."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from tests.tool_loader import TOOLS, load_tool
from transfer.benchmark import ROWS

ROOT = TOOLS.parent
TINY_CAP_S = 0.05  # far less than starting Python and importing torch takes
KILL_SLACK_S = 5.0
OUTPUTS = {"device_check.json", "device_check.md"}


@pytest.fixture(scope="module")
def tool():
    return load_tool("device_check")


def test_a_check_over_its_cap_is_killed_and_recorded_with_its_cap(tool, tmp_path):
    report = tool.main(["--output", str(tmp_path), "--cap", f"machine={TINY_CAP_S}"])
    assert {path.name for path in tmp_path.iterdir()} == OUTPUTS
    assert json.loads((tmp_path / "device_check.json").read_text()) == report
    machine = report["parts"]["machine"]
    assert (machine["status"], machine["cap_s"]) == ("timed out", TINY_CAP_S)
    assert machine["reason"] == f"killed after its cap of {TINY_CAP_S:g} s"
    assert machine["seconds"] < TINY_CAP_S + KILL_SLACK_S and "result" not in machine
    assert machine["command"].startswith(f"{sys.executable} -m moco_pretrain.machine ")
    assert report["machine"] is None
    others = {name: part for name, part in report["parts"].items() if name != "machine"}
    assert list(others) == list(tool.CAPS_S)[1:]
    assert others == {
        name: {"status": "skipped", "cap_s": cap, "seconds": 0.0,
               "reason": "the machine check did not finish"}
        for name, cap in list(tool.CAPS_S.items())[1:]
    }  # fmt: skip
    assert all(t["measured"] is None and t["met"] is None for t in report["targets"].values())
    lines = (tmp_path / "device_check.md").read_text().splitlines()
    assert lines[:3] == ["# Device check", "", "machine: n/a"]
    assert f"| machine | timed out | 0 ({TINY_CAP_S:g}) | killed after its cap of 0.05 s |" in lines
    assert "| scenes | skipped | 0 (480) | the machine check did not finish |" in lines
    assert "## machine: the end of its output" in lines
    assert not any(line.startswith("## gpu_tests") for line in lines)  # skipped: no output


def test_the_files_go_to_the_current_folder_by_default(tmp_path):
    """Run as a script from another folder: nothing is written into the repository."""
    gpu_results = ROOT / "results" / "gpu" / "device_check.json"
    before = gpu_results.stat().st_mtime_ns if gpu_results.exists() else None
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    run = subprocess.run(
        [sys.executable, str(TOOLS / "device_check.py"), "--dry-run", "--cap", "machine=0.05"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert {path.name for path in tmp_path.iterdir()} == OUTPUTS
    assert json.loads((tmp_path / "device_check.json").read_text())["dry_run"] is True
    assert (gpu_results.stat().st_mtime_ns if gpu_results.exists() else None) == before
    printed = run.stdout.splitlines()
    assert printed[0].startswith("machine: timed out after ")
    assert "# Device check: dry run at toy sizes on the CPU" in printed
    assert printed[-1] == f"wrote device_check.json and device_check.md to {tmp_path.resolve()}"


def test_targets_are_judged_against_their_bounds_and_never_in_a_dry_run(tool):
    def speed(ours, baseline, ratio, memory=None):
        return {"result": {"ours": {"images_per_s": ours}, "baseline": {"images_per_s": baseline},
                           "ratio": {"images_per_s": ratio, "peak_memory": memory}}}  # fmt: skip

    parts = {"model": speed(100.0, 90.0, 1.1), "model_bf16": speed(200.0, 90.0, 2.2, 0.55),
             "e2e": speed(85.0, 60.0, 1.4)}  # fmt: skip
    targets = tool.judge_targets(parts, dry_run=False)
    assert {name: (t["target"], t["measured"], t["met"]) for name, t in targets.items()} == {
        "model_speedup_fp32": (">= 1.0", 1.1, True),
        "model_speedup": (">= 2.5", 2.2, False),
        "model_peak_memory": ("<= 0.6", 0.55, True),
        "e2e_of_model_only": (">= 0.8", 0.85, True),
    }
    what = "ours bf16 channels-last / baseline images/s, model only"
    assert targets["model_speedup"]["what"] == what
    dry = tool.judge_targets(parts, dry_run=True)
    assert [t["met"] for t in dry.values()] == [None] * 4
    assert [t["measured"] for t in dry.values()] == [1.1, 2.2, 0.55, 0.85]
    without_model = tool.judge_targets({"e2e": parts["e2e"]}, dry_run=False)
    assert {name: t["measured"] for name, t in without_model.items()} == dict.fromkeys(targets)


def test_test_outcomes_from_junit_xml(tool, tmp_path):
    path = tmp_path / "junit.xml"
    path.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.test_a" name="test_ok"/>'
        '<testcase classname="tests.test_a" name="test_bad"><failure message="x"/></testcase>'
        '<testcase classname="tests.test_b" name="test_broken"><error message="y"/></testcase>'
        '<testcase classname="tests.test_b" name="test_gpu"><skipped message="z"/></testcase>'
        "</testsuite></testsuites>"
    )
    assert tool.read_junit(path) == {
        "counts": {"passed": 1, "failed": 2, "skipped": 1},
        "tests": {
            "tests.test_a::test_ok": "passed", "tests.test_a::test_bad": "failed",
            "tests.test_b::test_broken": "failed", "tests.test_b::test_gpu": "skipped",
        },
    }  # fmt: skip


@pytest.mark.skipif(torch.cuda.is_available(), reason="would run the GPU checks")
def test_without_a_gpu_every_check_is_skipped_with_the_reason(tool, tmp_path):
    report = tool.main(["--output", str(tmp_path), "--parts", "model"])
    parts = report["parts"]
    assert parts["machine"]["status"] == "ok" and report["machine"]["cuda_available"] is False
    assert report["machine"] == parts["machine"]["result"]
    reason = "no CUDA device (torch.cuda.is_available() is False); --dry-run runs on a CPU"
    assert {name: (p["status"], p["reason"]) for name, p in parts.items() if name != "machine"} == {
        name: ("skipped", reason) for name in list(tool.CAPS_S)[1:]
    }


def test_an_unknown_part_in_a_cap_is_a_usage_error(tool, capsys):
    with pytest.raises(SystemExit) as exit_info:
        tool.main(["--cap", "warp=3"])
    assert exit_info.value.code == 2
    assert "expected PART=SECONDS, PART one of machine, gpu_tests, model" in capsys.readouterr().err


@pytest.fixture(scope="module")
def dry_run(tool, tmp_path_factory):
    """One dry run for the slow cases, the profile check capped: (output folder, report)."""
    output = tmp_path_factory.mktemp("device_check")
    report = tool.main(["--dry-run", "--output", str(output), "--cap", f"profile={TINY_CAP_S}"])
    return output, report


@pytest.mark.slow  # the dry run: every check as a subprocess, about two minutes
def test_the_capped_check_timed_out_and_every_later_check_ran(tool, dry_run):
    output, report = dry_run
    assert {path.name for path in output.iterdir()} == OUTPUTS
    assert json.loads((output / "device_check.json").read_text()) == report
    assert set(report) == {
        "format", "dry_run", "date", "command", "budget_s", "wall_s", "machine", "parts", "targets",
    }  # fmt: skip
    assert report["dry_run"] is True and report["budget_s"] == 480
    parts = report["parts"]
    expected = dict.fromkeys(tool.CAPS_S, "ok") | {"profile": "timed out"}
    if importlib.util.find_spec("detectron2") is None:
        expected["scenes"] = "skipped"
    assert {name: part["status"] for name, part in parts.items()} == expected
    assert parts["profile"]["reason"] == f"killed after its cap of {TINY_CAP_S:g} s"
    assert parts["profile"]["seconds"] < TINY_CAP_S + KILL_SLACK_S
    for name, part in parts.items():
        if part["status"] == "ok":
            assert part["seconds"] <= part["cap_s"] <= tool.CAPS_S[name] and "result" in part
    assert parts["model"]["cap_s"] == tool.CAPS_S["model"]  # scenes': what the budget has left


@pytest.mark.slow  # the dry run: every check as a subprocess, about two minutes
def test_each_check_reports_its_figures(dry_run):
    _, report = dry_run
    results = {name: part.get("result") for name, part in report["parts"].items()}
    assert results["machine"]["device"] == "cpu" and results["machine"]["cuda_available"] is False
    outcomes = results["gpu_tests"]["tests"]
    assert results["gpu_tests"]["counts"] == {"skipped": len(outcomes)}  # no GPU here
    assert "tests.test_cuda::test_a_training_step_needs_no_host_sync" in outcomes
    assert "tests.test_gpu_augment::test_cuda_views_need_no_host_sync" in outcomes
    for name, mode, compiled in (("model", "model", False), ("model_bf16", "model", False),
                                 ("e2e", "e2e", False), ("compile", "model", True)):  # fmt: skip
        config = results[name]["config"]
        assert (config["arch"], config["batch_size"], config["K"], config["mlp"]) == (
            "resnet18", 8, 64, True,
        )  # fmt: skip
        assert (config["mode"], config["compile"], config["profile"]) == (mode, compiled, 0)
        assert results[name]["ours"]["images_per_s"] > 0
    assert results["e2e"]["config"]["aug"] == "device"
    assert results["e2e"]["ours"]["split_ms"]["augment"] > 0  # the device path augments
    # the opt-in pair reaches the bf16 check only (a CPU records neither: both are CUDA-only)
    commands = {name: report["parts"][name]["command"] for name in ("model", "model_bf16")}
    assert commands["model_bf16"].endswith(" TRAIN.AMP_DTYPE bf16 TRAIN.CHANNELS_LAST True")
    assert "TRAIN.AMP_DTYPE" not in commands["model"]
    profiled = results["compile_profile"]
    assert (profiled["config"]["compile"], profiled["config"]["profile"]) == (True, 2)
    for variant in ("ours", "baseline"):
        profile = profiled[variant]["profile"]
        assert (profile["timed"], profile["host_syncs_per_step"]) == ("ops", 0)  # CPU: no CUDA
        assert profile["top"][-1]["name"] == "(all others)"
        assert math.fsum(row["share"] for row in profile["top"]) == pytest.approx(1.0)
    fashion = results["fashion_mnist"]
    assert len(fashion["epochs"]) == 1 and fashion["epochs"][0]["images_per_s"] > 0
    for key in ("knn_top1", "knn_top1_random_init", "linear_top1", "linear_top1_random_init"):
        assert 0 <= fashion[key] <= 100
    if results["scenes"] is not None:
        assert set(results["scenes"]["metrics"]) == {label for label, *_ in ROWS.values()}
        seconds = set(results["scenes"]["seconds"])
        assert {"scenes", "supervised/seed_0", "fine_tune/short/moco"} <= seconds
        assert "pretrain/seed_0" not in seconds  # read back from fashion_mnist


@pytest.mark.slow  # the dry run: every check as a subprocess, about two minutes
def test_the_markdown_summary(dry_run):
    output, report = dry_run
    text = (output / "device_check.md").read_text()
    lines = text.splitlines()
    assert lines[0] == "# Device check: dry run at toy sizes on the CPU"
    machine = report["machine"]
    assert lines[2] == (
        f"name {machine['name']}, cuda {machine['cuda']}, torch {machine['torch']}, python"
        f" {machine['python']}, cpu_count {machine['cpu_count']}"
    )  # no driver without a GPU
    targets, parts = report["targets"], report["parts"]
    assert targets["model_speedup"]["met"] is None
    measured, what = targets["model_speedup"]["measured"], targets["model_speedup"]["what"]
    assert f"| {what} | >= 2.5 | {measured:.2f} | n/a |" in lines
    assert f"| profile | timed out | 0 ({TINY_CAP_S:g}) | killed after its cap of 0.05 s |" in lines
    for name, part in parts.items():
        assert sum(line.startswith(f"| {name} | {part['status']} | ") for line in lines) == 1
        if "tail" in part:
            section = text.split(f"## {name}: the end of its output\n\n`{part['command']}`\n")[1]
            assert section.startswith("\n```text\n" + "\n".join(part["tail"]))
    assert "baseline under the profiler: " in text  # pretrain_speed's kernel table, in the tail
