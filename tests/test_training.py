"""End-to-end pretraining on a tiny ImageFolder: learning, exact resume, checkpoints, bad input."""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import pytest
import torch

from moco_pretrain.checkpoint import (
    Checkpointer,
    atomic_save,
    load_checkpoint,
    without_ddp_prefix,
)
from moco_pretrain.config import setup_cfg
from moco_pretrain.engine import NonFiniteLossError, Runner
from moco_pretrain.evaluation import backbone_of, knn_metrics_of
from moco_pretrain.models import build_backbone
from moco_pretrain.pretrain import build_moco, run_pretraining
from moco_pretrain.recipes import config_root

from .conftest import write_image_folder


def tiny_cfg(data_root: Path, output_dir: Path, *extra: str):
    return setup_cfg(
        None,
        [
            "OUTPUT_DIR", str(output_dir), "DATA.ROOT", str(data_root), "DATA.IMAGE_SIZE", "16",
            "DATA.NUM_WORKERS", "0", "DATA.AUG", "v2", "MODEL.ARCH", "resnet18",
            "MODEL.SMALL_STEM", "True", "MODEL.DIM", "16", "MODEL.K", "32", "MODEL.M", "0.9",
            "MODEL.T", "0.2", "MODEL.MLP", "True", "MODEL.BN_SPLITS", "2", "SOLVER.BATCH_SIZE", "8",
            "SOLVER.EPOCHS", "2", "SOLVER.LR_SCHEDULE", "cos", "TRAIN.LOG_PERIOD", "2",
            *extra,
        ],
    )  # fmt: skip


@pytest.mark.slow  # two 6-epoch runs
def test_training_lowers_the_loss(tiny_imagefolder, tmp_path):
    """SGD steps lower the InfoNCE loss below that of the same run with a zero learning rate.

    The raw loss of a young MoCo run rises while the queue fills with real keys, so the baseline
    is the identical run (data order, augmentations, queue) whose weights never move.
    """
    options = ("SOLVER.EPOCHS", "6", "MODEL.K", "16", "MODEL.M", "0.99")
    trained = run_pretraining(
        tiny_cfg(tiny_imagefolder, tmp_path / "a", *options, "SOLVER.BASE_LR", "0.96")
    )
    frozen = run_pretraining(
        tiny_cfg(tiny_imagefolder, tmp_path / "b", *options, "SOLVER.BASE_LR", "0.0")
    )
    # every epoch once the queue holds real keys (after 2 steps): both losses drift towards
    # ln(K + 1) as the keys spread, the trained one lower in each epoch
    full = slice(1, 6)
    mean = lambda summary, key: sum(e[key] for e in summary["epochs"][full]) / 5  # noqa: E731
    assert mean(trained, "loss") < mean(frozen, "loss") - 0.05
    assert all(
        a["loss"] < b["loss"]
        for a, b in zip(trained["epochs"][full], frozen["epochs"][full], strict=True)
    )
    assert mean(trained, "acc1") > mean(frozen, "acc1")


def test_checkpoint_has_the_official_layout(tiny_imagefolder, tmp_path):
    summary = run_pretraining(tiny_cfg(tiny_imagefolder, tmp_path, "SOLVER.EPOCHS", "1"))
    checkpoint = load_checkpoint(summary["checkpoint"])
    assert Path(summary["checkpoint"]).name == "checkpoint_0000.pth.tar"
    assert checkpoint["epoch"] == 1 and checkpoint["arch"] == "resnet18"
    keys = set(checkpoint["state_dict"])
    assert {"module.queue", "module.queue_ptr", "module.encoder_q.fc.0.weight"} <= keys
    assert all(
        k.startswith(("module.encoder_q.", "module.encoder_k.", "module.queue")) for k in keys
    )
    assert {"optimizer", "scaler", "config", "rng"} <= set(checkpoint)
    assert (tmp_path / "config.yaml").read_text() == checkpoint["config"]
    assert (
        json.loads((tmp_path / "summary.json").read_text())["checkpoint"] == summary["checkpoint"]
    )


