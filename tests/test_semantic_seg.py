"""Semantic segmentation: the FCN head, its augmentation and data, the configs, end to end on CPU."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("detectron2")

from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.config import get_cfg  # noqa: E402
from detectron2.data import transforms as T  # noqa: E402
from detectron2.layers import ShapeSpec  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from tests.conftest import write_converted_resnet50  # noqa: E402
from tests.test_transfer_tasks import differing_keys  # noqa: E402
from transfer import add_moco_config  # noqa: E402
from transfer.preflight import BackboneWeightsError, load_verified  # noqa: E402
from transfer.semantic_seg import (  # noqa: E402
    FCNHead,
    RandomScale,
    load_sem_seg,
    train_augmentations,
)
from transfer.train_net import Trainer, main  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "segmentation"
YAMLS = sorted(p.name for p in CONFIGS.glob("*.yaml"))
BENCHMARKS = {
    "voc_R_50_FCN_30k": (21, 513, 0.003, 30000),
    "cityscapes_R_50_FCN_90k": (19, 769, 0.01, 90000),
}
SUFFIXES = ("", "_moco", "_tvsup", "_random")
# keys in which the four rows of a benchmark may differ: the initialisation and its input format
ROW_KEYS = {
    "MODEL.WEIGHTS", "MODEL.PIXEL_MEAN", "MODEL.PIXEL_STD", "MODEL.RESNETS.STRIDE_IN_1X1",
    "INPUT.FORMAT", "MOCO.INIT", "MOCO.CHECK_BACKBONE_WEIGHTS",
}  # fmt: skip


def _load(name: str):
    cfg = get_cfg()
    add_moco_config(cfg)
    cfg.merge_from_file(str(CONFIGS / name))
    return cfg


def test_the_segmentation_configs_are_the_four_rows_of_each_benchmark_plus_tests_and_scenes():
    rows = {f"{b}{s}.yaml" for b in BENCHMARKS for s in SUFFIXES}
    extra = {"Base-FCN-BN.yaml", "instant_test_voc_R_50_FCN.yaml",
             "instant_test_cityscapes_R_50_FCN.yaml"} | {
        f"fashion_scenes_R_18_FCN_{i}.yaml" for i in ("moco", "sup", "random")
    }  # fmt: skip
    assert set(YAMLS) == rows | extra


@pytest.mark.parametrize("benchmark", sorted(BENCHMARKS))
def test_benchmark_rows_follow_the_paper_and_differ_only_in_the_initialisation(benchmark):
    classes, crop, lr, iters = BENCHMARKS[benchmark]
    cfgs = {s: _load(f"{benchmark}{s}.yaml") for s in SUFFIXES}
    for cfg in cfgs.values():
        assert cfg.MODEL.META_ARCHITECTURE == "SemanticSegmentor"
        assert (cfg.MODEL.RESNETS.DEPTH, cfg.MODEL.RESNETS.RES5_DILATION) == (50, 2)
        assert (cfg.MODEL.RESNETS.NORM, cfg.MODEL.BACKBONE.FREEZE_AT) == ("SyncBN", 0)
        head = cfg.MODEL.SEM_SEG_HEAD
        assert (head.NAME, head.IN_FEATURES, head.NUM_CONVS, head.CONVS_DIM) == (
            "FCNHead", ["res5"], 2, 256,
        )  # fmt: skip
        assert (head.DILATION, head.NORM, head.COMMON_STRIDE, head.NUM_CLASSES) == (
            6, "SyncBN", 16, classes,
        )  # fmt: skip
        assert cfg.INPUT.RANDOM_SCALE == (0.5, 2.0) and cfg.INPUT.CROP.SIZE == [crop, crop]
        assert (cfg.INPUT.MIN_SIZE_TEST, cfg.TEST.PRECISE_BN.ENABLED) == (0, True)
        solver = cfg.SOLVER
        assert (solver.IMS_PER_BATCH, solver.BASE_LR, solver.MAX_ITER) == (16, lr, iters)
        assert solver.STEPS == (round(0.7 * iters), round(0.9 * iters))
        assert (solver.WEIGHT_DECAY, solver.REFERENCE_WORLD_SIZE) == (0.0001, 8)
    assert [c.MOCO.INIT for c in cfgs.values()] == ["supervised", "moco", "supervised-tv", "random"]
    for suffix in SUFFIXES[1:]:
        assert differing_keys(cfgs[""], cfgs[suffix]) <= ROW_KEYS
    assert cfgs["_moco"].MODEL.WEIGHTS == cfgs["_random"].MODEL.WEIGHTS == ""


def test_every_segmentation_yaml_builds(tmp_path):
    built = set()
    for name in YAMLS:
        cfg = _load(name)
        cfg.MODEL.DEVICE = "cpu"
        key = (cfg.MODEL.RESNETS.DEPTH, tuple(cfg.MODEL.RESNETS.OUT_FEATURES))
        if name.startswith("Base-") or key in built:
            continue
        built.add(key)
        model = Trainer.build_model(cfg)
        head = model.sem_seg_head
        assert isinstance(head, FCNHead)
        assert [c.dilation for c in head.convs] == [(cfg.MODEL.SEM_SEG_HEAD.DILATION,) * 2] * 2
    assert built == {(50, ("res5",)), (18, ("res4",))}


def _head(**overrides) -> FCNHead:
    kwargs = dict(in_feature="res5", num_classes=3, conv_dims=8, num_convs=2, dilation=6,
                  common_stride=16, norm="BN", ignore_value=255)  # fmt: skip
    kwargs.update(overrides)
    return FCNHead({"res5": ShapeSpec(channels=4, stride=16)}, **kwargs)


def test_fcn_head_layers_and_output_resolution():
    head = _head().eval()
    conv1, conv2 = head.convs
    assert (conv1.in_channels, conv1.out_channels, conv2.out_channels) == (4, 8, 8)
    assert (conv1.kernel_size, conv1.padding, conv1.dilation) == ((3, 3), (6, 6), (6, 6))
    assert conv1.bias is None and isinstance(conv1.norm, torch.nn.BatchNorm2d)
    assert head.predictor.kernel_size == (1, 1) and head.predictor.out_channels == 3
    logits, losses = head({"res5": torch.randn(2, 4, 3, 5)})
    assert logits.shape == (2, 3, 48, 80) and losses == {}


def test_fcn_loss_is_cross_entropy_over_labelled_pixels_of_the_target_size():
    torch.manual_seed(0)
    head = _head(loss_weight=0.5).train()
    features = {"res5": torch.randn(2, 4, 3, 5)}
    targets = torch.randint(0, 3, (2, 40, 70))
    targets[0, :10] = 255
    _, losses = head(features, targets)
    x = head.predictor(head.convs(features["res5"]))
    logits = F.interpolate(x, scale_factor=16, mode="bilinear", align_corners=False)[:, :, :40, :70]
    expected = 0.5 * F.cross_entropy(logits, targets, ignore_index=255)
    assert torch.allclose(losses["loss_sem_seg"], expected)
    labelled = targets != 255
    per_pixel = F.cross_entropy(logits, targets.clamp(max=2), reduction="none")[labelled]
    assert torch.allclose(expected, 0.5 * per_pixel.mean())


def test_random_scale_keeps_the_aspect_and_draws_the_ratio_in_range():
    np.random.seed(0)
    ratio = np.random.uniform(0.5, 2.0)
    np.random.seed(0)
    transform = RandomScale(0.5, 2.0).get_transform(np.zeros((100, 60, 3), np.uint8))
    assert (transform.new_h, transform.new_w) == (round(100 * ratio), round(60 * ratio))


def test_train_augmentations_follow_the_config_order():
    cfg = _load("voc_R_50_FCN_30k.yaml")
    scale, crop, flip = train_augmentations(cfg)
    assert (type(scale), type(crop), type(flip)) == (RandomScale, T.RandomCrop, T.RandomFlip)
    assert (scale.min_scale, scale.max_scale, crop.crop_size) == (0.5, 2.0, [513, 513])
    cfg.INPUT.RANDOM_SCALE, cfg.INPUT.CROP.ENABLED = (), False
    assert [type(a) for a in train_augmentations(cfg)] == [T.RandomFlip]


def _write_sem_seg(root: Path, n: int, seed: int) -> tuple[Path, Path]:
    """Noise with one square (class 1) and one bar (class 2) per image; label PNGs in mode L."""
    rng = np.random.default_rng(seed)
    images, labels = root / "images", root / "labels"
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        pixels = rng.integers(0, 80, size=(72, 96, 3), dtype=np.uint8)
        label = np.zeros((72, 96), np.uint8)
        for c, (h, w), colour in ((1, (24, 24), (220, 40, 40)), (2, (10, 40), (40, 40, 220))):
            y, x = int(rng.integers(0, 72 - h)), int(rng.integers(0, 96 - w))
            pixels[y : y + h, x : x + w], label[y : y + h, x : x + w] = colour, c
        label[0, 0] = 255  # an unlabelled pixel
        Image.fromarray(pixels).save(images / f"{seed}_{i}.png")
        Image.fromarray(label).save(labels / f"{seed}_{i}.png")
    return images, labels


def test_load_sem_seg_reads_a_list_file_and_refuses_palette_labels(tmp_path):
    images, labels = _write_sem_seg(tmp_path, 3, seed=0)
    listed = tmp_path / "split.txt"
    listed.write_text("0_2\n0_0\n")
    dicts = load_sem_seg(str(images), str(labels), str(listed))
    assert [Path(d["file_name"]).name for d in dicts] == ["0_2.png", "0_0.png"]
    assert [Path(d["sem_seg_file_name"]) for d in dicts] == [labels / "0_2.png", labels / "0_0.png"]
    assert len(load_sem_seg(str(images), str(labels))) == 3
    palette = Image.fromarray(np.zeros((4, 4), np.uint8)).convert("P")
    palette.save(labels / "0_2.png")
    with pytest.raises(ValueError, match=re.escape(f"{labels / '0_2.png'}: label PNGs must")):
        load_sem_seg(str(images), str(labels), str(listed))


def test_a_converted_resnet50_fills_every_backbone_tensor_of_the_fcn(tmp_path, backbone_pkl):
    cfg = _load("voc_R_50_FCN_30k_moco.yaml")
    cfg.MODEL.DEVICE = "cpu"
    model = Trainer.build_model(cfg)
    load_verified(model, lambda: DetectionCheckpointer(model).load(str(backbone_pkl)), weights="w")
    # res5 keeps the pretrained weights while its 3x3 convs are dilated at stride 1
    res5 = model.backbone.res5[0]
    assert (res5.conv2.dilation, res5.conv2.stride, res5.conv1.stride) == ((2, 2), (1, 1), (1, 1))
    missing = write_converted_resnet50(tmp_path, drop="res5.2.conv3.weight")
    with pytest.raises(BackboneWeightsError, match=r"left 1 of \d+ backbone tensors unset"):
        load_verified(model, lambda: DetectionCheckpointer(model).load(str(missing)), weights="w")


@pytest.fixture(scope="module")
def tiny_sem_seg(tmp_path_factory) -> list:
    """MOCO.DATASETS.SEM_SEG entries of a tiny train/test pair."""
    root = tmp_path_factory.mktemp("sem_seg")
    train_images, train_labels = _write_sem_seg(root / "train", 4, seed=1)
    test_images, test_labels = _write_sem_seg(root / "test", 2, seed=2)
    datasets = [("moco_tiny_sem_seg_train", str(train_images), str(train_labels), ""),
                ("moco_tiny_sem_seg_test", str(test_images), str(test_labels), "")]  # fmt: skip
    return datasets


@pytest.mark.slow
@pytest.mark.parametrize("benchmark", ["voc", "cityscapes"])
def test_instant_test_trains_two_iterations_and_scores_miou(
    tmp_path, benchmark, tiny_sem_seg, backbone_pkl
):
    output = tmp_path / "out"
    main([
        "--config-file", f"segmentation/instant_test_{benchmark}_R_50_FCN.yaml",
        "MOCO.DATASETS.SEM_SEG", str(tiny_sem_seg),
        "MOCO.DATASETS.SEM_SEG_CLASSES", "['background', 'square', 'bar']",
        "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "3", "MODEL.WEIGHTS", str(backbone_pkl),
        "OUTPUT_DIR", str(output),
    ])  # fmt: skip
    result = json.loads((output / "trial_0" / "results.json").read_text())
    assert (result["task"], result["init"]) == ("sem_seg", "moco")
    metrics = result["metrics"]
    ious = [metrics[f"sem_seg/IoU-{c}"] for c in ("background", "square", "bar")]
    assert metrics["sem_seg/mIoU"] == pytest.approx(np.mean(ious))
    assert result["protocol"]["max_iter"] == 2


@pytest.mark.parametrize(
    ("name", "miou", "table"),
    [("voc_R_50_FCN_30k.yaml", 74.4, "VOC"), ("voc_R_50_FCN_30k_moco.yaml", 72.5, "VOC"),
     ("cityscapes_R_50_FCN_90k.yaml", 74.6, "Cityscapes"),
     ("cityscapes_R_50_FCN_90k_moco.yaml", 75.3, "Cityscapes")],
)  # fmt: skip
def test_each_row_as_recorded_finds_its_table_6_number_in_expected_yaml(name, miou, table):
    """The MoCo rows with weights converted from a MoCo v1 200-epoch checkpoint (the paper's);
    MoCo v2 weights have no published number here."""
    import yaml

    from moco_pretrain.comparison import find_expected, load_expected
    from moco_pretrain.recipes import config_root

    entries = load_expected(config_root() / "expected.yaml")
    config = yaml.safe_load(_load(name).dump())
    (found,) = find_expected(entries, config, {"method": "moco_v1", "epochs": 200})
    assert found.source.startswith(f"MoCo paper, Table 6, {table} semantic segmentation (mIoU)")
    assert (found.metrics, found.trials) == ({"sem_seg/mIoU": (miou, None)}, 5)  # appendix A.5
    if "moco" in name:
        assert find_expected(entries, config, {"method": "moco_v2", "epochs": 200}) == []


def test_random_init_rows_have_no_expected_number():
    import yaml

    from moco_pretrain.comparison import find_expected, load_expected
    from moco_pretrain.recipes import config_root

    entries = load_expected(config_root() / "expected.yaml")
    for name in ("voc_R_50_FCN_30k_random.yaml", "cityscapes_R_50_FCN_90k_random.yaml"):
        assert find_expected(entries, yaml.safe_load(_load(name).dump())) == []


def test_the_evaluator_scores_the_labels_100_and_all_background_by_hand(tmp_path):
    from transfer.datasets.register import register_datasets

    images, labels = _write_sem_seg(tmp_path, 2, seed=3)
    cfg = _load("instant_test_voc_R_50_FCN.yaml")
    cfg.MOCO.DATASETS.SEM_SEG = [("sem_seg_oracle", str(images), str(labels), "")]
    cfg.MOCO.DATASETS.SEM_SEG_CLASSES = ["background", "square", "bar"]
    cfg.OUTPUT_DIR = str(tmp_path / "out")
    register_datasets(cfg)
    truth = {p.name: np.array(Image.open(p), dtype=np.int64) for p in sorted(labels.glob("*.png"))}
    inputs = [{"file_name": str(images / name)} for name in truth]

    def score(predict) -> dict:
        evaluator = Trainer.build_evaluator(cfg, "sem_seg_oracle")
        evaluator.reset()
        for item, label in zip(inputs, truth.values(), strict=True):
            classes = torch.from_numpy(predict(label))
            evaluator.process([item], [{"sem_seg": F.one_hot(classes, 3).permute(2, 0, 1).float()}])
        return evaluator.evaluate()["sem_seg"]

    perfect = score(lambda label: np.where(label == 255, 0, label))
    assert (perfect["mIoU"], perfect["pACC"]) == (100.0, 100.0)
    background = score(np.zeros_like)
    scored = np.concatenate([label[label != 255] for label in truth.values()])
    assert background["IoU-background"] == pytest.approx(100 * np.mean(scored == 0))
    assert background["mIoU"] == pytest.approx(100 * np.mean(scored == 0) / 3)


def test_bad_head_features_and_scale_range_are_one_clear_line():
    cfg = _load("voc_R_50_FCN_30k.yaml")
    cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES = ["res4", "res5"]
    message = (
        "MODEL.SEM_SEG_HEAD.IN_FEATURES must name one feature for FCNHead, got ['res4', 'res5']"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        FCNHead.from_config(cfg, {"res5": ShapeSpec(channels=4, stride=16)})
    with pytest.raises(ValueError, match=re.escape("0 < min <= max, got (2.0, 0.5)")):
        RandomScale(2.0, 0.5)
    cfg.INPUT.RANDOM_SCALE = (0.5,)
    with pytest.raises(
        ValueError, match=re.escape("INPUT.RANDOM_SCALE must be (min, max), got (0.5,)")
    ):
        train_augmentations(cfg)
