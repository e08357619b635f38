"""The installed package: its console commands, its recipes, and a working torchvision."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import torchvision.ops

from moco_pretrain.recipes import config_root

SETUP_PY = Path(__file__).resolve().parents[1] / "setup.py"


def declared_commands() -> dict[str, str]:
    """``setup.py``'s console scripts, name -> ``module:function``, read from its source."""
    setup = next(
        node for node in ast.walk(ast.parse(SETUP_PY.read_text()))
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setup"
    )  # fmt: skip
    entry_points = next(k.value for k in setup.keywords if k.arg == "entry_points")
    scripts = ast.literal_eval(entry_points)["console_scripts"]
    return dict(script.replace(" ", "").split("=") for script in scripts)


def test_torchvision_ops_load():
    """A torchvision built against another torch fails exactly here ('operator ... nms')."""
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [1.0, 1.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    keep = torchvision.ops.nms(boxes, torch.tensor([0.9, 0.8, 0.7]), iou_threshold=0.5)
    assert keep.tolist() == [0, 2]


def test_console_commands_are_installed_and_answer_help():
    """Every command setup.py declares is on PATH, and its entry point answers --help: exit 0, a
    usage line that names the command (the parser's prog) on stdout.

    The entry points run as the installed wrapper runs them (argv[0] is the command), but from
    this checkout's setup.py: an install made from another checkout may map a name elsewhere.
    One subprocess per command, all started at once."""
    commands = declared_commands()
    assert {"moco-pretrain", "moco-transfer"} <= commands.keys()  # the parse found the list
    missing = [command for command in commands if not shutil.which(command)]
    assert missing == [], f"{missing} not on PATH: pip install -e ."
    running = {}
    for command, target in commands.items():
        module, function = target.split(":")
        code = f"import sys; sys.argv[0] = {command!r}; from {module} import {function} as f"
        running[command] = subprocess.Popen(
            [sys.executable, "-c", f"{code}; sys.exit(f())", "--help"], cwd=SETUP_PY.parent,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
    helps = {}
    for command, process in running.items():
        helps[command], stderr = process.communicate(timeout=300)
        assert process.returncode == 0, f"{command} --help: exit {process.returncode}\n{stderr}"
    wrong = {c: text[:80] for c, text in helps.items() if not text.startswith(f"usage: {c} ")}
    assert wrong == {}
    assert "--config-file" in helps["moco-pretrain"]


def test_recipes_are_reachable_from_the_package():
    assert (config_root() / "pretrain" / "fashion_mnist_demo.yaml").is_file()
    assert (config_root() / "detection").is_dir()
