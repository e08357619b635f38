"""The Fashion-MNIST scenes builder: determinism, disjoint sources, masks and boxes, COCO loading."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from moco_pretrain.data import FASHION_MNIST_DIR
from transfer.datasets import scenes as scenes_module
from transfer.datasets.scenes import build_fashion_scenes, rle_encode, scene_datasets

REAL = (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file()
SMALL = {"num_labelled": 40, "num_val": 20, "num_test": 20}


def rle_decode(rle: dict) -> np.ndarray:
    """Independent decoder of COCO's uncompressed RLE (column-major runs, zeros first)."""
    height, width = rle["size"]
    flat = np.repeat(np.arange(len(rle["counts"])) % 2 == 1, rle["counts"])
    return flat.reshape((width, height)).T


@pytest.fixture(scope="module")
def scenes(tiny_fashion_mnist, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("scenes")
    build_fashion_scenes(out, root=tiny_fashion_mnist, **SMALL)
    return out


def test_rle_encode_matches_hand_runs_and_decodes_back():
    mask = np.array([[0, 1, 1], [0, 1, 0]], dtype=bool)  # column-major: 0 0 1 1 1 0
    assert rle_encode(mask) == {"counts": [2, 3, 1], "size": [2, 3]}
    assert rle_encode(np.ones((2, 2), bool)) == {"counts": [0, 4], "size": [2, 2]}
    rng = np.random.default_rng(0)
    for _ in range(20):
        mask = rng.random((7, 5)) < 0.4
        assert np.array_equal(rle_decode(rle_encode(mask)), mask)
        assert np.array_equal(scenes_module.rle_decode(rle_encode(mask)), mask)  # the package's


def test_extreme_points_take_the_middle_of_a_flat_edge():
    mask = np.zeros((6, 8), bool)
    mask[1, 2:6] = True  # flat top edge, columns 2-5
    mask[2:5, 1:7] = True
    mask[5, 4] = True  # single bottom pixel
    # top: middle of columns 2..5 -> 3; left/right edges span rows 2..4 -> middle row 3
    assert scenes_module._extreme_points(mask) == [3, 1, 2, 4, 5, 2, 1, 3, 2, 6, 3, 2]


def test_semantic_labels_and_keypoints_follow_the_instances(scenes, tmp_path):
    import shutil

    root = tmp_path / "scenes"
    shutil.copytree(scenes, root)  # the fixture's files stay as built
    scenes_module.write_semantic_labels(root)
    scenes_module.write_keypoint_annotations(root)
    for split in ("train", "val", "test"):
        coco = json.loads((root / f"{split}.json").read_text())
        painted = {im["id"]: np.zeros((128, 128), np.int64) for im in coco["images"]}
        for ann in coco["annotations"]:
            painted[ann["image_id"]] += ann["category_id"] * rle_decode(ann["segmentation"])
        for im in coco["images"]:
            label = Image.open(root / f"{split}_sem_seg" / im["file_name"])
            assert label.mode == "L" and np.array_equal(np.array(label), painted[im["id"]])
        keypoints = json.loads((root / f"{split}_keypoints.json").read_text())
        assert [c["keypoints"] for c in keypoints["categories"]] == [
            ["top", "bottom", "left", "right"]
        ] * 10
        for ann, original in zip(keypoints["annotations"], coco["annotations"], strict=True):
            x0, y0, w, h = original["bbox"]
            top, bottom, left, right = np.reshape(ann["keypoints"], (4, 3)).tolist()
            assert (top[1], bottom[1], left[0], right[0]) == (y0, y0 + h - 1, x0, x0 + w - 1)
            mask = rle_decode(original["segmentation"])
            assert all(mask[y, x] and v == 2 for x, y, v in (top, bottom, left, right))


def test_same_seed_same_bytes_other_seed_other_scenes(tiny_fashion_mnist, scenes, tmp_path):
    build_fashion_scenes(tmp_path / "again", root=tiny_fashion_mnist, **SMALL)
    files = sorted(p.relative_to(scenes) for p in scenes.rglob("*") if p.is_file())
    assert files == sorted(
        p.relative_to(tmp_path / "again") for p in (tmp_path / "again").rglob("*") if p.is_file()
    )
    assert all((scenes / f).read_bytes() == (tmp_path / "again" / f).read_bytes() for f in files)
    build_fashion_scenes(tmp_path / "other", root=tiny_fashion_mnist, seed=1, **SMALL)
    assert (tmp_path / "other" / "train.json").read_bytes() != (scenes / "train.json").read_bytes()


def test_sources_are_disjoint_class_balanced_and_each_garment_is_used_once(scenes):
    summary = json.loads((scenes / "summary.json").read_text())
    sources = summary["sources"]
    train, val = set(sources["train_labelled_indices"]), set(sources["val_indices"])
    assert len(train) == 40 and len(val) == 20 and not train & val
    assert len(sources["test_indices"]) == 20  # indices into the test set, a different file
    for split, garments in (("train", 40), ("val", 20), ("test", 20)):
        coco = json.loads((scenes / f"{split}.json").read_text())
        classes = [a["category_id"] for a in coco["annotations"]]
        assert len(classes) == garments  # every garment placed exactly once
        assert np.bincount(classes, minlength=11)[1:].tolist() == [garments // 10] * 10
        assert summary["splits"][split]["instances"] == garments


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_masks_lie_in_tight_boxes_and_match_the_image(scenes, split):
    from PIL import Image

    coco = json.loads((scenes / f"{split}.json").read_text())
    images = {im["id"]: im for im in coco["images"]}
    for ann in coco["annotations"]:
        image = images[ann["image_id"]]
        mask = rle_decode(ann["segmentation"])
        assert mask.shape == (image["height"], image["width"]) == (128, 128)
        x, y, w, h = ann["bbox"]
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        assert (x, y, x + w - 1, y + h - 1) == (cols[0], rows[0], cols[-1], rows[-1])  # tight
        assert ann["area"] == int(mask.sum()) > 0
    for image in coco["images"]:
        pixels = np.asarray(Image.open(scenes / split / image["file_name"]))
        assert pixels.shape == (128, 128) and pixels.dtype == np.uint8


def test_scenes_load_in_pycocotools_and_score_perfectly_against_themselves(scenes):
    pytest.importorskip("pycocotools")
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = COCO(str(scenes / "test.json"))
    detections = [
        {**{k: a[k] for k in ("image_id", "category_id", "bbox", "segmentation")}, "score": 1.0}
        for a in gt.dataset["annotations"]
    ]
    for iou_type in ("bbox", "segm"):
        evaluation = COCOeval(gt, gt.loadRes(detections), iou_type)
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
        assert evaluation.stats[0] == pytest.approx(1.0)  # AP over IoU .5:.95


def test_detectron2_reads_the_scenes_and_its_evaluator_scores_ground_truth_100(scenes, tmp_path):
    pytest.importorskip("detectron2")
    import torch
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.data.datasets import register_coco_instances
    from detectron2.evaluation import COCOEvaluator
    from detectron2.structures import BitMasks, Boxes, BoxMode, Instances
    from pycocotools import mask as mask_util

    name, json_file, image_root = scene_datasets(scenes, prefix="scenes_test_gt")[2]
    register_coco_instances(name, {}, json_file, image_root)
    try:
        dicts = DatasetCatalog.get(name)
        assert len(dicts) == len(json.loads(Path(json_file).read_text())["images"])
        evaluator = COCOEvaluator(name, output_dir=str(tmp_path))
        evaluator.reset()
        for record in dicts:
            annotations = record["annotations"]
            masks = np.stack([mask_util.decode(a["segmentation"]) for a in annotations])
            instances = Instances((record["height"], record["width"]))
            boxes = [
                BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in annotations
            ]
            instances.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
            instances.scores = torch.ones(len(annotations))
            instances.pred_classes = torch.tensor([a["category_id"] for a in annotations])
            instances.pred_masks = BitMasks(torch.from_numpy(masks).bool()).tensor
            evaluator.process([record], [{"instances": instances}])
        results = evaluator.evaluate()
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    assert results["bbox"]["AP"] == pytest.approx(100.0)
    assert results["segm"]["AP"] == pytest.approx(100.0)


@pytest.mark.skipif(
    not REAL, reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)"
)
def test_real_scenes_counts(tmp_path):
    summary = build_fashion_scenes(tmp_path, num_labelled=100, num_val=20, num_test=50)
    assert {s: summary["splits"][s]["instances"] for s in ("train", "val", "test")} == {
        "train": 100, "val": 20, "test": 50,
    }  # fmt: skip
