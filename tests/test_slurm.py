"""The SLURM launcher: environment mapping, requeue on preemption, and a real (debug) submission."""

from __future__ import annotations

import pytest

from moco_pretrain import slurm
from moco_pretrain.checkpoint import load_checkpoint
from moco_pretrain.recipes import resolve_config_file

from .test_training import tiny_cfg

submitit = pytest.importorskip("submitit", reason="the SLURM launcher needs the [slurm] extra")


def test_torchrun_environment_for_a_task():
    env = slurm.torchrun_environment(
        global_rank=9, local_rank=1, world_size=16, master_addr="node-a", master_port=29500
    )
    assert env == {
        "RANK": "9", "LOCAL_RANK": "1", "WORLD_SIZE": "16", "MASTER_ADDR": "node-a",
        "MASTER_PORT": "29500",
    }  # fmt: skip
    assert slurm.master_port_for("123456") == slurm.master_port_for("123456")
    assert 20000 <= slurm.master_port_for("987654_3") < 40000


def test_preempted_job_requeues_itself_and_resumes_from_the_newest_checkpoint(tmp_path):
    opts = ["DATA.ROOT", "/data", "OUTPUT_DIR", str(tmp_path)]
    job = slurm.PretrainJob("pretrain/moco_v2_800ep.yaml", opts, "first.pth.tar")
    resubmission = job.checkpoint()
    assert isinstance(resubmission, submitit.helpers.DelayedSubmission)
    requeued = resubmission.function
    assert isinstance(requeued, slurm.PretrainJob)
    assert (requeued.config_file, requeued.opts) == ("pretrain/moco_v2_800ep.yaml", opts)
    assert requeued.resume == "first.pth.tar"  # preempted before its first checkpoint
    (tmp_path / "checkpoint_0000.pth.tar").write_bytes(b"")
    assert job.checkpoint().function.resume is None  # auto-resume from OUTPUT_DIR's newest


def test_debug_submission_trains_and_requeue_resumes(tiny_imagefolder, tmp_path, monkeypatch):
    """A job submitted through submitit trains; a second submission continues from its checkpoint."""
    cfg = tiny_cfg(tiny_imagefolder, tmp_path / "out", "SOLVER.EPOCHS", "1")
    base = ["OUTPUT_DIR", cfg.OUTPUT_DIR, "DATA.ROOT", cfg.DATA.ROOT, "SOLVER.EPOCHS", "1"]
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(cfg.dump())
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(slurm, "torchrun_environment", lambda **kw: {})  # one process, no group
    for epochs in (1, 2):  # the second submission continues from the first one's checkpoint
        job = slurm.submit(
            str(recipe), [*base[:-1], str(epochs)], job_dir=str(tmp_path / "jobs"), nodes=1,
            gpus_per_node=1, timeout_min=5, cluster="debug",
        )  # fmt: skip
        job.result()
        checkpoint = load_checkpoint(tmp_path / "out" / f"checkpoint_{epochs - 1:04d}.pth.tar")
        assert checkpoint["epoch"] == epochs
    history = (tmp_path / "out" / "log.txt").read_text()
    assert "resumed from" in history and "checkpoint_0000.pth.tar (epoch 1 done)" in history


def test_submit_cli_forwards_pretraining_arguments(monkeypatch):
    from moco_pretrain.cli import submit as submit_cli

    calls = {}
    monkeypatch.setattr(
        submit_cli,
        "submit",
        lambda config_file, opts, **kw: (
            calls.update(config_file=config_file, opts=opts, **kw) or _Job()
        ),
    )
    submit_cli.main(
        ["--nodes", "2", "--config-file", "pretrain/moco_v2_200ep.yaml", "DATA.ROOT", "/d"]
    )
    assert calls["config_file"] == str(resolve_config_file("pretrain/moco_v2_200ep.yaml").resolve())
    assert calls["opts"] == ["DATA.ROOT", "/d"] and calls["resume"] is None
    assert calls["nodes"] == 2 and calls["gpus_per_node"] == 8


def test_submit_cli_rejects_a_bad_recipe_before_submitting(monkeypatch, capsys):
    from moco_pretrain.cli import submit as submit_cli

    monkeypatch.setattr(submit_cli, "submit", lambda *a, **kw: pytest.fail("submitted"))
    with pytest.raises(SystemExit) as exit_info:
        submit_cli.main(["--config-file", "pretrain/moco_v2_200ep.yaml", "MODEL.K", "100"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith(
        "moco-submit: error: invalid config: MODEL.K is 100, smaller than one global batch"
    )
    # checked against the job's processes (2 nodes x 8), not the submitting shell's one
    with pytest.raises(SystemExit):
        submit_cli.main(["--nodes", "2", "--config-file", "pretrain/moco_v2_200ep_1gpu.yaml"])
    assert "MODEL.BN_SPLITS is 8 under 16 processes" in capsys.readouterr().err


class _Job:
    job_id = "42"
