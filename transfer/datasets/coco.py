"""A COCO-format detection dataset for ``moco-benchmark --dataset DIR``: checked, split into
train / val / test when it comes as one file, and cut into nested label fractions.

``DIR`` holds either

* ``train.json``, ``val.json`` and ``test.json`` (COCO instances), each split's images under
  ``DIR/<split>/`` when that folder exists, else under ``DIR`` (``file_name`` relative to it): the
  layout :mod:`transfer.datasets.scenes` writes, so the embedded scenes are one such dataset; or
* one ``annotations.json`` (images under ``DIR/images/`` when that folder exists, else under
  ``DIR``), split by image with a seeded shuffle: 20 % validation, 20 % test, the rest training
  (at least one image each).

Checks, each one line naming the file: a JSON that is not COCO instances (``images``,
``annotations``, ``categories`` lists; every annotation with a known image and category and a
positive box), image files that are missing, and splits whose categories differ. Nothing is
written before every check has passed.

Label fractions are nested: the training images are shuffled once with the seed and fraction
``f`` keeps the first ``ceil(f * N)``, so every smaller subset lies inside every larger one and
every row of a comparison sees the same images. Masks are trained when every annotation of every
split has a ``segmentation``; otherwise boxes only.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moco_pretrain.files import atomic_write_json, file_sha256

__all__ = ["CocoDataset", "DatasetError", "check_fractions", "prepare_coco_dataset"]

SPLITS = ("train", "val", "test")
SINGLE_FILE = "annotations.json"
HELD_OUT_SHARE = 0.2  # of the images of a single annotations.json, for val and for test
SUMMARY_FILE = "dataset.json"


class DatasetError(ValueError):
    """The dataset folder is not a usable COCO-format detection dataset (one line says why)."""


@dataclass(frozen=True)
class CocoDataset:
    """A checked dataset, prepared in ``folder`` (see :func:`prepare_coco_dataset`).

    Attributes:
        folder: where the fraction files (and the split of a single file) were written.
        tag: the prefix of its names in detectron2's dataset registry.
        classes: category names in ``categories`` order (detectron2's contiguous ids).
        masks: every annotation has a ``segmentation``.
        images: split -> (json file, image root).
        fractions: label fraction -> training json file (1: the training split's own).
        counts: ``{"train": N, "val": N, "test": N}`` images, and ``train_f<f>`` per fraction.
    """

    folder: Path
    tag: str
    classes: list[str]
    masks: bool
    images: dict[str, tuple[Path, Path]]
    fractions: dict[float, Path]
    counts: dict[str, int]

    def options(self, fraction: float, *, eval_split: str = "test") -> list[str]:
        """``moco-transfer`` overrides that register the splits, train on ``fraction`` of the
        training images, test on ``eval_split`` and size the heads for the classes."""
        tag = self.tag
        _, train_root = self.images["train"]
        train = f"{tag}_train" if fraction == 1 else f"{tag}_train_f{fraction:g}"
        entries = [(train, str(self.fractions[fraction]), str(train_root))]
        entries += [
            (f"{tag}_{s}", str(self.images[s][0]), str(self.images[s][1])) for s in SPLITS[1:]
        ]
        return [
            "MOCO.DATASETS.COCO", str(entries),
            "DATASETS.TRAIN", str((entries[0][0],)),
            "DATASETS.TEST", str((f"{tag}_{eval_split}",)),
            "MODEL.ROI_HEADS.NUM_CLASSES", str(len(self.classes)),
            "MODEL.MASK_ON", str(self.masks),
        ]  # fmt: skip


def check_fractions(fractions: Sequence[float]) -> list[float]:
    """Sorted, distinct label fractions, each in (0, 1]; one line naming a bad one."""
    for f in fractions:
        if not 0 < f <= 1:
            raise DatasetError(f"--label-fractions: {f:g} is not in (0, 1]")
    distinct = sorted(set(fractions))
    names = [f"{f:g}" for f in distinct]
    if len(set(names)) != len(names):
        raise DatasetError(f"--label-fractions: {distinct} are not distinct to 6 digits")
    return distinct


def _read(path: Path) -> dict[str, Any]:
    try:
        coco = json.loads(path.read_text())
    except FileNotFoundError:
        raise DatasetError(f"{path}: not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: not JSON ({e})") from None
    for key in ("images", "annotations", "categories"):
        if not isinstance(coco, dict) or not isinstance(coco.get(key), list):
            raise DatasetError(f"{path}: not a COCO instances file (no {key!r} list)")
    try:
        image_ids = {image["id"] for image in coco["images"]}
        category_ids = {category["id"] for category in coco["categories"]}
        names = [category["name"] for category in coco["categories"]]
        for a in coco["annotations"]:
            x, y, w, h = a["bbox"]
            if a["image_id"] not in image_ids or a["category_id"] not in category_ids:
                raise DatasetError(
                    f"{path}: annotation {a.get('id')} names image {a['image_id']} or category"
                    f" {a['category_id']}, which the file does not list"
                )
            if not (w > 0 and h > 0):
                raise DatasetError(f"{path}: annotation {a.get('id')} has an empty box {a['bbox']}")
        for image in coco["images"]:
            image["file_name"]  # noqa: B018 - checked present
    except DatasetError:
        raise
    except (KeyError, TypeError, ValueError) as e:
        raise DatasetError(f"{path}: not a COCO instances file ({type(e).__name__}: {e})") from None
    if not names:
        raise DatasetError(f"{path}: no categories")
    return coco


def _check_images(coco: dict[str, Any], root: Path, path: Path) -> None:
    missing = [im["file_name"] for im in coco["images"] if not (root / im["file_name"]).is_file()]
    if missing:
        raise DatasetError(
            f"{path}: {len(missing)} of {len(coco['images'])} images not found under {root},"
            f" e.g. {missing[:3]}"
        )


def _categories(coco: dict[str, Any]) -> list[tuple[int, str]]:
    return [(c["id"], c["name"]) for c in coco["categories"]]


def _subset(coco: dict[str, Any], image_ids: set[Any]) -> dict[str, Any]:
    return {
        **coco,
        "images": [im for im in coco["images"] if im["id"] in image_ids],
        "annotations": [a for a in coco["annotations"] if a["image_id"] in image_ids],
    }


def _split_single_file(coco: dict[str, Any], seed: int, path: Path) -> dict[str, dict[str, Any]]:
    ids = sorted(im["id"] for im in coco["images"])
    if len(ids) < 3:
        raise DatasetError(f"{path}: {len(ids)} images; a train / val / test split needs 3")
    random.Random(seed).shuffle(ids)
    held_out = max(1, round(HELD_OUT_SHARE * len(ids)))
    parts = {
        "val": ids[:held_out],
        "test": ids[held_out : 2 * held_out],
        "train": ids[2 * held_out :],
    }
    if not parts["train"]:
        raise DatasetError(f"{path}: {len(ids)} images leave none for training")
    return {split: _subset(coco, set(parts[split])) for split in SPLITS}


def prepare_coco_dataset(
    dataset: str | Path,
    folder: str | Path,
    *,
    fractions: Sequence[float],
    seed: int = 0,
    tag: str | None = None,
) -> CocoDataset:
    """Check the COCO dataset in ``dataset``, then write into ``folder`` its split (for a single
    ``annotations.json``, seeded) and its label-fraction training files ``train_f<f>.json``
    (fraction 1 trains on the training split's own file); ``folder/dataset.json`` records them. A
    prepared folder is read back and gains the fractions it lacks; one of another dataset, seed
    or split refuses.
    ``tag`` names the splits in detectron2's registry (default: from ``folder``'s path).

    Raises:
        DatasetError: one line naming the file at fault; nothing is written then.
    """
    dataset, folder = Path(dataset), Path(folder)
    fractions = check_fractions(fractions)
    if not dataset.is_dir():
        raise DatasetError(f"--dataset {dataset}: not a folder")
    if all((dataset / f"{s}.json").is_file() for s in SPLITS):
        files = {s: dataset / f"{s}.json" for s in SPLITS}
        cocos = {s: _read(path) for s, path in files.items()}
        roots = {s: dataset / s if (dataset / s).is_dir() else dataset for s in SPLITS}
        source = {s: str(files[s].resolve()) for s in SPLITS}
        digests = {s: file_sha256(files[s]) for s in SPLITS}
    elif (dataset / SINGLE_FILE).is_file():
        path = dataset / SINGLE_FILE
        whole = _read(path)
        root = dataset / "images" if (dataset / "images").is_dir() else dataset
        _check_images(whole, root, path)
        cocos = _split_single_file(whole, seed, path)
        files = {s: folder / f"{s}.json" for s in SPLITS}
        roots = dict.fromkeys(SPLITS, root)
        source = {SINGLE_FILE: str(path.resolve())}  # split by fraction_seed
        digests = {SINGLE_FILE: file_sha256(path)}
    else:
        raise DatasetError(
            f"--dataset {dataset}: needs train.json, val.json and test.json, or one {SINGLE_FILE}"
        )
    for split, coco in cocos.items():
        if SINGLE_FILE not in source:
            _check_images(coco, roots[split], files[split])
        if _categories(coco) != _categories(cocos["train"]):
            raise DatasetError(
                f"{files[split]}: categories {[n for _, n in _categories(coco)]} differ from the"
                f" training split's {[n for _, n in _categories(cocos['train'])]}"
            )
    train_ids = sorted(im["id"] for im in cocos["train"]["images"])
    random.Random(seed).shuffle(train_ids)
    keep = {f: math.ceil(f * len(train_ids)) for f in fractions}
    # the files' digests: a dataset edited in place would draw other, no longer nested subsets
    record = {"source": source, "sha256": digests, "fraction_seed": seed}
    summary_path = folder / SUMMARY_FILE
    recorded = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    if recorded is not None and {k: recorded.get(k) for k in record} != json.loads(
        json.dumps(record)
    ):
        raise DatasetError(
            f"{folder} holds another dataset, split or seed, or its files changed"
            f" ({recorded['source']}): choose another --work-dir"
        )
    # three split files at fraction 1 need nothing written (the embedded scenes' default)
    if recorded is not None or SINGLE_FILE in source or any(f < 1 for f in fractions):
        if recorded is None and SINGLE_FILE in source:
            for split in SPLITS:
                atomic_write_json(files[split], cocos[split])
        subsets = dict((recorded or {}).get("fractions", {}))
        for f in fractions:  # a fraction added to a prepared folder: the same seeded order
            if f"{f:g}" not in subsets:
                if f < 1:
                    subset = _subset(cocos["train"], set(train_ids[: keep[f]]))
                    atomic_write_json(folder / f"train_f{f:g}.json", subset)
                subsets[f"{f:g}"] = sorted(train_ids[: keep[f]])
        if {**record, "fractions": subsets} != recorded:
            atomic_write_json(summary_path, {**record, "fractions": subsets})
    masks = all(
        "segmentation" in a and a["segmentation"] for c in cocos.values() for a in c["annotations"]
    )
    counts = {s: len(cocos[s]["images"]) for s in SPLITS} | {
        f"train_f{f:g}": keep[f] for f in fractions
    }
    default_tag = "dataset_" + hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:8]
    return CocoDataset(
        folder=folder,
        tag=tag or default_tag,
        classes=[name for _, name in _categories(cocos["train"])],
        masks=masks,
        images={s: (files[s], roots[s]) for s in SPLITS},
        fractions={
            f: folder / f"train_f{f:g}.json" if f < 1 else files["train"] for f in fractions
        },
        counts=counts,
    )
