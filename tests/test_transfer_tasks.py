"""The MoCo paper's other detectron2 transfer tasks (He et al., CVPR 2020, Table 6): Cityscapes
instance segmentation, LVIS and COCO keypoints, each a family of four rows that differ only in
the initialisation; the models they build; their 2-iteration CPU runs on tiny COCO-format data.
"""

from __future__ import annotations

import json
from functools import reduce
from pathlib import Path
from typing import Any

import pytest
import yaml

pytest.importorskip("detectron2")

import torch  # noqa: E402
from detectron2.config import CfgNode, get_cfg  # noqa: E402
from detectron2.layers import FrozenBatchNorm2d  # noqa: E402
from fvcore.nn.precise_bn import get_bn_modules  # noqa: E402
from torch import nn  # noqa: E402

from moco_pretrain.comparison import find_expected, load_expected  # noqa: E402
from moco_pretrain.config import flatten_config
from moco_pretrain.recipes import config_root  # noqa: E402
from tests.test_detectron2_train import (  # noqa: E402
    check_coco_ap,
    predicted_images,
    write_coco,
)
from transfer import add_moco_config  # noqa: E402
from transfer.train_net import Trainer, main  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "detection"
SUFFIXES = ("", "_moco", "_tvsup", "_random")
INIT = {"": "supervised", "_moco": "moco", "_tvsup": "supervised-tv", "_random": "random"}
MSRA = "detectron2://ImageNetPretrained/MSRA/R-50.pkl"
# the keys a torchvision-style backbone (moco, tvsup, random) changes against detectron2's MSRA one
INPUT_KEYS = {
    "MODEL.PIXEL_MEAN", "MODEL.PIXEL_STD", "MODEL.RESNETS.STRIDE_IN_1X1", "INPUT.FORMAT",
}  # fmt: skip

# What every row of every family sets: the paper's FPN protocol, an 8-GPU schedule.
PROTOCOL = {
    "MODEL.META_ARCHITECTURE": "GeneralizedRCNN",
    "MODEL.RESNETS.DEPTH": 50,
    "MODEL.RESNETS.NORM": "SyncBN",
    "MODEL.FPN.NORM": "SyncBN",
    "MODEL.BACKBONE.FREEZE_AT": 0,
    "TEST.PRECISE_BN.ENABLED": True,
    "SOLVER.REFERENCE_WORLD_SIZE": 8,
}
SYNCBN_HEADS = {  # detectron2's configs/Misc/mask_rcnn_R_50_FPN_3x_syncbn.yaml
    "MODEL.ROI_BOX_HEAD.NAME": "FastRCNNConvFCHead",
    "MODEL.ROI_BOX_HEAD.NUM_CONV": 4,
    "MODEL.ROI_BOX_HEAD.NUM_FC": 1,
    "MODEL.ROI_BOX_HEAD.NORM": "SyncBN",
}
TWO_X = {
    "SOLVER.IMS_PER_BATCH": 16,
    "SOLVER.BASE_LR": 0.02,
    "SOLVER.STEPS": (120000, 160000),
    "SOLVER.MAX_ITER": 180000,
}
COCO_SCALES = (640, 672, 704, 736, 768, 800)


def _lvis(version: str, classes: int) -> dict[str, Any]:
    return {
        "MODEL.MASK_ON": True,
        "MODEL.KEYPOINT_ON": False,
        "MODEL.ROI_HEADS.NUM_CLASSES": classes,
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST": 0.0001,
        "MODEL.ROI_BOX_HEAD.NUM_CONV": 0,
        "MODEL.ROI_BOX_HEAD.NUM_FC": 2,
        "MODEL.ROI_BOX_HEAD.NORM": "",
        "MODEL.ROI_MASK_HEAD.NORM": "",
        "TEST.DETECTIONS_PER_IMAGE": 300,
        "DATALOADER.SAMPLER_TRAIN": "RepeatFactorTrainingSampler",
        "DATALOADER.REPEAT_THRESHOLD": 0.001,
        "INPUT.MIN_SIZE_TRAIN": COCO_SCALES,
        "INPUT.MIN_SIZE_TEST": 800,
        "DATASETS.TRAIN": (f"lvis_{version}_train",),
        "DATASETS.TEST": (f"lvis_{version}_val",),
        **TWO_X,
    }


