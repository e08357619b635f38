"""Config errors: one line naming the file and position or the keys, exit status 2 from every CLI;
the paper recipes' precision defaults."""

from __future__ import annotations

import subprocess
import sys

import pytest

from moco_pretrain.cli import knn, lincls, pretrain
from moco_pretrain.config import setup_cfg

UNCLOSED_LIST = "MODEL:\n  QUEUE: [unclosed\n"
UNCLOSED_LIST_ERROR = (
    "3:1: expected ',' or ']', but got '<stream end>' (while parsing a flow sequence at 2:10)"
)


def test_yaml_syntax_error_is_one_line_with_file_line_and_column(tmp_path):
    recipe = tmp_path / "broken.yaml"
    recipe.write_text(UNCLOSED_LIST)
    result = subprocess.run(
        [sys.executable, "-m", "moco_pretrain.cli.pretrain", "--config-file", str(recipe)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr == f"moco-pretrain: error: {recipe}:{UNCLOSED_LIST_ERROR}\n"
    assert result.stdout == ""


def test_yaml_error_in_a_base_recipe_names_the_base_file(tmp_path):
    (tmp_path / "base.yaml").write_text("SOLVER:\n  EPOCHS: 2\n   BATCH_SIZE: 8\n")
    (tmp_path / "child.yaml").write_text('_BASE_: "base.yaml"\n')
    with pytest.raises(ValueError) as error:
        setup_cfg(str(tmp_path / "child.yaml"))
    assert str(error.value) == f"{tmp_path / 'base.yaml'}:3:14: mapping values are not allowed here"


@pytest.mark.parametrize(
    ("text", "got"), [("", "an empty file"), ("- SOLVER\n", "a YAML list"), ("v2\n", "a YAML str")]
)
def test_recipe_that_is_not_a_mapping_is_named(tmp_path, text, got):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    with pytest.raises(ValueError) as error:
        setup_cfg(str(recipe))
    assert str(error.value) == (
        f"invalid config ({recipe}): expected a mapping of config keys such as 'SOLVER:', got {got}"
    )


@pytest.mark.parametrize(
    ("overrides", "problem"),
    [
        (["SOLVER.BATCH_SIZE", "0"], "SOLVER.BATCH_SIZE is 0, expected at least 1"),
        (["SOLVER.BATCH_SIZE", "-256"], "SOLVER.BATCH_SIZE is -256, expected at least 1"),
        (["MODEL.K", "0"], "MODEL.K is 0, expected at least 1"),
        (["MODEL.BN_SPLITS", "0"], "MODEL.BN_SPLITS is 0, expected at least 1"),
        (
            ["DATA.NAME", "cifar10"],
            "DATA.NAME is 'cifar10', expected one of ('imagefolder', 'fashion_mnist')",
        ),  # fmt: skip
        (["DATA.AUG", "v3"], "DATA.AUG is 'v3', expected one of ('v1', 'v2')"),
        (
            ["SOLVER.LR_SCHEDULE", "cosine"],
            "SOLVER.LR_SCHEDULE is 'cosine', expected one of ('step', 'cos')",
        ),  # fmt: skip
        (["DATA.CLASSES", "[1, 1]"], "DATA.CLASSES is [1, 1], expected distinct class indices"),
        (["DATA.CLASSES", "[-1]"], "DATA.CLASSES is [-1], expected distinct class indices"),
        (["DATA.HOLDOUT", "-5"], "DATA.HOLDOUT is -5, expected 0 or more"),
        (
            ["DATA.VAL_SPLIT", "holdout"],
            "DATA.VAL_SPLIT is 'holdout' but DATA.HOLDOUT is 0 (no images)",
        ),  # fmt: skip
        (
            ["TRAIN.AMP_DTYPE", "fp8"],
            "TRAIN.AMP_DTYPE is 'fp8', expected one of ('bf16', 'fp16', '')",
        ),  # fmt: skip
    ],
)
def test_values_that_cannot_run_are_rejected_on_loading(overrides, problem):
    with pytest.raises(ValueError) as error:
        setup_cfg("pretrain/moco_v2_cpu_trial.yaml", overrides)
    assert str(error.value).startswith(f"invalid config: {problem}")


@pytest.mark.parametrize(
    ("overrides", "world_size", "problem"),
    [
        (
            ["MODEL.K", "32"],
            1,
            "MODEL.K is 32, smaller than one global batch (SOLVER.BATCH_SIZE 64)",
        ),
        (
            ["MODEL.BN_SPLITS", "1", "SOLVER.BATCH_SIZE", "60"],
            8,
            "SOLVER.BATCH_SIZE 60 is not divisible by the 8 processes",
        ),  # fmt: skip
        (
            [],
            2,
            "MODEL.BN_SPLITS is 4 under 2 processes: split BN emulates Shuffle-BN in one process;"
            " with several, the official cross-process shuffle runs (set MODEL.BN_SPLITS 1)",
        ),  # fmt: skip
        (
            ["SOLVER.BATCH_SIZE", "30"],
            1,
            "SOLVER.BATCH_SIZE 30 is not divisible by MODEL.BN_SPLITS 4",
        ),
    ],
)
def test_a_batch_that_cannot_be_shared_out_is_rejected_on_loading(
    overrides, world_size, problem, monkeypatch
):
    """The global batch against the queue, torchrun's WORLD_SIZE and the split-BN groups."""
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    with pytest.raises(ValueError) as error:
        setup_cfg("pretrain/moco_v2_cpu_trial.yaml", overrides, pretraining=True)
    assert str(error.value) == f"invalid config: {problem}"


def test_the_same_batch_is_accepted_where_it_can_be_shared_out(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "8")
    cfg = setup_cfg("pretrain/moco_v2_cpu_trial.yaml", ["MODEL.BN_SPLITS", "1"], pretraining=True)
    assert cfg.SOLVER.BATCH_SIZE % 8 == 0 and cfg.MODEL.K >= cfg.SOLVER.BATCH_SIZE


def test_other_tasks_are_not_held_to_the_pretraining_checks(monkeypatch):
    """The linear-classification demo inherits MODEL.BN_SPLITS 8 from the pretraining recipe; it
    means nothing there, so two processes are fine; an indivisible batch is not."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert setup_cfg("lincls/fashion_mnist_demo.yaml").MODEL.BN_SPLITS == 8
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ValueError, match="BATCH_SIZE 256 is not divisible by the 3 processes"):
        setup_cfg("lincls/fashion_mnist_demo.yaml")


def test_every_problem_is_named_in_the_same_line():
    with pytest.raises(ValueError) as error:
        setup_cfg(None, ["SOLVER.BATCH_SIZE", "0", "MODEL.K", "-1", "DATA.AUG", "v3"])
    assert str(error.value) == (
        "invalid config: SOLVER.BATCH_SIZE is 0, expected at least 1; MODEL.K is -1, expected at"
        " least 1; DATA.AUG is 'v3', expected one of ('v1', 'v2')"
    )


@pytest.mark.parametrize(
    ("main", "prog", "extra"),
    [
        (pretrain.main, "moco-pretrain", []),
        (lincls.main, "moco-lincls", ["--pretrained", "unused.pth"]),
        (knn.main, "moco-knn", ["--pretrained", "unused.pth"]),
    ],
)
def test_every_command_exits_2_with_one_line(tmp_path, capsys, main, prog, extra):
    recipe = tmp_path / "broken.yaml"
    recipe.write_text(UNCLOSED_LIST)
    for argv, message in (
        (["--config-file", str(recipe)], f"{recipe}:{UNCLOSED_LIST_ERROR}"),
        (["SOLVER.BATCH_SIZE", "0"], "invalid config: SOLVER.BATCH_SIZE is 0, expected at least 1"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main([*extra, *argv])
        assert exit_info.value.code == 2
        assert capsys.readouterr().err == f"{prog}: error: {message}\n"


@pytest.mark.parametrize(
    "recipe", ["moco_v1_200ep", "moco_v2_200ep", "moco_v2_200ep_1gpu", "moco_v2_800ep"]
)
def test_the_paper_recipes_train_in_fp32_and_nchw_as_the_official_code(recipe):
    """bf16 autocast and channels-last are an opt-in pair, off unless set."""
    cfg = setup_cfg(f"pretrain/{recipe}.yaml", pretraining=True)
    assert (cfg.TRAIN.AMP_DTYPE, cfg.TRAIN.CHANNELS_LAST) == ("", False)
    fast = setup_cfg(
        f"pretrain/{recipe}.yaml", ["TRAIN.AMP_DTYPE", "bf16", "TRAIN.CHANNELS_LAST", "True"]
    )
    assert (fast.TRAIN.AMP_DTYPE, fast.TRAIN.CHANNELS_LAST) == ("bf16", True)
