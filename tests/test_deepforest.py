"""transfer/datasets/deepforest.py: tiling rules, the VOC tree it writes, and the real scenes when installed."""

from __future__ import annotations

import importlib.util
import json
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from transfer.datasets.coco import prepare_coco_dataset
from transfer.datasets.deepforest import (
    SCENES,
    VAL_SCENE,
    Box,
    build_deepforest_voc,
    find_deepforest_data,
    grid_starts,
    parse_voc_boxes,
    tile_scene,
)


def test_grid_keeps_remainders_of_at_least_half_a_tile():
    assert grid_starts(2299) == [0, 400, 800, 1200, 1600, 2000]  # 299 px remainder kept
    assert grid_starts(2472) == [0, 400, 800, 1200, 1600, 2000]  # 72 px remainder dropped
    assert grid_starts(400) == [0]
    assert grid_starts(300) == [0]
    assert grid_starts(150) == []


def test_each_box_goes_to_the_one_tile_holding_its_centre():
    boxes = [
        Box(10, 10, 50, 50),  # inside tile (0, 0)
        Box(380, 100, 440, 140),  # centre x=410: tile (400, 0), clipped at its left edge
        Box(100, 850, 120, 870),  # centre y=860: the dropped 60 px bottom remainder
    ]
    tiles, dropped = tile_scene("scene", (800, 860), boxes, "rows")
    assert dropped == 1
    by_origin = {(t.x0, t.y0): t for t in tiles}
    assert set(by_origin) == {(0, 0), (400, 0), (0, 400), (400, 400)}
    assert by_origin[0, 0].boxes == (Box(10, 10, 50, 50),)
    assert by_origin[400, 0].boxes == (Box(0, 100, 40, 140),)
    assert sum(len(t.boxes) for t in tiles) == 2
    # 2 rows of tiles: the bottom one (30 %, at least one row) is the test split
    assert {(t.y0, t.split) for t in tiles} == {(0, "train"), (400, "test")}


def write_fake_scenes(root: Path) -> Path:
    """The four scene files (PNG + VOC XML) with random boxes, smaller than the real ones."""
    data = root / "deepforest" / "data"
    data.mkdir(parents=True)
    rng = np.random.default_rng(0)
    sizes = {0: (1000, 1300), 1: (830, 820), 2: (400, 400), 3: (400, 400)}
    for i, (stem, _) in enumerate(SCENES):
        width, height = sizes[i]
        Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(
            data / f"{stem}.png"
        )
        annotation = ET.Element("annotation")
        for _ in range(12):
            x, y = rng.integers(0, width - 40), rng.integers(0, height - 40)
            obj = ET.SubElement(annotation, "object")
            ET.SubElement(obj, "name").text = "Tree" if i < 3 else "Dead"
            bndbox = ET.SubElement(obj, "bndbox")
            for key, value in zip(
                ("xmin", "ymin", "xmax", "ymax"), (x, y, x + 30, y + 40), strict=True
            ):
                ET.SubElement(bndbox, key).text = str(value)
        ET.ElementTree(annotation).write(data / f"{stem}.xml")
    return root


@pytest.fixture(scope="module")
def fake_voc(tmp_path_factory) -> tuple[Path, dict]:
    source = write_fake_scenes(tmp_path_factory.mktemp("deepforest_source"))
    output = tmp_path_factory.mktemp("deepforest_voc")
    return output, build_deepforest_voc(output, source)


def test_voc_tree_splits_disjoint_and_counts_every_box(fake_voc):
    root, summary = fake_voc
    ids = {
        s: (root / "ImageSets" / "Main" / f"{s}.txt").read_text().split() for s in ("train", "test")
    }
    assert not set(ids["train"]) & set(ids["test"])
    assert {s: len(v) for s, v in ids.items()} == summary["tiles"]
    assert summary["tiles"]["train"] > 0 and summary["tiles"]["test"] > 0
    for split, names in ids.items():
        boxes = 0
        for name in names:
            xml_path = root / "Annotations" / f"{name}.xml"
            tree = ET.parse(xml_path)
            assert {o.findtext("name") for o in tree.iter("object")} <= {"tree"}
            width, height = Image.open(root / "JPEGImages" / f"{name}.jpg").size
            assert (int(tree.findtext("size/width")), int(tree.findtext("size/height"))) == (
                width,
                height,
            )
            for box in parse_voc_boxes(xml_path.read_text(), source=str(xml_path)):
                assert 1 <= box.xmin < box.xmax <= width and 1 <= box.ymin < box.ymax <= height
                boxes += 1
        assert boxes == summary["boxes"][split]
    assert (
        summary["boxes"]["train"] + summary["boxes"]["test"] + summary["dropped_edge_boxes"] == 48
    )
    # unlabelled MoCo patches come from train tiles only
    patches = list((root / "unlabelled" / "patches").glob("*.png"))
    assert len(patches) == summary["patches"] > 0
    assert all(p.name.rsplit("_", 2)[0] in ids["train"] for p in patches)