FAMILIES = {
    "cityscapes_R_50_FPN": {  # detectron2's configs/Cityscapes/mask_rcnn_R_50_FPN.yaml
        "MODEL.MASK_ON": True,
        "MODEL.KEYPOINT_ON": False,
        "MODEL.ROI_HEADS.NUM_CLASSES": 8,
        **SYNCBN_HEADS,
        "MODEL.ROI_MASK_HEAD.NORM": "SyncBN",
        "DATALOADER.SAMPLER_TRAIN": "TrainingSampler",
        "INPUT.MIN_SIZE_TRAIN": tuple(range(800, 1025, 32)),
        "INPUT.MIN_SIZE_TRAIN_SAMPLING": "choice",
        "INPUT.MAX_SIZE_TRAIN": 2048,
        "INPUT.MIN_SIZE_TEST": 1024,
        "INPUT.MAX_SIZE_TEST": 2048,
        "DATASETS.TRAIN": ("cityscapes_fine_instance_seg_train",),
        "DATASETS.TEST": ("cityscapes_fine_instance_seg_val",),
        "SOLVER.IMS_PER_BATCH": 8,
        "SOLVER.BASE_LR": 0.01,
        "SOLVER.STEPS": (18000,),
        "SOLVER.MAX_ITER": 24000,
    },
    "lvis_v0.5_R_50_FPN_2x": _lvis("v0.5", 1230),
    "lvis_v1_R_50_FPN_2x": _lvis("v1", 1203),
    "coco_keypoint_R_50_FPN_2x": {  # detectron2's Base-Keypoint-RCNN-FPN.yaml + SyncBN box head
        "MODEL.MASK_ON": False,
        "MODEL.KEYPOINT_ON": True,
        "MODEL.ROI_HEADS.NUM_CLASSES": 1,
        "MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS": 17,
        **SYNCBN_HEADS,
        "MODEL.ROI_BOX_HEAD.SMOOTH_L1_BETA": 0.5,
        "MODEL.RPN.POST_NMS_TOPK_TRAIN": 1500,
        "DATALOADER.SAMPLER_TRAIN": "TrainingSampler",
        "INPUT.MIN_SIZE_TRAIN": COCO_SCALES,
        "INPUT.MIN_SIZE_TEST": 800,
        "DATASETS.TRAIN": ("keypoints_coco_2017_train",),
        "DATASETS.TEST": ("keypoints_coco_2017_val",),
        **TWO_X,
        "SOLVER.WARMUP_METHOD": "linear",  # detectron2's warm-up, kept
        "SOLVER.WARMUP_FACTOR": 0.001,
        "SOLVER.WARMUP_ITERS": 1000,
    },
}
FROZENBN = "lvis_v0.5_R_50_FPN_2x_frozenbn.yaml"
INSTANT = {  # instant test -> the row it shrinks
    "instant_test_cityscapes_R_50_FPN.yaml": "cityscapes_R_50_FPN_moco.yaml",
    "instant_test_lvis_R_50_FPN.yaml": "lvis_v0.5_R_50_FPN_2x_moco.yaml",
    "instant_test_coco_keypoint_R_50_FPN.yaml": "coco_keypoint_R_50_FPN_2x_moco.yaml",
}
ROWS = [f"{family}{suffix}.yaml" for family in FAMILIES for suffix in SUFFIXES]


def _load(name: str) -> CfgNode:
    cfg = get_cfg()
    add_moco_config(cfg)
    cfg.merge_from_file(str(CONFIGS / name))
    return cfg


def _get(cfg: CfgNode, dotted: str) -> Any:
    return reduce(getattr, dotted.split("."), cfg)


def differing_keys(a: CfgNode, b: CfgNode) -> set[str]:
    """The dotted keys whose values differ between two configs (as recorded: through yaml)."""
    fa, fb = (flatten_config(yaml.safe_load(cfg.dump())) for cfg in (a, b))
    return {key for key in fa.keys() | fb.keys() if fa.get(key) != fb.get(key)}


