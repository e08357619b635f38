"""moco-transfer end to end on CPU: 2 iterations + evaluation on tiny VOC- and COCO-format data.

The datasets are written here (coloured boxes on noise, 96x128 px); the backbone is a randomly
initialised torchvision ResNet-50 converted by the converter, so the whole path (convert ->
register -> preflight -> train -> evaluate -> results.json -> trials, --eval-only, restarts)
runs as a user runs it.
"""

from __future__ import annotations

import json
import math
import pickle
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("detectron2")

from moco_pretrain.recipes import resolve_config_file  # noqa: E402
from moco_pretrain.weights import load_backbone_state_dict  # noqa: E402
from transfer.convert import convert_to_detectron2, write_detectron2_pkl  # noqa: E402
from transfer.preflight import BackboneWeightsError  # noqa: E402
from transfer.train_net import main  # noqa: E402

CLASSES = ("square", "bar")
SIZE = (128, 96)  # width, height


def _scene(rng: np.random.Generator) -> tuple[Image.Image, list[tuple[int, list[int]]]]:
    """Noise with 1-2 flat coloured rectangles; returns the image and (class, xyxy) boxes."""
    pixels = rng.integers(0, 80, size=(SIZE[1], SIZE[0], 3), dtype=np.uint8)
    boxes = []
    for _ in range(rng.integers(1, 3)):
        c = int(rng.integers(0, len(CLASSES)))
        w, h = (30, 30) if c == 0 else (50, 16)
        x, y = int(rng.integers(0, SIZE[0] - w)), int(rng.integers(0, SIZE[1] - h))
        pixels[y : y + h, x : x + w] = (220, 40, 40) if c == 0 else (40, 40, 220)
        boxes.append((c, [x, y, x + w, y + h]))
    return Image.fromarray(pixels), boxes


def write_voc(root: Path, *, splits=(("train", 4), ("test", 2))) -> Path:
    rng = np.random.default_rng(0)
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for split, n in splits:
        ids = [f"{split}_{i}" for i in range(n)]
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")
        for image_id in ids:
            image, boxes = _scene(rng)
            image.save(root / "JPEGImages" / f"{image_id}.jpg", quality=95)
            ann = ET.Element("annotation")
            size = ET.SubElement(ann, "size")
            for tag, value in zip(("width", "height", "depth"), (*SIZE, 3), strict=True):
                ET.SubElement(size, tag).text = str(value)
            for c, box in boxes:
                obj = ET.SubElement(ann, "object")
                ET.SubElement(obj, "name").text = CLASSES[c]
                for tag in ("pose", "truncated", "difficult"):
                    ET.SubElement(obj, tag).text = "Unspecified" if tag == "pose" else "0"
                bndbox = ET.SubElement(obj, "bndbox")
                for tag, value in zip(("xmin", "ymin", "xmax", "ymax"), box, strict=True):
                    ET.SubElement(bndbox, tag).text = str(value)
            ET.ElementTree(ann).write(root / "Annotations" / f"{image_id}.xml")
    return root


def write_coco(root: Path, split: str, n: int, seed: int) -> tuple[Path, Path]:
    rng = np.random.default_rng(seed)
    images_dir = root / split
    images_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(n):
        image, boxes = _scene(rng)
        image.save(images_dir / f"{i}.png")
        images.append({"id": i + 1, "file_name": f"{i}.png", "width": SIZE[0], "height": SIZE[1]})
        for c, (x0, y0, x1, y1) in boxes:
            polygon = [x0, y0, x1, y0, x1, y1, x0, y1]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": c + 1,
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": (x1 - x0) * (y1 - y0),
                    "iscrowd": 0,
                    "segmentation": [polygon],
                }
            )
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(CLASSES)]
    json_file = root / f"{split}.json"
    json_file.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    return json_file, images_dir


def _results(output: Path, trial: int = 0) -> dict:
    return json.loads((output / f"trial_{trial}" / "results.json").read_text())