def test_killed_run_resumes_exactly(tiny_imagefolder, tmp_path, monkeypatch):
    """A run stopped after epoch 1 and resumed gives the uninterrupted run's epoch-2 loss."""
    uninterrupted = run_pretraining(tiny_cfg(tiny_imagefolder, tmp_path / "a"))

    original = Runner.train_one_epoch

    def crash_in_second_epoch(self, epoch):
        if epoch == 1:
            raise KeyboardInterrupt("killed")
        return original(self, epoch)

    monkeypatch.setattr(Runner, "train_one_epoch", crash_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        run_pretraining(tiny_cfg(tiny_imagefolder, tmp_path / "b"))
    monkeypatch.setattr(Runner, "train_one_epoch", original)
    resumed = run_pretraining(tiny_cfg(tiny_imagefolder, tmp_path / "b"))  # auto-resume

    assert [e["epoch"] for e in resumed["epochs"]] == [1, 2]  # epoch 1 from the checkpoint
    for before, after in zip(uninterrupted["epochs"], resumed["epochs"], strict=True):
        assert before["loss"] == after["loss"] and before["acc1"] == after["acc1"]
    final_a = load_checkpoint(uninterrupted["checkpoint"])["state_dict"]
    final_b = load_checkpoint(resumed["checkpoint"])["state_dict"]
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)  # queue and pointer too


def kill_at_step(monkeypatch, module, name: str, step: int) -> None:
    """Make ``module.name`` (a task's step function) raise KeyboardInterrupt at its ``step``-th
    call (1-based), as a ``kill -9`` between two steps would stop the run."""
    original, calls = getattr(module, name), []

    def step_fn(*args):
        calls.append(1)
        if len(calls) == step:
            raise KeyboardInterrupt("killed")
        return original(*args)

    monkeypatch.setattr(module, name, step_fn)


@pytest.mark.parametrize(
    "path",
    [
        "pil",
        pytest.param("device_aug", marks=pytest.mark.slow),
        pytest.param("demo", marks=pytest.mark.slow),
    ],
)
def test_run_is_a_function_of_its_seed(
    path, tiny_imagefolder, tiny_fashion_mnist, tmp_path, monkeypatch
):
    """With 2 loader workers, a run killed inside its second epoch and rerun ends with the weights
    and queue of the uninterrupted run, bit for bit; and 0 workers give that run too. For the PIL
    recipe, the device augmentation, and the demo recipe's grey arrays."""
    from moco_pretrain import pretrain

    def run(name, workers, **kwargs):
        options = ["OUTPUT_DIR", str(tmp_path / name), "DATA.NUM_WORKERS", workers]
        options += ["DATA.MAX_SAMPLES", "32"]  # 4 steps per epoch
        if path == "demo":
            options += ["DATA.ROOT", str(tiny_fashion_mnist), "SOLVER.BATCH_SIZE", "8"]
            options += ["MODEL.K", "32", "MODEL.BN_SPLITS", "2", "KNN.FINAL", "False"]
            options += ["DATA.HOLDOUT", "8"]  # of the 80 tiny training images
            cfg = setup_cfg("pretrain/fashion_mnist_demo.yaml", options)
        else:
            device_aug = str(path == "device_aug")
            cfg = tiny_cfg(tiny_imagefolder, tmp_path, *options, "DATA.DEVICE_AUG", device_aug)
        return run_pretraining(cfg, **kwargs)

    uninterrupted = run("a", "2")
    kill_at_step(monkeypatch, pretrain, "contrastive_step", 4 + 2)
    with pytest.raises(KeyboardInterrupt):
        run("b", "2")
    monkeypatch.undo()
    assert not (tmp_path / "b" / "checkpoint_0001.pth.tar").exists()
    resumed = run("b", "2")  # auto-resume after epoch 1
    without_workers = run("c", "0")

    final = {
        name: load_checkpoint(summary["checkpoint"])["state_dict"]
        for name, summary in (("a", uninterrupted), ("b", resumed), ("c", without_workers))
    }
    assert {"module.queue", "module.queue_ptr"} <= final["a"].keys()
    for other in ("b", "c"):
        assert final[other].keys() == final["a"].keys()
        assert all(torch.equal(final["a"][k], final[other][k]) for k in final["a"]), other
    losses = [[e["loss"] for e in s["epochs"]] for s in (uninterrupted, resumed, without_workers)]
    assert losses[0] == losses[1] == losses[2] and len(losses[0]) == 2