def test_coco_files_hold_the_voc_boxes_with_the_val_scene_apart(fake_voc, tmp_path):
    root, summary = fake_voc
    coco = {s: json.loads((root / f"{s}.json").read_text()) for s in ("train", "val", "test")}
    names = {s: [Path(im["file_name"]).stem for im in c["images"]] for s, c in coco.items()}
    voc = {
        s: (root / "ImageSets" / "Main" / f"{s}.txt").read_text().split() for s in ("train", "test")
    }
    assert names["val"] and all(n.startswith(VAL_SCENE) for n in names["val"])
    assert sorted(names["train"] + names["val"]) == sorted(voc["train"])
    assert names["test"] == voc["test"]
    boxes = {s: len(c["annotations"]) for s, c in coco.items()}
    assert (boxes["train"] + boxes["val"], boxes["test"]) == (
        summary["boxes"]["train"],
        summary["boxes"]["test"],
    )
    ids = [a["id"] for c in coco.values() for a in c["annotations"]]
    assert len(set(ids)) == len(ids)
    for content in coco.values():  # the same boxes as the VOC files (1-based there)
        for image in content["images"]:
            xml_path = root / "Annotations" / f"{Path(image['file_name']).stem}.xml"
            voc_boxes = parse_voc_boxes(xml_path.read_text(), source=str(xml_path))
            boxes = [a["bbox"] for a in content["annotations"] if a["image_id"] == image["id"]]
            assert [round(x + 1) for x, *_ in boxes] == [b.xmin for b in voc_boxes]
    prepared = prepare_coco_dataset(root, tmp_path / "prepared", fractions=[0.5, 1.0])
    assert prepared.classes == ["tree"] and not prepared.masks
    assert prepared.images["train"][1] == root  # file_name holds JPEGImages/


def test_detectron2_registers_and_evaluates_the_tree(fake_voc):
    pytest.importorskip("detectron2", reason="detectron2 is not installed")
    from detectron2.config import get_cfg
    from detectron2.data import DatasetCatalog
    from detectron2.evaluation.pascal_voc_evaluation import parse_rec

    from transfer import add_moco_config
    from transfer.datasets.register import register_datasets

    root, summary = fake_voc
    cfg = get_cfg()
    add_moco_config(cfg)
    cfg.merge_from_file(
        str(Path(__file__).parents[1] / "configs/detection/deepforest_R_50_C4_moco.yaml")
    )
    cfg.MOCO.DATASETS.VOC = [[f"{n}_fake", str(root), s] for n, s in (("deepforest_train", "train"), ("deepforest_test", "test"))]  # fmt: skip
    register_datasets(cfg)
    for split in ("train", "test"):
        records = DatasetCatalog.get(f"deepforest_{split}_fake")
        assert sum(len(r["annotations"]) for r in records) == summary["boxes"][split]
        for record in records:  # the evaluator's own parser reads every annotation
            parse_rec(str(root / "Annotations" / f"{record['image_id']}.xml"))


def test_missing_package_or_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no DeepForest scenes"):
        find_deepforest_data(tmp_path)


@pytest.mark.skipif(
    importlib.util.find_spec("deepforest") is None,
    reason="the deepforest package is not installed (pip install --no-deps deepforest==2.1.0)",
)
def test_real_scenes_give_the_documented_tiles(tmp_path):
    summary = build_deepforest_voc(tmp_path)
    assert summary["tiles"] == {"train": 31, "test": 16}
    assert summary["boxes"] == {"train": 634, "test": 292}
    assert summary["dropped_edge_boxes"] == 25  # of 951 annotated crowns
    assert summary["patches"] == 267