def check_coco_ap(metrics: dict[str, float], task: str) -> None:
    """COCOEvaluator's ``task`` AP after a short run on :func:`write_coco`'s data: finite (NaN
    would mean nothing was predicted), AP50 bounding AP and AP75, and NaN for medium and large
    objects, of which the tiny data has none (every object's area is below 32^2)."""
    ap, ap50, ap75 = (metrics[f"{task}/{m}"] for m in ("AP", "AP50", "AP75"))
    assert all(map(math.isfinite, (ap, ap50, ap75))), metrics
    assert ap50 >= ap and ap50 >= ap75
    assert math.isnan(metrics[f"{task}/APm"]) and math.isnan(metrics[f"{task}/APl"]), metrics


def predicted_images(output: Path) -> set[int]:
    """The image ids of the predictions that the first trial's COCOEvaluator scored."""
    path = output / "trial_0" / "inference" / "coco_instances_results.json"
    return {prediction["image_id"] for prediction in json.loads(path.read_text())}


def score_ground_truth(dataset: str, output: Path) -> dict:
    """What a run's evaluator for the registered ``dataset`` reports for a detector that predicts
    the ground truth itself (every box once, score 1): the full mark, unless the evaluator reads
    other annotations or classes than the run trains on."""
    from detectron2.config import get_cfg
    from detectron2.data import DatasetCatalog
    from detectron2.structures import Boxes, BoxMode, Instances

    from transfer import add_moco_config
    from transfer.train_net import Trainer

    cfg = get_cfg()
    add_moco_config(cfg)
    cfg.OUTPUT_DIR = str(output)
    evaluator = Trainer.build_evaluator(cfg, dataset)
    evaluator.reset()
    for record in DatasetCatalog.get(dataset):
        anns = record["annotations"]
        boxes = [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in anns]
        predicted = Instances((record["height"], record["width"]))
        predicted.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
        predicted.scores = torch.ones(len(anns))
        predicted.pred_classes = torch.tensor([a["category_id"] for a in anns])
        evaluator.process([{"image_id": record["image_id"]}], [{"instances": predicted}])
    return evaluator.evaluate()


