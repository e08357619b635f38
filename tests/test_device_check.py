"""tools/device_check.py: its dry run end to end on the CPU (every part at toy sizes, what it
writes, a part over its time cap killed while the next still runs), and the readers of the
kernel profile and the test outcomes that only a GPU run feeds for real."""

from __future__ import annotations

import importlib.util
import json
import math
from types import SimpleNamespace

import pytest
import torch
from torch.autograd import DeviceType

from tests.tool_loader import load_tool
from transfer.benchmark import ROWS

TINY_CAP_S = 0.05  # the profile part's cap in the dry run: far less than starting Python takes
KILL_SLACK_S = 5.0


@pytest.fixture(scope="module")
def tool():
    return load_tool("device_check")


@pytest.fixture(scope="module")
def dry_run(tool, tmp_path_factory):
    """One dry run for the whole module: (its output folder, the report it returned)."""
    output = tmp_path_factory.mktemp("gpu")
    report = tool.main(["--dry-run", "--output", str(output), "--cap", f"profile={TINY_CAP_S}"])
    return output, report


@pytest.mark.slow  # the dry run: every part as a subprocess, about a minute
def test_writes_the_report_the_tables_and_the_log_and_nothing_else(tool, dry_run):
    output, report = dry_run
    assert {path.name for path in output.iterdir()} == {
        "device_check.json", "README.md", "device_check.log",
    }  # fmt: skip
    assert json.loads((output / "device_check.json").read_text()) == report
    assert set(report) == {
        "format", "dry_run", "date", "command", "budget_s", "wall_s", "machine", "parts", "targets",
    }  # fmt: skip
    assert report["dry_run"] is True and report["budget_s"] == 480
    assert list(report["parts"]) == list(tool.PARTS)
    log = (output / "device_check.log").read_text()
    for name, part in report["parts"].items():
        assert f"===== {name}: {part['status']} after {part['seconds']} s\n" in log


@pytest.mark.slow  # the dry run: every part as a subprocess, about a minute
def test_the_capped_part_timed_out_and_every_other_part_ran(tool, dry_run):
    _, report = dry_run
    parts = report["parts"]
    expected = {name: "ok" for name in tool.PARTS} | {"profile": "timed out"}
    if importlib.util.find_spec("detectron2") is None:
        expected["scenes"] = "skipped"
    assert {name: part["status"] for name, part in parts.items()} == expected
    assert parts["profile"]["reason"] == f"killed after its cap of {TINY_CAP_S:g} s"
    assert parts["profile"]["seconds"] < TINY_CAP_S + KILL_SLACK_S
    assert "result" not in parts["profile"]
    caps = {name: part["cap_s"] for name, part in parts.items()}
    assert caps == tool.CAPS_S | {"profile": TINY_CAP_S}
    for name in tool.PARTS:
        if parts[name]["status"] == "ok":
            assert parts[name]["seconds"] <= caps[name] and "result" in parts[name]


@pytest.mark.slow  # the dry run: every part as a subprocess, about a minute
def test_each_part_reports_its_figures(tool, dry_run):
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
        assert (config["mode"], config["compile"]) == (mode, compiled)
        ours = results[name]["ours"]  # images/s is the batch over the step's time
        assert ours["images_per_s"] == pytest.approx(config["batch_size"] * 1000 / ours["step_ms"])
    assert results["e2e"]["config"]["aug"] == "device"
    # the opt-in pair reaches the bf16 part only (a CPU records neither: both are CUDA-only)
    commands = {name: report["parts"][name]["command"] for name in ("model", "model_bf16")}
    assert commands["model_bf16"].endswith(" TRAIN.AMP_DTYPE bf16 TRAIN.CHANNELS_LAST True")
    assert "TRAIN.AMP_DTYPE" not in commands["model"]
    split = results["e2e"]["ours"]["split_ms"]
    assert 0 < split["augment"] < split["step"]  # the device path augments, inside the step
    profile = results["compile_profile"]
    assert list(profile) == ["ours"] and profile["ours"]["timed"] == "ops"
    assert profile["ours"]["top"][-1]["name"] == "(all others)"
    assert math.fsum(row["share"] for row in profile["ours"]["top"]) == pytest.approx(1.0)
    assert profile["ours"]["host_syncs_per_step"] == 0  # CPU: no CUDA runtime calls
    assert set(results["fashion_mnist"]) == {
        "images_per_s_per_epoch", "train_seconds", "loss", "acc1", "knn_top1",
        "knn_top1_random_init", "linear_top1", "linear_top1_random_init",
    }  # fmt: skip
    assert len(results["fashion_mnist"]["images_per_s_per_epoch"]) == 1
    if results["scenes"] is not None:
        assert set(results["scenes"]["metrics"]) == {label for label, *_ in ROWS.values()}
        seconds = set(results["scenes"]["seconds"])
        assert {"scenes", "supervised/seed_0", "fine_tune/short/moco"} <= seconds
        assert "pretrain/seed_0" not in seconds  # read back from fashion_mnist


