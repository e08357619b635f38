"""The plugin's config keys (``MOCO.*``), added to a detectron2 config by :func:`add_moco_config`."""

from __future__ import annotations

from detectron2.config import CfgNode as CN

from . import (
    roi_heads,  # noqa: F401  (registers Res5ROIHeadsExtraNorm)
    semantic_seg,  # noqa: F401  (registers FCNHead)
)

__all__ = ["INITS", "VOC_CLASSES", "add_moco_config", "check_moco_config", "produced_metrics"]

# The four initialisations of the paper's transfer tables (MoCo, Tables 2 and 5), and a control:
# random init with BN statistics calibrated on the pretraining images (moco_pretrain.controls).
INITS = ("supervised", "supervised-tv", "moco", "pretrained", "random", "random-bn")
# Pascal VOC's 20 classes, in detectron2's (and the VOC devkit's) order.
VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)  # fmt: skip


def produced_metrics(cfg: CN) -> list[str]:
    """The summary metrics a run of ``cfg`` reports (per-class APs aside), as ``moco-report``
    names them: ``bbox/AP``..., ``segm/...`` with masks, ``keypoints/...``, ``sem_seg/mIoU``..."""
    if cfg.MODEL.META_ARCHITECTURE == "SemanticSegmentor":
        return [f"sem_seg/{m}" for m in ("mIoU", "fwIoU", "mACC", "pACC")]
    boxes = ("AP", "AP50", "AP75", "APs", "APm", "APl")
    names = [f"bbox/{m}" for m in boxes]
    if cfg.MODEL.MASK_ON:
        names += [f"segm/{m}" for m in boxes]
    if cfg.MODEL.KEYPOINT_ON:  # COCO's keypoint evaluation has no small-object AP
        names += [f"keypoints/{m}" for m in ("AP", "AP50", "AP75", "APm", "APl")]
    return names


def check_moco_config(cfg: CN) -> None:
    """One ``ValueError`` naming a ``MOCO.*`` value that cannot run."""
    if cfg.MOCO.INIT not in INITS:
        raise ValueError(f"MOCO.INIT must be one of {INITS}, got {cfg.MOCO.INIT!r}")
    primary = cfg.MOCO.PRIMARY_METRIC
    if primary and primary not in produced_metrics(cfg):
        raise ValueError(
            f"MOCO.PRIMARY_METRIC {primary!r} is not a metric this task reports"
            f" ({', '.join(produced_metrics(cfg))})"
        )
    overlap = set(cfg.MOCO.PARTITION.SOURCE) & set(cfg.MOCO.PARTITION.TARGET)
    if overlap:
        raise ValueError(
            f"MOCO.PARTITION: classes {sorted(overlap)} are both source and target (a"
            " class-disjoint transfer needs disjoint sets)"
        )


def add_moco_config(cfg: CN) -> None:
    """Add the ``MOCO`` node to ``cfg`` (in place; a second call changes nothing).

    Importing this module registers the plugin's heads, as detectron2's own do:
    ``Res5ROIHeadsExtraNorm`` in ``ROI_HEADS_REGISTRY`` (select it with
    ``MODEL.ROI_HEADS.NAME``) and ``FCNHead`` in ``SEM_SEG_HEADS_REGISTRY``. Datasets are
    registered by :func:`transfer.datasets.register.register_datasets`, never on import.
    """
    if "MOCO" in cfg:
        return
    cfg.MOCO = CN()
    # Which initialisation this run uses, one of INITS: "supervised" (detectron2's MSRA weights),
    # "supervised-tv" (torchvision's ImageNet weights converted by moco-convert), "moco" (a MoCo
    # backbone converted by moco-convert), "pretrained" (any other checkpoint converted by
    # moco-convert; its provenance says how it was trained), "random", "random-bn" (the control,
    # converted by moco-convert). moco-report labels and compares rows by it.
    cfg.MOCO.INIT = "supervised"
    # Stop before training unless MODEL.WEIGHTS sets every backbone tensor (stem, res2-res5, also
    # res5 inside the C4 ROI head; not the new extra norm). detectron2 itself only warns about
    # missing keys, and a run then silently trains from a random backbone. Off for random init.
    cfg.MOCO.CHECK_BACKBONE_WEIGHTS = True
    # The metric this protocol is judged on, declared before the run ("": none): moco-report
    # makes its comparisons the confirmatory family and treats every other metric as secondary.
    cfg.MOCO.PRIMARY_METRIC = ""
    # A class-disjoint transfer (moco-benchmark): the class names the backbone was pretrained on
    # and the classes the detector learns. Recorded in each trial's results.json; moco-report
    # never pools trials of different partitions.
    cfg.MOCO.PARTITION = CN()
    cfg.MOCO.PARTITION.SOURCE = []
    cfg.MOCO.PARTITION.TARGET = []

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
    # Keypoint names of the COCO-format datasets above, in the order of their annotations'
    # "keypoints", and the pairs that swap under a horizontal flip (empty: no keypoints).
    cfg.MOCO.DATASETS.KEYPOINT_NAMES = []
    cfg.MOCO.DATASETS.KEYPOINT_FLIP_MAP = []
    # Semantic-segmentation datasets to register: a list of (name, image_root, label_root,
    # list_file). label_root holds one PNG of class indices per image (IGNORE_VALUE: not scored),
    # named like the image; list_file names the image ids of the split, one per line ("": every
    # PNG in label_root). voc_2012_train_aug_sem_seg / voc_2012_val_sem_seg need no entry
    # (register_datasets registers them under $DETECTRON2_DATASETS/VOC2012 when named).
    cfg.MOCO.DATASETS.SEM_SEG = []
    # Class names of the semantic-segmentation datasets above, index 0 first.
    cfg.MOCO.DATASETS.SEM_SEG_CLASSES = ["background", *VOC_CLASSES]

    # The FCN head of the paper's semantic segmentation (transfer.semantic_seg.FCNHead, Appendix):
    # MODEL.SEM_SEG_HEAD.NUM_CONVS 3x3 convs of CONVS_DIM channels with this dilation, NORM and
    # ReLU, then a 1x1 classifier, upsampled by COMMON_STRIDE.
    cfg.MODEL.SEM_SEG_HEAD.NUM_CONVS = 2
    cfg.MODEL.SEM_SEG_HEAD.DILATION = 6
    # Training-time random scaling of each image by a ratio in [min, max] (empty: off), before
    # INPUT.CROP and the flip; used by SemanticSegmentor configs (transfer.semantic_seg).
    cfg.INPUT.RANDOM_SCALE = ()