def test_voc_two_iterations_and_evaluation(tmp_path, backbone_pkl):
    voc = write_voc(tmp_path / "voc")
    datasets = f"[('tiny_voc_train', '{voc}', 'train'), ('tiny_voc_test', '{voc}', 'test')]"
    output = tmp_path / "out"
    opts = ["MOCO.DATASETS.VOC", datasets, "MOCO.DATASETS.VOC_CLASSES", str(list(CLASSES))]
    opts += ["DATASETS.TRAIN", "('tiny_voc_train',)", "DATASETS.TEST", "('tiny_voc_test',)"]
    opts += ["MODEL.ROI_HEADS.NUM_CLASSES", "2", "MODEL.WEIGHTS", str(backbone_pkl)]
    argv = ["--config-file", "detection/instant_test_voc_R_50_C4.yaml", "--num-trials", "2"]
    main([*argv, *opts, "OUTPUT_DIR", str(output)])

    first, second = _results(output, 0), _results(output, 1)
    assert first["task"] == "detection" and first["init"] == "moco"
    assert set(first["metrics"]) == {"bbox/AP", "bbox/AP50", "bbox/AP75"}
    # AP over IoU 0.5:0.95 falls with the threshold: AP50 bounds AP and AP75. Two iterations
    # from a random backbone detect nothing yet (AP 0; 40 iterations give AP50 4.5 on the train
    # images, too slow here), so the evaluation itself is checked: finite, and the ground truth
    # of the test split gets the full mark from this run's evaluator (its annotations, classes)
    box = first["metrics"]
    assert all(map(math.isfinite, box.values())), box
    assert box["bbox/AP50"] >= box["bbox/AP"] and box["bbox/AP50"] >= box["bbox/AP75"]
    # The full mark: detectron2's VOC evaluator averages over every class, counting one without
    # test objects as AP 0 (the 2 test images hold bars only)
    names = {
        e.text for f in (voc / "Annotations").glob("test_*.xml") for e in ET.parse(f).iter("name")
    }
    oracle = score_ground_truth("tiny_voc_test", tmp_path / "oracle")["bbox"]
    expected = 100.0 * len(names) / len(CLASSES)
    assert [oracle[m] for m in ("AP", "AP50", "AP75")] == pytest.approx([expected] * 3)
    assert (first["seed"], second["seed"]) == (0, 1)
    # provenance: what makes the trials comparable, the same for both (only the seed differs)
    protocol = first["protocol"]
    assert first["config_file"] == "detection/instant_test_voc_R_50_C4.yaml"
    assert (protocol["world_size"], protocol["ims_per_batch"], protocol["ims_per_gpu"]) == (1, 2, 2)
    assert protocol["max_iter"] == first["config"]["SOLVER"]["MAX_ITER"]
    assert (protocol["torch"], protocol["reference_world_size"]) == (torch.__version__, 0)
    assert protocol == second["protocol"] and len(protocol["config_sha256"]) == 64
    assert "trial_1" not in (output / "trial_0" / "log.txt").read_text()  # logs kept apart
    assert "Starting training from iteration 0" in (output / "trial_1" / "log.txt").read_text()
    assert first["checkpoint_sha256"] and first["config"]["MODEL"]["ROI_HEADS"]["NAME"] == (
        "Res5ROIHeadsExtraNorm"
    )
    # how the weights were pretrained: the .pkl's provenance (a torchvision classifier here)
    with open(backbone_pkl, "rb") as f:
        assert first["pretraining"] == pickle.load(f)["provenance"]
    assert (first["pretraining"]["method"], first["pretraining"]["epochs"]) == ("supervised", None)
    # rerunning the series skips finished trials: results.json is not rewritten
    stamp = (output / "trial_0" / "results.json").stat().st_mtime_ns
    main([*argv, *opts, "OUTPUT_DIR", str(output)])
    assert (output / "trial_0" / "results.json").stat().st_mtime_ns == stamp

    # --eval-only on the trained detector (its backbone passes the preflight) gives the same AP
    final = output / "trial_0" / "model_final.pth"
    argv = ["--config-file", "detection/instant_test_voc_R_50_C4.yaml", "--eval-only"]
    main([*argv, *opts, "MODEL.WEIGHTS", str(final), "OUTPUT_DIR", str(tmp_path / "eval")])
    assert _results(tmp_path / "eval")["metrics"] == first["metrics"]
    assert _results(tmp_path / "eval")["pretraining"] is None  # a detectron2 checkpoint: no record


def test_weights_provenance_is_read_from_converted_pkls_only(tmp_path, backbone_pkl):
    from moco_pretrain.weights import converted_provenance as weights_provenance

    provenance = weights_provenance(str(backbone_pkl))
    assert provenance["method"] == "supervised" and provenance["converted_as"] == "resnet50"
    msra = tmp_path / "R-50.pkl"  # detectron2's own weight files hold no provenance
    msra.write_bytes(pickle.dumps({"blobs": {"conv1_w": np.zeros(1)}, "__author__": "Detectron"}))
    for weights in (str(msra), "", "detectron2://ImageNetPretrained/MSRA/R-50.pkl"):
        assert weights_provenance(weights) is None


