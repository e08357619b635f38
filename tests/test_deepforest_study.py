"""tools/deepforest_study.py end to end on fake scenes, at toy sizes (needs detectron2)."""

from __future__ import annotations

import json
import shlex

import pytest

from tests.test_deepforest import write_fake_scenes
from tests.tool_loader import load_tool
from transfer.benchmark import slug

PRETRAIN = (
    "DATA.IMAGE_SIZE 32 SOLVER.EPOCHS 1 SOLVER.BATCH_SIZE 8 MODEL.K 16 MODEL.BN_SPLITS 2 "
    "DATA.NUM_WORKERS 0"
)
FINE_TUNE = shlex.split(
    "SOLVER.MAX_ITER 1 SOLVER.WARMUP_ITERS 0 SOLVER.STEPS () INPUT.MIN_SIZE_TRAIN (96,) "
    "INPUT.MAX_SIZE_TRAIN 96 INPUT.MIN_SIZE_TEST 96 INPUT.MAX_SIZE_TEST 96 "
    "TEST.PRECISE_BN.NUM_ITER 1 MODEL.RPN.POST_NMS_TOPK_TEST 20 "
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE 8 DATALOADER.NUM_WORKERS 0"
)


@pytest.mark.slow
def test_study_pretrains_then_benchmarks_both_rows_over_fractions_and_trials(tmp_path):
    pytest.importorskip("detectron2", reason="detectron2 is not installed")
    study = load_tool("deepforest_study")

    source = write_fake_scenes(tmp_path / "source")
    work, output = tmp_path / "work", tmp_path / "results"
    argv = [
        "--source", str(source), "--trials", "2", "--label-fractions", "0.5", "1",
        "--work-dir", str(work), "--output", str(output), "--pretrain-opts", PRETRAIN, *FINE_TUNE,
    ]  # fmt: skip
    study.main(argv)

    summary = json.loads((output / "study.json").read_text())
    assert summary["tiles"]["tiles"]["train"] > 0 and len(summary["moco"]["epochs"]) == 1
    assert "--dataset" in summary["benchmark_command"]
    runs = work / "benchmark" / "det" / "short"
    checkpoint = summary["moco"]["checkpoint"]
    for subset in ("f0.5", ""):  # all labels: the run's own folders
        for row in (
            "random",
            slug(study.MOCO_ROW),
        ):
            for trial in (0, 1):
                folder = runs / subset / row
                result_file = next(folder.rglob(f"trial_{trial}/results.json"))
                result = json.loads(result_file.read_text())
                assert result["seed"] == trial and {"bbox/AP", "bbox/AP50"} <= set(
                    result["metrics"]
                )
                assert result["config"]["MODEL"]["MASK_ON"] is False
                if row != "random":
                    assert result["pretraining"]["source"] == checkpoint
        report = (output / "short" / subset / "report.md").read_text()
        assert study.MOCO_ROW in report and "random init" in report
    assert (output / "short" / "bbox_AP_vs_label_fraction.png").read_bytes().startswith(b"\x89PNG")
    seconds = json.loads((work / "costs.json").read_text())["seconds"]
    assert set(seconds) == {"tiles", "pretrain", "benchmark"}

    # rerun: tiles, pretraining and finished trials are read back, not redone
    stamps = {
        p: p.stat().st_mtime_ns
        for p in work.rglob("*")
        if p.suffix in (".pkl", ".pth", ".tar") or p.name == "results.json"
    }
    study.main(argv)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
