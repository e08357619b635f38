"""The code's layout contracts: modules call each other through typed functions, not command
lines; tasks never import each other; tools never edit ``sys.path``; importing registers nothing."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CODE = sorted(p for d in ("moco_pretrain", "transfer", "tools") for p in (ROOT / d).rglob("*.py"))
TASKS = {"pretrain", "supervised", "lincls", "knn_task", "controls"}


def _calls(tree: ast.AST):
    return (node for node in ast.walk(tree) if isinstance(node, ast.Call))


def _name(func: ast.expr) -> str:
    return func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")


def test_no_module_calls_another_ones_command_line():
    offences = []
    for path in CODE:
        tree = ast.parse(path.read_text())
        for call in _calls(tree):
            name = _name(call.func)
            through_argv = name == "main" and (call.args or call.keywords)
            if through_argv or name in ("Namespace", "SimpleNamespace"):
                offences.append(f"{path.relative_to(ROOT)}:{call.lineno} {name}(...)")
    assert offences == []


def test_no_task_module_imports_another():
    offences = []
    for name in sorted(TASKS):
        path = ROOT / "moco_pretrain" / f"{name}.py"
        if not path.is_file():
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                imported = node.module.rsplit(".", 1)[-1]
                if imported in TASKS - {name}:
                    offences.append(f"{path.name}:{node.lineno} imports {imported}")
    assert offences == []


def test_tools_never_edit_sys_path():
    offences = [
        f"{path.relative_to(ROOT)}:{node.lineno}"
        for path in CODE
        if path.parent.name == "tools"
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Attribute) and node.attr == "path"
        and isinstance(node.value, ast.Name) and node.value.id == "sys"
    ]  # fmt: skip
    assert offences == []


def test_importing_the_plugin_registers_no_dataset_and_registration_is_explicit():
    pytest.importorskip("detectron2")
    code = (
        "from detectron2.data import DatasetCatalog\n"
        "from detectron2.config import get_cfg\n"
        "import transfer.config, transfer.train_net\n"
        "from transfer import add_moco_config\n"
        "from transfer.datasets.register import register_datasets\n"
        "before = set(DatasetCatalog.list())\n"
        "cfg = get_cfg(); add_moco_config(cfg)\n"
        "cfg.DATASETS.TEST = ('voc_2012_val_sem_seg',)\n"
        "register_datasets(cfg)\n"
        "print(sorted(set(DatasetCatalog.list()) - before))\n"
        "print('voc_2012_val_sem_seg' in before)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == [
        "['voc_2012_train_aug_sem_seg', 'voc_2012_val_sem_seg']",
        "False",
    ]