def test_bn_statistics_are_averaged_after_precise_bn_and_the_schedule_rescaled(
    tmp_path, backbone_pkl
):
    from detectron2.engine import hooks

    from transfer.train_net import AverageBNStatistics, Trainer, build_parser, setup

    voc = write_voc(tmp_path / "voc")
    datasets = f"[('avg_voc_train', '{voc}', 'train'), ('avg_voc_test', '{voc}', 'test')]"
    opts = ["MOCO.DATASETS.VOC", datasets, "MOCO.DATASETS.VOC_CLASSES", str(list(CLASSES))]
    opts += ["DATASETS.TRAIN", "('avg_voc_train',)", "DATASETS.TEST", "('avg_voc_test',)"]
    opts += ["MODEL.ROI_HEADS.NUM_CLASSES", "2", "MODEL.WEIGHTS", str(backbone_pkl)]
    # an 8-GPU schedule (16 images, lr 0.02, 10 iterations) run on one process
    opts += ["SOLVER.REFERENCE_WORLD_SIZE", "8", "SOLVER.IMS_PER_BATCH", "16"]
    opts += ["SOLVER.BASE_LR", "0.02", "SOLVER.MAX_ITER", "10", "SOLVER.STEPS", "(6,)"]
    opts += ["OUTPUT_DIR", str(tmp_path / "out")]
    config = str(resolve_config_file("detection/instant_test_voc_R_50_C4.yaml"))
    trainer = Trainer(setup(build_parser().parse_args(["--config-file", config, *opts]), 0))
    kinds = [type(hook) for hook in trainer.build_hooks()]
    assert kinds[kinds.index(hooks.PreciseBN) + 1] is AverageBNStatistics
    assert kinds.index(AverageBNStatistics) < kinds.index(hooks.EvalHook)  # before evaluating
    # detectron2's rescaling keeps 2 images per GPU: batch / 8, lr / 8, iterations x 8
    solver = trainer.cfg.SOLVER
    assert (solver.IMS_PER_BATCH, solver.MAX_ITER, tuple(solver.STEPS)) == (2, 80, (48,))
    assert solver.BASE_LR == pytest.approx(0.0025)
    log = (tmp_path / "out" / "trial_0" / "log.txt").read_text()
    assert "effective schedule: 1 processes x 2 images = batch 2, lr 0.0025, 80 iterations" in log


def test_coco_two_iterations_and_box_and_mask_evaluation(tmp_path, backbone_pkl):
    train = write_coco(tmp_path / "coco", "train", 4, seed=1)
    test = write_coco(tmp_path / "coco", "test", 2, seed=2)
    datasets = f"[('tiny_coco_train', '{train[0]}', '{train[1]}'), "
    datasets += f"('tiny_coco_test', '{test[0]}', '{test[1]}')]"
    output = tmp_path / "out"
    opts = ["MOCO.DATASETS.COCO", datasets, "MODEL.ROI_HEADS.NUM_CLASSES", "2"]
    opts += ["DATASETS.TRAIN", "('tiny_coco_train',)", "DATASETS.TEST", "('tiny_coco_test',)"]
    opts += ["MODEL.WEIGHTS", str(backbone_pkl), "OUTPUT_DIR", str(output)]
    main(["--config-file", "detection/instant_test_coco_R_50_FPN.yaml", *opts])

    metrics = _results(output)["metrics"]
    for task in ("bbox", "segm"):
        assert {f"{task}/{m}" for m in ("AP", "AP50", "AP75", "APs", "APm", "APl")} <= set(metrics)
        check_coco_ap(metrics, task)
        assert math.isfinite(metrics[f"{task}/APs"])
    assert predicted_images(output) == {1, 2}  # the test split's 2 images, each predicted on
    oracle = score_ground_truth("tiny_coco_test", tmp_path / "oracle")["bbox"]
    assert (oracle["AP"], oracle["AP50"], oracle["AP75"]) == (100.0, 100.0, 100.0)


