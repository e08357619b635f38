"""A user's COCO-format dataset: checks that name the file, the seeded split of a single file,
nested label fractions, and the detectron2 overrides (no detectron2 needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from transfer.datasets.coco import DatasetError, check_fractions, prepare_coco_dataset

CATEGORIES = [{"id": 3, "name": "crown"}, {"id": 7, "name": "snag"}]


def _coco(ids: range, *, masks: bool = True, categories=CATEGORIES) -> dict:
    images = [{"id": i, "file_name": f"im{i}.png", "width": 8, "height": 8} for i in ids]
    annotations = [
        {"id": 100 + i, "image_id": i, "category_id": categories[i % 2]["id"], "bbox": [1, 1, 4, 3],
         "area": 12, "iscrowd": 0, **({"segmentation": [[1, 1, 5, 1, 5, 4]]} if masks else {})}
        for i in ids
    ]  # fmt: skip
    return {"images": images, "annotations": annotations, "categories": categories}


def _write_images(folder: Path, ids: range) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in ids:
        Image.new("RGB", (8, 8)).save(folder / f"im{i}.png")


def _three_splits(root: Path, **kwargs) -> Path:
    for split, ids in (("train", range(0, 20)), ("val", range(20, 25)), ("test", range(25, 30))):
        (root / f"{split}.json").parent.mkdir(parents=True, exist_ok=True)
        (root / f"{split}.json").write_text(json.dumps(_coco(ids, **kwargs)))
        _write_images(root / split, ids)
    return root


def test_three_splits_nested_fractions_and_overrides(tmp_path):
    data = _three_splits(tmp_path / "data")
    prepared = prepare_coco_dataset(data, tmp_path / "work", fractions=[1.0, 0.25, 0.5], seed=0)
    assert prepared.classes == ["crown", "snag"] and prepared.masks
    assert prepared.counts == {"train": 20, "val": 5, "test": 5, "train_f0.25": 5,
                               "train_f0.5": 10, "train_f1": 20}  # fmt: skip
    subsets = {
        f: {im["id"] for im in json.loads(path.read_text())["images"]}
        for f, path in prepared.fractions.items()
    }
    assert subsets[0.25] < subsets[0.5] < subsets[1.0] == set(range(20))
    quarter = json.loads(prepared.fractions[0.25].read_text())
    assert {a["image_id"] for a in quarter["annotations"]} == subsets[0.25]
    assert prepared.images["test"] == (data / "test.json", data / "test")
    assert prepared.fractions[1.0] == data / "train.json"  # no copy of the whole split
    options = dict(zip(*[iter(prepared.options(0.5, eval_split="val"))] * 2, strict=True))
    tag = prepared.tag
    assert options["DATASETS.TRAIN"] == f"('{tag}_train_f0.5',)"
    assert options["DATASETS.TEST"] == f"('{tag}_val',)"
    assert options["MODEL.ROI_HEADS.NUM_CLASSES"] == "2" and options["MODEL.MASK_ON"] == "True"
    assert eval(options["MOCO.DATASETS.COCO"])[0] == (
        f"{tag}_train_f0.5",
        str(prepared.fractions[0.5]),
        str(data / "train"),
    )
    full = dict(zip(*[iter(prepared.options(1.0))] * 2, strict=True))
    assert (full["DATASETS.TRAIN"], full["DATASETS.TEST"]) == (
        f"('{tag}_train',)",
        f"('{tag}_test',)",
    )
    # another seed draws other subsets; the prepared folder refuses it
    other = prepare_coco_dataset(data, tmp_path / "other", fractions=[0.25], seed=1)
    assert json.loads(other.fractions[0.25].read_text())["images"] != quarter["images"]
    with pytest.raises(DatasetError, match="holds another dataset, split or seed"):
        prepare_coco_dataset(data, tmp_path / "work", fractions=[0.25, 0.5, 1.0], seed=1)
    again = prepare_coco_dataset(data, tmp_path / "work", fractions=[0.25, 0.5, 1.0], seed=0)
    assert again == prepared
    more = prepare_coco_dataset(data, tmp_path / "work", fractions=[0.1, 0.25], seed=0)
    tenth = {im["id"] for im in json.loads(more.fractions[0.1].read_text())["images"]}
    assert len(tenth) == 2 and tenth < subsets[0.25]  # the same seeded order
    recorded = json.loads((tmp_path / "work" / "dataset.json").read_text())["fractions"]
    assert sorted(recorded) == ["0.1", "0.25", "0.5", "1"]
    stamp = (tmp_path / "work" / "dataset.json").stat().st_mtime_ns
    prepare_coco_dataset(data, tmp_path / "work", fractions=[0.25, 1.0], seed=0)
    assert (tmp_path / "work" / "dataset.json").stat().st_mtime_ns == stamp  # nothing rewritten
    # the dataset edited in place: its subsets would no longer be nested, so it refuses
    (data / "train.json").write_text(json.dumps(_coco(range(0, 28))))
    _write_images(data / "train", range(20, 28))
    with pytest.raises(DatasetError, match="holds another dataset, split or seed, or its files"):
        prepare_coco_dataset(data, tmp_path / "work", fractions=[0.25], seed=0)


def test_all_labels_of_three_split_files_write_nothing(tmp_path):
    data = _three_splits(tmp_path / "data")
    prepared = prepare_coco_dataset(data, tmp_path / "work", fractions=[1.0], tag="scenes")
    assert not (tmp_path / "work").exists() and prepared.fractions == {1.0: data / "train.json"}


def test_boxes_only_when_an_annotation_has_no_mask(tmp_path):
    data = _three_splits(tmp_path / "data", masks=False)
    assert not prepare_coco_dataset(data, tmp_path / "work", fractions=[1.0]).masks


def test_single_file_is_split_by_seed(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "annotations.json").write_text(json.dumps(_coco(range(10))))
    _write_images(data / "images", range(10))
    prepared = prepare_coco_dataset(data, tmp_path / "work", fractions=[0.5, 1.0], seed=0)
    ids = {
        s: {im["id"] for im in json.loads(path.read_text())["images"]}
        for s, (path, _) in prepared.images.items()
    }
    assert [len(ids[s]) for s in ("train", "val", "test")] == [6, 2, 2]
    assert ids["train"] | ids["val"] | ids["test"] == set(range(10))
    assert not (ids["train"] & ids["val"] or ids["train"] & ids["test"] or ids["val"] & ids["test"])
    assert prepared.images["val"][1] == data / "images"
    reseeded = prepare_coco_dataset(data, tmp_path / "work2", fractions=[1.0], seed=3)
    assert json.loads(reseeded.images["test"][0].read_text())["images"] != [
        im for im in _coco(range(10))["images"] if im["id"] in ids["test"]
    ]


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: (d / "val.json").write_text('{"images": []}'),
         r"val.json: not a COCO instances file \(no 'annotations' list\)"),
        (lambda d: (d / "train.json").write_text("not json"), r"train.json: not JSON"),
        (lambda d: (d / "test" / "im27.png").unlink(),
         r"test.json: 1 of 5 images not found under .*test, e.g. \['im27.png'\]"),
        (lambda d: (d / "test.json").write_text(json.dumps(_coco(range(25, 30), categories=[
            {"id": 3, "name": "crown"}, {"id": 7, "name": "dead tree"}]))),
         r"test.json: categories \['crown', 'dead tree'\] differ from the training split's "
         r"\['crown', 'snag'\]"),
        (lambda d: (d / "train.json").write_text(json.dumps(
            _coco(range(0, 20)) | {"annotations": [{"id": 1, "image_id": 99, "category_id": 3,
                                                    "bbox": [0, 0, 1, 1]}]})),
         r"train.json: annotation 1 names image 99 or category 3, which the file does not list"),
        (lambda d: (d / "train.json").unlink(), r"needs train.json, val.json and test.json"),
    ],
)  # fmt: skip
def test_bad_dataset_is_one_line_and_writes_nothing(tmp_path, damage, message):
    data = _three_splits(tmp_path / "data")
    damage(data)
    with pytest.raises(DatasetError, match=message):
        prepare_coco_dataset(data, tmp_path / "work", fractions=[1.0])
    assert not (tmp_path / "work").exists()


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5])
def test_fractions_outside_the_unit_interval(bad):
    with pytest.raises(DatasetError, match=rf"--label-fractions: {bad:g} is not in \(0, 1\]"):
        check_fractions([0.5, bad])
    assert check_fractions([1.0, 0.1, 0.1]) == [0.1, 1.0]
    with pytest.raises(DatasetError, match="not distinct to 6 digits"):
        check_fractions([0.3333333, 0.33333334])
