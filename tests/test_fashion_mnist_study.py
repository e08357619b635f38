"""tools/fashion_mnist_study.py end to end on a tiny Fashion-MNIST-format IDX set."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.tool_loader import load_tool


@pytest.fixture(scope="module")
def study():
    return load_tool("fashion_mnist_study")


SMALL = [
    "SOLVER.EPOCHS", "1", "SOLVER.BATCH_SIZE", "16", "MODEL.BN_SPLITS", "2",
    "DATA.NUM_WORKERS", "0", "KNN.BATCH_SIZE_PER_PROCESS", "40",
]  # fmt: skip


@pytest.mark.slow
def test_study_runs_every_comparison_and_resumes(study, tiny_fashion_mnist, tmp_path):
    work, output = tmp_path / "work", tmp_path / "results"
    argv = ["--work-dir", str(work), "--output", str(output), "DATA.ROOT", str(tiny_fashion_mnist)]
    study.main([*argv, *SMALL])
    results = json.loads((output / "results.json").read_text())

    accuracies = [
        results["raw_pixels_knn_top1"], results["random_init"]["knn_top1"],
        results["random_init"]["linear_top1"], results["moco"]["knn_top1"],
        results["moco"]["linear_top1"], results["supervised"]["top1"],
        results["supervised"]["knn_top1"],
        *(run["knn_top1"] for run in results["ablations"]["runs"].values()),
    ]  # fmt: skip
    # accuracies over the 40 test images: each is a whole number of correct images
    assert all(a * 40 / 100 == pytest.approx(round(a * 40 / 100)) for a in accuracies)
    # the bands are far apart in pixel space: raw-pixel kNN separates the classes
    assert results["raw_pixels_knn_top1"] == 100.0
    assert list(results["ablations"]["runs"]) == list(study.ABLATIONS)
    for i, (name, overrides) in enumerate(study.ABLATIONS.items()):
        config = yaml.safe_load((work / "ablations" / f"run_{i}" / "config.yaml").read_text())
        for key, value in zip(overrides[::2], overrides[1::2], strict=True):
            section, option = key.split(".")
            assert str(config[section][option]) == value, (name, key)
        assert config["KNN"]["NEIGHBORS"] == 20 and config["SOLVER"]["EPOCHS"] == 1
        assert results["ablations"]["runs"][name]["iterations"]
    assert results["machine"]["device"] == "cpu"
    for png in ("curves.png", "ablations.png"):
        assert (output / png).read_bytes().startswith(b"\x89PNG")
    tables = (output / "tables.md").read_text()
    assert all(name in tables for name in study.ABLATIONS)

    # a second call reads every finished run back: nothing retrains, same figures
    checkpoints = {p: p.stat().st_mtime_ns for p in work.rglob("checkpoint_*.pth.tar")}
    study.main([*argv, *SMALL])
    assert {p: p.stat().st_mtime_ns for p in work.rglob("checkpoint_*.pth.tar")} == checkpoints
    again = json.loads((output / "results.json").read_text())
    assert {k: v for k, v in again.items() if k != "command"} == {
        k: v for k, v in results.items() if k != "command"
    }


def test_crossover_is_the_first_epoch_above_the_level(study):
    summary = {
        "epochs": [{"epoch": e} for e in (1, 2, 3, 4)],
        "train_seconds": 480.0,  # 2 minutes per epoch
        "knn": [{"epoch": 2, "knn_top1": 70.0}, {"epoch": 4, "knn_top1": 85.0}],
    }
    assert study.crossover(summary, 80.0) == {"epoch": 4, "knn_top1": 85.0, "minutes": 8.0}
    assert study.crossover(summary, 90.0) is None