def test_the_new_files_exist_and_the_readme_names_each():
    new = sorted([*ROWS, FROZENBN, *INSTANT])
    assert sorted(p.name for p in CONFIGS.glob("*.yaml") if p.name in new) == new
    readme = (CONFIGS / "README.md").read_text()
    assert [name for name in new if name not in readme] == []
    assert "### Why facebookresearch/moco#23 diverged" in readme


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("family", FAMILIES)
def test_every_row_has_its_task_data_and_schedule(family, suffix):
    cfg = _load(f"{family}{suffix}.yaml")
    expected = {**PROTOCOL, **FAMILIES[family]}
    assert {key: _get(cfg, key) for key in expected} == expected


@pytest.mark.parametrize("family", FAMILIES)
def test_the_four_rows_differ_only_in_the_initialisation(family):
    rows = {suffix: _load(f"{family}{suffix}.yaml") for suffix in SUFFIXES}
    assert {suffix: cfg.MOCO.INIT for suffix, cfg in rows.items()} == INIT
    assert [cfg.MODEL.WEIGHTS for cfg in rows.values()] == [MSRA, "", "", ""]
    assert [cfg.MOCO.CHECK_BACKBONE_WEIGHTS for cfg in rows.values()] == [True, True, True, False]
    assert rows[""].INPUT.FORMAT == "BGR" and rows[""].MODEL.RESNETS.STRIDE_IN_1X1
    assert rows["_moco"].INPUT.FORMAT == "RGB" and not rows["_moco"].MODEL.RESNETS.STRIDE_IN_1X1
    supervised_vs = INPUT_KEYS | {"MODEL.WEIGHTS", "MOCO.INIT"}
    assert differing_keys(rows[""], rows["_moco"]) == supervised_vs
    assert differing_keys(rows[""], rows["_tvsup"]) == supervised_vs
    assert differing_keys(rows[""], rows["_random"]) == supervised_vs | {
        "MOCO.CHECK_BACKBONE_WEIGHTS"
    }
    assert differing_keys(rows["_moco"], rows["_tvsup"]) == {"MOCO.INIT"}
    assert differing_keys(rows["_moco"], rows["_random"]) == {
        "MOCO.INIT",
        "MOCO.CHECK_BACKBONE_WEIGHTS",
    }


def test_lvis_versions_differ_in_classes_and_data_and_frozenbn_only_in_the_norms():
    v05, v1 = _load("lvis_v0.5_R_50_FPN_2x.yaml"), _load("lvis_v1_R_50_FPN_2x.yaml")
    assert differing_keys(v05, v1) == {
        "MODEL.ROI_HEADS.NUM_CLASSES",
        "DATASETS.TRAIN",
        "DATASETS.TEST",
    }
    frozen = _load(FROZENBN)
    assert differing_keys(v05, frozen) == {"MODEL.RESNETS.NORM", "MODEL.FPN.NORM"}
    assert (frozen.MODEL.RESNETS.NORM, frozen.MODEL.FPN.NORM) == ("FrozenBN", "")
    assert (frozen.MOCO.INIT, frozen.MODEL.WEIGHTS) == ("supervised", MSRA)


def _norms(module: nn.Module) -> list[str]:
    kinds = (nn.BatchNorm2d, nn.SyncBatchNorm, FrozenBatchNorm2d, nn.GroupNorm)
    return [type(m).__name__ for m in module.modules() if isinstance(m, kinds)]


# R50: stem 1 + 16 bottlenecks x 3 + 4 shortcuts = 53 norms; FPN: 4 lateral + 4 output convs.
R50_NORMS, FPN_NORMS = 53, 8


