"""Fashion-MNIST scenes: a small detection and instance-segmentation benchmark built from real images.

Each scene is a grey canvas holding several Fashion-MNIST garments at random positions and scales
over a cluttered background, with the garment's class, its visible silhouette as the instance mask
and the tight box around that mask, written in COCO format (one PNG per scene, one JSON per split).
The card (counts, construction, licence) is ``results/fashion_scenes/DATASET.md``.

Sources are disjoint by construction:

- ``train`` and ``val`` scenes paste garments from a fixed, class-balanced labelled subset of the
  60k training images (``num_labelled`` for train, ``num_val`` more for val), each garment once;
- ``test`` scenes paste garments from the 10k test images only;
- background clutter in train/val scenes comes from the training images outside the labelled
  subset (which pretraining sees without labels anyway), in test scenes from the other test images.

The builder is deterministic: the same arguments give the same bytes (PNG and JSON). It needs numpy
and Pillow only; detectron2 reads the result through ``MOCO.DATASETS.COCO``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from moco_pretrain.data import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, FashionMNIST
from moco_pretrain.files import atomic_write, atomic_write_json

__all__ = [
    "KEYPOINT_FLIP_MAP",
    "KEYPOINT_NAMES",
    "SPLITS",
    "SceneSpec",
    "build_fashion_scenes",
    "rle_decode",
    "rle_encode",
    "scene_datasets",
    "scene_options",
    "write_keypoint_annotations",
    "write_semantic_labels",
]

SUMMARY_FILE = "summary.json"
SPLITS = ("train", "val", "test")
# The keypoint variant: the extreme points of each garment's visible silhouette.
KEYPOINT_NAMES = ("top", "bottom", "left", "right")
KEYPOINT_FLIP_MAP = (("left", "right"),)


@dataclass(frozen=True)
class SceneSpec:
    """How scenes look. Defaults are the benchmark's; each choice keeps scores off the ceiling.

    Attributes:
        canvas: side of the square canvas in pixels.
        objects: (min, max) garments per scene; several per scene and partial overlaps.
        size: (min, max) side in pixels of the square a 28 px garment is resized to (log-uniform):
            from below the pretraining resolution (32 px) to twice it, a 2.8x scale range.
        min_visible: a placement is refused if it leaves any garment with less than this fraction
            of its silhouette visible (occlusion up to 1 - min_visible).
        clutter: (min, max) unlabelled garment fragments pasted into the background.
        clutter_size: (min, max) side of a fragment in pixels (parts of garments, never whole ones).
        noise_std: standard deviation of the pixel noise added to every scene (grey levels).
        mask_threshold: grey level (0-255) above which a resized garment pixel is silhouette.
    """

    canvas: int = 128
    objects: tuple[int, int] = (3, 6)
    size: tuple[int, int] = (20, 56)
    min_visible: float = 0.6
    clutter: tuple[int, int] = (4, 10)
    clutter_size: tuple[int, int] = (8, 16)
    noise_std: float = 8.0
    mask_threshold: int = 24


def rle_encode(mask: np.ndarray) -> dict[str, Any]:
    """COCO's uncompressed RLE of a binary ``[H, W]`` mask: run lengths in column-major order,
    starting with a (possibly empty) run of zeros."""
    flat = np.asarray(mask, dtype=bool).flatten(order="F")
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0, *counts]
    return {"counts": counts, "size": list(mask.shape)}


def rle_decode(rle: dict[str, Any]) -> np.ndarray:
    """The binary ``[H, W]`` mask of an uncompressed RLE (the inverse of :func:`rle_encode`)."""
    height, width = rle["size"]
    values = np.arange(len(rle["counts"])) % 2  # runs alternate 0, 1, 0, ...
    flat = np.repeat(values.astype(bool), rle["counts"])
    return flat.reshape((height, width), order="F")


def _balanced_indices(
    labels: np.ndarray, per_class: int, classes: Sequence[int], rng: np.random.Generator
) -> np.ndarray:
    """``per_class`` random indices of each of ``classes``, interleaved in a random order."""
    chosen = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in classes]
    if min(len(c) for c in chosen) < per_class:
        raise ValueError(f"fewer than {per_class} images in some class")
    return rng.permutation(np.concatenate(chosen))


def _background(spec: SceneSpec, rng: np.random.Generator) -> np.ndarray:
    """A grey level with a linear gradient across the canvas, float ``[canvas, canvas]``."""
    base = rng.uniform(0, 60)
    gx, gy = rng.uniform(-30, 30, size=2)
    ramp = np.linspace(-0.5, 0.5, spec.canvas)
    return base + gx * ramp[None, :] + gy * ramp[:, None]


def _paste_clutter(canvas: np.ndarray, images: np.ndarray, spec, rng) -> None:
    """Fragments of unlabelled garments, resized and at reduced contrast, in place."""
    for _ in range(rng.integers(spec.clutter[0], spec.clutter[1] + 1)):
        image = images[rng.integers(len(images))]
        crop = int(rng.integers(8, 15))
        y, x = rng.integers(0, 28 - crop + 1, size=2)
        side = int(rng.integers(spec.clutter_size[0], spec.clutter_size[1] + 1))
        patch = _resize(image[y : y + crop, x : x + crop], side) * rng.uniform(0.3, 0.7)
        top, left = rng.integers(0, spec.canvas - side + 1, size=2)
        region = canvas[top : top + side, left : left + side]
        np.maximum(region, patch, out=region)


def _resize(image: np.ndarray, side: int) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize((side, side), Image.BILINEAR), dtype=np.float64)


def _compose(
    garments: list[tuple[np.ndarray, int]], background, spec, rng
) -> tuple[np.ndarray, list[dict[str, Any]], list[tuple[np.ndarray, int]]]:
    """Place garments one by one over ``background``: the canvas, the instances, the unplaced.

    A placement is retried (up to 20 times) while it would leave some garment, the new one included,
    with less than ``spec.min_visible`` of its silhouette; a garment that never fits is returned
    unplaced (the first garment of a scene always fits). Instances are dicts with the class, the
    full and the visible mask.
    """
    canvas = background.copy()
    placed: list[dict[str, Any]] = []
    unplaced = []
    for image, label in garments:
        side = int(round(np.exp(rng.uniform(np.log(spec.size[0]), np.log(spec.size[1])))))
        pixels = _resize(image, side)
        silhouette = pixels > spec.mask_threshold
        for _ in range(20):
            top, left = rng.integers(0, spec.canvas - side + 1, size=2)
            full = np.zeros((spec.canvas, spec.canvas), dtype=bool)
            full[top : top + side, left : left + side] = silhouette
            visible = [p["visible"] & ~full for p in placed]
            if all(
                v.sum() >= spec.min_visible * p["full"].sum()
                for v, p in zip(visible, placed, strict=True)
            ):
                break
        else:
            unplaced.append((image, label))
            continue
        for p, v in zip(placed, visible, strict=True):
            p["visible"] = v
        region = canvas[top : top + side, left : left + side]
        region[silhouette] = pixels[silhouette]
        placed.append({"label": label, "full": full, "visible": full.copy()})
    return canvas, placed, unplaced


def _instance_annotation(instance: dict[str, Any], *, ann_id: int, image_id: int) -> dict:
    visible = instance["visible"]
    rows, cols = np.flatnonzero(visible.any(axis=1)), np.flatnonzero(visible.any(axis=0))
    x0, y0 = int(cols[0]), int(rows[0])
    box = [x0, y0, int(cols[-1]) - x0 + 1, int(rows[-1]) - y0 + 1]  # tight around the mask
    return {
        "id": ann_id, "image_id": image_id, "category_id": instance["label"] + 1,
        "bbox": box, "area": int(visible.sum()), "iscrowd": 0,
        "segmentation": rle_encode(visible),
    }  # fmt: skip


def _build_split(
    out: Path, split: str, garments: list, clutter: np.ndarray, spec: SceneSpec, seed: int,
    class_names: Sequence[str],
) -> dict[str, Any]:  # fmt: skip
    rng = np.random.default_rng(seed)
    image_dir = out / split
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations, visible_fractions = [], [], []
    queue = list(garments)
    while queue:
        count = int(rng.integers(spec.objects[0], spec.objects[1] + 1))
        todo, queue = queue[:count], queue[count:]
        background = _background(spec, rng)
        _paste_clutter(background, clutter, spec, rng)
        canvas, placed, unplaced = _compose(todo, background, spec, rng)
        queue = unplaced + queue  # into the next scene
        canvas += rng.normal(0, spec.noise_std, size=canvas.shape)
        pixels = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
        image_id = len(images) + 1
        name = f"{split}_{image_id:05d}.png"
        atomic_write(image_dir / name, lambda f, p=pixels: Image.fromarray(p).save(f, "PNG"))
        images.append(
            {"id": image_id, "file_name": name, "height": spec.canvas, "width": spec.canvas}
        )
        for instance in placed:
            visible_fractions.append(instance["visible"].sum() / instance["full"].sum())
            ann = _instance_annotation(instance, ann_id=len(annotations) + 1, image_id=image_id)
            annotations.append(ann)
    categories = [{"id": i + 1, "name": n} for i, n in enumerate(class_names)]
    coco = {"images": images, "annotations": annotations, "categories": categories}
    atomic_write(out / f"{split}.json", lambda f: f.write(json.dumps(coco).encode()))
    per_class = np.bincount([a["category_id"] - 1 for a in annotations], minlength=len(categories))
    return {
        "scenes": len(images), "instances": len(annotations), "garments": len(garments),
        "instances_per_class": per_class.tolist(),
        "visible_fraction_mean": round(float(np.mean(visible_fractions)), 4),
        "occluded_instances": int(np.sum(np.asarray(visible_fractions) < 1)),
        "box_side_px": np.percentile(
            [max(a["bbox"][2:]) for a in annotations], [0, 50, 100]
        ).tolist(),
    }  # fmt: skip


def build_fashion_scenes(
    out: str | Path,
    *,
    root: str | Path = FASHION_MNIST_DIR,
    num_labelled: int = 1000,
    num_val: int = 300,
    num_test: int = 1500,
    seed: int = 0,
    spec: SceneSpec = SceneSpec(),
    classes: Sequence[int] = tuple(range(10)),
) -> dict[str, Any]:
    """Write ``train``/``val``/``test`` scenes (PNG folders + COCO JSON) and ``summary.json``.

    Args:
        out: output folder; ``summary.json`` is written last, so its presence marks a whole build.
        root: folder with Fashion-MNIST's IDX files.
        num_labelled: labelled training garments in the train scenes (class-balanced, each once).
        num_val: further labelled training garments for the validation scenes.
        num_test: test-set garments in the test scenes.
        seed: the single seed of every random choice.
        spec: how scenes look (:class:`SceneSpec`).
        classes: the Fashion-MNIST classes (indices) of every garment, clutter included; the
            scenes' categories are these, numbered from 1 in this order. The benchmark's target
            classes, which no pretraining run sees.

    Returns:
        The summary: counts per split, the source indices' sizes, the spec and the seed.
    """
    k = len(classes)
    for n, name in ((num_labelled, "num_labelled"), (num_val, "num_val"), (num_test, "num_test")):
        if n < k or n % k:
            raise ValueError(
                f"{name} must be a positive multiple of the {k} classes (class-balanced), got {n}"
            )
    out = Path(out)
    train, test = FashionMNIST(root, split="train"), FashionMNIST(root, split="test")
    rng = np.random.default_rng(seed)
    train_labels = train.targets.numpy()
    picked = _balanced_indices(train_labels, (num_labelled + num_val) // k, classes, rng)
    per_class_val = num_val // k
    val_idx = np.concatenate([picked[train_labels[picked] == c][:per_class_val] for c in classes])
    labelled_idx = np.setdiff1d(picked, val_idx)
    test_labels = test.targets.numpy()
    test_idx = _balanced_indices(test_labels, num_test // k, classes, rng)
    # clutter: the other images of the same classes
    train_clutter = train.images[
        np.setdiff1d(np.flatnonzero(np.isin(train_labels, classes)), picked)
    ]
    test_clutter = test.images[
        np.setdiff1d(np.flatnonzero(np.isin(test_labels, classes)), test_idx)
    ]
    category_of = {c: i for i, c in enumerate(classes)}

    def garments(dataset: FashionMNIST, indices: np.ndarray) -> list:
        indices = rng.permutation(indices)
        return [(dataset.images[i], category_of[int(dataset.targets[i])]) for i in indices]

    splits = {
        "train": (garments(train, labelled_idx), train_clutter),
        "val": (garments(train, val_idx), train_clutter),
        "test": (garments(test, test_idx), test_clutter),
    }
    counts = {"num_labelled": num_labelled, "num_val": num_val, "num_test": num_test}
    names = [FASHION_MNIST_CLASSES[c] for c in classes]
    summary: dict[str, Any] = {
        "seed": seed, "counts": counts, "classes": names, "spec": asdict(spec), "splits": {},
    }  # fmt: skip
    for offset, (split, (pieces, clutter)) in enumerate(splits.items()):
        summary["splits"][split] = _build_split(
            out, split, pieces, clutter, spec, seed + offset, class_names=names
        )
    summary["sources"] = {
        "train_labelled_indices": sorted(int(i) for i in labelled_idx),
        "val_indices": sorted(int(i) for i in val_idx),
        "test_indices": sorted(int(i) for i in test_idx),
    }
    atomic_write_json(out / SUMMARY_FILE, summary)
    return summary


def scene_datasets(
    root: str | Path, prefix: str = "fashion_scenes", *, suffix: str = ""
) -> list[tuple[str, str, str]]:
    """``MOCO.DATASETS.COCO`` entries ``(name, json_file, image_root)`` for the three splits, the
    JSON files ``<split><suffix>.json`` (``"_keypoints"``: the keypoint variant's)."""
    root = Path(root)
    return [(f"{prefix}_{s}", str(root / f"{s}{suffix}.json"), str(root / s)) for s in SPLITS]


def write_semantic_labels(root: str | Path) -> None:
    """The semantic-segmentation variant: for each split, ``<split>_sem_seg/<scene>.png`` with
    0 for background and ``1 + class`` on every visible garment pixel (visible silhouettes do not
    overlap). Deterministic; derived from ``<split>.json``, written atomically."""
    root = Path(root)
    for split in SPLITS:
        coco = json.loads((root / f"{split}.json").read_text())
        labels = {
            im["id"]: np.zeros((im["height"], im["width"]), dtype=np.uint8) for im in coco["images"]
        }
        for ann in coco["annotations"]:
            labels[ann["image_id"]][rle_decode(ann["segmentation"])] = ann["category_id"]
        out = root / f"{split}_sem_seg"
        out.mkdir(exist_ok=True)
        for im in coco["images"]:
            label = Image.fromarray(labels[im["id"]])  # uint8: mode L
            atomic_write(out / im["file_name"], lambda f, m=label: m.save(f, "PNG"))


def _extreme_points(mask: np.ndarray) -> list[int]:
    """COCO keypoints ``[x, y, 2] * 4`` (pixel indices) of the silhouette's topmost, bottommost,
    leftmost and rightmost pixel; along a flat extreme edge, the middle one of that edge."""
    rows, cols = np.nonzero(mask)
    points = []
    for coords, other, pick in ((rows, cols, np.min), (rows, cols, np.max),
                                (cols, rows, np.min), (cols, rows, np.max)):  # fmt: skip
        edge = pick(coords)
        middle = int(np.sort(other[coords == edge])[(np.sum(coords == edge) - 1) // 2])
        x, y = (middle, int(edge)) if coords is rows else (int(edge), middle)
        points += [x, y, 2]
    return points


def write_keypoint_annotations(root: str | Path) -> None:
    """The keypoint variant: ``<split>_keypoints.json``, each split's COCO file with the
    :data:`KEYPOINT_NAMES` of every garment (its visible silhouette's extreme points)."""
    root = Path(root)
    for split in SPLITS:
        coco = json.loads((root / f"{split}.json").read_text())
        for ann in coco["annotations"]:
            ann["keypoints"] = _extreme_points(rle_decode(ann["segmentation"]))
            ann["num_keypoints"] = len(KEYPOINT_NAMES)
        for category in coco["categories"]:
            category["keypoints"], category["skeleton"] = list(KEYPOINT_NAMES), []
        data = json.dumps(coco).encode()
        atomic_write(root / f"{split}_keypoints.json", lambda f, d=data: f.write(d))


def _semantic_labels_complete(root: Path) -> bool:
    """Every split has one label PNG per scene (an interrupted write leaves fewer)."""
    for split in SPLITS:
        scenes = json.loads((root / f"{split}.json").read_text())["images"]
        if len(list((root / f"{split}_sem_seg").glob("*.png"))) != len(scenes):
            return False
    return True


def scene_classes(scenes: str | Path) -> list[str]:
    """The category names of the scenes under ``scenes``, in category-id order."""
    summary = json.loads((Path(scenes) / SUMMARY_FILE).read_text())
    return summary.get("classes", list(FASHION_MNIST_CLASSES))  # older builds: all 10


def scene_options(task: str, scenes: str | Path, split: str) -> list[str]:
    """``moco-transfer`` overrides that register ``task``'s scenes (``detection``, ``sem_seg``,
    ``keypoints``; their labels derived here when missing or incomplete), size the heads for
    their classes and test on ``split``."""
    scenes = Path(scenes)
    classes = scene_classes(scenes)
    if task == "sem_seg":
        if not _semantic_labels_complete(scenes):
            write_semantic_labels(scenes)
        datasets = [  # MOCO.DATASETS.SEM_SEG: (name, image_root, label_root, "") per split
            (f"fashion_scenes_sem_seg_{s}", str(scenes / s), str(scenes / f"{s}_sem_seg"), "")
            for s in SPLITS
        ]
        return [
            "MOCO.DATASETS.SEM_SEG", str(datasets),
            "MOCO.DATASETS.SEM_SEG_CLASSES", str(["background", *classes]),
            "MODEL.SEM_SEG_HEAD.NUM_CLASSES", str(len(classes) + 1),
            "DATASETS.TEST", f"('fashion_scenes_sem_seg_{split}',)",
        ]  # fmt: skip
    if task == "keypoints":
        if not all((scenes / f"{s}_keypoints.json").is_file() for s in SPLITS):
            write_keypoint_annotations(scenes)
        return [
            "MOCO.DATASETS.COCO", str(scene_datasets(scenes, "fashion_scenes_keypoints",
                                                     suffix="_keypoints")),
            "MOCO.DATASETS.KEYPOINT_NAMES", str(list(KEYPOINT_NAMES)),
            "MOCO.DATASETS.KEYPOINT_FLIP_MAP", str([list(p) for p in KEYPOINT_FLIP_MAP]),
            "MODEL.ROI_HEADS.NUM_CLASSES", str(len(classes)),
            "DATASETS.TEST", f"('fashion_scenes_keypoints_{split}',)",
        ]  # fmt: skip
    return [
        "MOCO.DATASETS.COCO", str(scene_datasets(scenes)),
        "MODEL.ROI_HEADS.NUM_CLASSES", str(len(classes)),
        "DATASETS.TEST", f"('fashion_scenes_{split}',)",
    ]  # fmt: skip
