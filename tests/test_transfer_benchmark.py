"""moco-benchmark end to end at toy sizes: every step, resume, reports, and its bad-input lines."""

from __future__ import annotations

import csv
import hashlib
import json
import shlex
from pathlib import Path

import pytest
import torch
import torchvision
import yaml

from moco_pretrain.data import FashionMNIST
from transfer import benchmark

SMALL_RUN = shlex.join([
    "SOLVER.EPOCHS", "1", "SOLVER.BATCH_SIZE", "16", "MODEL.BN_SPLITS", "2",
    "DATA.NUM_WORKERS", "0", "DATA.HOLDOUT", "8", "KNN.BATCH_SIZE_PER_PROCESS", "40",
    "KNN.NEIGHBORS", "20",
])  # fmt: skip
TINY_FINE_TUNE = [
    "SOLVER.MAX_ITER", "2", "SOLVER.STEPS", "()", "SOLVER.WARMUP_ITERS", "0",
    "SOLVER.IMS_PER_BATCH", "2", "TEST.PRECISE_BN.NUM_ITER", "1",
]  # fmt: skip
SOURCE = ["T-shirt/top", "Pullover", "Coat", "Shirt", "Bag"]  # the default partition
TARGET = ["Trouser", "Dress", "Sandal", "Sneaker", "Ankle boot"]