@pytest.mark.slow  # three 4-iteration Mask R-CNN trials
def test_killed_trial_restarts_and_ends_as_the_uninterrupted_trial(
    tmp_path, backbone_pkl, monkeypatch, capsys
):
    """A trial killed mid-training leaves no results.json; rerunning the command restarts it from
    iteration 0 and ends with the uninterrupted trial's weights and AP; --resume is refused."""
    from transfer import train_net

    train = write_coco(tmp_path / "coco", "train", 4, seed=1)
    test = write_coco(tmp_path / "coco", "test", 2, seed=2)
    datasets = f"[('kill_coco_train', '{train[0]}', '{train[1]}'), "
    datasets += f"('kill_coco_test', '{test[0]}', '{test[1]}')]"
    argv = ["--config-file", "detection/instant_test_coco_R_50_FPN.yaml"]
    argv += ["MOCO.DATASETS.COCO", datasets, "MODEL.ROI_HEADS.NUM_CLASSES", "2"]
    argv += ["DATASETS.TRAIN", "('kill_coco_train',)", "DATASETS.TEST", "('kill_coco_test',)"]
    argv += ["MODEL.WEIGHTS", str(backbone_pkl), "SOLVER.MAX_ITER", "4"]
    argv += ["SOLVER.CHECKPOINT_PERIOD", "1"]
    main([*argv, "OUTPUT_DIR", str(tmp_path / "a")])

    run_step = train_net.Trainer.run_step

    def killed_at_iteration_2(self):
        if self.iter == 2:
            raise KeyboardInterrupt("killed")
        run_step(self)

    monkeypatch.setattr(train_net.Trainer, "run_step", killed_at_iteration_2)
    with pytest.raises(KeyboardInterrupt):
        main([*argv, "OUTPUT_DIR", str(tmp_path / "b")])
    monkeypatch.undo()
    killed = tmp_path / "b" / "trial_0"
    assert not (killed / "results.json").exists() and (killed / "last_checkpoint").is_file()

    with pytest.raises(SystemExit) as exit_info:
        main(["--resume", *argv, "OUTPUT_DIR", str(tmp_path / "b")])
    assert exit_info.value.code == 2
    assert "restarts from iteration 0" in capsys.readouterr().err
    main([*argv, "OUTPUT_DIR", str(tmp_path / "b")])
    log = (killed / "log.txt").read_text()
    assert "stopped (last checkpoint model_0000001.pth): restarting from iteration 0" in log
    assert log.count("Starting training from iteration 0") == 2
    interrupted = (killed / "metrics.interrupted_1.json").read_text().splitlines()
    assert interrupted and len((killed / "metrics.json").read_text().splitlines()) > 0
    assert _results(tmp_path / "b")["metrics"] == _results(tmp_path / "a")["metrics"]
    final = [
        torch.load(tmp_path / name / "trial_0" / "model_final.pth", weights_only=False)["model"]
        for name in ("a", "b")
    ]
    assert all(torch.equal(final[0][k], final[1][k]) for k in final[0])


def test_preflight_stops_a_run_whose_weights_miss_the_backbone(
    tmp_path, backbone_pkl, capsys, monkeypatch
):
    voc = write_voc(tmp_path / "voc", splits=(("train", 2),))
    datasets = f"[('preflight_voc', '{voc}', 'train')]"
    base = ["--config-file", "detection/instant_test_voc_R_50_C4.yaml", "MOCO.DATASETS.VOC"]
    base += [datasets, "MOCO.DATASETS.VOC_CLASSES", str(list(CLASSES))]
    base += ["DATASETS.TRAIN", "('preflight_voc',)", "DATASETS.TEST", "()"]
    base += ["OUTPUT_DIR", str(tmp_path / "out")]

    with pytest.raises(SystemExit) as exit_info:
        main(base)  # the _moco config has no default weights: one error line, status 2
    assert exit_info.value.code == 2
    assert "moco-transfer: error: MODEL.WEIGHTS is empty" in capsys.readouterr().err

    # a file covering only the stem and res2: res3-res5 are named as unset
    converted = convert_to_detectron2(load_backbone_state_dict(backbone_pkl.with_suffix(".pth")))
    converted["model"] = {
        k: v for k, v in converted["model"].items() if k.startswith(("stem.", "res2."))
    }
    partial = tmp_path / "partial.pkl"
    write_detectron2_pkl(converted, partial)
    monkeypatch.setenv("MOCO_DEBUG", "1")  # the exception itself
    with pytest.raises(BackboneWeightsError, match=r"left \d+ of \d+ backbone tensors.*res[345]\."):
        main([*base, "MODEL.WEIGHTS", str(partial)])
    assert not (tmp_path / "out" / "trial_0" / "results.json").exists()