def test_auto_resume_refuses_another_run(tiny_imagefolder, tmp_path, capsys):
    """A checkpoint written with another SEED or recipe is not continued by auto-resume: one line
    naming both values, exit 2, nothing overwritten; an explicit --resume starts from it."""
    from moco_pretrain.cli.pretrain import main

    small = ("SOLVER.EPOCHS", "1", "DATA.MAX_SAMPLES", "16")
    first = run_pretraining(tiny_cfg(tiny_imagefolder, tmp_path, *small))
    files = {p: p.read_bytes() for p in tmp_path.iterdir() if p.is_file() and p.name != "log.txt"}
    base = [
        "--config-file", str(tmp_path / "config.yaml"), "SOLVER.EPOCHS", "2",
    ]  # fmt: skip
    for override, expected in (
        (["SEED", "1"], "SEED 0 vs 1"),
        (["DATA.AUG", "v1"], "DATA.AUG 'v2' vs 'v1'"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main([*base, *override])
        assert exit_info.value.code == 2
        error = capsys.readouterr().err.strip()
        assert "\n" not in error and expected in error and "checkpoint_0000.pth.tar" in error
        assert {p: p.read_bytes() for p in files} == files
        assert not (tmp_path / "checkpoint_0001.pth.tar").exists()
    # other workers, log period, kNN settings: the same run, continued
    main([*base, "DATA.NUM_WORKERS", "1", "TRAIN.LOG_PERIOD", "3", "KNN.NEIGHBORS", "7"])
    assert load_checkpoint(tmp_path / "checkpoint_0001.pth.tar")["epoch"] == 2
    # on purpose: --resume starts another run from the checkpoint
    main(["--resume", first["checkpoint"], *base, "SEED", "1", "OUTPUT_DIR", str(tmp_path / "o")])
    assert load_checkpoint(tmp_path / "o" / "checkpoint_0001.pth.tar")["epoch"] == 2


@pytest.mark.parametrize(
    "override, message",
    [
        (["DATA.NUM_WORKERS", "-1"], "DATA.NUM_WORKERS is -1, expected 0 or more"),
        (
            ["DATA.DEVICE_AUG", "False"],
            "DATA.DEVICE_AUG_GREY is True but DATA.DEVICE_AUG is False (it needs it)",
        ),
    ],
)
def test_bad_loader_settings_are_refused(override, message, capsys):
    from moco_pretrain.cli.pretrain import main

    with pytest.raises(SystemExit) as exit_info:
        main(override)  # the demo recipe: grey device augmentation
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == f"moco-pretrain: error: invalid config: {message}"


def test_official_checkpoint_layout_resumes(tiny_imagefolder, tmp_path):
    """A checkpoint with only the official keys (epoch, arch, state_dict, optimizer) resumes
    (without a history: the summary starts at the resumed epoch)."""
    first = run_pretraining(tiny_cfg(tiny_imagefolder, tmp_path / "a", "SOLVER.EPOCHS", "1"))
    full = load_checkpoint(first["checkpoint"])
    official = tmp_path / "official.pth.tar"
    torch.save({k: full[k] for k in ("epoch", "arch", "state_dict", "optimizer")}, official)
    resumed = run_pretraining(tiny_cfg(tiny_imagefolder, tmp_path / "b"), resume=str(official))
    assert [e["epoch"] for e in resumed["epochs"]] == [2]


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tiny_imagefolder, tmp_path):
    cfg = tiny_cfg(tiny_imagefolder, tmp_path, "SOLVER.EPOCHS", "1")
    good = run_pretraining(cfg)["checkpoint"]
    before = Path(good).read_bytes()
    diverging = tiny_cfg(tiny_imagefolder, tmp_path, "SOLVER.EPOCHS", "2", "SOLVER.BASE_LR", "1e30")
    with pytest.raises(
        NonFiniteLossError, match=r"epoch 2, iteration \d+ .*checkpoint_0000.pth.tar"
    ):
        run_pretraining(diverging, resume=good)  # another lr: an explicit resume
    assert Path(good).read_bytes() == before
    assert not (tmp_path / "checkpoint_0001.pth.tar").exists()


def test_atomic_save_never_leaves_a_torn_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint_0000.pth.tar"
    atomic_save({"epoch": 1}, path)

    def dies_midway(obj, f):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        atomic_save({"epoch": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_checkpointer_keeps_the_last_n(tmp_path):
    checkpointer = Checkpointer(tmp_path, keep_last=2)
    for epoch in range(4):
        checkpointer.save({"epoch": epoch + 1}, epoch=epoch)
    assert sorted(p.name for p in tmp_path.glob("*.pth.tar")) == [
        "checkpoint_0002.pth.tar",
        "checkpoint_0003.pth.tar",
    ]
    assert checkpointer.last_checkpoint() == tmp_path / "checkpoint_0003.pth.tar"


def test_code_running_pickles_are_refused(tmp_path):
    path = tmp_path / "evil.pth.tar"
    torch.save({"epoch": 1, "payload": shutil.rmtree}, path)  # a global: needs a full unpickle
    with pytest.raises(ValueError, match="evil.pth.tar .*could run code"):
        load_checkpoint(path)
    garbage = tmp_path / "garbage.pth.tar"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pth.tar is not a readable"):
        load_checkpoint(garbage)


def test_missing_and_empty_data_folders_fail_before_training(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"image folder .*nowhere.*train does not exist"):
        run_pretraining(tiny_cfg(tmp_path / "nowhere", tmp_path / "out"))
    (tmp_path / "empty" / "train" / "class_0").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"image folder .*empty.*train holds no images"):
        run_pretraining(tiny_cfg(tmp_path / "empty", tmp_path / "out"))
    assert not list((tmp_path / "out").glob("*.pth.tar"))


def test_unreadable_images_are_skipped_and_counted(tmp_path):
    root = write_image_folder(tmp_path / "data", splits=("train",), per_class=8)
    (root / "train" / "class_0" / "broken.png").write_bytes(b"\x89PNG truncated")
    with pytest.warns(UserWarning, match="skipping unreadable image") as caught:
        summary = run_pretraining(tiny_cfg(root, tmp_path / "out", "SOLVER.EPOCHS", "1"))
    skipped = [str(w.message) for w in caught if "skipping unreadable image" in str(w.message)]
    assert len(skipped) == 1 and f"{root / 'train' / 'class_0' / 'broken.png'}:" in skipped[0]
    assert summary["skipped_images"] == 1  # one epoch read the broken file once
    assert summary["checkpoint"]


def test_bad_config_key_and_value_name_the_culprit(tmp_path):
    with pytest.raises(ValueError, match="command line.*MODEL.QUEUE"):
        setup_cfg(None, ["MODEL.QUEUE", "4096"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("SOLVER:\n  EPOCS: 3\n")
    with pytest.raises(ValueError, match=r"bad.yaml.*EPOCS"):
        setup_cfg(str(bad))
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        setup_cfg("missing.yaml")


@pytest.mark.parametrize(
    "recipe",
    sorted(str(p.relative_to(config_root())) for p in config_root().glob("pretrain/*.yaml")),
)
def test_every_pretraining_recipe_loads(recipe):
    cfg = setup_cfg(recipe)
    assert cfg.SOLVER.EPOCHS > 0 and cfg.MODEL.K >= cfg.SOLVER.BATCH_SIZE


def test_device_augmentation_path_trains(tiny_imagefolder, tmp_path, monkeypatch):
    """DATA.DEVICE_AUG: workers only decode, the step augments on the training device.

    The step gets two different 16 px views of each image, and InfoNCE behaves as MoCo's should:
    at step 1 the queue holds random unit vectors, far from the positive, so the loss is low; once
    it holds only real keys (after K / batch = 4 steps), the keys of this barely trained encoder
    are all alike and the 1 + K logits nearly equal, so the loss is close to ln(K + 1). Identical
    views (no augmentation) give 2.9-3.2 there, a wrong positive index a high first loss.
    """
    from moco_pretrain import pretrain

    views = []

    def recording_step(model, batch):
        views.append(batch[0])
        return contrastive_step(model, batch)

    contrastive_step = pretrain.contrastive_step
    monkeypatch.setattr(pretrain, "contrastive_step", recording_step)
    summary = run_pretraining(
        tiny_cfg(tiny_imagefolder, tmp_path, "SOLVER.EPOCHS", "1", "DATA.DEVICE_AUG", "True",
                 "TRAIN.LOG_PERIOD", "1")
    )  # fmt: skip
    assert summary["checkpoint"] and len(views) == 8  # 64 images, batch 8
    for im_q, im_k in views:
        assert im_q.shape == im_k.shape == (8, 3, 16, 16) and not torch.equal(im_q, im_k)
    losses = [point["loss"] for point in summary["iterations"]]  # one per step
    full_queue = losses[32 // 8 :]
    assert losses[0] < math.log(32 + 1) - 2
    assert all(abs(loss - math.log(32 + 1)) < 0.2 for loss in full_queue), losses
    assert summary["epochs"][0]["loss"] == pytest.approx(sum(losses) / len(losses))


def test_cli_reports_bad_input_in_one_line(tmp_path, capsys):
    from moco_pretrain.cli.pretrain import main

    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "--config-file",
                "pretrain/moco_v2_cpu_trial.yaml",
                "DATA.ROOT",
                str(tmp_path / "none"),
            ]
        )
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("moco-pretrain: error: image folder") and "none" in error
    assert "\n" not in error and "Traceback" not in error


def test_knn_monitor_and_tensorboard(tiny_imagefolder, tmp_path):
    """KNN.MONITOR_PERIOD logs kNN top-1 per epoch; KNN.FINAL compares with a random encoder."""
    options = (
        "KNN.MONITOR_PERIOD",
        "1",
        "KNN.FINAL",
        "True",
        "KNN.NEIGHBORS",
        "5",
        "KNN.TEMPERATURE",
        "0.1",
    )
    cfg = tiny_cfg(tiny_imagefolder, tmp_path, *options)
    summary = run_pretraining(cfg)
    assert [entry["epoch"] for entry in summary["knn"]] == [1, 2]
    assert summary["knn_top1"] == summary["knn"][-1]["knn_top1"]
    assert {"linear_top1", "linear_top1_random_init"} <= summary.keys()
    # the monitor's figure is the kNN accuracy of the saved encoder, recomputed here
    model = build_moco(cfg)
    model.load_state_dict(without_ddp_prefix(load_checkpoint(summary["checkpoint"])["state_dict"]))
    cpu = torch.device("cpu")
    metrics, _ = knn_metrics_of(backbone_of(model.encoder_q, cfg), cfg, cpu, probe=True)
    assert metrics["top1"] == summary["knn_top1"]
    assert metrics["linear_top1"] == summary["linear_top1"]
    torch.manual_seed(cfg.SEED)  # the random-init encoder of the comparison, rebuilt
    random_init = build_backbone(cfg.MODEL.ARCH, small_stem=cfg.MODEL.SMALL_STEM)
    random_metrics = knn_metrics_of(random_init, cfg, cpu, probe=True)[0]
    assert random_metrics["top1"] == summary["knn_top1_random_init"]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert f"epoch 2: knn_top1 {summary['knn_top1']:.4g}" in (tmp_path / "log.txt").read_text()
    # monitoring does not change the training: the same run without it ends with the same weights
    unmonitored = run_pretraining(tiny_cfg(tiny_imagefolder, tmp_path / "unmonitored"))
    trained = without_ddp_prefix(load_checkpoint(unmonitored["checkpoint"])["state_dict"])
    monitored = model.state_dict()
    assert trained.keys() == monitored.keys()
    assert all(torch.equal(trained[k], monitored[k]) for k in monitored)


def test_resumed_run_reports_every_epoch(tiny_imagefolder, tmp_path):
    """History, per-log-point losses and kNN results are saved in checkpoints: a run resumed after
    epoch 1 reports both epochs, as the uninterrupted run does."""
    options = ("KNN.MONITOR_PERIOD", "1", "KNN.NEIGHBORS", "5", "TRAIN.LOG_PERIOD", "2")
    walls, summaries = [], []
    for epochs in ("1", "2"):
        start = time.perf_counter()
        summaries.append(
            run_pretraining(tiny_cfg(tiny_imagefolder, tmp_path, *options, "SOLVER.EPOCHS", epochs))
        )
        walls.append(time.perf_counter() - start)
    first, resumed = summaries
    assert [e["epoch"] for e in resumed["epochs"]] == [1, 2]
    assert resumed["epochs"][0] == first["epochs"][0]
    assert [e["epoch"] for e in resumed["knn"]] == [1, 2]
    assert resumed["knn"][0] == first["knn"][0]
    iterations = [p["iteration"] for p in resumed["iterations"]]
    assert iterations[: len(first["iterations"])] == [p["iteration"] for p in first["iterations"]]
    assert iterations == sorted(iterations) and len(iterations) == 2 * len(first["iterations"])
    # each epoch was timed inside the call that ran it, and its speed is its 64 images / seconds
    for epoch, wall in zip(resumed["epochs"], walls, strict=True):
        assert 0 < epoch["seconds"] < wall
        assert epoch["images_per_s"] == pytest.approx(64 / epoch["seconds"])
    assert resumed["train_seconds"] == pytest.approx(sum(e["seconds"] for e in resumed["epochs"]))