def argv(data: Path, work: Path, *extra: str) -> list[str]:
    # tiny data: 8 training images per class, 40 per partition side
    return [
        "--work-dir", str(work), "--data-root", str(data), "--labelled", "20",
        "--val-garments", "10", "--test-garments", "10", "--pretrain-opts", SMALL_RUN,
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


def pretraining_ids(data: Path, classes: str) -> set[int]:
    """The training-image ids a source-class run of the demo recipe trains on (holdout aside)."""
    from moco_pretrain.config import dataset_options, setup_cfg
    from moco_pretrain.data import build_dataset, image_ids

    cfg = setup_cfg(benchmark.PRETRAIN_RECIPE, ["DATA.ROOT", str(data), "DATA.CLASSES", classes,
                                                *shlex.split(SMALL_RUN)])  # fmt: skip
    return set(image_ids(build_dataset(**dataset_options(cfg), split="train", transform=None)))


@pytest.fixture(scope="module")
def two_seed_run(tiny_fashion_mnist, tmp_path_factory) -> tuple[Path, list[str]]:
    """One benchmark of 2 pretraining seeds, scored on the validation scenes, run as the quick
    start runs it, with a work folder relative to the current one: its work folder and arguments
    (one per module: detectron2 registers the scenes' names once per process)."""
    pytest.importorskip("detectron2")
    base = tmp_path_factory.mktemp("benchmark")
    args = argv(tiny_fashion_mnist, Path("work"), "--pretrain-seeds", "2", "--eval-split", "val",
                *TINY_FINE_TUNE)  # fmt: skip
    run_in(base, args)
    return base / "work", args


def run_in(folder: Path, args: list[str]) -> None:
    """``moco-benchmark args`` run from ``folder``."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        benchmark.main(args)


def test_every_step_runs_reports_and_a_rerun_trains_nothing(two_seed_run):
    work, args = two_seed_run
    schedule = "short-val"
    report = read_report(work / "report" / schedule / "report.csv")
    runs = {
        "moco": [(f"seed_{s}/trial_0", f"work/weights/moco_seed{s}.pkl", 0) for s in (0, 1)],
        "sup": [(f"seed_{s}/trial_0", f"work/weights/sup_seed{s}.pkl", 0) for s in (0, 1)],
        "random": [(f"trial_{k}", "", k) for k in (0, 1)],  # as many trials as a pretrained row
    }
    for row, expected in runs.items():
        found = sorted((work / "det" / schedule / row).rglob("results.json"))
        assert [p.parent.relative_to(work / "det" / schedule / row).as_posix() for p in found] == [
            e[0] for e in expected
        ]
        metrics = [json.loads(path.read_text())["metrics"] for path in found]
        for metric in ("bbox/AP", "segm/AP"):  # a toy model can predict nothing: then no AP
            n = sum(metric in m for m in metrics)
            label = benchmark.ROWS[row][0]
            if n:
                assert sum(int(r["n"]) for (lbl, m), r in report.items()
                           if lbl.startswith(label) and m == metric) == n  # fmt: skip
        for path, (_, weights, seed) in zip(found, expected, strict=True):
            result = json.loads(path.read_text())
            config = result["config"]
            assert result["init"] == benchmark.ROWS[row][2]
            assert result["seed"] == seed
            assert result["partition"] == {"source": SOURCE, "target": TARGET}
            assert config["SOLVER"]["MAX_ITER"] == 2
            assert config["MODEL"]["ROI_HEADS"]["NUM_CLASSES"] == 5
            assert config["DATASETS"]["TEST"] == ["fashion_scenes_val"]
            assert config["MODEL"]["WEIGHTS"] == weights  # as given, relative to the command
    for s in (0, 1):  # the pretraining seeds are the runs' SEEDs
        assert f"SEED: {s}\n" in (work / "moco" / f"seed_{s}" / "config.yaml").read_text()
    seconds = json.loads((work / "costs.json").read_text())["seconds"]
    assert {
        "scenes",
        "pretrain/seed_1",
        "supervised/seed_1",
        "fine_tune/short-val/moco",
    } <= seconds.keys()

    finished = {
        p: p.stat().st_mtime_ns for p in work.rglob("*") if p.suffix in (".json", ".pkl", ".tar")
    }
    report = (work / "report" / schedule / "report.md").read_text()
    run_in(work.parent, args)
    rerun = {p: p.stat().st_mtime_ns for p in finished}
    unchanged = {p for p in finished if rerun[p] == finished[p]}
    assert unchanged == {p for p in finished if p.name != "costs.json"}  # nothing retrained
    assert (work / "report" / schedule / "report.md").read_text() == report


def test_no_scene_garment_is_in_any_pretraining_set(two_seed_run, tiny_fashion_mnist):
    """The class-disjoint protocol, from the records the runs leave: the pretrained rows trained
    on source-class images only, the scenes hold target-class garments only, and the ids and
    digests agree."""
    work, _ = two_seed_run
    scenes = json.loads((work / "scenes" / "summary.json").read_text())
    assert scenes["classes"] == TARGET
    for split in ("train", "val", "test"):
        coco = json.loads((work / "scenes" / f"{split}.json").read_text())
        assert [c["name"] for c in coco["categories"]] == TARGET
    garments = {*scenes["sources"]["train_labelled_indices"], *scenes["sources"]["val_indices"]}
    ids = pretraining_ids(tiny_fashion_mnist, "[0, 2, 4, 6, 8]")
    assert len(ids) == 32 and not ids & garments  # 5 classes x 8, the 8 held out aside
    labels = FashionMNIST(tiny_fashion_mnist, split="train").targets.tolist()
    assert {labels[i] for i in ids} == {0, 2, 4, 6, 8}
    assert {labels[i] for i in garments} == {1, 3, 5, 7, 9}
    identity = f"fashion_mnist:train:{','.join(SOURCE)}:{','.join(map(str, sorted(ids)))}"
    digest = hashlib.sha256(identity.encode()).hexdigest()
    moco = json.loads((work / "moco" / "seed_0" / "summary.json").read_text())["data"]
    supervised = json.loads((work / "supervised" / "seed_0" / "results.json").read_text())["data"]
    for record in (moco, supervised):
        assert record["classes"] == SOURCE and record["images"] == 32
        assert record["images_sha256"] == digest


@pytest.mark.slow
def test_controls_epoch_curve_and_long_schedule_extend_a_finished_run(two_seed_run):
    work, args = two_seed_run
    pretrained = {p: p.stat().st_mtime_ns for p in (work / "moco").rglob("*.tar")}
    run_in(work.parent, [*args[: args.index("SOLVER.MAX_ITER")], "--epoch-curve", "1", "2",
                         "--schedules", "short", "long", "--controls", *TINY_FINE_TUNE])  # fmt: skip
    assert {p: p.stat().st_mtime_ns for p in pretrained} == pretrained  # reused, not retrained
    short, long = work / "det" / "short-val", work / "det" / "long-val"
    for row, init in (("random_bn", "random-bn"), ("moco_m0", "moco")):
        trials = sorted((short / row).rglob("results.json"))
        assert [p.parent.parent.name for p in trials] == ["seed_0", "seed_1"]
        result = json.loads(trials[1].read_text())
        assert result["init"] == init and result["pretraining"]["seed"] == 1
    assert json.loads(next((short / "random_bn").rglob("results.json")).read_text())[
        "pretraining"]["method"] == "random-bn"  # fmt: skip
    m0 = yaml.safe_load((work / "moco_m0" / "seed_1" / "config.yaml").read_text())
    assert m0["MODEL"]["M"] == 0.0 and m0["SEED"] == 1
    for epoch in (1, 2):
        (trial,) = (short / "epochs" / f"epoch_{epoch}").rglob("results.json")
        assert json.loads(trial.read_text())["pretraining"]["epochs"] == epoch
    assert (work / "report" / "short-val" / "ap_vs_epochs.png").read_bytes()[:4] == b"\x89PNG"
    controls = read_report(work / "report" / "short-val" / "controls" / "report.csv")
    assert {row for row, _ in controls} == {
        "MoCo v2", "random init", "random init, BN calibrated (control)", "MoCo v2, m 0 (control)",
    }  # fmt: skip
    # the contrast with MoCo (this report's first baseline), every comparison secondary
    lines = [line for (row, _), line in controls.items() if row == "MoCo v2, m 0 (control)"]
    assert lines and {line["family"] for line in lines} == {"secondary"}
    assert all(line["verdict_supervised"] for line in lines)
    # the long schedule: the main rows, the first pretraining seed, iterations x3
    assert sorted(p.parent.relative_to(long).as_posix() for p in long.rglob("results.json")) == [
        "moco/seed_0/trial_0", "random/trial_0", "sup/seed_0/trial_0",
    ]  # fmt: skip
    result = json.loads((long / "moco/seed_0/trial_0/results.json").read_text())
    assert result["config"]["SOLVER"]["MAX_ITER"] == 6


@pytest.mark.slow
def test_the_segmentation_and_keypoint_variants_run_on_the_same_backbones(
    tiny_fashion_mnist, tmp_path
):
    pytest.importorskip("detectron2")
    work = tmp_path / "work"
    for task in ("sem_seg", "keypoints"):
        benchmark.main(argv(tiny_fashion_mnist, work, "--task", task, *TINY_FINE_TUNE))
    seconds = json.loads((work / "costs.json").read_text())["seconds"]
    assert {"fine_tune/sem_seg/short/moco", "fine_tune/keypoints/short/random"} <= seconds.keys()
    assert not (work / "det").exists()  # the detection rows were not run
    for task, metric, test_set in (("sem_seg", "sem_seg/mIoU", "fashion_scenes_sem_seg_test"),
                                   ("keypoints", "bbox/AP", "fashion_scenes_keypoints_test")):  # fmt: skip
        for row in benchmark.ROWS:
            trial = "trial_0" if row == "random" else "seed_0/trial_0"
            result = json.loads((work / task / "short" / row / trial / "results.json").read_text())
            assert result["config"]["DATASETS"]["TEST"] == [test_set]
            assert result["task"] == ("sem_seg" if task == "sem_seg" else "detection")
        report = read_report(work / "report" / task / "short" / "report.csv")
        assert report[(benchmark.ROWS["moco"][0], metric)]["n"] == "1"


def test_scene_options_register_each_variant_and_build_its_labels(tiny_fashion_mnist, tmp_path):
    from transfer.datasets.scenes import build_fashion_scenes, scene_options

    scenes = tmp_path / "scenes"
    build_fashion_scenes(scenes, root=tiny_fashion_mnist, num_labelled=20, num_val=10, num_test=10)
    options = scene_options("sem_seg", scenes, "val")
    assert options[::2] == [
        "MOCO.DATASETS.SEM_SEG", "MOCO.DATASETS.SEM_SEG_CLASSES", "MODEL.SEM_SEG_HEAD.NUM_CLASSES",
        "DATASETS.TEST",
    ]  # fmt: skip
    assert options[1] == str([
        (f"fashion_scenes_sem_seg_{s}", str(scenes / s), str(scenes / f"{s}_sem_seg"), "")
        for s in ("train", "val", "test")
    ])  # fmt: skip
    assert options[3].startswith("['background', 'T-shirt/top'") and options[5] == "11"
    assert options[7] == "('fashion_scenes_sem_seg_val',)"
    assert len(list((scenes / "val_sem_seg").glob("*.png"))) == len(
        list((scenes / "val").glob("*.png"))
    )
    options = scene_options("keypoints", scenes, "test")
    assert options[4:] == [
        "MOCO.DATASETS.KEYPOINT_FLIP_MAP", "[['left', 'right']]", "MODEL.ROI_HEADS.NUM_CLASSES",
        "10", "DATASETS.TEST", "('fashion_scenes_keypoints_test',)",
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
    summary = json.loads((tmp_path / "moco" / "seed_0" / "summary.json").read_text())
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
    assert not (tmp_path / "work" / "weights" / "moco_seed0.pkl").exists()


def test_scenes_of_other_counts_in_the_work_dir_are_refused(tiny_fashion_mnist, tmp_path, capsys):
    pytest.importorskip("detectron2")
    from transfer.datasets.scenes import build_fashion_scenes

    build_fashion_scenes(tmp_path / "scenes", root=tiny_fashion_mnist, num_labelled=10,
                         num_val=10, num_test=10, classes=(1, 3, 5, 7, 9))  # fmt: skip
    err = error_line(capsys, argv(tiny_fashion_mnist, tmp_path))
    assert err.startswith(f"moco-benchmark: error: {tmp_path / 'scenes'} holds scenes built with")
    assert "choose another --work-dir" in err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["--source-classes", "0,2,Jacket"],
            "--source-classes: 'Jacket' is not a Fashion-MNIST class",
        ),
        (["--target-classes", "1,12"], "--target-classes: '12' is not a Fashion-MNIST class"),
        (["--target-classes", "1,trouser"], "--target-classes: class 'trouser' is named twice"),
        (["--target-classes", "1,3,Coat"], "--source-classes and --target-classes share ['Coat']"),
        (["--pretrain-seeds", "0"], "--pretrain-seeds must be at least 1, got 0"),
        (["--trials", "0"], "--trials must be at least 1, got 0"),
        (
            ["MOCO.PRIMARY_METRIC", "keypoints/AP"],
            "MOCO.PRIMARY_METRIC 'keypoints/AP' is not a metric this task reports",
        ),
    ],
)
def test_bad_partitions_counts_and_metrics_are_one_line_and_write_nothing(
    tiny_fashion_mnist, tmp_path, capsys, extra, message
):
    if extra[0].startswith("MOCO."):
        pytest.importorskip("detectron2")
    err = error_line(capsys, argv(tiny_fashion_mnist, tmp_path / "work", *extra))
    assert err.startswith(f"moco-benchmark: error: {message}")
    assert not (tmp_path / "work").exists()


def test_another_partition_in_the_same_work_dir_is_refused(tiny_fashion_mnist, tmp_path, capsys):
    work = tmp_path / "work"
    benchmark.check_partition(
        work.parent, benchmark.partition_of(benchmark.build_parser().parse_args([]))
    )
    recorded = (work.parent / benchmark.PARTITION_FILE).read_bytes()
    swapped = ["--source-classes", "1,3,5,7,9", "--target-classes", "0,2,4,6,8"]
    err = error_line(capsys, argv(tiny_fashion_mnist, work.parent, *swapped))
    assert err.startswith(
        f"moco-benchmark: error: {work.parent} holds runs of the partition source"
    )
    assert (work.parent / benchmark.PARTITION_FILE).read_bytes() == recorded


def test_a_backbone_not_pretrained_on_the_source_classes_is_refused(
    tiny_fashion_mnist, tmp_path, capsys
):
    pytest.importorskip("detectron2")
    checkpoint = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), checkpoint)  # no record of its data
    err = error_line(
        capsys, argv(tiny_fashion_mnist, tmp_path / "work", "--pretrained", str(checkpoint))
    )
    assert err == (
        f"moco-benchmark: error: {checkpoint} records no training classes, not the source classes"
        f" {SOURCE}: pretrain it with DATA.CLASSES set to them (moco-pretrain writes the record"
        " into its checkpoints)"
    )
    assert not (tmp_path / "work" / "weights" / "moco_seed0.pkl").exists()
