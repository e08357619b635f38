"""Register the VOC- and COCO-format datasets named in ``cfg.MOCO.DATASETS`` with detectron2.

detectron2's builtin names (``voc_2007_trainval``, ``coco_2017_train``, ...) are registered when
detectron2 is imported and read their files under ``$DETECTRON2_DATASETS``; nothing is done here
for them. Evaluators are chosen later from ``MetadataCatalog.get(name).evaluator_type``, which
this module sets for every dataset it registers.
"""

from __future__ import annotations

from pathlib import Path

from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances, register_pascal_voc

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
    """Register every ``MOCO.DATASETS.VOC`` / ``.COCO`` entry; returns the names. Idempotent."""
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
    for name, json_file, image_root in cfg.MOCO.DATASETS.COCO:
        _check_exists(name, Path(json_file), Path(image_root))
        if not _already_registered(name, json_file=str(json_file), image_root=str(image_root)):
            register_coco_instances(name, {}, str(json_file), str(image_root))  # evaluator "coco"
        names.append(name)
    return names
