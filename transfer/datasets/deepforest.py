"""Build a VOC-format tree-crown detection set from the scenes inside the ``deepforest`` wheel.

The ``deepforest`` package (PyPI, MIT) ships four annotated aerial RGB scenes with exhaustive
Pascal-VOC boxes. They are cut here into a 400 px grid of tiles with a fixed train/test split by
scene area, written as a VOC tree that ``MOCO.DATASETS.VOC`` registers::

    <out>/JPEGImages/<id>.jpg  Annotations/<id>.xml  ImageSets/Main/{train,test}.txt
    <out>/unlabelled/patches/<id>.png   # train-area patches for MoCo, no labels
    <out>/{train,val,test}.json         # the same tiles in COCO format, for moco-benchmark --dataset

The COCO files hold out ``VAL_SCENE`` (``OSBS_029``, one tile of another site) from the training
tiles as the validation split that ``--dataset`` requires; the VOC tree keeps it in train. Its
unlabelled patches stay among MoCo's.

Rules (all deterministic):

- A box belongs to the one tile that holds its centre and is clipped to it, so no tree is ever in
  two tiles, let alone in both splits (the "keep a box when >= 50 % of it is inside" rule in 1-D).
- Edge remainders of a scene narrower than half a tile are dropped (with their boxes, counted in
  the summary); wider ones are kept as smaller tiles.
- Split: in each large scene the bottom rows of tiles (``TEST_FRACTION`` of the rows, at least one)
  are test; of the two single-tile scenes, ``OSBS_029`` is train and ``SOAP_061`` test.
- One class, ``tree``: SOAP_061 labels its crowns ``Dead`` / ``Alive``, the others ``Tree``.

The package is never imported (it pulls heavy dependencies): its data files are read from an
installed copy (``pip install --no-deps deepforest==2.1.0``), an unpacked folder or the wheel.
"""

from __future__ import annotations

import importlib.util
import io
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from moco_pretrain.files import atomic_write_json

__all__ = [
    "CLASSES",
    "SCENES",
    "Box",
    "Tile",
    "build_deepforest_voc",
    "coco_record",
    "find_deepforest_data",
    "grid_starts",
    "parse_voc_boxes",
    "tile_scene",
    "write_voc_tile",
]

CLASSES = ("tree",)
VAL_SCENE = "OSBS_029"  # the COCO files' validation split
TILE_SIZE = 400
TEST_FRACTION = 0.3
PATCH_SIZE, PATCH_STRIDE = 192, 104  # unlabelled patches: 3 x 3 per full tile
# (scene stem, split: "rows" = bottom rows are test, or the whole scene's split)
SCENES = (
    ("2019_YELL_2_528000_4978000_image_crop2", "rows"),
    ("2019_YELL_2_541000_4977000_image_crop", "rows"),
    ("OSBS_029", "train"),
    ("SOAP_061", "test"),
)
_DATA_DIR = "deepforest/data"


@dataclass(frozen=True)
class Box:
    xmin: float
    ymin: float
    xmax: float
    ymax: float


@dataclass(frozen=True)
class Tile:
    """One tile: its window in the scene, its split and its boxes in tile coordinates."""

    image_id: str
    x0: int
    y0: int
    width: int
    height: int
    split: str
    boxes: tuple[Box, ...]


