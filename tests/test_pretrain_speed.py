"""tools/pretrain_speed.py: runs both variants through the engine and reports the agreed JSON;
its profile of the largest kernels and host syncs."""

from __future__ import annotations

import json
import math
import time
from types import SimpleNamespace

import pytest
import torch
from torch.autograd import DeviceType

from tests.tool_loader import load_tool

SMALL = [
    "MODEL.ARCH",
    "resnet18",
    "DATA.IMAGE_SIZE",
    "32",
    "SOLVER.BATCH_SIZE",
    "8",
    "MODEL.K",
    "64",
]


@pytest.fixture(scope="module")
def tool():
    return load_tool("pretrain_speed")


# The parts timed inside the step (the others: the loader's wait, and the remainder)
IN_STEP = ("query_fwd_bwd", "key_fwd", "momentum_update", "optimizer")


def _timed_main(tool, argv: list[str]) -> tuple[dict, float]:
    """The tool's report and the wall time of the call that made it."""
    start = time.perf_counter()
    report = tool.main(argv)
    return report, time.perf_counter() - start


def _check_report(report: dict, tool, wall: float) -> None:
    assert set(report) == {"command", "machine", "config", "ours", "baseline", "ratio"}
    assert report["machine"]["device"] == "cpu"
    config = report["config"]
    for name in ("ours", "baseline"):
        result = report[name]
        rounds = result["step_seconds_per_round"]
        assert len(rounds) == config["rounds"]
        # each round's steps (step ends are timed: steps - 1 intervals) ran inside the call
        assert all(0 < seconds * (config["steps"] - 1) < wall for seconds in rounds)
        assert result["step_ms"] == pytest.approx(1000 * rounds[0])
        assert result["images_per_s"] == pytest.approx(config["batch_size"] / rounds[0])
        split = result["split_ms"]
        assert set(split) == {*tool.PARTS, "step"}
        # per-step means: each part timed inside the step is a positive part of it (a unit slip,
        # e.g. the profiler's microseconds read as milliseconds, makes a part exceed the step)
        assert all(0 < split[part] < split["step"] for part in IN_STEP), split
        assert result["peak_memory_mib"] is None or result["peak_memory_mib"] >= 0
    expected = report["baseline"]["step_ms"] / report["ours"]["step_ms"]  # one round
    assert report["ratio"]["images_per_s"] == pytest.approx(expected)


def test_model_mode_two_steps_writes_the_json(tool, tmp_path, capsys):
    out = tmp_path / "speed.json"
    argv = ["--device", "cpu", "--threads", "1", "--steps", "2", "--warmup", "1", "--rounds", "1"]
    argv += ["--profile", "3", "--json", str(out)]
    report, wall = _timed_main(tool, [*argv, *SMALL, "MODEL.BN_SPLITS", "2"])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    _check_report(report, tool, wall)
    assert report["config"]["mode"] == "model" and report["config"]["bn_splits"] == 2
    assert report["config"]["profile"] == 3
    printed = capsys.readouterr().out
    for name in ("ours", "baseline"):  # 3 profiled steps: more than the 2 synthetic batches
        profile = report[name]["profile"]
        assert (profile["timed"], profile["steps"], profile["host_syncs_per_step"]) == ("ops", 3, 0)
        assert profile["top"][-1]["name"] == "(all others)" and profile["step_ms"] > 0
        assert math.fsum(row["share"] for row in profile["top"]) == pytest.approx(1.0)
        assert f"{name} under the profiler: {profile['step_ms']:.1f} ms/step," in printed
        largest = profile["top"][0]
        assert (
            f"{largest['share']:8.1%} {largest['ms_per_step']:9.2f}  {largest['name']}" in printed
        )
    split = report["ours"]["split_ms"]
    assert 0 < split["shuffle"] < split["step"]  # split BN: the key batch is shuffled
    assert report["ours"]["split_ms"]["data"] < report["ours"]["split_ms"]["step"]


