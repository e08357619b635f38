"""moco-benchmark end to end at toy sizes: every step, resume, reports, and its bad-input lines."""

from __future__ import annotations

import csv
import json
import shlex
from pathlib import Path

import pytest
import torch
import torchvision

from transfer import benchmark

SMALL_RUN = shlex.join([
    "SOLVER.EPOCHS", "1", "SOLVER.BATCH_SIZE", "16", "MODEL.BN_SPLITS", "2",
    "DATA.NUM_WORKERS", "0", "KNN.BATCH_SIZE_PER_PROCESS", "40", "KNN.NEIGHBORS", "20",
])  # fmt: skip
TINY_FINE_TUNE = [
    "SOLVER.MAX_ITER", "2", "SOLVER.STEPS", "()", "SOLVER.WARMUP_ITERS", "0",
    "SOLVER.IMS_PER_BATCH", "2", "TEST.PRECISE_BN.NUM_ITER", "1",
]  # fmt: skip


def argv(data: Path, work: Path, *extra: str) -> list[str]:
    return [
        "--work-dir", str(work), "--data-root", str(data), "--labelled", "40",
        "--val-garments", "20", "--test-garments", "20", "--pretrain-opts", SMALL_RUN,
        "--supervised-opts", SMALL_RUN, *extra,
    ]  # fmt: skip


def read_report(path: Path) -> dict[tuple[str, str], dict[str, str]]:
    with path.open() as f:
        return {(r["row"], r["metric"]): r for r in csv.DictReader(f)}


def test_the_long_schedule_scales_iterations_and_lr_steps_of_the_config_and_overrides():
    pytest.importorskip("detectron2")
    moco, random = (benchmark.RECIPES["detection"].format(init=i) for i in ("moco", "random"))
    assert benchmark.scaled_schedule(moco, 3, []) == [
        "SOLVER.MAX_ITER", "600", "SOLVER.STEPS", "(450, 555)",  # the short schedule: 200, (150, 185)
    ]  # fmt: skip
    assert benchmark.scaled_schedule(random, 3, ["SOLVER.MAX_ITER", "4", "SOLVER.STEPS", "(3,)"]) == [
        "SOLVER.MAX_ITER", "12", "SOLVER.STEPS", "(9,)",
    ]  # fmt: skip


def test_every_step_runs_reports_and_a_rerun_trains_nothing(tiny_fashion_mnist, tmp_path, capsys):
    pytest.importorskip("detectron2")
    work = tmp_path / "work"
    args = argv(tiny_fashion_mnist, work, "--trials", "2", "--schedules", "long",
                "--eval-split", "val", *TINY_FINE_TUNE)  # fmt: skip
    benchmark.main(args)
    out = capsys.readouterr().out
    assert "kNN top-1: MoCo" in out and "linear probe top-1: MoCo" in out

    schedule, iterations = "long-val", 6  # 2 iterations in the config x 3
    report = read_report(work / "report" / schedule / "report.csv")
    for init in benchmark.ROWS:
        trials = sorted((work / "det" / schedule / init).glob("trial_*/results.json"))
        assert len(trials) == 2
        metrics = [json.loads(path.read_text())["metrics"] for path in trials]
        for metric in ("bbox/AP", "segm/AP"):  # a toy model can predict nothing: then no AP
            n = sum(metric in m for m in metrics)
            assert report.get((benchmark.ROWS[init], metric), {"n": "0"})["n"] == str(n)
        for trial, path in enumerate(trials):
            result = json.loads(path.read_text())
            config = result["config"]
            assert result["init"] == {"sup": "supervised"}.get(init, init)
            assert result["seed"] == trial
            assert config["SOLVER"]["MAX_ITER"] == iterations
            assert config["DATASETS"]["TEST"] == ["fashion_scenes_val"]
            weights = {
                "sup": work / "weights/supervised.pkl",
                "moco": work / "weights/moco.pkl",
            }
            assert config["MODEL"]["WEIGHTS"] == str(weights.get(init, ""))
    seconds = json.loads((work / "benchmark.json").read_text())["seconds"]
    assert {"scenes", "pretrain", "supervised", "fine_tune/long-val/moco"} <= seconds.keys()

    finished = {
        p: p.stat().st_mtime_ns for p in work.rglob("*") if p.suffix in (".json", ".pkl", ".tar")
    }
    report = (work / "report" / "long-val" / "report.md").read_text()
    benchmark.main(args)
    rerun = {p: p.stat().st_mtime_ns for p in finished}
    unchanged = {p for p in finished if rerun[p] == finished[p]}
    assert unchanged == {p for p in finished if p.name != "benchmark.json"}  # nothing retrained
    assert (work / "report" / "long-val" / "report.md").read_text() == report


