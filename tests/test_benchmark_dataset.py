"""``moco-benchmark --dataset``: any COCO-format dataset and any checkpoint, label fractions, the
frozen-backbone probe, and bad input as one line that writes nothing."""

from __future__ import annotations

import csv
import json
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from moco_pretrain.weights import load_backbone_state_dict
from transfer import benchmark
from transfer.convert import convert_to_detectron2, write_detectron2_pkl

from .test_transfer_benchmark import error_line

pytest.importorskip("detectron2")

CATEGORIES = [{"id": 1, "name": "square"}, {"id": 2, "name": "bar"}]
TINY = [
    "SOLVER.MAX_ITER", "2", "SOLVER.STEPS", "()", "SOLVER.WARMUP_ITERS", "0",
    "SOLVER.IMS_PER_BATCH", "2", "TEST.PRECISE_BN.NUM_ITER", "1", "DATALOADER.NUM_WORKERS", "0",
    "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64", "INPUT.MIN_SIZE_TEST", "64",
    "INPUT.MAX_SIZE_TEST", "64", "MODEL.FPN.OUT_CHANNELS", "32", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "16",
]  # fmt: skip


def _write_dataset(root: Path) -> Path:
    """Three splits of 64 px images with a square and a bar each, boxes and polygon masks."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 8), ("val", 3), ("test", 3)):
        (root / split).mkdir(parents=True)
        images, annotations = [], []
        for i in range(count):
            pixels = np.zeros((64, 64, 3), np.uint8)
            for category, (w, h) in ((1, (16, 16)), (2, (24, 8))):
                x, y = (int(v) for v in rng.integers(2, 64 - 26, size=2))
                pixels[y : y + h, x : x + w] = 80 * category
                annotations.append({
                    "id": len(annotations) + 1, "image_id": i, "category_id": category,
                    "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0,
                    "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]],
                })  # fmt: skip
            Image.fromarray(pixels).save(root / split / f"{i}.png")
            images.append({"id": i, "file_name": f"{i}.png", "width": 64, "height": 64})
        coco = {"images": images, "annotations": annotations, "categories": CATEGORIES}
        (root / f"{split}.json").write_text(json.dumps(coco))
    return root


def _swav_checkpoint(path: Path) -> Path:
    """A SwAV-layout ResNet-18 (``module.`` + projection head and prototypes)."""
    torch.manual_seed(0)
    state = {f"module.{k}": v for k, v in torchvision.models.resnet18().state_dict().items()}
    state = {k: v for k, v in state.items() if not k.startswith("module.fc.")}
    state |= {"module.projection_head.0.weight": torch.randn(8, 512),
              "module.prototypes.weight": torch.randn(4, 8)}  # fmt: skip
    torch.save(state, path)
    return path


def _argv(data: Path, work: Path, weights: Path, *extra: str) -> list[str]:
    return ["--dataset", str(data), "--work-dir", str(work), "--arch", "resnet18", *extra,
            "--weights", f"SwAV={weights}", "--trials", "2", *TINY]  # fmt: skip


@pytest.fixture(scope="module")
def dataset_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("dataset_run")
    data, weights = _write_dataset(root / "data"), _swav_checkpoint(root / "swav.pth")
    work = root / "work"
    benchmark.main(_argv(data, work, weights, "--label-fractions", "0.5", "1"))
    return data, weights, work


@pytest.mark.slow
def test_two_rows_two_fractions_two_trials_with_the_fraction_chart(dataset_run):
    _, _, work = dataset_run
    for subset, images in (("f0.5", 4), ("", 8)):  # all labels: the run's own folders
        for row in ("random", "SwAV/seed_0"):
            trials = sorted((work / "det" / "short" / subset / row).glob("trial_*"))
            assert [t.name for t in trials] == ["trial_0", "trial_1"]
            result = json.loads((trials[0] / "results.json").read_text())
            assert result["init"] == ("random" if row == "random" else "pretrained")
            train = result["config"]["DATASETS"]["TRAIN"][0]
            entries = {
                name: json_file
                for name, json_file, _ in result["config"]["MOCO"]["DATASETS"]["COCO"]
            }
            assert len(json.loads(Path(entries[train]).read_text())["images"]) == images
            assert result["config"]["MODEL"]["RESNETS"]["DEPTH"] == 18
            assert result["config"]["MODEL"]["MASK_ON"] is True
    swav = json.loads((work / "det/short/SwAV/seed_0/trial_0/results.json").read_text())
    assert swav["pretraining"]["layout"] == "swav"
    assert set(swav["pretraining"]["dropped"]) == {
        "projection head",
        "prototypes",
        "BN step counters",
    }
    report = work / "report" / "short"
    for metric in ("bbox_AP", "bbox_AP50", "bbox_AP75", "segm_AP"):
        png = report / f"{metric}_vs_label_fraction.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for subset in ("f0.5", ""):
        with (report / subset / "report.csv").open() as f:
            rows = {r["row"] for r in csv.DictReader(f)}
        assert rows == {"random init", "SwAV"}
    # declared before the runs: SwAV against random init, with all labels only
    assert "Confirmatory (" in (report / "report.md").read_text()
    assert "for SwAV: Holm" in (report / "report.md").read_text()
    assert "Not confirmatory in this report" in (report / "f0.5" / "report.md").read_text()


@pytest.mark.slow
def test_a_rerun_trains_nothing(dataset_run, monkeypatch):
    data, weights, work = dataset_run
    from transfer import train_net

    def refuse(*args, **kwargs):
        raise AssertionError("a finished trial was trained again")

    monkeypatch.setattr(train_net, "run_trial", refuse)
    benchmark.main(_argv(data, work, weights, "--label-fractions", "0.5", "1"))


@pytest.mark.slow
def test_frozen_probe_is_its_own_protocol(dataset_run):
    data, weights, work = dataset_run
    benchmark.main(_argv(data, work, weights, "--frozen"))
    frozen = json.loads((work / "det/short-frozen/SwAV/seed_0/trial_0/results.json").read_text())
    tuned = json.loads((work / "det/short/SwAV/seed_0/trial_0/results.json").read_text())
    assert frozen["config"]["MODEL"]["BACKBONE"]["FREEZE_AT"] == 5
    assert frozen["config"]["MODEL"]["RESNETS"]["NORM"] == "FrozenBN"
    assert frozen["protocol"]["recipe_sha256"] != tuned["protocol"]["recipe_sha256"]
    assert (work / "report" / "short-frozen" / "report.csv").is_file()


class _RunsCode:
    def __reduce__(self):
        return (print, ("unpickling ran code",))


@pytest.mark.parametrize(
    ("damage", "extra", "message"),
    [
        (lambda d, w: (d / "val.json").write_text("[]"), [],
         r"val.json: not a COCO instances file \(no 'images' list\)"),
        (lambda d, w: (d / "train" / "3.png").unlink(), [],
         r"train.json: 1 of 8 images not found under .*train, e.g. \['3.png'\]"),
        (lambda d, w: (d / "test.json").write_text(json.dumps(
            json.loads((d / "test.json").read_text()) | {"categories": CATEGORIES[:1]})), [],
         r"test.json: annotation \d+ names image \d+ or category 2, which the file does not list"),
        (lambda d, w: (d / "test.json").write_text(json.dumps(
            json.loads((d / "test.json").read_text()) | {"categories": CATEGORIES[::-1]})), [],
         r"test.json: categories \['bar', 'square'\] differ from the training split's"),
        (lambda d, w: None, ["--label-fractions", "0.5", "1.5"],
         r"--label-fractions: 1.5 is not in \(0, 1\]"),
        (lambda d, w: torch.save(torchvision.models.resnet50().state_dict(), w), [],
         r"swav.pth \(layout torchvision\) is not a resnet18 backbone"),
        (lambda d, w: torch.save({"state_dict": {}, "hook": _RunsCode()}, w), [],
         r"swav.pth: .*could run code"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, damage, extra, message):
    data, weights = _write_dataset(tmp_path / "data"), _swav_checkpoint(tmp_path / "swav.pth")
    damage(data, weights)
    err = error_line(capsys, _argv(data, tmp_path / "work", weights, *extra))
    assert err.startswith("moco-benchmark: error: ")
    assert re.search(message, err), err
    assert "unpickling ran code" not in capsys.readouterr().out
    assert not (tmp_path / "work").exists()


def test_overrides_after_list_options_and_all_labels_always_a_fraction():
    argv = ["--dataset", "d", "--weights", "SwAV=a.pth", "DINO=b.pth", "--label-fractions", "0.1",
            "0.25", "SOLVER.MAX_ITER", "6000", "SOLVER.STEPS", "(4500, 5500)"]  # fmt: skip
    options, overrides = benchmark.split_overrides(argv)
    assert overrides == ["SOLVER.MAX_ITER", "6000", "SOLVER.STEPS", "(4500, 5500)"]
    # an option's value shaped like a key stays with its option
    assert benchmark.split_overrides(["--work-dir", "RUNS.V2", "SEED.X", "1"]) == (
        ["--work-dir", "RUNS.V2"],
        ["SEED.X", "1"],
    )
    args = benchmark.build_parser().parse_args(options)
    assert args.weights == [("SwAV", Path("a.pth")), ("DINO", Path("b.pth"))]
    benchmark.check_arguments(args)
    assert args.label_fractions == [0.1, 0.25, 1.0]


@pytest.mark.parametrize("kind", ["runs code", "another arch", "not converted"])
def test_a_bad_pkl_row_is_one_line_and_runs_nothing(tmp_path, capsys, kind):
    data = _write_dataset(tmp_path / "data")
    pkl = tmp_path / "row.pkl"
    if kind == "runs code":
        pkl.write_bytes(pickle.dumps({"model": _RunsCode()}))
    elif kind == "another arch":
        r50 = tmp_path / "r50.pth"
        torch.save(torchvision.models.resnet50().state_dict(), r50)
        write_detectron2_pkl(convert_to_detectron2(load_backbone_state_dict(r50)), pkl)
    else:
        torch.save(torchvision.models.resnet18().state_dict(), pkl)
    args = ["--dataset", str(data), "--work-dir", str(tmp_path / "work"), "--arch", "resnet18",
            "--weights", f"X={pkl}", *TINY]  # fmt: skip
    err = error_line(capsys, args)
    assert re.search(r"--weights X=.*row.pkl: not a moco-convert .pkl of a resnet18 backbone", err)
    assert "unpickling ran code" not in capsys.readouterr().out
    assert not (tmp_path / "work").exists()


def test_rows_of_a_converted_pkl_and_of_another_file_under_a_known_name(tmp_path, capsys):
    data, weights = _write_dataset(tmp_path / "data"), _swav_checkpoint(tmp_path / "swav.pth")
    pkl = tmp_path / "given.pkl"
    write_detectron2_pkl(
        convert_to_detectron2(load_backbone_state_dict(weights), arch="resnet18"), pkl
    )
    work = tmp_path / "work"
    args = benchmark.build_parser().parse_args(
        [
            "--dataset",
            str(data),
            "--arch",
            "resnet18",
            "--weights",
            f"given={pkl}",
            f"SwAV={weights}",
        ]
    )
    benchmark.check_arguments(args)
    rows, _, _ = benchmark.dataset_rows(args, work, "moco-benchmark ...")
    assert rows["given"].weights == {0: pkl}  # a Detectron2 .pkl is used as it is
    assert rows["SwAV"].weights == {0: work / "weights" / "SwAV.pkl"}
    other = tmp_path / "other.pth"
    torch.save(torchvision.models.resnet18().state_dict(), other)
    err = error_line(capsys, _argv(data, work, other))
    assert re.search(
        r"SwAV.pkl was converted from .*swav.pth as resnet18, not from .*other.pth", err
    )
