"""The plugin's config keys (``MOCO.*``), added to a detectron2 config by :func:`add_moco_config`."""

from __future__ import annotations

from detectron2.config import CfgNode as CN

from . import roi_heads  # noqa: F401  (registers Res5ROIHeadsExtraNorm)

__all__ = ["INITS", "VOC_CLASSES", "add_moco_config"]

# The four initialisations of the paper's transfer tables (MoCo, Tables 2 and 5).
INITS = ("supervised", "supervised-tv", "moco", "random")
# Pascal VOC's 20 classes, in detectron2's (and the VOC devkit's) order.
VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)  # fmt: skip


def add_moco_config(cfg: CN) -> None:
    """Add the ``MOCO`` node to ``cfg`` (in place; a second call changes nothing).

    Importing this module registers ``Res5ROIHeadsExtraNorm`` in detectron2's
    ``ROI_HEADS_REGISTRY`` (select it with ``MODEL.ROI_HEADS.NAME``).
    """
    if "MOCO" in cfg:
        return
    cfg.MOCO = CN()
    # Which initialisation this run uses, one of INITS: "supervised" (detectron2's MSRA weights),
    # "supervised-tv" (torchvision's ImageNet weights converted by moco-convert), "moco" (a MoCo
    # backbone converted by moco-convert), "random". moco-report labels and compares rows by it.
    cfg.MOCO.INIT = "supervised"
    # Stop before training unless MODEL.WEIGHTS sets every backbone tensor (stem, res2-res5, also
    # res5 inside the C4 ROI head; not the new extra norm). detectron2 itself only warns about
    # missing keys, and a run then silently trains from a random backbone. Off for random init.
    cfg.MOCO.CHECK_BACKBONE_WEIGHTS = True

    cfg.MOCO.DATASETS = CN()
    # VOC-format datasets to register: a list of (name, dirname, split). dirname holds
    # Annotations/<id>.xml, JPEGImages/<id>.jpg and ImageSets/Main/<split>.txt. detectron2's
    # builtin names (voc_2007_trainval, coco_2017_train, ...) need no entry: they are found under
    # $DETECTRON2_DATASETS (default ./datasets).
    cfg.MOCO.DATASETS.VOC = []
    # Class names of the VOC-format datasets above (default: VOC's 20 classes).
    cfg.MOCO.DATASETS.VOC_CLASSES = list(VOC_CLASSES)
    # Year given to detectron2's VOC evaluator: 2007 uses VOC2007's 11-point AP (as the builtin
    # voc_2007_test), any other year the area under the precision/recall curve.
    cfg.MOCO.DATASETS.VOC_YEAR = 2007
    # COCO-format datasets to register: a list of (name, json_file, image_root).
    cfg.MOCO.DATASETS.COCO = []