@pytest.mark.parametrize(
    ("name", "classes", "backbone_norm", "fpn_norms", "head_norms"),
    [
        ("cityscapes_R_50_FPN.yaml", 8, "SyncBatchNorm", FPN_NORMS, 4),
        ("lvis_v0.5_R_50_FPN_2x.yaml", 1230, "SyncBatchNorm", FPN_NORMS, 0),
        ("lvis_v1_R_50_FPN_2x.yaml", 1203, "SyncBatchNorm", FPN_NORMS, 0),
        (FROZENBN, 1230, "FrozenBatchNorm2d", 0, 0),
        ("coco_keypoint_R_50_FPN_2x.yaml", 1, "SyncBatchNorm", FPN_NORMS, 4),
    ],
)
def test_each_architecture_builds_as_configured(
    name, classes, backbone_norm, fpn_norms, head_norms
):
    """One build per architecture: the rows of a family share it (the test above)."""
    cfg = _load(name)
    cfg.MODEL.DEVICE = "cpu"
    model = Trainer.build_model(cfg)
    bottom_up, heads = model.backbone.bottom_up, model.roi_heads
    assert _norms(bottom_up) == [backbone_norm] * R50_NORMS
    assert _norms(model.backbone) == _norms(bottom_up) + ["SyncBatchNorm"] * fpn_norms
    assert all(p.requires_grad for p in model.parameters())  # nothing frozen (FREEZE_AT 0)
    # class-specific boxes: scores for classes + background, 4 deltas per class
    predictor = heads.box_predictor
    assert (predictor.cls_score.out_features, predictor.bbox_pred.out_features) == (
        classes + 1, 4 * classes,
    )  # fmt: skip
    assert _norms(heads.box_head) == ["SyncBatchNorm"] * head_norms
    assert len(heads.box_head.conv_norm_relus) == (4 if head_norms else 0)
    assert len(heads.box_head.fcs) == (1 if head_norms else 2)
    if name.startswith("coco_keypoint"):
        assert (heads.mask_on, heads.keypoint_on) == (False, True)
        assert heads.keypoint_head.score_lowres.out_channels == 17
        assert model.proposal_generator.post_nms_topk[True] == 1500  # per image, training
        assert predictor.smooth_l1_beta == 0.5
    else:
        assert (heads.mask_on, heads.keypoint_on) == (True, False)
        assert heads.mask_head.predictor.out_channels == classes
        assert _norms(heads.mask_head) == ["SyncBatchNorm"] * head_norms
    if name.startswith("lvis"):
        assert (predictor.test_score_thresh, predictor.test_topk_per_image) == (0.0001, 300)
    if name == FROZENBN:  # no BN left: precise BN has nothing to recompute
        assert get_bn_modules(model) == []


@pytest.mark.parametrize("name", INSTANT)
def test_instant_tests_shrink_the_moco_row_and_nothing_else(name):
    instant, row = _load(name), _load(INSTANT[name])
    shrunk = {
        "MODEL.DEVICE", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "MODEL.RPN.POST_NMS_TOPK_TEST",
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "INPUT.MIN_SIZE_TRAIN", "INPUT.MAX_SIZE_TRAIN",
        "INPUT.MIN_SIZE_TEST", "INPUT.MAX_SIZE_TEST", "DATASETS.TRAIN", "DATASETS.TEST",
        "DATALOADER.NUM_WORKERS", "TEST.PRECISE_BN.NUM_ITER", "SOLVER.REFERENCE_WORLD_SIZE",
        "SOLVER.IMS_PER_BATCH", "SOLVER.BASE_LR", "SOLVER.STEPS", "SOLVER.MAX_ITER",
        "SOLVER.WARMUP_ITERS", "SOLVER.CHECKPOINT_PERIOD",
    }  # fmt: skip
    if "keypoint" in name:
        shrunk |= {"MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS", "TEST.KEYPOINT_OKS_SIGMAS"}
        assert instant.MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS == 4
        assert instant.TEST.KEYPOINT_OKS_SIGMAS == [0.079] * 4
    assert differing_keys(row, instant) == shrunk
    assert (instant.MODEL.DEVICE, instant.SOLVER.MAX_ITER, instant.SOLVER.REFERENCE_WORLD_SIZE) == (
        "cpu", 2, 0,
    )  # fmt: skip
    assert instant.INPUT.MIN_SIZE_TRAIN == (96,) and instant.INPUT.MAX_SIZE_TEST == 128
    assert all(d.startswith("moco_tiny_") for d in instant.DATASETS.TRAIN + instant.DATASETS.TEST)


