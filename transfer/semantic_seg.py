"""Semantic segmentation in the MoCo paper's protocol: the FCN head, its augmentation, its data.

The paper (He et al., CVPR 2020, Appendix, "Semantic segmentation") fine-tunes an FCN: the R50
convolutional layers with the 3x3 convolutions of res5 dilated by 2 at stride 1 (output stride
16, detectron2's ``MODEL.RESNETS.RES5_DILATION 2``), then two 3x3 convolutions of 256 channels
with dilation 6, BN and ReLU, then a 1x1 per-pixel classifier; training with random scaling by a
ratio in [0.5, 2.0], a random crop and a horizontal flip, inference at the original image size.
:class:`FCNHead` is that head for detectron2's ``SemanticSegmentor``; :func:`train_augmentations`
builds the augmentation; :func:`register_sem_seg` registers label-PNG datasets, Pascal VOC's
``train_aug`` / ``val`` among them.

Deviations, deliberate: the logits are upsampled to the input bilinearly with
``align_corners=False`` (detectron2's convention; DeepLab crops odd sizes, 513, with
``align_corners=True``); a crop larger than the scaled image takes the whole image and the batch
is padded with the mean (zero after normalisation) and the ignore label, as DeepLab pads.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from detectron2.config import CfgNode, configurable
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import transforms as T
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY
from fvcore.nn import weight_init
from PIL import Image
from torch import nn
from torch.nn import functional as F

__all__ = ["FCNHead", "RandomScale", "register_sem_seg", "train_augmentations"]

# Pascal VOC 2012 with the SBD extra annotations (DeepLab's "SegmentationClassAug"), as the paper.
VOC_SEM_SEG = {
    "voc_2012_train_aug_sem_seg": "train_aug",  # 10,582 images
    "voc_2012_val_sem_seg": "val",  # 1,449 images
}


@SEM_SEG_HEADS_REGISTRY.register()
class FCNHead(nn.Module):
    """The paper's FCN head: ``num_convs`` dilated 3x3 conv + norm + ReLU, a 1x1 classifier, and
    bilinear upsampling by ``common_stride`` to the input resolution; cross-entropy over the
    pixels whose label is not ``ignore_value``."""

    @configurable
    def __init__(
        self,
        input_shape: dict[str, ShapeSpec],
        *,
        in_feature: str,
        num_classes: int,
        conv_dims: int,
        num_convs: int,
        dilation: int,
        common_stride: int,
        norm: str = "SyncBN",
        loss_weight: float = 1.0,
        ignore_value: int = 255,
    ) -> None:
        super().__init__()
        self.in_feature, self.common_stride = in_feature, common_stride
        self.loss_weight, self.ignore_value = loss_weight, ignore_value
        convs, channels = [], input_shape[in_feature].channels
        for _ in range(num_convs):
            conv = Conv2d(
                channels, conv_dims, kernel_size=3, padding=dilation, dilation=dilation,
                bias=not norm, norm=get_norm(norm, conv_dims), activation=F.relu,
            )  # fmt: skip
            weight_init.c2_msra_fill(conv)
            convs.append(conv)
            channels = conv_dims
        self.convs = nn.Sequential(*convs)
        self.predictor = Conv2d(channels, num_classes, kernel_size=1)
        nn.init.normal_(self.predictor.weight, std=0.001)  # as detectron2's DeepLab project head
        nn.init.constant_(self.predictor.bias, 0)

    @classmethod
    def from_config(cls, cfg: CfgNode, input_shape: dict[str, ShapeSpec]) -> dict:
        head = cfg.MODEL.SEM_SEG_HEAD
        if len(head.IN_FEATURES) != 1:
            raise ValueError(
                f"MODEL.SEM_SEG_HEAD.IN_FEATURES must name one feature for FCNHead, got "
                f"{list(head.IN_FEATURES)}"
            )
        (in_feature,) = head.IN_FEATURES
        return {
            "input_shape": input_shape, "in_feature": in_feature,
            "num_classes": head.NUM_CLASSES, "conv_dims": head.CONVS_DIM,
            "num_convs": head.NUM_CONVS, "dilation": head.DILATION,
            "common_stride": head.COMMON_STRIDE, "norm": head.NORM,
            "loss_weight": head.LOSS_WEIGHT, "ignore_value": head.IGNORE_VALUE,
        }  # fmt: skip

    def forward(
        self, features: dict[str, torch.Tensor], targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        logits = self.predictor(self.convs(features[self.in_feature]))
        logits = F.interpolate(
            logits, scale_factor=self.common_stride, mode="bilinear", align_corners=False
        )
        if not self.training:
            return logits, {}  # SemanticSegmentor crops the padding and resizes to the input
        # the stride-16 grid covers the padded batch, rounded up: score only the labelled part
        logits = logits[..., : targets.shape[-2], : targets.shape[-1]]
        loss = F.cross_entropy(logits, targets, reduction="mean", ignore_index=self.ignore_value)
        return None, {"loss_sem_seg": loss * self.loss_weight}


class RandomScale(T.Augmentation):
    """Resize by a ratio drawn uniformly from ``[min_scale, max_scale]`` (the aspect kept)."""

    def __init__(self, min_scale: float, max_scale: float) -> None:
        super().__init__()
        if not 0 < min_scale <= max_scale:
            raise ValueError(
                f"scale range must satisfy 0 < min <= max, got ({min_scale}, {max_scale})"
            )
        self.min_scale, self.max_scale = min_scale, max_scale

    def get_transform(self, image: np.ndarray) -> T.Transform:
        h, w = image.shape[:2]
        scale = np.random.uniform(self.min_scale, self.max_scale)
        return T.ResizeTransform(h, w, max(1, round(h * scale)), max(1, round(w * scale)))


def train_augmentations(cfg: CfgNode) -> list[T.Augmentation]:
    """The paper's training augmentation from ``INPUT.RANDOM_SCALE``, ``INPUT.CROP`` and
    ``INPUT.RANDOM_FLIP``, in that order (no resizing to a fixed size: the original scale)."""
    augmentations: list[T.Augmentation] = []
    if cfg.INPUT.RANDOM_SCALE:
        if len(cfg.INPUT.RANDOM_SCALE) != 2:
            raise ValueError(f"INPUT.RANDOM_SCALE must be (min, max), got {cfg.INPUT.RANDOM_SCALE}")
        augmentations.append(RandomScale(*cfg.INPUT.RANDOM_SCALE))
    if cfg.INPUT.CROP.ENABLED:
        augmentations.append(T.RandomCrop(cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE))
    if cfg.INPUT.RANDOM_FLIP != "none":
        flip = cfg.INPUT.RANDOM_FLIP
        augmentations.append(
            T.RandomFlip(horizontal=flip == "horizontal", vertical=flip == "vertical")
        )
    return augmentations


def _check_label_png(path: Path) -> None:
    """detectron2's mapper reads labels as 8-bit grey: a palette PNG (VOC's own SegmentationClass)
    would train on the palette's luminance instead of the class indices."""
    mode = Image.open(path).mode
    if mode not in ("L", "I", "I;16"):
        raise ValueError(
            f"{path}: label PNGs must hold class indices in one channel (mode L), not mode {mode}"
            " (for VOC use SegmentationClassAug, or convert SegmentationClass with"
            " Image.open(p).convert('P') -> np.array -> Image.fromarray(..., 'L'))"
        )


