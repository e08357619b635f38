"""tools/deepforest_study.py end to end on fake scenes, at toy sizes (needs detectron2)."""

from __future__ import annotations

import json
import shlex

import pytest

from tests.test_deepforest import write_fake_scenes
from tests.tool_loader import load_tool

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
def test_study_fine_tunes_both_inits_over_trials_and_reports(tmp_path):
    pytest.importorskip("detectron2", reason="detectron2 is not installed")
    study = load_tool("deepforest_study")

    source = write_fake_scenes(tmp_path / "source")
    work, output = tmp_path / "work", tmp_path / "results"
    argv = [
        "--source", str(source), "--trials", "2", "--work-dir", str(work), "--output", str(output),
        "--pretrain-opts", PRETRAIN, *FINE_TUNE,
    ]  # fmt: skip
    study.main(argv)

    summary = json.loads((output / "study.json").read_text())
    assert summary["tiles"]["tiles"]["train"] > 0 and len(summary["moco"]["epochs"]) == 1
    moco_weights = work / "moco" / "moco_detectron2.pkl"
    for init in ("random", "moco"):
        for trial in (0, 1):
            result = json.loads(
                (work / f"det_{init}" / f"trial_{trial}" / "results.json").read_text()
            )
            assert result["init"] == init and result["seed"] == trial
            assert {"bbox/AP", "bbox/AP50", "bbox/AP75"} <= set(result["metrics"])
            weights = result["config"]["MODEL"]["WEIGHTS"]
            assert weights == (str(moco_weights) if init == "moco" else "")
    report = (output / "report.md").read_text()
    assert all(label in report for label in study.ROWS.values())
    assert (output / "report.png").read_bytes().startswith(b"\x89PNG")

    seconds = json.loads((work / "costs.json").read_text())["seconds"]
    assert set(seconds) == {"tiles", "pretrain", "fine_tune/random", "fine_tune/moco"}

    # rerun: tiles, pretraining and finished trials are read back, not redone (costs.json records
    # the latest command)
    stamps = {
        p: p.stat().st_mtime_ns
        for p in work.rglob("*")
        if p.suffix in (".pkl", ".json", ".pth") and p.name != "costs.json"
    }
    study.main(argv)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