EXPECTED_ENTRY = {  # config -> the name of its one entry in configs/expected.yaml (None: no entry)
    "cityscapes_R_50_FPN.yaml": "Cityscapes instance segmentation, Mask R-CNN R50-FPN: ImageNet-1M supervised",
    "cityscapes_R_50_FPN_moco.yaml": "Cityscapes instance segmentation, Mask R-CNN R50-FPN: MoCo v1, ImageNet-1M",
    "cityscapes_R_50_FPN_random.yaml": "Cityscapes instance segmentation, Mask R-CNN R50-FPN: random init",
    "lvis_v0.5_R_50_FPN_2x.yaml": "LVIS v0.5, Mask R-CNN R50-FPN 2x: ImageNet-1M supervised, BN tuned",
    FROZENBN: "LVIS v0.5, Mask R-CNN R50-FPN 2x: ImageNet-1M supervised, BN frozen",
    "lvis_v0.5_R_50_FPN_2x_moco.yaml": "LVIS v0.5, Mask R-CNN R50-FPN 2x: MoCo v1, ImageNet-1M",
    "lvis_v0.5_R_50_FPN_2x_random.yaml": "LVIS v0.5, Mask R-CNN R50-FPN 2x: random init",
    "coco_keypoint_R_50_FPN_2x.yaml": "COCO keypoints, Keypoint R-CNN R50-FPN 2x: ImageNet-1M supervised",
    "coco_keypoint_R_50_FPN_2x_moco.yaml": "COCO keypoints, Keypoint R-CNN R50-FPN 2x: MoCo v1, ImageNet-1M",
    "coco_keypoint_R_50_FPN_2x_random.yaml": "COCO keypoints, Keypoint R-CNN R50-FPN 2x: random init",
}  # fmt: skip
LVIS_AP = {  # Table 6 and appendix A.4 (means of 5 trials): each BN setting its own number
    "lvis_v0.5_R_50_FPN_2x.yaml": 23.2, FROZENBN: 24.4, "lvis_v0.5_R_50_FPN_2x_moco.yaml": 24.1,
}  # fmt: skip
MOCO_V1 = {"method": "moco_v1", "epochs": 200}  # the paper's MoCo weights, as a .pkl records them


@pytest.mark.parametrize("name", sorted([*ROWS, FROZENBN, *INSTANT]))
def test_each_config_as_recorded_finds_its_table_6_entry(name):
    """tvsup rows, LVIS v1 (the paper used v0.5) and the instant tests have no published number;
    a MoCo row matches only with MoCo v1 200-epoch weights."""
    entries = load_expected(config_root() / "expected.yaml")
    config = yaml.safe_load(_load(name).dump())
    found = find_expected(entries, config, MOCO_V1)
    assert [e.name for e in found] == ([EXPECTED_ENTRY[name]] if name in EXPECTED_ENTRY else [])
    for entry in found:
        assert entry.source.startswith(("MoCo paper, Table 6, ", "MoCo paper, appendix A.4"))
        metric = "keypoints/AP" if "keypoint" in name else "segm/AP"
        assert list(entry.metrics) == [metric] and entry.metrics[metric][1] is None
        if name in LVIS_AP:
            assert (entry.metrics[metric][0], entry.trials) == (LVIS_AP[name], 5)
    if "moco" in name:
        assert find_expected(entries, config, {"method": "moco_v2", "epochs": 200}) == []


# ---- 2-iteration runs on tiny COCO-format data (the LVIS / Cityscapes evaluators need packages
# that are not installed: the tiny datasets are "coco" and get the COCO evaluator) ----

KEYPOINTS = ("top_left", "top_right", "bottom_right", "bottom_left")
FLIP_MAP = (("top_left", "top_right"), ("bottom_left", "bottom_right"))
COCO_BOX = {f"bbox/{m}" for m in ("AP", "AP50", "AP75", "APs", "APm", "APl")}


def write_keypoint_coco(root: Path, split: str, n: int, seed: int) -> tuple[Path, Path]:
    """write_coco's scenes as one class, each object with its box corners as 4 visible keypoints
    in the order of KEYPOINTS."""
    json_file, images_dir = write_coco(root, split, n, seed)
    data = json.loads(json_file.read_text())
    for ann in data["annotations"]:
        x, y, w, h = ann["bbox"]
        corners = ((x, y), (x + w, y), (x + w, y + h), (x, y + h))
        ann["keypoints"] = [v for cx, cy in corners for v in (cx, cy, 2)]  # 2: visible
        ann["num_keypoints"] = len(corners)
        ann["category_id"] = 1
    data["categories"] = [{"id": 1, "name": "shape", "keypoints": list(KEYPOINTS), "skeleton": []}]
    json_file.write_text(json.dumps(data))
    return json_file, images_dir