def load_sem_seg(image_root: str, label_root: str, list_file: str = "") -> list[dict]:
    """Dataset dicts ``{file_name, sem_seg_file_name}``: for each id of ``list_file`` (or every
    PNG in ``label_root``), the image ``image_root/<id>.{jpg,png}`` and ``label_root/<id>.png``."""
    images, labels = Path(image_root), Path(label_root)
    if list_file:
        ids = [line.strip() for line in Path(list_file).read_text().splitlines() if line.strip()]
    else:
        ids = sorted(p.stem for p in labels.glob("*.png"))
    if not ids:
        raise ValueError(f"no labels in {list_file or label_root}")
    suffix = ".jpg" if (images / f"{ids[0]}.jpg").is_file() else ".png"
    dicts = []
    for image_id in ids:
        image, label = images / f"{image_id}{suffix}", labels / f"{image_id}.png"
        if not image.is_file() or not label.is_file():
            raise FileNotFoundError(f"{image if not image.is_file() else label} not found")
        dicts.append({"file_name": str(image), "sem_seg_file_name": str(label)})
    _check_label_png(Path(dicts[0]["sem_seg_file_name"]))
    return dicts


def register_sem_seg(
    name: str,
    image_root: str,
    label_root: str,
    list_file: str,
    classes: list[str],
    *,
    ignore_label: int = 255,
) -> None:
    """Register a label-PNG dataset (:func:`load_sem_seg`), scored by ``SemSegEvaluator``."""
    DatasetCatalog.register(name, lambda: load_sem_seg(image_root, label_root, list_file))
    MetadataCatalog.get(name).set(
        image_root=str(image_root), label_root=str(label_root), list_file=str(list_file),
        stuff_classes=list(classes), ignore_label=ignore_label, evaluator_type="sem_seg",
    )  # fmt: skip


def register_builtin_voc(classes: list[str]) -> None:
    """``voc_2012_train_aug_sem_seg`` / ``voc_2012_val_sem_seg`` under
    ``$DETECTRON2_DATASETS/VOC2012`` (default ``./datasets``): ``JPEGImages/``,
    ``SegmentationClassAug/`` and ``ImageSets/Segmentation/{train_aug,val}.txt``."""
    root = Path(os.getenv("DETECTRON2_DATASETS", "datasets")) / "VOC2012"
    for name, split in VOC_SEM_SEG.items():
        if name not in DatasetCatalog.list():
            register_sem_seg(
                name, str(root / "JPEGImages"), str(root / "SegmentationClassAug"),
                str(root / "ImageSets" / "Segmentation" / f"{split}.txt"), classes,
            )  # fmt: skip
