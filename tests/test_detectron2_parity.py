"""A converted torchvision ResNet-50 computes the same res4/res5 features inside detectron2.

BN in eval mode with non-trivial statistics; the same RGB image, normalised by each side's own
pixel mean/std (the _moco configs' torchvision values). C4: res5 runs inside the ROI head
(``roi_heads.res5``) and is followed by the new, unloaded extra norm. FPN: ``bottom_up``.
"""

from __future__ import annotations

import pytest
import torch
import torchvision

pytest.importorskip("detectron2")

from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.config import get_cfg  # noqa: E402
from detectron2.modeling import build_backbone, build_model  # noqa: E402

from moco_pretrain.recipes import resolve_config_file  # noqa: E402
from moco_pretrain.weights import load_backbone_state_dict  # noqa: E402
from transfer import add_moco_config  # noqa: E402
from transfer.convert import convert_to_detectron2, write_detectron2_pkl  # noqa: E402


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(torchvision ResNet-50 in eval mode with random BN statistics, converted .pkl, image)."""
    torch.manual_seed(0)
    resnet = torchvision.models.resnet50().eval()
    for module in resnet.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    root = tmp_path_factory.mktemp("parity")
    torch.save({"state_dict": resnet.state_dict()}, root / "tv.pth")
    write_detectron2_pkl(
        convert_to_detectron2(load_backbone_state_dict(root / "tv.pth")), root / "tv.pkl"
    )
    image = torch.randint(0, 256, (3, 96, 128)).float()  # RGB, 0..255
    return resnet, root / "tv.pkl", image


def _torchvision_features(resnet, image):
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    x = ((image / 255 - mean) / std)[None]
    with torch.no_grad():
        x = resnet.layer2(resnet.layer1(resnet.maxpool(resnet.relu(resnet.bn1(resnet.conv1(x))))))
        res4 = resnet.layer3(x)
        return res4, resnet.layer4(res4)


def _cfg(name: str, *opts: str):
    cfg = get_cfg()
    add_moco_config(cfg)
    cfg.merge_from_file(str(resolve_config_file(name)))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", *opts])
    return cfg


def _assert_same(ours, theirs):
    """Equal up to float32 summation order: max error below 1e-5 of the feature scale."""
    assert ours.shape == theirs.shape
    error = (ours - theirs).abs().max() / theirs.abs().max()
    assert error < 1e-5, f"relative error {error:.2e}"


def _normalised(model, image):
    return ((image - model.pixel_mean) / model.pixel_std)[None]


def test_c4_res4_and_roi_head_res5_match_torchvision(reference):
    resnet, pkl, image = reference
    model = build_model(_cfg("detection/pascal_voc_R_50_C4_24k_moco.yaml")).eval()
    DetectionCheckpointer(model).load(str(pkl))
    with torch.no_grad():
        res4 = model.backbone(_normalised(model, image))["res4"]
        *blocks, extra_norm = model.roi_heads.res5  # the extra norm is new: identity statistics
        res5 = torch.nn.Sequential(*blocks)(res4)
    tv_res4, tv_res5 = _torchvision_features(resnet, image)
    assert res4.shape == tv_res4.shape == (1, 1024, 6, 8) and res5.shape == (1, 2048, 3, 4)
    _assert_same(res4, tv_res4)
    _assert_same(res5, tv_res5)
    assert isinstance(extra_norm, torch.nn.modules.batchnorm._BatchNorm)
    assert torch.equal(extra_norm.weight, torch.ones(2048))


def test_fpn_bottom_up_res4_res5_match_torchvision(reference):
    resnet, pkl, image = reference
    backbone = build_backbone(_cfg("detection/coco_R_50_FPN_1x_moco.yaml")).eval()
    DetectionCheckpointer(backbone).load(str(pkl))
    mean = torch.tensor([123.675, 116.280, 103.530])[:, None, None]
    std = torch.tensor([58.395, 57.120, 57.375])[:, None, None]
    with torch.no_grad():
        features = backbone.bottom_up(((image - mean) / std)[None])
    tv_res4, tv_res5 = _torchvision_features(resnet, image)
    _assert_same(features["res4"], tv_res4)
    _assert_same(features["res5"], tv_res5)
