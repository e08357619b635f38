"""moco-report on fabricated metric files: statistics, differences, outputs, idempotence."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from transfer.report import main

VOC = {  # per-row AP50 over trials; AP and AP75 are AP50 - 25 and AP50 - 20
    "sup": ("supervised", [81.1, 81.3, 81.5]),
    "moco": ("moco", [82.2, 82.4, 82.6, 82.4, 82.4]),
    "rand": ("random", [60.0, 60.4]),
}


def _write(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result))


def _fabricate(root: Path) -> list[str]:
    rows = []
    for label, (init, ap50s) in VOC.items():
        for trial, ap50 in enumerate(ap50s):
            metrics = {"bbox/AP50": ap50, "bbox/AP": ap50 - 25, "bbox/AP75": ap50 - 20}
            metrics["bbox/AP-person"] = 1.0  # per-class APs are kept out of the table
            result = {"task": "detection", "metrics": metrics, "init": init, "trial": trial}
            _write(root / label / f"trial_{trial}" / "results.json", result)
        rows.append(f"{label}={root / label}")
    # moco-knn / moco-lincls results of the same MoCo checkpoint (their own layout)
    for task, top1 in (("knn", 61.5), ("lincls", 67.5)):
        result = {"task": task, "metrics": {"top1": top1, "top5": 88.0}, "layout": "moco_v2"}
        result |= {"checkpoint_sha256": "0" * 64, "config": {"MODEL": {"ARCH": "resnet50"}}}
        _write(root / "moco" / task / "results.json", result)
    return rows


def _csv(output: Path) -> dict[tuple[str, str, str], dict[str, str]]:
    with open(output / "report.csv") as f:
        return {(r["task"], r["row"], r["metric"]): r for r in csv.DictReader(f)}


def test_mean_std_and_differences(tmp_path, capsys):
    rows = _fabricate(tmp_path / "runs")
    assert main([*rows, "--output", str(tmp_path / "report")]) == 0
    table = _csv(tmp_path / "report")
    moco = table[("detection", "moco", "bbox/AP50")]
    assert int(moco["n"]) == 5 and float(moco["mean"]) == pytest.approx(82.4)
    assert float(moco["std"]) == pytest.approx(math.sqrt(0.08 / 4))  # sample std, n - 1
    assert float(moco["diff_supervised"]) == pytest.approx(82.4 - 81.3)
    assert float(moco["diff_random"]) == pytest.approx(82.4 - 60.2)
    assert float(table[("detection", "sup", "bbox/AP")]["std"]) == pytest.approx(0.2)
    assert float(table[("detection", "rand", "bbox/AP75")]["mean"]) == pytest.approx(40.2)
    assert not any(m == "bbox/AP-person" for _, _, m in table)
    knn = table[("knn", "moco", "top1")]  # one trial: no std; no baseline rows for knn
    assert (knn["n"], knn["mean"], knn["std"], knn["diff_supervised"]) == ("1", "61.5", "", "")

    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "| row | n | bbox/AP50 | bbox/AP | bbox/AP75 |" in markdown
    assert "| moco | 5 | 82.40 ± 0.14 | 57.40 ± 0.14 | 62.40 ± 0.14 |" in markdown
    assert "| moco | +1.10 / +22.20 | +1.10 / +22.20 | +1.10 / +22.20 |" in markdown
    assert "vs sup / vs rand" in markdown and "## knn" in markdown and "## lincls" in markdown
    assert markdown in capsys.readouterr().out
    assert (tmp_path / "report" / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rerunning_is_idempotent_and_picks_up_new_trials(tmp_path):
    rows = _fabricate(tmp_path / "runs")
    out = tmp_path / "report"
    main([*rows, "--output", str(out)])
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    main([*rows, "--output", str(out)])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first  # nothing doubled
    assert sorted(first) == ["report.csv", "report.md", "report.png"]  # no temporary files

    metrics = {"bbox/AP50": 81.3, "bbox/AP": 56.3, "bbox/AP75": 61.3}
    _write(tmp_path / "runs/sup/trial_3/results.json", {"task": "detection", "metrics": metrics})
    main([*rows, "--output", str(out)])
    assert _csv(out)[("detection", "sup", "bbox/AP50")]["n"] == "4"


def test_explicit_baselines_and_errors(tmp_path, capsys):
    rows = _fabricate(tmp_path / "runs")
    out = str(tmp_path / "report")
    main([*rows, "--supervised", "moco", "--random", "sup", "--output", out])
    moco = _csv(Path(out))[("detection", "moco", "bbox/AP50")]
    assert float(moco["diff_supervised"]) == 0.0
    assert float(moco["diff_random"]) == pytest.approx(1.1)
    for extra, pattern in (
        (["--supervised", "nope"], "baseline row 'nope' is not among"),
        ([f"again={tmp_path / 'runs' / 'moco'}"], "belongs to rows 'moco' and 'again'"),
    ):
        _fails(capsys, [*rows, *extra, "--output", out], pattern)
    _fails(capsys, [f"empty={tmp_path}/nothing", "--output", out], "no results.json under")
    _write(tmp_path / "bad" / "results.json", {"metrics": {}})
    _fails(capsys, [str(tmp_path / "bad"), "--output", out], "is not a results file")


def _fails(capsys, argv: list[str], pattern: str) -> None:
    """Bad input: exit status 2 and one ``moco-report: error: ...`` line on stderr."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert pattern in capsys.readouterr().err