@pytest.mark.slow
def test_the_segmentation_and_keypoint_variants_run_on_the_same_backbones(
    tiny_fashion_mnist, tmp_path
):
    pytest.importorskip("detectron2")
    work = tmp_path / "work"
    for task in ("sem_seg", "keypoints"):
        benchmark.main(argv(tiny_fashion_mnist, work, "--task", task, *TINY_FINE_TUNE))
    seconds = json.loads((work / "benchmark.json").read_text())["seconds"]
    assert {"fine_tune/sem_seg/short/moco", "fine_tune/keypoints/short/random"} <= seconds.keys()
    assert not (work / "det").exists()  # the detection rows were not run
    for task, metric, test_set in (("sem_seg", "sem_seg/mIoU", "fashion_scenes_sem_seg_test"),
                                   ("keypoints", "bbox/AP", "fashion_scenes_keypoints_test")):  # fmt: skip
        for init in benchmark.ROWS:
            result = json.loads((work / task / "short" / init / "trial_0/results.json").read_text())
            assert result["config"]["DATASETS"]["TEST"] == [test_set]
            assert result["task"] == ("sem_seg" if task == "sem_seg" else "detection")
        report = read_report(work / "report" / task / "short" / "report.csv")
        assert report[(benchmark.ROWS["moco"], metric)]["n"] == "1"


def test_scene_options_register_each_variant_and_build_its_labels(tiny_fashion_mnist, tmp_path):
    from transfer.scenes import build_fashion_scenes, scene_options

    scenes = tmp_path / "scenes"
    build_fashion_scenes(scenes, root=tiny_fashion_mnist, num_labelled=20, num_val=10, num_test=10)
    options = scene_options("sem_seg", scenes, "val")
    assert options[::2] == [
        "MOCO.DATASETS.SEM_SEG", "MOCO.DATASETS.SEM_SEG_CLASSES", "DATASETS.TEST"
    ]  # fmt: skip
    assert options[1] == str([
        (f"fashion_scenes_sem_seg_{s}", str(scenes / s), str(scenes / f"{s}_sem_seg"), "")
        for s in ("train", "val", "test")
    ])  # fmt: skip
    assert options[3].startswith("['background', 'T-shirt/top'") and options[5] == (
        "('fashion_scenes_sem_seg_val',)"
    )
    assert len(list((scenes / "val_sem_seg").glob("*.png"))) == len(
        list((scenes / "val").glob("*.png"))
    )
    options = scene_options("keypoints", scenes, "test")
    assert options[4:] == [
        "MOCO.DATASETS.KEYPOINT_FLIP_MAP", "[['left', 'right']]",
        "DATASETS.TEST", "('fashion_scenes_keypoints_test',)",
    ]  # fmt: skip
    assert options[:4] == [
        "MOCO.DATASETS.COCO",
        str([(f"fashion_scenes_keypoints_{s}", str(scenes / f"{s}_keypoints.json"), str(scenes / s))
             for s in ("train", "val", "test")]),  # fmt: skip
        "MOCO.DATASETS.KEYPOINT_NAMES", "['top', 'bottom', 'left', 'right']",
    ]  # fmt: skip


def test_without_detectron2_pretrains_probes_and_says_how_to_install(
    tiny_fashion_mnist, tmp_path, capsys, monkeypatch
):
    real_find_spec = benchmark.importlib.util.find_spec
    monkeypatch.setattr(
        benchmark.importlib.util, "find_spec",
        lambda name, *a: None if name == "detectron2" else real_find_spec(name, *a),
    )  # fmt: skip
    benchmark.main(argv(tiny_fashion_mnist, tmp_path))
    lines = capsys.readouterr().out.splitlines()
    assert [line for line in lines if line.startswith("moco-benchmark")] == [
        "moco-benchmark: detectron2 is not installed, so the detection benchmark did not run;"
        f" install it with: {benchmark.DETECTRON2_INSTALL}"
    ]
    summary = json.loads((tmp_path / "moco" / "summary.json").read_text())
    assert f"kNN top-1: MoCo {summary['knn_top1']:.2f} %" in "\n".join(lines)
    assert not (tmp_path / "det").exists() and not (tmp_path / "supervised").exists()


def error_line(capsys, args: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    return err


def test_missing_fashion_mnist_is_one_line(tmp_path, capsys):
    err = error_line(capsys, argv(tmp_path / "nowhere", tmp_path / "work"))
    assert err.startswith("moco-benchmark: error: Fashion-MNIST file train-images-idx3-ubyte(.gz)")
    assert "apt-get install dataset-fashion-mnist" in err


def test_a_checkpoint_of_another_architecture_is_one_line(tiny_fashion_mnist, tmp_path, capsys):
    pytest.importorskip("detectron2")
    checkpoint = tmp_path / "r50.pth"
    torch.save(torchvision.models.resnet50().state_dict(), checkpoint)
    args = argv(tiny_fashion_mnist, tmp_path / "work", "--pretrained", str(checkpoint))
    err = error_line(capsys, args)
    assert err.startswith("moco-benchmark: error: ") and "resnet18" in err
    assert not (tmp_path / "work" / "weights" / "moco.pkl").exists()


def test_scenes_of_other_counts_in_the_work_dir_are_refused(tiny_fashion_mnist, tmp_path, capsys):
    pytest.importorskip("detectron2")
    from transfer.scenes import build_fashion_scenes

    build_fashion_scenes(tmp_path / "scenes", root=tiny_fashion_mnist, num_labelled=20,
                         num_val=20, num_test=20)  # fmt: skip
    err = error_line(capsys, argv(tiny_fashion_mnist, tmp_path))
    assert err.startswith(f"moco-benchmark: error: {tmp_path / 'scenes'} holds scenes built with")
    assert "choose another --work-dir" in err