@pytest.mark.slow  # the dry run: every part as a subprocess, about a minute
def test_targets_are_measured_but_not_judged_in_a_dry_run(dry_run):
    _, report = dry_run
    targets, parts = report["targets"], report["parts"]
    assert {name: (t["target"], t["met"]) for name, t in targets.items()} == {
        "model_speedup_fp32": (">= 1.0", None),
        "model_speedup": (">= 2.5", None),
        "model_peak_memory": ("<= 0.6", None),
        "e2e_of_model_only": (">= 0.8", None),
    }
    model, bf16, e2e = (parts[name]["result"] for name in ("model", "model_bf16", "e2e"))
    assert targets["model_speedup_fp32"]["measured"] == model["ratio"]["images_per_s"]
    assert targets["model_speedup"]["measured"] == bf16["ratio"]["images_per_s"]
    e2e_fraction = e2e["ours"]["images_per_s"] / model["ours"]["images_per_s"]
    assert targets["e2e_of_model_only"]["measured"] == pytest.approx(e2e_fraction)


@pytest.mark.slow  # the dry run: every part as a subprocess, about a minute
def test_the_markdown_tables(tool, dry_run):
    output, report = dry_run
    lines = (output / "README.md").read_text().splitlines()
    assert lines[0] == "# Device check: dry run at toy sizes on the CPU"
    machine = report["machine"]
    assert lines[4] == (
        f"| {machine['name']} | n/a | {machine['cuda']} | {machine['torch']} |"
        f" {machine['python']} | {machine['cpu_count']} | {report['date'][:10]} |"
    )
    assert f"| profile | timed out | 0 ({TINY_CAP_S:g}) | killed after its cap of 0.05 s |" in lines
    for name, part in report["parts"].items():
        assert sum(line.startswith(f"| {name} | {part['status']} | ") for line in lines) == 1
    assert "| ours bf16 channels-last / baseline images/s, model only | >= 2.5 |" in "\n".join(
        lines
    )
    assert "| ours/baseline images/s, model only, both fp32 | >= 1.0 |" in "\n".join(lines)
    assert "## compile_profile, ours: " in "\n".join(lines)


def test_kernel_shares_of_a_cuda_profile(tool):
    """Kernels by share of the device time, the rest summed, and the runtime's sync calls."""

    def event(key, device_type, device_us=0.0, count=1):
        return SimpleNamespace(
            key=key, device_type=device_type, self_device_time_total=device_us,
            self_cpu_time_total=1.0, count=count,
        )  # fmt: skip

    kernels = [event(f"void k{i}<float, 4>(float*)", DeviceType.CUDA, 100.0 + i) for i in range(13)]
    host = [
        event("cudaStreamSynchronize", DeviceType.CPU, count=4),
        event("aten::mm", DeviceType.CPU),
        event("moco/queue", DeviceType.CUDA, 5000.0),  # a named range around kernels: not one
    ]
    shares = tool.kernel_shares(kernels + host, steps=4, step_s=0.002, on_cuda=True)
    total = sum(100.0 + i for i in range(13))  # microseconds over 4 steps
    assert shares["timed"] == "kernels" and shares["host_syncs_per_step"] == 1.0
    assert shares["busy"] == pytest.approx(total / 1e6 / 4 / 0.002)
    assert [row["name"] for row in shares["top"]] == [
        *(f"k{i}(float*)" for i in range(12, 0, -1)), "(all others)",
    ]  # fmt: skip
    assert shares["top"][0]["share"] == pytest.approx(112.0 / total)
    assert shares["top"][0]["ms_per_step"] == pytest.approx(0.112 / 4)
    assert shares["top"][-1]["share"] == pytest.approx(100.0 / total)  # k0


def test_kernel_names_lose_templates_and_return_type(tool):
    name = "void at::native::vectorized_elementwise_kernel<4, at::native::AddFunctor<float>, std::array<char*, 3> >(int, T2, T3)"  # fmt: skip
    assert tool.short_name(name) == "at::native::vectorized_elementwise_kernel(int, T2, T3)"
    assert tool.short_name("x" * 100) == "x" * 87 + "..."


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


@pytest.mark.skipif(torch.cuda.is_available(), reason="would run the GPU parts")
def test_without_a_gpu_every_part_is_skipped_with_the_reason(tool, tmp_path):
    report = tool.main(["--output", str(tmp_path), "--parts", "model"])
    parts = report["parts"]
    assert parts["machine"]["status"] == "ok"
    reason = "no CUDA device (torch.cuda.is_available() is False); --dry-run runs on a CPU"
    assert {name: (p["status"], p["reason"]) for name, p in parts.items() if name != "machine"} == {
        name: ("skipped", reason) for name in tool.PARTS[1:]
    }
    assert report["targets"]["model_speedup"] == {
        "what": "ours bf16 channels-last / baseline images/s, model only", "target": ">= 2.5",
        "measured": None, "met": None,
    }  # fmt: skip


def test_an_unknown_part_in_a_cap_is_a_usage_error(tool, capsys):
    with pytest.raises(SystemExit) as exit_info:
        tool.main(["--cap", "warp=3"])
    assert exit_info.value.code == 2
    assert (
        "expected PART=SECONDS with PART one of machine, gpu_tests, model"
        in capsys.readouterr().err
    )
