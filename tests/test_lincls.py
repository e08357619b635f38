"""Linear classification on frozen features: protocol, sanity check, checkpoint layouts, a tiny run."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json

import pytest
import torch

from moco_pretrain import lincls
from moco_pretrain.builder import MoCo
from moco_pretrain.checkpoint import load_checkpoint, with_ddp_prefix
from moco_pretrain.cli.lincls import main
from moco_pretrain.config import setup_cfg
from moco_pretrain.evaluation import build_frozen_backbone, classification_step, load_pretrained
from moco_pretrain.lincls import (
    FrozenBackboneError,
    build_linear_classifier,
    check_backbone_unchanged,
    run_lincls,
)
from moco_pretrain.models import build_resnet
from moco_pretrain.recipes import config_root
from moco_pretrain.schedules import lr_at_epoch, scaled_lr
from moco_pretrain.weights import CheckpointLayoutError

from .conftest import write_image_folder
from .distributed_utils import run_on_gloo

ARCH = "resnet18"


def _cfg(*opts: str, config_file: str | None = None):
    return setup_cfg(config_file, ["MODEL.ARCH", ARCH, *opts])


def _torchvision_state(*, small_stem: bool = False) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = build_resnet(ARCH, num_classes=10, small_stem=small_stem)
    with torch.no_grad():  # non-trivial BN statistics, so a reset would be noticed
        for name, buf in model.named_buffers():
            if name.endswith("running_mean"):
                buf.normal_()
            elif name.endswith("running_var"):
                buf.uniform_(0.5, 2.0)
    return model.state_dict()


def _backbone(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if not k.startswith("fc.")}


def _moco_checkpoint(*, mlp: bool, seed: int = 0) -> dict:
    """Our pretraining checkpoint layout (the official one): module.encoder_q/k, queue."""
    torch.manual_seed(seed)
    moco = MoCo(functools.partial(build_resnet, ARCH), dim=16, K=32, mlp=mlp)
    return {"epoch": 3, "arch": ARCH, "state_dict": with_ddp_prefix(moco.state_dict())}


def _layouts() -> dict[str, tuple[dict, dict[str, torch.Tensor], str | None]]:
    """layout -> (file content, expected backbone, prefix argument)."""
    tv = _torchvision_state()
    v1, v2 = _moco_checkpoint(mlp=False), _moco_checkpoint(mlp=True)

    def encoder_q(ckpt: dict) -> dict[str, torch.Tensor]:
        q = {k.removeprefix("module.encoder_q."): v for k, v in ckpt["state_dict"].items()}
        return {k: v for k, v in q.items() if k.startswith(("conv1", "bn1", "layer"))}

    v3 = {f"module.base_encoder.{k}": v for k, v in tv.items()}  # fc: the v3 projection head
    v3 |= {f"module.momentum_encoder.{k}": v for k, v in tv.items()}
    v3["module.predictor.0.weight"] = torch.zeros(4, 4)
    custom = {f"student.backbone.{k}": v for k, v in tv.items()} | {"teacher.w": torch.ones(1)}
    return {
        "moco_v1": (v1, encoder_q(v1), None),
        "moco_v2": (v2, encoder_q(v2), None),
        "moco_v3": ({"epoch": 100, "arch": ARCH, "state_dict": v3}, _backbone(tv), None),
        "torchvision": (tv, _backbone(tv), None),
        "prefix": ({"model": custom}, _backbone(tv), "student.backbone."),
    }


@pytest.mark.parametrize("layout", ["moco_v1", "moco_v2", "moco_v3", "torchvision", "prefix"])
def test_loads_every_supported_layout(tmp_path, layout):
    content, expected, prefix = _layouts()[layout]
    path = tmp_path / "ckpt.pth.tar"
    torch.save(content, path)
    weights = load_pretrained(_cfg(), path, prefix=prefix)
    assert weights.layout == layout
    assert weights.meta["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()

    model = build_linear_classifier(_cfg(), weights, num_classes=7)
    state = model.state_dict()
    assert set(_backbone(state)) == set(expected)
    assert all(torch.equal(state[k], v) for k, v in expected.items())
    backbone = build_frozen_backbone(_cfg(), weights)
    assert not backbone.training and not any(p.requires_grad for p in backbone.parameters())
    assert all(torch.equal(backbone.state_dict()[k], v) for k, v in expected.items())


def test_unreadable_checkpoint_raises_the_shared_loader_error(tmp_path):
    path = tmp_path / "broken.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointLayoutError, match="broken.pth: "):
        load_pretrained(_cfg(), path)
    torch.save({"state_dict": {"head.weight": torch.ones(1)}}, path)
    with pytest.raises(CheckpointLayoutError, match="unknown checkpoint layout"):
        load_pretrained(_cfg(), path)


def test_classifier_follows_the_protocol(tmp_path):
    path = tmp_path / "tv.pth"
    torch.save(_torchvision_state(), path)
    model = build_linear_classifier(_cfg(), load_pretrained(_cfg(), path), num_classes=1000)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["fc.weight", "fc.bias"]
    assert model.fc.weight.std().item() == pytest.approx(0.01, rel=0.02)  # N(0, 0.01): 512k draws
    assert abs(model.fc.weight.mean().item()) < 1e-4
    assert torch.equal(model.fc.bias, torch.zeros(1000))


def test_mismatched_checkpoint_raises(tmp_path):
    path = tmp_path / "tv.pth"
    torch.save(_torchvision_state(), path)
    weights = load_pretrained(_cfg(), path)
    with pytest.raises(ValueError, match="check MODEL.ARCH and MODEL.SMALL_STEM"):
        build_linear_classifier(_cfg("MODEL.SMALL_STEM", "True"), weights, num_classes=3)
    torch.save(_torchvision_state(small_stem=True), path)
    small = build_frozen_backbone(_cfg("MODEL.SMALL_STEM", "True"), load_pretrained(_cfg(), path))
    assert small.conv1.kernel_size == (3, 3)
    with pytest.raises(ValueError, match="missing"):
        build_linear_classifier(setup_cfg(None, ["MODEL.ARCH", "resnet34"]), weights, num_classes=3)
    moco = tmp_path / "moco.pth.tar"
    torch.save(_moco_checkpoint(mlp=True), moco)
    with pytest.raises(ValueError, match="holds a resnet18 backbone but MODEL.ARCH is resnet50"):
        load_pretrained(setup_cfg(None, []), moco)


def _trained_classifier(tmp_path, *, train_mode: bool) -> tuple[torch.nn.Module, dict]:
    path = tmp_path / "tv.pth"
    torch.save(_torchvision_state(), path)
    weights = load_pretrained(_cfg(), path)
    reference = {k: v.clone() for k, v in weights.state_dict.items()}
    model = build_linear_classifier(_cfg(), weights, num_classes=3)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=30.0)
    model.train(train_mode)
    for _ in range(2):
        batch = (torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0]))
        loss, _ = classification_step(model, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model, reference


def test_frozen_backbone_stays_frozen_in_eval_mode(tmp_path):
    model, reference = _trained_classifier(tmp_path, train_mode=False)
    assert model.fc.weight.grad.abs().sum() > 0  # the head did train
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("fc."))
    check_backbone_unchanged(model, reference)  # passes: parameters and BN statistics intact


def test_sanity_check_catches_bn_statistics_in_train_mode(tmp_path):
    model, reference = _trained_classifier(tmp_path, train_mode=True)
    with pytest.raises(FrozenBackboneError, match=r"tensors differ .*'bn1.running_mean'"):
        check_backbone_unchanged(model, reference)


def test_sanity_check_catches_a_changed_weight(tmp_path):
    model, reference = _trained_classifier(tmp_path, train_mode=False)
    with torch.no_grad():
        model.layer4[1].conv2.weight[0, 0, 0, 0] += 1e-6
    with pytest.raises(
        FrozenBackboneError, match=r"1 tensors differ .*\['layer4.1.conv2.weight'\]"
    ):
        check_backbone_unchanged(model, reference)


def test_protocol_lr_schedule():
    # The official adjust_learning_rate: lr 30, x0.1 at epochs 60 and 80 (epochs 0-based).
    cfg = setup_cfg("lincls/imagenet_r50.yaml", [])
    lr = scaled_lr(cfg.SOLVER.BASE_LR, cfg.SOLVER.BATCH_SIZE)
    schedule = functools.partial(
        lr_at_epoch, lr, schedule=cfg.SOLVER.LR_SCHEDULE, epochs=cfg.SOLVER.EPOCHS,
        steps=cfg.SOLVER.STEPS, gamma=cfg.SOLVER.GAMMA,
    )  # fmt: skip
    expected = {0: 30.0, 59: 30.0, 60: 3.0, 79: 3.0, 80: 0.3, 99: 0.3}
    assert {e: schedule(e) for e in expected} == pytest.approx(expected)
    assert (cfg.SOLVER.EPOCHS, cfg.SOLVER.MOMENTUM, cfg.SOLVER.WEIGHT_DECAY) == (100, 0.9, 0.0)
    assert (cfg.MODEL.ARCH, cfg.DATA.IMAGE_SIZE) == ("resnet50", 224)


@pytest.mark.parametrize(
    "recipe", sorted(p.name for p in (config_root() / "lincls").glob("*.yaml"))
)
def test_every_recipe_keeps_the_protocol_optimizer(recipe):
    cfg = setup_cfg(f"lincls/{recipe}", [])
    assert (cfg.SOLVER.MOMENTUM, cfg.SOLVER.WEIGHT_DECAY) == (0.9, 0.0)
    assert cfg.SOLVER.LR_SCHEDULE == "step"
    assert cfg.SOLVER.STEPS == tuple(round(cfg.SOLVER.EPOCHS * f) for f in (0.6, 0.8))


def test_recipes_load():
    demo = setup_cfg("lincls/fashion_mnist_demo.yaml", [])
    pretrain = setup_cfg("pretrain/fashion_mnist_demo.yaml", [])
    for key in ("ARCH", "SMALL_STEM"):  # the encoder the demo pretrains
        assert demo.MODEL[key] == pretrain.MODEL[key]
    for key in ("NAME", "IMAGE_SIZE", "MEAN", "STD", "TRAIN_SPLIT", "VAL_SPLIT"):
        assert demo.DATA[key] == pretrain.DATA[key]
    assert (demo.SOLVER.MOMENTUM, demo.SOLVER.WEIGHT_DECAY) == (0.9, 0.0)


def _image_folder(root, *, per_class: int = 4) -> None:
    write_image_folder(root, classes=3, per_class=per_class, size=20)


def _tiny_opts(tmp_path, *opts: str) -> list[str]:
    return [
        "MODEL.ARCH", ARCH,
        "OUTPUT_DIR", str(tmp_path / "out"),
        "DATA.ROOT", str(tmp_path / "data"),
        "DATA.IMAGE_SIZE", "16",
        "DATA.NUM_WORKERS", "0",
        "SOLVER.BATCH_SIZE", "4",
        "SOLVER.BASE_LR", "64.0",  # lr 1.0 at batch 4 (linear scaling)
        "SOLVER.STEPS", "(1,)",
        "TRAIN.LOG_PERIOD", "1",
        *opts,
    ]  # fmt: skip


def _tiny_cfg(tmp_path, *opts: str):
    return setup_cfg("lincls/imagenet_r50.yaml", _tiny_opts(tmp_path, *opts))


def test_tiny_lincls_run_resume_and_evaluate(tmp_path, capsys):
    torch.set_num_threads(1)
    _image_folder(tmp_path / "data")
    pretrained = tmp_path / "moco.pth.tar"
    torch.save(_moco_checkpoint(mlp=True), pretrained)

    result = run_lincls(_tiny_cfg(tmp_path, "SOLVER.EPOCHS", "2"), pretrained=pretrained)
    out = tmp_path / "out"
    saved = json.loads((out / "results.json").read_text())
    assert saved["task"] == "lincls" and saved["epoch"] == 2
    assert set(saved["metrics"]) == {"top1", "top5"}
    assert saved["metrics"]["top5"] == 100.0  # 3 classes
    assert saved["checkpoint_sha256"] == hashlib.sha256(pretrained.read_bytes()).hexdigest()
    assert saved["layout"] == "moco_v2" and saved["config"]["SOLVER"]["EPOCHS"] == 2
    assert result["metrics"] == saved["metrics"]
    last = load_checkpoint(out / "checkpoint_0001.pth.tar")
    assert last["epoch"] == 2 and last["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.1)
    assert set(last["state_dict"]) >= {"module.fc.weight", "module.conv1.weight"}
    best = load_checkpoint(out / "model_best.pth.tar")
    assert best["best_acc1"] == saved["best_top1"]

    resumed = run_lincls(_tiny_cfg(tmp_path, "SOLVER.EPOCHS", "3"), pretrained=pretrained)
    assert resumed["epoch"] == 3 and (out / "checkpoint_0002.pth.tar").is_file()
    (out / "results.json").unlink()
    main(["--config-file", "lincls/imagenet_r50.yaml", "--pretrained", str(pretrained),
          "--evaluate", *_tiny_opts(tmp_path, "SOLVER.EPOCHS", "3")])  # fmt: skip
    evaluated = json.loads((out / "results.json").read_text())
    assert evaluated["metrics"] == resumed["metrics"] and evaluated["epoch"] == 3
    assert f"linear classification, epoch 3: top-1 {resumed['metrics']['top1']:.2f} %" in (
        capsys.readouterr().out
    )


def test_lincls_is_a_function_of_its_seed(tmp_path, monkeypatch):
    """Linear classification with 2 workers, killed inside epoch 2 and rerun, ends with the
    uninterrupted run's classifier bit for bit; 0 workers give the same classifier."""
    _image_folder(tmp_path / "data")  # 12 images: 3 steps per epoch
    pretrained = tmp_path / "moco.pth.tar"
    torch.save(_moco_checkpoint(mlp=True), pretrained)

    def run(name, workers):
        options = ("SOLVER.EPOCHS", "2", "DATA.NUM_WORKERS", workers)
        cfg = _tiny_cfg(tmp_path, "OUTPUT_DIR", str(tmp_path / name), *options)
        run_lincls(cfg, pretrained=pretrained)
        return load_checkpoint(tmp_path / name / "checkpoint_0001.pth.tar")["state_dict"]

    uninterrupted = run("a", "2")
    original, calls = lincls.classification_step, []

    def killed_in_epoch_2(*args):
        calls.append(1)
        if len(calls) == 3 + 2:
            raise KeyboardInterrupt("killed")
        return original(*args)

    monkeypatch.setattr(lincls, "classification_step", killed_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        run("b", "2")
    monkeypatch.undo()
    for name, workers in (("b", "2"), ("c", "0")):
        state = run(name, workers)
        assert all(torch.equal(uninterrupted[k], state[k]) for k in uninterrupted), name
    assert not torch.equal(uninterrupted["module.fc.weight"], torch.zeros(3, 512))


def test_run_stops_when_the_backbone_moves(tmp_path, monkeypatch):
    """A bug that trains BN statistics (the backbone in training mode) is caught after epoch 1."""
    _image_folder(tmp_path / "data", per_class=2)
    torch.save(_moco_checkpoint(mlp=True), tmp_path / "moco.pth.tar")
    build = lincls.lincls_task

    def buggy_task(*args, **kwargs):
        return dataclasses.replace(build(*args, **kwargs), train_mode=True)

    monkeypatch.setattr(lincls, "lincls_task", buggy_task)
    with pytest.raises(FrozenBackboneError, match="running_mean"):
        run_lincls(_tiny_cfg(tmp_path, "SOLVER.EPOCHS", "2"), pretrained=tmp_path / "moco.pth.tar")


def test_resume_with_other_pretrained_weights_raises(tmp_path):
    _image_folder(tmp_path / "data", per_class=1)
    for name, seed in (("a.pth.tar", 0), ("b.pth.tar", 1)):  # different backbones
        torch.save(_moco_checkpoint(mlp=True, seed=seed), tmp_path / name)
    run_lincls(_tiny_cfg(tmp_path, "SOLVER.EPOCHS", "1"), pretrained=tmp_path / "a.pth.tar")
    with pytest.raises(FrozenBackboneError, match="trained on other pretrained weights than"):
        run_lincls(_tiny_cfg(tmp_path, "SOLVER.EPOCHS", "2"), pretrained=tmp_path / "b.pth.tar")


def test_evaluate_needs_a_trained_classifier(tmp_path):
    _image_folder(tmp_path / "data", per_class=1)
    pretrained = tmp_path / "moco.pth.tar"
    torch.save(_moco_checkpoint(mlp=False), pretrained)
    with pytest.raises(ValueError, match="--evaluate needs a trained classifier"):
        run_lincls(_tiny_cfg(tmp_path), pretrained=pretrained, evaluate_only=True)


def _lincls_worker(rank: int, tmp_path) -> None:
    torch.set_num_threads(1)
    cfg = _tiny_cfg(tmp_path, "SOLVER.EPOCHS", "2")
    result = run_lincls(cfg, pretrained=tmp_path / "moco.pth.tar")  # 2 processes x 2 images
    (tmp_path / f"rank{rank}.json").write_text(json.dumps(result))


@pytest.mark.ddp
@pytest.mark.slow  # a whole task on two processes
def test_two_process_lincls(tmp_path):
    _image_folder(tmp_path / "data", per_class=3)  # 9 val images: the sampler pads one
    torch.save(_moco_checkpoint(mlp=True), tmp_path / "moco.pth.tar")
    run_on_gloo(_lincls_worker, tmp_path)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert results[0] == results[1]  # every rank saw the same gathered validation logits
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["metrics"] == results[0]["metrics"] and saved["epoch"] == 2
    assert (tmp_path / "out" / "checkpoint_0001.pth.tar").is_file()