def _run(tmp_path: Path, config: str, prefix: str, writer, weights: Path, *opts: str) -> dict:
    train = writer(tmp_path / "data", "train", 4, seed=1)
    test = writer(tmp_path / "data", "test", 2, seed=2)
    datasets = f"[('{prefix}_train', '{train[0]}', '{train[1]}'), "
    datasets += f"('{prefix}_test', '{test[0]}', '{test[1]}')]"
    output = tmp_path / "out"
    argv = ["--config-file", f"detection/{config}", "MOCO.DATASETS.COCO", datasets]
    main([*argv, *opts, "MODEL.WEIGHTS", str(weights), "OUTPUT_DIR", str(output)])
    assert predicted_images(output) == {1, 2}  # the test split's 2 images, each predicted on
    results = json.loads((output / "trial_0" / "results.json").read_text())
    results["log"] = (output / "trial_0" / "log.txt").read_text()
    return results


def _per_class(task: str) -> set[str]:
    return {f"{task}/AP-square", f"{task}/AP-bar"}  # write_coco's two classes


def _mask_rcnn_results(tmp_path: Path, config: str, dataset: str, backbone_pkl: Path) -> dict:
    """Train an instant-test Mask R-CNN; check it reports box and mask AP (also per class)."""
    results = _run(
        tmp_path, config, dataset, write_coco, backbone_pkl, "MODEL.ROI_HEADS.NUM_CLASSES", "2"
    )
    metrics = results["metrics"]
    segm = {key.replace("bbox/", "segm/") for key in COCO_BOX}
    assert set(metrics) == COCO_BOX | segm | _per_class("bbox") | _per_class("segm")
    check_coco_ap(metrics, "bbox")
    check_coco_ap(metrics, "segm")
    return results


@pytest.mark.slow
def test_cityscapes_instant_test_trains_with_syncbn_heads_and_evaluates_masks(
    tmp_path, backbone_pkl
):
    results = _mask_rcnn_results(
        tmp_path, "instant_test_cityscapes_R_50_FPN.yaml", "moco_tiny_cityscapes", backbone_pkl
    )
    model = results["config"]["MODEL"]
    assert (model["ROI_BOX_HEAD"]["NORM"], model["ROI_MASK_HEAD"]["NORM"]) == ("SyncBN", "SyncBN")
    assert results["init"] == "moco" and "Using training sampler TrainingSampler" in results["log"]


@pytest.mark.slow
def test_lvis_instant_test_trains_with_the_repeat_factor_sampler(tmp_path, backbone_pkl):
    results = _mask_rcnn_results(
        tmp_path, "instant_test_lvis_R_50_FPN.yaml", "moco_tiny_lvis", backbone_pkl
    )
    # the sampler read the tiny data's category ids (it raises on annotations without them)
    assert "Using training sampler RepeatFactorTrainingSampler" in results["log"]
    assert results["config"]["DATALOADER"]["REPEAT_THRESHOLD"] == 0.001
    assert results["config"]["TEST"]["DETECTIONS_PER_IMAGE"] == 300


@pytest.mark.slow
def test_keypoint_instant_test_trains_and_evaluates_keypoints(tmp_path, backbone_pkl):
    results = _run(
        tmp_path, "instant_test_coco_keypoint_R_50_FPN.yaml", "moco_tiny_keypoints",
        write_keypoint_coco, backbone_pkl,
        "MOCO.DATASETS.KEYPOINT_NAMES", str(list(KEYPOINTS)),
        "MOCO.DATASETS.KEYPOINT_FLIP_MAP", str(list(FLIP_MAP)),
    )  # fmt: skip
    metrics = results["metrics"]
    keypoints = {f"keypoints/{m}" for m in ("AP", "AP50", "AP75", "APm", "APl")}  # no APs
    assert set(metrics) == COCO_BOX | keypoints  # one class: no per-class AP
    check_coco_ap(metrics, "bbox")
    check_coco_ap(metrics, "keypoints")
    model = results["config"]["MODEL"]
    assert (model["KEYPOINT_ON"], model["ROI_KEYPOINT_HEAD"]["NUM_KEYPOINTS"]) == (True, 4)
    assert results["config"]["MOCO"]["DATASETS"]["KEYPOINT_NAMES"] == list(KEYPOINTS)


