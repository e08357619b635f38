"""Every detection YAML loads after ``add_moco_config``; dataset registration; evaluator choice."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("detectron2")

from detectron2.config import get_cfg  # noqa: E402
from detectron2.data import MetadataCatalog  # noqa: E402
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY  # noqa: E402

from transfer import add_moco_config  # noqa: E402
from transfer.config import INITS  # noqa: E402
from transfer.datasets.register import register_datasets  # noqa: E402
from transfer.train_net import Trainer  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "detection"
YAMLS = sorted(p.name for p in CONFIGS.glob("*.yaml"))
STUDIES = [n for n in YAMLS if n.startswith("deepforest_")]  # tools/deepforest_study.py
SCENES = [n for n in YAMLS if n.startswith("fashion_scenes_")]  # moco-benchmark
ANY_DATASET = ["coco_format_R_FPN_pretrained.yaml", "coco_format_R_FPN_random.yaml"]  # --dataset
FROZENBN = "lvis_v0.5_R_50_FPN_2x_frozenbn.yaml"  # a fifth LVIS row (tests/test_transfer_tasks.py)
ROWS = [
    n
    for n in YAMLS
    if not n.startswith(("Base-", "instant_test", "deepforest_", "fashion_scenes_"))
    and n not in (FROZENBN, *ANY_DATASET)
]
TORCHVISION_MEAN = [123.675, 116.280, 103.530]
BENCHMARKS = {"pascal_voc_R_50_C4_24k"} | {
    f"coco_R_50_{m}_{s}" for m in ("C4", "FPN") for s in ("1x", "2x")
}
BENCHMARKS |= {  # the paper's Table 6
    "cityscapes_R_50_FPN", "coco_keypoint_R_50_FPN_2x", "lvis_v0.5_R_50_FPN_2x", "lvis_v1_R_50_FPN_2x"
}  # fmt: skip
SUFFIX = {"supervised": "", "supervised-tv": "_tvsup", "moco": "_moco", "random": "_random"}


def _load(name: str):
    cfg = get_cfg()
    add_moco_config(cfg)
    add_moco_config(cfg)  # a second call is a no-op
    cfg.merge_from_file(str(CONFIGS / name))
    return cfg


def test_there_are_four_inits_per_benchmark():
    # 4 rows per benchmark, 2 bases, 5 instant tests, the frozen-BN LVIS row
    extra = len(STUDIES) + len(SCENES) + len(ANY_DATASET)
    assert len(YAMLS) == 4 * len(BENCHMARKS) + 2 + 5 + 1 + extra
    assert set(ROWS) == {f"{b}{s}.yaml" for b in BENCHMARKS for s in SUFFIX.values()}


@pytest.mark.parametrize("name", YAMLS)
def test_every_yaml_loads_with_the_plugin(name):
    cfg = _load(name)
    assert cfg.MOCO.INIT in INITS
    assert cfg.MODEL.RESNETS.NORM == ("FrozenBN" if name == FROZENBN else "SyncBN")
    assert cfg.MODEL.BACKBONE.FREEZE_AT == 0
    assert cfg.TEST.PRECISE_BN.ENABLED
    if "C4" in name:
        assert cfg.MODEL.ROI_HEADS.NAME == "Res5ROIHeadsExtraNorm"
        assert "Res5ROIHeadsExtraNorm" in ROI_HEADS_REGISTRY
    if "FPN" in name:
        assert cfg.MODEL.FPN.NORM == ("" if name == FROZENBN else "SyncBN")
    if name.startswith("coco_R_"):
        assert cfg.MODEL.MASK_ON and cfg.DATASETS.TEST == ("coco_2017_val",)
        assert cfg.SOLVER.MAX_ITER == (90000 if "_1x" in name else 180000)
    if name.startswith("pascal_voc"):
        assert cfg.MODEL.ROI_HEADS.NUM_CLASSES == 20 and not cfg.MODEL.MASK_ON
        assert cfg.DATASETS.TRAIN == ("voc_2007_trainval", "voc_2012_trainval")
        assert (cfg.SOLVER.MAX_ITER, cfg.SOLVER.STEPS) == (24000, (18000, 22000))


@pytest.mark.parametrize("name", ROWS)
def test_initialisation_rows(name):
    cfg = _load(name)
    init = cfg.MOCO.INIT
    benchmark = name.removesuffix(".yaml").removesuffix(SUFFIX[init])
    assert benchmark + SUFFIX[init] + ".yaml" == name and benchmark in BENCHMARKS
    if init == "supervised":  # detectron2's MSRA weights: BGR, Caffe statistics, stride in 1x1
        assert cfg.MODEL.WEIGHTS == "detectron2://ImageNetPretrained/MSRA/R-50.pkl"
        assert cfg.INPUT.FORMAT == "BGR" and cfg.MODEL.RESNETS.STRIDE_IN_1X1
        assert cfg.MOCO.CHECK_BACKBONE_WEIGHTS
        return
    # torchvision-style backbones (moco, tvsup, random): RGB, torchvision statistics, stride in 3x3
    assert cfg.INPUT.FORMAT == "RGB" and cfg.MODEL.PIXEL_MEAN == TORCHVISION_MEAN
    assert not cfg.MODEL.RESNETS.STRIDE_IN_1X1
    assert cfg.MODEL.WEIGHTS == ""  # no placeholder: the converted .pkl is given explicitly
    assert cfg.MOCO.CHECK_BACKBONE_WEIGHTS == (init != "random")
    # same schedule and data as the supervised row of the benchmark
    supervised = _load(benchmark + ".yaml")
    for key in ("MAX_ITER", "STEPS", "BASE_LR", "IMS_PER_BATCH"):
        assert cfg.SOLVER[key] == supervised.SOLVER[key]
    assert cfg.DATASETS == supervised.DATASETS


def test_readme_gives_a_command_for_every_row():
    readme = (CONFIGS / "README.md").read_text()
    missing = [
        n
        for n in ROWS + STUDIES + SCENES + [n for n in YAMLS if n.startswith("instant")]
        if n not in readme
    ]
    assert not missing


def test_deepforest_rows_differ_only_in_the_initialisation():
    assert STUDIES == ["deepforest_R_50_C4_moco.yaml", "deepforest_R_50_C4_random.yaml"]
    moco, random = (_load(n) for n in STUDIES)
    assert (moco.MOCO.INIT, random.MOCO.INIT) == ("moco", "random")
    assert moco.MOCO.CHECK_BACKBONE_WEIGHTS and not random.MOCO.CHECK_BACKBONE_WEIGHTS
    assert moco.MODEL.WEIGHTS == random.MODEL.WEIGHTS == ""  # the study passes the .pkl
    for cfg in (moco, random):
        cfg.MOCO.INIT = "moco"
        cfg.MOCO.CHECK_BACKBONE_WEIGHTS = True
    assert moco.dump() == random.dump()
    assert moco.MODEL.ROI_HEADS.NUM_CLASSES == 1 and moco.MOCO.DATASETS.VOC_CLASSES == ["tree"]
    assert moco.DATASETS.TRAIN == ("deepforest_train",) and moco.DATASETS.TEST == (
        "deepforest_test",
    )
    assert [name for name, _, _ in moco.MOCO.DATASETS.VOC] == [
        "deepforest_train",
        "deepforest_test",
    ]


def test_dataset_registration_is_idempotent_and_checks_paths(tmp_path):
    for sub in ("a", "b"):
        (tmp_path / sub / "Annotations").mkdir(parents=True)
        (tmp_path / sub / "ImageSets" / "Main").mkdir(parents=True)
        (tmp_path / sub / "ImageSets" / "Main" / "val.txt").write_text("")
    cfg = _load("instant_test_voc_R_50_C4.yaml")
    cfg.MOCO.DATASETS.VOC = [("cfg_test_voc", str(tmp_path / "a"), "val")]
    assert register_datasets(cfg) == register_datasets(cfg) == ["cfg_test_voc"]
    meta = MetadataCatalog.get("cfg_test_voc")
    assert (meta.evaluator_type, meta.year, len(meta.thing_classes)) == ("pascal_voc", 2007, 20)
    assert type(Trainer.build_evaluator(cfg, "cfg_test_voc")).__name__ == (
        "PascalVOCDetectionEvaluator"
    )

    cfg.MOCO.DATASETS.VOC = [("cfg_test_voc", str(tmp_path / "b"), "val")]
    with pytest.raises(ValueError, match="'cfg_test_voc' is already registered with other data"):
        register_datasets(cfg)
    cfg.MOCO.DATASETS.VOC = []
    cfg.MOCO.DATASETS.COCO = [("cfg_test_coco", str(tmp_path / "x.json"), str(tmp_path))]
    with pytest.raises(FileNotFoundError, match=r"'cfg_test_coco': .*x.json not found"):
        register_datasets(cfg)
    MetadataCatalog.get("cfg_test_untyped").set(thing_classes=["x"])
    with pytest.raises(ValueError, match="'cfg_test_untyped' has evaluator_type None"):
        Trainer.build_evaluator(cfg, "cfg_test_untyped")


def test_scene_rows_differ_only_in_the_initialisation_and_match_the_pretraining_input():
    from moco_pretrain.config import setup_cfg

    rows = [f"fashion_scenes_R_18_FPN_{s}.yaml" for s in ("moco", "random", "sup")]
    keypoint_rows = [
        f"fashion_scenes_R_18_FPN_keypoint_{s}.yaml" for s in ("moco", "random", "sup")
    ]
    assert SCENES == sorted(rows + keypoint_rows)
    moco, random, sup = (_load(n) for n in rows)
    # the keypoint variant: the same recipe with a keypoint head instead of the mask head
    keypoint = [_load(n) for n in keypoint_rows]
    for detection, cfg in zip((moco, random, sup), keypoint, strict=True):
        assert (cfg.MODEL.KEYPOINT_ON, cfg.MODEL.MASK_ON) == (True, False)
        assert cfg.MODEL.ROI_KEYPOINT_HEAD.NUM_KEYPOINTS == len(cfg.TEST.KEYPOINT_OKS_SIGMAS) == 4
        assert cfg.DATASETS.TEST == ("fashion_scenes_keypoints_test",)
        assert cfg.MOCO.PRIMARY_METRIC == "keypoints/AP"
        cfg.MOCO.PRIMARY_METRIC = detection.MOCO.PRIMARY_METRIC
        for key in ("KEYPOINT_ON", "MASK_ON", "ROI_KEYPOINT_HEAD"):
            cfg.MODEL[key] = detection.MODEL[key]
        cfg.DATASETS, cfg.TEST.KEYPOINT_OKS_SIGMAS = (
            detection.DATASETS,
            detection.TEST.KEYPOINT_OKS_SIGMAS,
        )
        assert cfg == detection
    assert (moco.MOCO.INIT, random.MOCO.INIT, sup.MOCO.INIT) == ("moco", "random", "supervised")
    assert [c.MOCO.CHECK_BACKBONE_WEIGHTS for c in (moco, random, sup)] == [True, False, True]
    for cfg in (random, sup):
        cfg.MOCO.INIT, cfg.MOCO.CHECK_BACKBONE_WEIGHTS = moco.MOCO.INIT, True
        assert cfg == moco
    for recipe in ("pretrain/fashion_mnist_demo.yaml", "supervised/fashion_mnist.yaml"):
        data = setup_cfg(recipe, []).DATA
        assert moco.MODEL.PIXEL_MEAN == pytest.approx([255 * m for m in data.MEAN], abs=0.01)
        assert moco.MODEL.PIXEL_STD == pytest.approx([255 * s for s in data.STD], abs=0.01)
    assert (moco.MODEL.RESNETS.DEPTH, moco.MODEL.MASK_ON, moco.INPUT.MASK_FORMAT) == (
        18, True, "bitmask",
    )  # fmt: skip


def test_a_converted_resnet18_fills_every_backbone_tensor_of_the_scene_model(tmp_path):
    import torch
    import torchvision
    from detectron2.checkpoint import DetectionCheckpointer

    from moco_pretrain.weights import load_backbone_state_dict
    from transfer.convert import convert_to_detectron2, write_detectron2_pkl
    from transfer.preflight import load_verified

    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pth")
    weights = tmp_path / "r18.pkl"
    converted = convert_to_detectron2(
        load_backbone_state_dict(tmp_path / "r18.pth"), arch="resnet18"
    )
    write_detectron2_pkl(converted, weights)
    cfg = _load("fashion_scenes_R_18_FPN_moco.yaml")
    model = Trainer.build_model(cfg)
    load_verified(
        model, lambda: DetectionCheckpointer(model).load(str(weights)), weights=str(weights)
    )
    stem = model.backbone.bottom_up.stem.conv1.weight
    assert torch.equal(stem, torch.from_numpy(converted["model"]["stem.conv1.weight"]))