def test_end_to_end_with_device_augmentation(tool, tiny_imagefolder):
    argv = ["--device", "cpu", "--threads", "1", "--mode", "e2e", "--aug", "device", "--steps", "2"]
    opts = ["DATA.ROOT", str(tiny_imagefolder), "DATA.NUM_WORKERS", "0", "DATA.AUG", "v2"]
    report, wall = _timed_main(tool, [*argv, "--warmup", "1", "--rounds", "1", *SMALL, *opts])
    _check_report(report, tool, wall)
    assert report["config"]["aug"] == "device"
    split = report["ours"]["split_ms"]
    assert 0 < split["augment"] < split["step"]  # on the device, inside the step
    assert report["baseline"]["split_ms"]["augment"] == 0  # the CPU recipe, in the loader


def test_baseline_momentum_update_matches_ours_exactly(tool):
    """The baseline differs in speed only: its Python-loop update gives the same key encoder."""
    torch.manual_seed(0)

    def encoder(num_classes: int) -> torch.nn.Module:
        net = torch.nn.Sequential(torch.nn.Linear(4, 6))
        net.fc = torch.nn.Linear(6, num_classes)
        return net

    model = tool.OfficialMoCo(encoder, dim=8, K=16, m=0.9)
    with torch.no_grad():
        for param in model.encoder_q.parameters():
            param.add_(torch.randn_like(param))
    reference = {k: v.clone() for k, v in model.encoder_k.state_dict().items()}
    query = model.encoder_q.state_dict()
    model._momentum_update_key_encoder()
    tool.MoCo._momentum_update_key_encoder(model)  # then ours, from the baseline's result
    for key, value in model.encoder_k.state_dict().items():
        once = reference[key] * 0.9 + query[key] * (1.0 - 0.9)
        assert torch.equal(value, once * 0.9 + query[key] * (1.0 - 0.9))


def test_invalid_counts_raise(tool):
    for argv in (["--steps", "1"], ["--profile", "1"]):
        with pytest.raises(ValueError, match=r"need --steps >= 2, --profile 0 or >= 2 \(step ends"):
            tool.main(argv)


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


@pytest.mark.slow  # three variants with loader workers
def test_pipeline_mode_compares_the_recipe_with_its_model_step(tool, tiny_imagefolder, capsys):
    """end_to_end (the run's own loader and device step), model_only and unseeded, with both
    ratios from the paired rounds."""
    argv = ["--device", "cpu", "--threads", "1", "--mode", "pipeline", "--steps", "2"]
    opts = ["DATA.ROOT", str(tiny_imagefolder), "DATA.NUM_WORKERS", "1", "DATA.DEVICE_AUG", "True"]
    report, wall = _timed_main(tool, [*argv, "--warmup", "1", "--rounds", "2", *SMALL, *opts])
    variants = ("end_to_end", "model_only", "unseeded")
    assert set(report) == {"command", "machine", "config", "ratios", "seeding", *variants}
    seeding = report["seeding"]
    cost = seeding["seeded_ms_per_batch"] - seeding["unseeded_ms_per_batch"]
    assert seeding["share_of_step"] == pytest.approx(cost / report["end_to_end"]["step_ms"])
    for loader in ("seeded", "unseeded"):  # a median of rounds of 2 batches, inside the call
        assert 0 < seeding[f"{loader}_ms_per_batch"] * 2 / 1000 < wall
    assert report["config"]["device_aug"] is True
    split = {name: report[name]["split_ms"] for name in variants}
    for name in ("end_to_end", "unseeded"):
        assert 0 < split[name]["augment"] < split[name]["step"]
    assert split["model_only"]["augment"] == 0  # views already made: the model step alone
    printed = capsys.readouterr().out
    for pair in ("end_to_end/model_only", "end_to_end/unseeded"):
        first, second = (report[name]["step_seconds_per_round"] for name in pair.split("/"))
        expected = sorted(b / a for a, b in zip(first, second, strict=True))
        assert report["ratios"][pair]["images_per_s"] == pytest.approx(sum(expected) / 2)
        assert f"{pair}: {report['ratios'][pair]['images_per_s']:.2f}x" in printed
    assert f"seeding costs {100 * seeding['share_of_step']:+.2f} %" in printed