def test_the_keypoint_evaluator_scores_the_ground_truth_100(tmp_path):
    from detectron2.data import DatasetCatalog
    from detectron2.structures import Boxes, Instances

    from transfer.datasets.register import register_datasets

    json_file, images = write_keypoint_coco(tmp_path, "oracle", 3, seed=4)
    cfg = _load("instant_test_coco_keypoint_R_50_FPN.yaml")
    cfg.MOCO.DATASETS.COCO = [("moco_keypoint_oracle", str(json_file), str(images))]
    cfg.MOCO.DATASETS.KEYPOINT_NAMES, cfg.MOCO.DATASETS.KEYPOINT_FLIP_MAP = KEYPOINTS, FLIP_MAP
    cfg.OUTPUT_DIR = str(tmp_path / "out")
    register_datasets(cfg)
    DatasetCatalog.get("moco_keypoint_oracle")  # loading sets the category-id mapping, as a run
    data = json.loads(json_file.read_text())
    evaluator = Trainer.build_evaluator(cfg, "moco_keypoint_oracle")
    evaluator.reset()
    for image in data["images"]:
        anns = [a for a in data["annotations"] if a["image_id"] == image["id"]]
        predicted = Instances((image["height"], image["width"]))
        predicted.pred_boxes = Boxes(
            torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)])
        )
        predicted.scores = torch.ones(len(anns))
        predicted.pred_classes = torch.zeros(len(anns), dtype=torch.int64)
        points = torch.tensor([a["keypoints"] for a in anns], dtype=torch.float32).view(-1, 4, 3)
        points[..., :2] += 0.5  # detectron2's continuous coordinates; the evaluator subtracts 0.5
        predicted.pred_keypoints = points
        evaluator.process([{"image_id": image["id"]}], [{"instances": predicted}])
    results = evaluator.evaluate()
    assert (results["bbox"]["AP"], results["keypoints"]["AP"]) == (100.0, 100.0)


def test_the_protocol_hash_ignores_where_data_lies_but_not_its_keypoint_labels():
    from transfer.train_net import protocol_of

    def sha(**datasets) -> str:
        cfg = _load("instant_test_coco_keypoint_R_50_FPN.yaml")
        cfg.MOCO.DATASETS.KEYPOINT_NAMES, cfg.MOCO.DATASETS.KEYPOINT_FLIP_MAP = KEYPOINTS, FLIP_MAP
        for key, value in datasets.items():
            cfg.MOCO.DATASETS[key] = value
        return protocol_of(cfg, cfg, weights_sha256="0" * 64)["config_sha256"]

    moved = [("moco_tiny_keypoints_train", "/elsewhere/train.json", "/elsewhere/images")]
    assert sha() == sha(COCO=moved) == sha(SEM_SEG=[("x", "/images", "/labels", "")])
    assert sha() != sha(KEYPOINT_FLIP_MAP=[("top_left", "top_right")])


def test_the_recipe_hash_is_the_protocol_hash_without_the_weights():
    """Two backbones (or inits) on one recipe: one recipe_sha256, two config_sha256; another lr:
    another recipe."""
    from transfer.train_net import protocol_of

    def hashes(weights: str, init: str = "moco", lr: float = 0.02) -> tuple[str, str]:
        cfg = _load("pascal_voc_R_50_C4_24k_moco.yaml")
        cfg.MOCO.INIT, cfg.SOLVER.BASE_LR = init, lr
        cfg.MOCO.CHECK_BACKBONE_WEIGHTS = init != "random"  # as the random-init configs set it
        protocol = protocol_of(cfg, cfg, weights_sha256=weights)
        return protocol["config_sha256"], protocol["recipe_sha256"]

    (config_a, recipe_a), (config_b, recipe_b) = hashes("a" * 64), hashes("b" * 64)
    assert config_a != config_b and recipe_a == recipe_b == hashes("", init="random")[1]
    assert hashes("a" * 64, lr=0.04)[1] != recipe_a
