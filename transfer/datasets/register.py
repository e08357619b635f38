"""Register the VOC-, COCO- and label-PNG datasets of ``cfg.MOCO.DATASETS`` with detectron2.

detectron2's builtin names (``voc_2007_trainval``, ``coco_2017_train``, ...) are registered when
detectron2 is imported and read their files under ``$DETECTRON2_DATASETS``; nothing is done here
for them, except VOC 2012's semantic-segmentation splits, which detectron2 lacks and which are
registered here when a config names them. Evaluators are chosen later from ``MetadataCatalog.get(name).evaluator_type``, which
this module sets for every dataset it registers.
"""

from __future__ import annotations

from pathlib import Path

from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances, register_pascal_voc

from ..config import VOC_CLASSES
from ..semantic_seg import VOC_SEM_SEG, register_builtin_voc, register_sem_seg

__all__ = ["register_datasets"]


def _already_registered(name: str, **expected: object) -> bool:
    """True when ``name`` is registered with the same metadata; ValueError if it differs."""
    if name not in DatasetCatalog.list():
        return False
    meta = MetadataCatalog.get(name)
    differing = {k: v for k, v in expected.items() if meta.get(k, None) != v}
    if differing:
        raise ValueError(
            f"dataset {name!r} is already registered with other data ({differing} expected); "
            "choose another name in MOCO.DATASETS"
        )
    return True


def _check_exists(name: str, *paths: Path) -> None:
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise FileNotFoundError(f"dataset {name!r}: {', '.join(missing)} not found")


def register_datasets(cfg: CfgNode) -> list[str]:
    """Register every ``MOCO.DATASETS.VOC`` / ``.COCO`` / ``.SEM_SEG`` entry, and VOC 2012's
    semantic-segmentation splits when ``DATASETS.TRAIN`` / ``TEST`` name them; returns the names
    of the entries. Idempotent."""
    if set(VOC_SEM_SEG) & {*cfg.DATASETS.TRAIN, *cfg.DATASETS.TEST}:
        register_builtin_voc(["background", *VOC_CLASSES])
    names = []
    classes = list(cfg.MOCO.DATASETS.VOC_CLASSES)
    year = cfg.MOCO.DATASETS.VOC_YEAR
    for name, dirname, split in cfg.MOCO.DATASETS.VOC:
        root = Path(dirname)
        _check_exists(name, root / "Annotations", root / "ImageSets" / "Main" / f"{split}.txt")
        if not _already_registered(name, dirname=str(root), split=split, thing_classes=classes):
            register_pascal_voc(name, str(root), split, year, class_names=classes)
            MetadataCatalog.get(name).evaluator_type = "pascal_voc"
        names.append(name)
    keypoints = {}
    if cfg.MOCO.DATASETS.KEYPOINT_NAMES:  # read by the keypoint head's flip and the evaluator
        keypoints = {
            "keypoint_names": list(cfg.MOCO.DATASETS.KEYPOINT_NAMES),
            "keypoint_flip_map": [tuple(pair) for pair in cfg.MOCO.DATASETS.KEYPOINT_FLIP_MAP],
        }
    for name, json_file, image_root in cfg.MOCO.DATASETS.COCO:
        _check_exists(name, Path(json_file), Path(image_root))
        if not _already_registered(
            name, json_file=str(json_file), image_root=str(image_root), **keypoints
        ):
            register_coco_instances(name, keypoints, str(json_file), str(image_root))  # "coco"
        names.append(name)
    classes = list(cfg.MOCO.DATASETS.SEM_SEG_CLASSES)
    ignore = cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE
    for name, image_root, label_root, list_file in cfg.MOCO.DATASETS.SEM_SEG:
        paths = [Path(image_root), Path(label_root)] + ([Path(list_file)] if list_file else [])
        _check_exists(name, *paths)
        if not _already_registered(
            name, image_root=str(image_root), label_root=str(label_root),
            list_file=str(list_file), stuff_classes=classes, ignore_label=ignore,
        ):  # fmt: skip
            register_sem_seg(name, image_root, label_root, list_file, classes, ignore_label=ignore)
        names.append(name)
    return names
