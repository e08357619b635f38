"""transfer.pipeline: each step runs once, is read back afterwards, and its seconds add up."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from transfer.pipeline import COSTS_FILE, Pipeline

RECIPE = "pretrain/fashion_mnist_demo.yaml"


def _task(calls: list):
    def task(cfg):
        calls.append((cfg.OUTPUT_DIR, cfg.SEED))
        out = Path(cfg.OUTPUT_DIR)
        out.mkdir(parents=True, exist_ok=True)
        (out / "done.json").write_text(json.dumps({"seed": cfg.SEED}))

    return task


def test_a_step_runs_once_and_is_read_back(tmp_path):
    calls: list = []
    first = Pipeline(tmp_path, command="first")
    done = first.run(_task(calls), RECIPE, "a", ["SEED", "3"], done="done.json", step="a")
    assert done == tmp_path / "a" / "done.json"
    again = Pipeline(tmp_path, command="second")  # a resumed study
    assert again.run(_task(calls), RECIPE, "a", ["SEED", "4"], done="done.json", step="a") == done
    assert json.loads(done.read_text()) == {"seed": 3}
    assert calls == [(str(tmp_path / "a"), 3)]
    costs = json.loads((tmp_path / COSTS_FILE).read_text())
    assert costs["command"] == "second" and set(costs["seconds"]) == {"a"}
    assert costs["machine"]["cpu_count"] >= 1


def test_seconds_add_up_over_resumed_runs_and_failures(tmp_path):
    def fail():
        raise RuntimeError("killed")

    pipeline = Pipeline(tmp_path, command="c")
    with pytest.raises(RuntimeError, match="killed"):
        pipeline.timed("step", fail)
    pipeline.costs["seconds"]["step"] = 2.5  # as if the failed attempt took 2.5 s
    pipeline.timed("step", lambda: None)
    resumed = Pipeline(tmp_path, command="c")
    resumed.timed("step", lambda: None)
    seconds = json.loads((tmp_path / COSTS_FILE).read_text())["seconds"]["step"]
    assert 2.5 <= seconds < 3.5


def test_a_conversion_check_refuses_before_anything_is_written(tmp_path):
    torch = pytest.importorskip("torch")
    from moco_pretrain.models import build_backbone

    checkpoint = tmp_path / "backbone.pth"
    torch.save(build_backbone("resnet18").state_dict(), checkpoint)
    pipeline = Pipeline(tmp_path, command="c")

    def refuse(provenance):
        raise ValueError(f"not of the source classes: {provenance.get('classes')}")

    with pytest.raises(ValueError, match="not of the source classes: None"):
        pipeline.convert(checkpoint, "w.pkl", arch="resnet18", check=refuse)
    assert not (tmp_path / "w.pkl").exists()
    path = pipeline.convert(checkpoint, "w.pkl", arch="resnet18")
    assert path == tmp_path / "w.pkl" and path.stat().st_size > 0


def test_a_path_that_names_the_work_folder_again_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pipeline = Pipeline(Path("out/study"), command="c")
    assert pipeline.path("det/moco") == Path("out/study/det/moco")
    assert pipeline.path(tmp_path / "elsewhere") == tmp_path / "elsewhere"
    with pytest.raises(ValueError, match="names the work folder out/study again"):
        pipeline.path(Path("out/study") / "det")