def find_deepforest_data(source: str | Path | None = None) -> Path | zipfile.Path:
    """The folder holding the scenes: ``source`` (a wheel, or a folder that holds
    ``deepforest/data`` or is it), else the installed package, located without importing it."""
    if source is None:
        spec = importlib.util.find_spec("deepforest")
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                "the deepforest package is not installed: run `pip install --no-deps "
                "deepforest==2.1.0` (or pass the wheel from `pip download --no-deps deepforest==2.1.0`)"
            )
        data = Path(next(iter(spec.submodule_search_locations))) / "data"
    else:
        source = Path(source)
        if source.is_file() and zipfile.is_zipfile(source):
            data = zipfile.Path(source, at=f"{_DATA_DIR}/")
        elif (source / _DATA_DIR).is_dir():
            data = source / _DATA_DIR
        else:
            data = source
    missing = [f"{stem}.{ext}" for stem, _ in SCENES for ext in ("png", "xml")]
    missing = [name for name in missing if not (data / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{source or data}: no DeepForest scenes ({', '.join(missing)} missing)"
        )
    return data


def parse_voc_boxes(xml_text: str, *, source: str) -> list[Box]:
    """The boxes of a VOC annotation (any class name); ``source`` names the file in errors."""
    boxes = []
    for obj in ET.fromstring(xml_text).iter("object"):
        bndbox = obj.find("bndbox")
        try:
            coords = [float(bndbox.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")]
        except (AttributeError, TypeError, ValueError) as e:
            raise ValueError(f"{source}: object without a numeric <bndbox>") from e
        boxes.append(Box(*coords))
    return boxes


def grid_starts(length: int, tile: int = TILE_SIZE) -> list[int]:
    """Tile origins along one axis: full tiles, plus the remainder when it is >= half a tile."""
    starts = list(range(0, length - tile + 1, tile))
    remainder = length - (starts[-1] + tile if starts else 0)
    if remainder * 2 >= tile:
        starts.append(length - remainder)
    return starts


def tile_scene(
    stem: str, size: tuple[int, int], boxes: Sequence[Box], split: str
) -> tuple[list[Tile], int]:
    """Cut a scene of ``size`` (w, h) into tiles; returns (tiles, boxes dropped with the edges)."""
    width, height = size
    xs, ys = grid_starts(width), grid_starts(height)
    n_test_rows = max(1, round(len(ys) * TEST_FRACTION)) if split == "rows" else 0
    tiles, kept = [], 0
    for row, y0 in enumerate(ys):
        tile_split = (
            split if split != "rows" else ("test" if row >= len(ys) - n_test_rows else "train")
        )
        for x0 in xs:
            w, h = min(TILE_SIZE, width - x0), min(TILE_SIZE, height - y0)
            inside = []
            for b in boxes:
                cx, cy = (b.xmin + b.xmax) / 2, (b.ymin + b.ymax) / 2
                if x0 <= cx < x0 + w and y0 <= cy < y0 + h:
                    inside.append(
                        Box(max(b.xmin - x0, 0), max(b.ymin - y0, 0),
                            min(b.xmax - x0, w), min(b.ymax - y0, h))
                    )  # fmt: skip
            kept += len(inside)
            tiles.append(Tile(f"{stem}_{x0}_{y0}", x0, y0, w, h, tile_split, tuple(inside)))
    return tiles, len(boxes) - kept


def write_voc_tile(root: Path, tile: Tile, image: Image.Image) -> None:
    """Write the tile's JPEG and VOC XML (integer 1-based pixel boxes) under ``root``."""
    crop = image.crop((tile.x0, tile.y0, tile.x0 + tile.width, tile.y0 + tile.height))
    crop.save(root / "JPEGImages" / f"{tile.image_id}.jpg", quality=95)
    annotation = ET.Element("annotation")
    ET.SubElement(annotation, "filename").text = f"{tile.image_id}.jpg"
    size = ET.SubElement(annotation, "size")
    for key, value in (("width", tile.width), ("height", tile.height), ("depth", 3)):
        ET.SubElement(size, key).text = str(value)
    for box in tile.boxes:
        obj = ET.SubElement(annotation, "object")
        # every tag detectron2's VOC evaluator reads (it calls int() on truncated/difficult)
        for key, value in (
            ("name", CLASSES[0]),
            ("pose", "Unspecified"),
            ("truncated", "0"),
            ("difficult", "0"),
        ):
            ET.SubElement(obj, key).text = value
        bndbox = ET.SubElement(obj, "bndbox")
        # detectron2's VOC reader subtracts 1 from xmin/ymin (1-based VOC pixels)
        coords = (box.xmin + 1, box.ymin + 1, box.xmax, box.ymax)
        for key, value in zip(("xmin", "ymin", "xmax", "ymax"), coords, strict=True):
            ET.SubElement(bndbox, key).text = str(int(round(value)))
    ET.ElementTree(annotation).write(root / "Annotations" / f"{tile.image_id}.xml")


def _write_patches(root: Path, tile: Tile, image: Image.Image) -> int:
    """Unlabelled PATCH_SIZE patches of a train tile (for MoCo); returns how many."""
    count = 0
    for dy in range(0, tile.height - PATCH_SIZE + 1, PATCH_STRIDE):
        for dx in range(0, tile.width - PATCH_SIZE + 1, PATCH_STRIDE):
            x, y = tile.x0 + dx, tile.y0 + dy
            patch = image.crop((x, y, x + PATCH_SIZE, y + PATCH_SIZE))
            patch.save(root / f"{tile.image_id}_{dx}_{dy}.png")
            count += 1
    return count


def coco_record(tile: Tile, image_id: int, first_box_id: int) -> tuple[dict, list[dict]]:
    """The tile's COCO image entry (``file_name`` under ``JPEGImages/``) and its box annotations
    (0-based ``[x, y, w, h]`` in tile pixels, category 1)."""
    image = {"id": image_id, "file_name": f"JPEGImages/{tile.image_id}.jpg",
             "width": tile.width, "height": tile.height}  # fmt: skip
    annotations = [
        {"id": first_box_id + i, "image_id": image_id, "category_id": 1, "iscrowd": 0,
         "bbox": [b.xmin, b.ymin, b.xmax - b.xmin, b.ymax - b.ymin],
         "area": (b.xmax - b.xmin) * (b.ymax - b.ymin)}
        for i, b in enumerate(tile.boxes)
    ]  # fmt: skip
    return image, annotations


def build_deepforest_voc(output: str | Path, source: str | Path | None = None) -> dict:
    """Write the VOC tree (and the unlabelled train patches) into ``output``, with the COCO files;
    returns a summary (also ``output/summary.json``): tiles, boxes and patches per split, boxes
    dropped at edges."""
    data = find_deepforest_data(source)
    root = Path(output)
    patches_dir = root / "unlabelled" / "patches"
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    patches_dir.mkdir(parents=True, exist_ok=True)
    ids: dict[str, list[str]] = {"train": [], "test": []}
    categories = [{"id": 1, "name": CLASSES[0]}]
    coco = {split: {"images": [], "annotations": [], "categories": categories}
            for split in ("train", "val", "test")}  # fmt: skip
    boxes_written = 0
    summary = {"tiles": {"train": 0, "test": 0}, "boxes": {"train": 0, "test": 0}}
    summary.update(patches=0, dropped_edge_boxes=0, tile_size=TILE_SIZE, classes=list(CLASSES))
    for stem, split in SCENES:
        xml_path = data / f"{stem}.xml"
        boxes = parse_voc_boxes(xml_path.read_text(), source=str(xml_path))
        image = Image.open(io.BytesIO((data / f"{stem}.png").read_bytes())).convert("RGB")
        tiles, dropped = tile_scene(stem, image.size, boxes, split)
        summary["dropped_edge_boxes"] += dropped
        for tile in tiles:
            write_voc_tile(root, tile, image)
            ids[tile.split].append(tile.image_id)
            coco_split = coco["val" if stem == VAL_SCENE else tile.split]
            image_entry, annotations = coco_record(tile, len(ids["train"]) + len(ids["test"]),
                                                   boxes_written + 1)  # fmt: skip
            coco_split["images"].append(image_entry)
            coco_split["annotations"] += annotations
            boxes_written += len(annotations)
            summary["tiles"][tile.split] += 1
            summary["boxes"][tile.split] += len(tile.boxes)
            if tile.split == "train":
                summary["patches"] += _write_patches(patches_dir, tile, image)
    for split, names in ids.items():
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{n}\n" for n in names))
    for split, content in coco.items():
        atomic_write_json(root / f"{split}.json", content)
    atomic_write_json(root / "summary.json", summary)  # last: it marks a finished tree
    return summary
