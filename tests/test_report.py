"""moco-report on fabricated metric files: statistics, differences, outputs, idempotence."""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path

import pytest
import yaml
from scipy import stats

from moco_pretrain.comparison import (
    Expected,
    Observation,
    Sample,
    find_expected,
    holm,
    load_expected,
    two_level_bootstrap,
    welch,
)
from moco_pretrain.report import BASELINE_NAMES, main

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
    assert (moco["verdict_supervised"], moco["verdict_random"]) == ("better", "better")
    assert float(table[("detection", "sup", "bbox/AP")]["std"]) == pytest.approx(0.2)
    assert float(table[("detection", "rand", "bbox/AP75")]["mean"]) == pytest.approx(40.2)
    assert not any(m == "bbox/AP-person" for _, _, m in table)
    knn = table[("knn", "moco", "top1")]  # one trial: no std; no baseline rows for knn
    assert (knn["n"], knn["mean"], knn["std"], knn["diff_supervised"]) == ("1", "61.5", "", "")

    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "| row | n trials | n backbones | bbox/AP50 | bbox/AP | bbox/AP75 |" in markdown
    assert "| moco | 5 | 5 | 82.40 ± 0.14 | 57.40 ± 0.14 | 62.40 ± 0.14 |" in markdown
    p, holm_p = float(moco["p_supervised"]), float(moco["holm_p_supervised"])
    welch_cell = f"+1.10 [+0.70, +1.50] better; p {p:.3f}, Holm {holm_p:.3f}"
    assert f"| bbox/AP50 | moco - sup | {welch_cell} |" in markdown
    assert "## knn" in markdown and "## lincls" in markdown
    assert markdown in capsys.readouterr().out
    assert (tmp_path / "report" / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _row(root: Path, label: str, values: list[float], **extra) -> str:
    for trial, value in enumerate(values):
        result = {"task": "detection", "metrics": {"bbox/AP": value}, "trial": trial, **extra}
        _write(root / label / f"trial_{trial}" / "results.json", result)
    return f"{label}={root / label}"


def test_welch_interval_and_verdict_equal_hand_computed_values(tmp_path):
    """Row [10, 12, 14] vs a baseline of three 5s: mean difference 7, standard error
    2 / sqrt(3), Welch degrees of freedom (s^2/n)^2 / ((s^2/n)^2 / 2) = 2, and Student's t with 2
    degrees of freedom has the closed form t_p = (2p - 1) / sqrt(2p(1 - p)): t_0.975 = 4.30265.
    The same row against one trial of 5 has no interval."""
    root = tmp_path / "runs"
    rows = [_row(root, "base", [5.0, 5.0, 5.0]), _row(root, "new", [10.0, 12.0, 14.0])]
    rows.append(_row(root, "once", [5.0]))
    main([*rows, "--supervised", "base", "--random", "once", "--output", str(tmp_path / "r")])
    new = _csv(tmp_path / "r")[("detection", "new", "bbox/AP")]
    half = (0.95 / math.sqrt(2 * 0.975 * 0.025)) * 2 / math.sqrt(3)
    assert float(new["diff_supervised"]) == pytest.approx(7.0)
    assert float(new["low_supervised"]) == pytest.approx(7.0 - half, rel=1e-9)
    assert float(new["high_supervised"]) == pytest.approx(7.0 + half, rel=1e-9)
    assert new["verdict_supervised"] == "better"
    assert float(new["diff_random"]) == pytest.approx(7.0)
    assert (new["low_random"], new["high_random"]) == ("", "")
    assert new["verdict_random"] == "single trial: no interval"
    t = 7.0 / (2 / math.sqrt(3))  # Student's t with 2 degrees of freedom: p = 1 - t / sqrt(2 + t^2)
    assert float(new["p_supervised"]) == pytest.approx(1 - t / math.sqrt(2 + t**2), rel=1e-9)
    assert new["p_random"] == ""
    markdown = (tmp_path / "r" / "report.md").read_text()
    assert "| bbox/AP | new - once | +7.00 (single trial: no interval) |" in markdown


def test_overlapping_rows_are_within_noise(tmp_path):
    root = tmp_path / "runs"
    rows = [_row(root, "a", [10.0, 12.0, 14.0]), _row(root, "b", [11.0, 13.0, 15.0])]
    main([*rows, "--supervised", "a", "--output", str(tmp_path / "r")])
    assert _csv(tmp_path / "r")[("detection", "b", "bbox/AP")]["verdict_supervised"] == (
        "within noise"
    )


def test_trials_of_different_protocols_are_not_pooled(tmp_path, capsys):
    root = tmp_path / "runs"
    for trial, (protocol, value) in enumerate(
        (("a" * 64, 10.0), ("a" * 64, 12.0), ("b" * 64, 30.0))
    ):
        result = {"task": "detection", "metrics": {"bbox/AP": value}, "trial": trial}
        result["protocol"] = {"config_sha256": protocol, "world_size": 8 if protocol < "b" else 1}
        _write(root / "moco" / f"trial_{trial}" / "results.json", result)
    main([f"moco={root / 'moco'}", "--output", str(tmp_path / "r")])
    table = _csv(tmp_path / "r")
    assert table[("detection", "moco [aaaaaaaa]", "bbox/AP")]["mean"] == "11.0"
    assert table[("detection", "moco [bbbbbbbb]", "bbox/AP")]["n"] == "1"
    note = "row 'moco' (detection): its trials ran 2 different protocols"
    assert note in capsys.readouterr().err and note in (tmp_path / "r" / "report.md").read_text()
    # named as a baseline, a split row is its part with the most trials
    main([f"moco={root / 'moco'}", "--random", "moco", "--output", str(tmp_path / "r2")])
    other = _csv(tmp_path / "r2")[("detection", "moco [bbbbbbbb]", "bbox/AP")]
    assert float(other["diff_random"]) == pytest.approx(30.0 - 11.0)
    assert other["verdict_random"] == "single trial: no interval"
    assert "baseline 'moco' ran several protocols: compared with 'moco [aaaaaaaa]'" in (
        capsys.readouterr().err
    )


V2_200 = {
    "method": "moco_v2",
    "epochs": 200,
}  # a trial's "pretraining", as moco-transfer records it


def _record_moco_trials(runs: Path, **extra) -> None:
    """Give the fabricated moco trials a recorded config (and ``extra`` entries)."""
    for root in (runs / "moco").glob("trial_*"):
        result = json.loads((root / "results.json").read_text())
        result["config"] = {"MOCO": {"INIT": "moco"}, "SOLVER": {"MAX_ITER": 24000}}
        _write(root / "results.json", result | extra)


def _expected_file(path: Path, *, checked: str, match: str = "") -> Path:
    path.write_text(
        f'- {{name: "VOC MoCo", source: "a table", checked: {checked}, trials: 5,'
        f" match: {{MOCO.INIT: moco, SOLVER.MAX_ITER: 24000{match}}},"
        " metrics: {bbox/AP50: [82.5, 0.2], bbox/AP: [80.0, 0.2]}}\n"
    )
    return path


def test_rows_far_from_their_expected_numbers_are_flagged(tmp_path):
    """moco (AP50 82.4 ± 0.14, n 5) against 82.5 ± 0.2 over 5 trials: 0.1 apart, two combined
    standard errors are 2 sqrt(0.02/5 + 0.04/5) = 0.22: fine. Against 80.0 (AP 57.4): flagged
    below. The entry names the pretraining method and epochs the trials record."""
    rows = _fabricate(tmp_path / "runs")
    _record_moco_trials(tmp_path / "runs", pretraining=V2_200)
    match = ", pretraining.method: moco_v2, pretraining.epochs: 200"
    expected = _expected_file(tmp_path / "expected.yaml", checked="paper", match=match)
    main([*rows, "--expected", str(expected), "--output", str(tmp_path / "r")])
    table = _csv(tmp_path / "r")
    ap50, ap = table[("detection", "moco", "bbox/AP50")], table[("detection", "moco", "bbox/AP")]
    assert (ap50["expected_mean"], ap50["expected_n"], ap50["expected_flag"]) == ("82.5", "5", "")
    assert (ap["expected_mean"], ap["expected_flag"]) == ("80.0", "below expected")
    assert table[("detection", "sup", "bbox/AP")]["expected_mean"] == ""  # no entry matches
    markdown = (tmp_path / "r" / "report.md").read_text()
    assert "- moco: VOC MoCo (a table; 5 trials): bbox/AP50 82.40 vs 82.50 ± 0.20" in markdown
    assert "**below expected: bbox/AP**" in markdown and "SOLVER.IMS_PER_BATCH" in markdown


def test_unverified_numbers_are_shown_but_never_flag_a_row(tmp_path):
    rows = _fabricate(tmp_path / "runs")
    _record_moco_trials(tmp_path / "runs")
    for checked, shown in (("transcription", "transcription"), ('"no"', "no")):
        expected = _expected_file(tmp_path / "expected.yaml", checked=checked)
        main([*rows, "--expected", str(expected), "--output", str(tmp_path / "r")])
        ap = _csv(tmp_path / "r")[("detection", "moco", "bbox/AP")]
        assert (ap["expected_mean"], ap["expected_flag"]) == ("80.0", "")  # 57.4 vs 80.0
        markdown = (tmp_path / "r" / "report.md").read_text()
        assert (
            f"- moco: VOC MoCo (a table; 5 trials; unverified (checked: {shown}),"
            " never flagged): bbox/AP50 82.40 vs 82.50 ± 0.20"
        ) in markdown
        assert "below expected" not in markdown


def test_a_v1_entry_never_judges_a_v2_run(tmp_path):
    """The same config with other weights: an entry naming MoCo v1 200 epochs matches trials that
    record it, not v2 trials nor trials without a record (weights from another converter)."""
    rows = _fabricate(tmp_path / "runs")
    match = ", pretraining.method: moco_v1, pretraining.epochs: 200"
    expected = _expected_file(tmp_path / "expected.yaml", checked="paper", match=match)
    for pretraining, shown in (
        (V2_200, ""), (None, ""), ({"method": "moco_v1", "epochs": 800}, ""),
        ({"method": "moco_v1", "epochs": 200, "seed": 3}, "80.0"),
    ):  # fmt: skip
        _record_moco_trials(tmp_path / "runs", pretraining=pretraining)
        main([*rows, "--expected", str(expected), "--output", str(tmp_path / "r")])
        assert _csv(tmp_path / "r")[("detection", "moco", "bbox/AP")]["expected_mean"] == shown


def test_a_single_trial_is_checked_with_the_references_std():
    """One trial has no std: 82.4 against 82.5 ± 0.2 (5 trials) is within 2 sqrt(0.04 + 0.008)."""
    expected = Expected("VOC", "paper", 5, {"bbox/AP50": (82.5, 0.2)}, "readme")
    assert expected.verified
    assert expected.check("bbox/AP50", Sample(1, 82.4, math.nan)) is None
    assert expected.check("bbox/AP50", Sample(1, 82.0, math.nan)) == "below expected"
    assert welch(Sample(0, math.nan, math.nan), Sample(3, 1.0, 0.1)).verdict == "no data"


@pytest.mark.parametrize("checked", ["transcription", "no"])
def test_an_unverified_entry_flags_nothing(checked):
    expected = Expected("VOC", "a table", 5, {"bbox/AP50": (82.5, 0.2)}, checked)
    assert not expected.verified
    assert expected.check("bbox/AP50", Sample(5, 60.0, 0.1)) is None  # 225 standard errors off


def test_find_expected_reads_pretraining_keys_from_the_provenance():
    entries = [
        ({"MOCO.INIT": "moco", "pretraining.method": "moco_v2"}, "v2"),
        ({"MOCO.INIT": "moco", "pretraining.data.images": 3}, "nested"),
        ({"MOCO.INIT": "moco"}, "any"),
    ]
    config = {"MOCO": {"INIT": "moco"}, "pretraining": {"method": "moco_v2"}}  # not a provenance
    assert find_expected(entries, config) == ["any"]
    assert find_expected(entries, config, {"method": "moco_v2"}) == ["v2", "any"]
    assert find_expected(entries, config, {"method": "moco_v1", "data": {"images": 3}}) == [
        "nested", "any",
    ]  # fmt: skip


def test_malformed_checked_values_are_named(tmp_path):
    for value, shown in (("paperish", "'paperish'"), ("no", "False")):  # YAML: a bare no is false
        path = _expected_file(tmp_path / "expected.yaml", checked=value)
        with pytest.raises(ValueError, match=rf"entry 0 is malformed .*checked is {shown}"):
            load_expected(path)
    (tmp_path / "expected.yaml").write_text(
        "- {name: x, source: y, trials: 1, match: {}, metrics: {a: [1, null]}}\n"
    )
    with pytest.raises(ValueError, match="entry 0 is malformed \\(KeyError: 'checked'\\)"):
        load_expected(tmp_path / "expected.yaml")


V1_200 = {"method": "moco_v1", "epochs": 200}


@pytest.mark.parametrize(
    ("config", "pretraining", "entry"),
    [
        ("detection/pascal_voc_R_50_C4_24k_moco.yaml", V2_200, "24k iterations: MoCo v2, 200 epochs"),
        ("detection/pascal_voc_R_50_C4_24k_moco.yaml", {"method": "moco_v2", "epochs": 800},
         "24k iterations: MoCo v2, 800 epochs"),
        ("detection/pascal_voc_R_50_C4_24k_moco.yaml", V1_200, "24k iterations: MoCo v1, 200 epochs"),
        ("detection/pascal_voc_R_50_C4_24k_moco.yaml", None, None),  # weights of unknown origin
        ("detection/pascal_voc_R_50_C4_24k.yaml", None, "24k iterations: ImageNet-1M supervised"),
        ("detection/coco_R_50_FPN_1x_random.yaml", None, "R50-FPN 1x: random init"),
        ("detection/coco_R_50_C4_2x_moco.yaml", V1_200, "R50-C4 2x: MoCo v1"),
        ("detection/coco_R_50_C4_2x_moco.yaml", V2_200, None),  # the paper has v1 numbers only
        ("detection/lvis_v0.5_R_50_FPN_2x.yaml", None, "supervised, BN tuned"),
        ("detection/lvis_v0.5_R_50_FPN_2x_frozenbn.yaml", None, "supervised, BN frozen"),
        ("detection/lvis_v0.5_R_50_FPN_2x_moco.yaml", V1_200, "R50-FPN 2x: MoCo v1"),
        # the study's entries hold for its protocol (10 classes, lr 0.04), not today's recipe
        ("detection/fashion_scenes_R_18_FPN_sup.yaml", {"method": "supervised", "epochs": 2}, None),
        ("detection/fashion_scenes_R_18_FPN_moco.yaml", {"method": "moco_v2", "epochs": 2}, None),
        ("detection/deepforest_R_50_C4_random.yaml", None, "100 iterations: random init"),
        ("detection/pascal_voc_R_50_C4_24k_tvsup.yaml", None, None),  # no published number
        ("detection/instant_test_voc_R_50_C4.yaml", None, None),
    ],
)  # fmt: skip
def test_each_benchmark_config_as_recorded_matches_its_expected_entry(config, pretraining, entry):
    """The config as moco-transfer records it (detectron2 defaults + plugin keys + the YAML,
    through yaml) and the weights' provenance against the packaged file."""
    pytest.importorskip("detectron2")
    from detectron2.config import get_cfg

    from moco_pretrain.recipes import config_root, resolve_config_file
    from transfer.config import add_moco_config

    cfg = get_cfg()
    add_moco_config(cfg)
    cfg.merge_from_file(str(resolve_config_file(config)))
    entries = load_expected(config_root() / "expected.yaml")
    found = find_expected(entries, yaml.safe_load(cfg.dump()), pretraining)
    assert [entry in e.name for e in found] == ([True] if entry else [])


def test_the_packaged_expected_numbers_load_and_match_one_entry_each():
    from moco_pretrain.recipes import config_root

    entries = load_expected(config_root() / "expected.yaml")
    voc_moco = {"MOCO": {"INIT": "moco"}, "DATASETS": {"TEST": ["voc_2007_test"]},
                "SOLVER": {"MAX_ITER": 24000}, "MODEL": {"RESNETS": {"DEPTH": 50}}}  # fmt: skip
    (found,) = find_expected(entries, voc_moco, {**V2_200, "arch": "resnet50", "seed": 0})
    assert found.metrics["bbox/AP50"] == (82.4, 0.2) and found.trials == 5
    assert found.checked == "readme" and found.verified
    (random,) = find_expected(entries, voc_moco | {"MOCO": {"INIT": "random"}})
    assert random.metrics["bbox/AP50"] == (60.2, 0.2) and not random.verified  # Table 2b, R50-C4
    assert len({e.name for _, e in entries}) == len(entries)
    for match, e in entries:
        if match["MOCO.INIT"] == "moco":  # never judged against another method's numbers
            assert {"pretraining.method", "pretraining.epochs"} <= set(match), e.name
        assert (e.checked == "study") == e.source.startswith("results/"), e.name


def test_bad_files_are_named_and_skipped(tmp_path, capsys):
    rows = _fabricate(tmp_path / "runs")
    bad = {
        "truncated": '{"task": "detection", "metr',
        "no_metrics": json.dumps({"task": "detection"}),
        "text_metric": json.dumps({"task": "detection", "metrics": {"bbox/AP": "high"}}),
        "other_task": json.dumps({"task": "segmentation", "metrics": {"mIoU": 70.0}}),
    }
    for name, text in bad.items():
        (tmp_path / "runs" / "sup" / name).mkdir()
        (tmp_path / "runs" / "sup" / name / "results.json").write_text(text)
    assert main([*rows, "--output", str(tmp_path / "r")]) == 0
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 4 and all(line.startswith("moco-report: skipped ") for line in errors)
    for name in bad:
        assert sum(f"{name}/results.json" in line for line in errors) == 1
    assert _csv(tmp_path / "r")[("detection", "sup", "bbox/AP50")]["n"] == "3"  # the rest stays


def test_rerunning_is_idempotent_and_picks_up_new_trials(tmp_path):
    rows = _fabricate(tmp_path / "runs")
    out = tmp_path / "report"
    main([*rows, "--output", str(out)])
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    main([*rows, "--output", str(out)])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first  # nothing doubled
    assert sorted(first) == ["report.csv", "report.md", "report.png"]  # no temporary files

    metrics = {"bbox/AP50": 81.3, "bbox/AP": 56.3, "bbox/AP75": 61.3}
    result = {"task": "detection", "metrics": metrics, "init": "supervised"}
    _write(tmp_path / "runs/sup/trial_3/results.json", result)
    main([*rows, "--output", str(out)])
    assert _csv(out)[("detection", "sup", "bbox/AP50")]["n"] == "4"


def test_explicit_baselines_and_errors(tmp_path, capsys):
    rows = _fabricate(tmp_path / "runs")
    out = str(tmp_path / "report")
    main([*rows, "--supervised", "moco", "--random", "sup", "--output", out])
    moco = _csv(Path(out))[("detection", "moco", "bbox/AP50")]
    assert moco["diff_supervised"] == ""  # the baseline itself
    markdown = (Path(out) / "report.md").read_text()
    assert "## Notes" not in markdown  # moco's knn and lincls rows do not split it
    knn = markdown[markdown.index("## knn") : markdown.index("## lincls")]
    assert "Difference vs" not in knn  # the baseline alone: nothing to compare
    assert float(moco["diff_random"]) == pytest.approx(1.1)
    for extra, pattern in (
        (["--supervised", "nope"], "baseline row 'nope' is not among"),
        ([f"again={tmp_path / 'runs' / 'moco'}"], "belongs to rows 'moco' and 'again'"),
    ):
        _fails(capsys, [*rows, *extra, "--output", out], pattern)
    _fails(capsys, [f"empty={tmp_path}/nothing", "--output", out], "no results.json under")
    _write(tmp_path / "bad" / "results.json", {"metrics": {}})
    _fails(capsys, [str(tmp_path / "bad"), "--output", out], "no readable results")


def _fails(capsys, argv: list[str], pattern: str) -> None:
    """Bad input: exit status 2 and one ``moco-report: error: ...`` line on stderr."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert pattern in capsys.readouterr().err


def _study(
    root: Path,
    label: str,
    per_backbone: dict[int | None, list[float]],
    *,
    init: str,
    primary: str | None = "bbox/AP",
    recipe: str = "r" * 64,
    **extra,
) -> str:
    """A row of trials: per pretraining seed (None: random init, every trial its own backbone)
    the bbox/AP of trial seeds 0, 1, ...; bbox/AP50 is bbox/AP + 20."""
    for pretraining_seed, values in per_backbone.items():
        for seed, value in enumerate(values):
            result = {
                "task": "detection", "metrics": {"bbox/AP": value, "bbox/AP50": value + 20},
                "init": init, "seed": seed, "trial": seed,
                "protocol": {"recipe_sha256": recipe, "config_sha256": f"{label}{pretraining_seed}"},
                "config": {"MOCO": {"PRIMARY_METRIC": primary}} if primary else {}, **extra,
            }  # fmt: skip
            if pretraining_seed is not None:
                sha256 = f"{label}{pretraining_seed}".ljust(64, "0")
                result |= {"checkpoint": f"{label}.pkl", "checkpoint_sha256": sha256}
                result["pretraining"] = {"seed": pretraining_seed}
            folder = root / label / f"backbone_{pretraining_seed}" / f"trial_{seed}"
            _write(folder / "results.json", result)
    return f"{label}={root / label}"


SUP = {0: [50.0, 51.0, 52.0]}
MOCO = {0: [53.0, 55.0, 54.0], 1: [56.0, 57.0, 55.0], 2: [52.0, 53.0, 54.0]}
RANDOM = {None: [40.0, 42.0, 41.0]}


def _observations(per_backbone: dict[int | None, list[float]]) -> list[Observation]:
    return [
        Observation(v, f"{p}" if p is not None else f"trial {s}", s, p)
        for p, values in per_backbone.items()
        for s, v in enumerate(values)
    ]


def test_the_primary_metric_is_the_confirmatory_family(tmp_path):
    """bbox/AP declared: its 3 comparisons are one Holm family, bbox/AP50's another. MoCo holds
    3 pretrained backbones, one row by recipe_sha256 though its config_sha256 differ; its
    bootstrap is the two-level one; with one trial seed set and one recipe, every pair is paired,
    by trial seed over MoCo's backbone means (the supervised row has one pretraining seed)."""
    root = tmp_path / "runs"
    rows = [_study(root, "sup", SUP, init="supervised"), _study(root, "moco", MOCO, init="moco")]
    rows.append(_study(root, "rand", RANDOM, init="random"))
    main([*rows, "--output", str(tmp_path / "r")])
    table = _csv(tmp_path / "r")
    moco = table[("detection", "moco", "bbox/AP")]
    assert (moco["n"], moco["n_backbones"], moco["family"]) == ("9", "3", "primary")
    assert table[("detection", "moco", "bbox/AP50")]["family"] == "secondary"
    for metric in ("bbox/AP", "bbox/AP50"):
        lines = [table[("detection", r, metric)] for r in ("sup", "moco", "rand")]
        for prefix in ("", "bootstrap_", "paired_"):
            found = [(line[f"{prefix}p_{b}"], line[f"{prefix}holm_p_{b}"])
                     for line in lines for b in BASELINE_NAMES if line[f"{prefix}p_{b}"]]  # fmt: skip
            assert len(found) == 3  # moco - sup, moco - rand, sup - rand: each pair once
            raw, adjusted = zip(*((float(p), float(h)) for p, h in found), strict=True)
            assert list(adjusted) == pytest.approx(holm(list(raw)), rel=1e-12)

    expected = two_level_bootstrap(_observations(MOCO), _observations(SUP))
    assert float(moco["bootstrap_diff_supervised"]) == pytest.approx(54.0 + 1 / 3 - 51.0)
    assert float(moco["bootstrap_low_supervised"]) == pytest.approx(expected.low, rel=1e-12)
    assert float(moco["bootstrap_p_supervised"]) == pytest.approx(expected.p, rel=1e-12)
    per_seed = [statistics.fmean(values[s] for values in MOCO.values()) for s in range(3)]
    assert float(moco["paired_p_supervised"]) == pytest.approx(
        stats.ttest_rel(per_seed, SUP[0]).pvalue, rel=1e-10
    )
    assert float(moco["paired_p_random"]) == pytest.approx(
        stats.ttest_rel(per_seed, RANDOM[None]).pvalue, rel=1e-10
    )

    markdown = (tmp_path / "r" / "report.md").read_text()
    assert markdown.index("### Primary metric: bbox/AP") < markdown.index("### Secondary metrics")
    assert (
        "Confirmatory (declared in MOCO.PRIMARY_METRIC): Holm over its 3 comparisons." in markdown
    )
    assert "| row | n trials | n backbones | bbox/AP |\n" in markdown
    assert "| moco | 9 | 3 | 54.33 ± 1.58 |" in markdown
    assert "| moco | pretraining seed 1 | 3 | 56.00 ± 1.00 | 76.00 ± 1.00 |" in markdown
    assert (
        "  - moco - sup: by trial seed (3 pairs; each side the mean over its backbones" in markdown
    )
    bootstrap = f"{float(moco['bootstrap_high_supervised']):+.2f}] better; p "
    assert (
        f"| bbox/AP | moco - sup | {_difference_text(moco)}" in markdown and bootstrap in markdown
    )


def test_welch_over_backbone_means_takes_each_backbone_as_one_value(tmp_path):
    """MoCo's 3 backbone means against random init's 3 trials (each its own backbone); the
    supervised row has one backbone, so no interval."""
    root = tmp_path / "runs"
    rows = [_study(root, "sup", SUP, init="supervised"), _study(root, "moco", MOCO, init="moco")]
    rows.append(_study(root, "rand", RANDOM, init="random"))
    main([*rows, "--output", str(tmp_path / "r")])
    moco = _csv(tmp_path / "r")[("detection", "moco", "bbox/AP")]
    means = [statistics.fmean(values) for values in MOCO.values()]
    expected = stats.ttest_ind(means, RANDOM[None], equal_var=False)
    assert float(moco["backbones_p_random"]) == pytest.approx(expected.pvalue, rel=1e-10)
    assert float(moco["backbones_diff_random"]) == pytest.approx(
        statistics.fmean(means) - statistics.fmean(RANDOM[None])
    )
    assert moco["backbones_p_supervised"] == "" and moco["backbones_verdict_supervised"] == (
        "single trial: no interval"
    )
    assert "Welch over backbone means 95 %" in (tmp_path / "r" / "report.md").read_text()


def test_confirmatory_rows_narrow_the_primary_family(tmp_path, capsys):
    """--confirmatory moco: only moco's 2 primary comparisons are one Holm family; sup - rand
    joins the secondary ones; naming no row makes every comparison secondary."""
    root = tmp_path / "runs"
    rows = [_study(root, "sup", SUP, init="supervised"), _study(root, "moco", MOCO, init="moco")]
    rows.append(_study(root, "rand", RANDOM, init="random"))
    main([*rows, "--output", str(tmp_path / "r"), "--confirmatory", "moco"])
    table = _csv(tmp_path / "r")
    primary = [table[("detection", "moco", "bbox/AP")][f"holm_p_{b}"] for b in BASELINE_NAMES]
    raw = [float(table[("detection", "moco", "bbox/AP")][f"p_{b}"]) for b in BASELINE_NAMES]
    assert [float(p) for p in primary] == pytest.approx(holm(raw), rel=1e-12)
    assert table[("detection", "sup", "bbox/AP")]["family"] == "secondary"
    secondary = [
        float(line[f"p_{b}"]) for (_, row, metric), line in table.items()
        for b in BASELINE_NAMES if line[f"p_{b}"] and line["family"] == "secondary"
    ]  # fmt: skip
    assert len(secondary) == 4  # bbox/AP50's 3 comparisons and sup - rand on bbox/AP
    sup = table[("detection", "sup", "bbox/AP")]
    assert float(sup["holm_p_random"]) == pytest.approx(
        holm(secondary)[secondary.index(float(sup["p_random"]))], rel=1e-12
    )
    markdown = (tmp_path / "r" / "report.md").read_text()
    assert "Confirmatory (declared in MOCO.PRIMARY_METRIC) for moco: Holm over their 2" in markdown
    main([*rows, "--output", str(tmp_path / "none"), "--confirmatory"])
    assert {line["family"] for line in _csv(tmp_path / "none").values()} == {"secondary"}
    with pytest.raises(SystemExit) as exit_info:
        main([*rows, "--output", str(tmp_path / "bad"), "--confirmatory", "MoCo"])
    assert exit_info.value.code == 2
    assert "confirmatory rows that are not here: ['MoCo']" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def _difference_text(line: dict[str, str]) -> str:
    diff, low, high = (
        float(line[k]) for k in ("diff_supervised", "low_supervised", "high_supervised")
    )
    return f"{diff:+.2f} [{low:+.2f}, {high:+.2f}] {line['verdict_supervised']}; p "


def test_pairs_only_on_one_recipe_and_one_set_of_trial_seeds(tmp_path):
    root = tmp_path / "runs"
    rows = [
        _study(root, "sup", {0: [50.0, 51.0]}, init="supervised"),
        _study(root, "moco", MOCO, init="moco"),
        _study(root, "rand", RANDOM, init="random", recipe="x" * 64),
    ]
    main([*rows, "--output", str(tmp_path / "r")])
    moco = _csv(tmp_path / "r")[("detection", "moco", "bbox/AP")]
    assert (moco["paired_p_supervised"], moco["paired_p_random"]) == ("", "")
    markdown = (tmp_path / "r" / "report.md").read_text()
    assert "  - moco - sup: not shown: trial seeds differ ({0, 1, 2} vs {0, 1})" in markdown
    assert "  - moco - rand: not shown: the recipes differ beyond the weights" in markdown


def test_a_primary_metric_not_reported_or_not_agreed_is_refused(tmp_path, capsys):
    root, out = tmp_path / "runs", tmp_path / "r"
    sup, moco = (
        _study(root, "sup", SUP, init="supervised"),
        _study(root, "moco", MOCO, init="moco"),
    )
    main([sup, moco, "--output", str(out)])
    written = {p.name: p.read_bytes() for p in out.iterdir()}
    _study(root, "sup", SUP, init="supervised", primary="segm/AP")
    _study(root, "moco", MOCO, init="moco", primary="segm/AP")
    _fails(capsys, [sup, moco, "--output", str(out)],
           "the primary metric 'segm/AP' (detection, MOCO.PRIMARY_METRIC of sup, moco) is not among"
           " the metrics its trials report: bbox/AP50, bbox/AP")  # fmt: skip
    _study(root, "moco", MOCO, init="moco", primary="bbox/AP50")
    _fails(capsys, [sup, moco, "--output", str(out)],
           "rows of detection declare different primary metrics (MOCO.PRIMARY_METRIC): 'segm/AP'"
           " by sup; 'bbox/AP50' by moco")  # fmt: skip
    _fails(capsys, [sup, moco, "--primary", "bbox/AP25", "--output", str(out)],
           "--primary 'bbox/AP25' is not among the metrics the trials report")  # fmt: skip
    assert {p.name: p.read_bytes() for p in out.iterdir()} == written  # nothing overwritten

    main([sup, moco, "--primary", "bbox/AP50", "--output", str(out)])  # --primary decides
    assert _csv(out)[("detection", "moco", "bbox/AP50")]["family"] == "primary"
    assert (
        "primary metric 'bbox/AP50' set by --primary, not the declared" in capsys.readouterr().err
    )


def test_different_class_partitions_are_refused(tmp_path, capsys):
    root, out = tmp_path / "runs", tmp_path / "r"
    first = {"source": ["cat", "dog"], "target": ["cow"]}
    sup = _study(root, "sup", SUP, init="supervised", partition=first)
    moco = _study(
        root, "moco", MOCO, init="moco", partition={"source": ["dog", "cat"], "target": ["cow"]}
    )
    assert main([sup, moco, "--output", str(out)]) == 0  # the same partition, in another order
    _study(root, "moco", MOCO, init="moco", partition={"source": ["cat"], "target": ["cow", "dog"]})
    _fails(capsys, [sup, moco, "--output", str(tmp_path / "r2")],
           "rows 'sup' and 'moco' (detection) record different class partitions, which are not"
           " comparable: source [cat, dog] / target [cow] vs source [cat] / target [cow, dog]")  # fmt: skip
    _study(root, "moco", MOCO, init="moco")
    _fails(capsys, [sup, moco, "--output", str(tmp_path / "r2")],
           "source [cat, dog] / target [cow] vs no partition recorded")  # fmt: skip
    _study(root, "more", {7: [1.0]}, init="moco", partition=first)
    _fails(capsys, [f"moco={root}", "--output", str(tmp_path / "r2")],
           "row 'moco' (detection) holds trials of different class partitions")  # fmt: skip
    assert not (tmp_path / "r2").exists()


def test_the_report_starts_without_torch():
    """``moco-report`` reads JSON files: importing it must not pull in torch (docs/architecture.md)."""
    import subprocess
    import sys

    code = "import sys, moco_pretrain.report; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_holm_counts_every_hypothesis_of_the_family_even_where_an_analysis_is_missing(tmp_path):
    """Only moco - rand can be paired (the supervised row ran other seeds): its paired p is
    still corrected over the family's 3 comparisons, as if the other two had p = 1."""
    root = tmp_path / "runs"
    rows = [
        _study(root, "sup", {0: [50.0, 51.0]}, init="supervised"),
        _study(root, "moco", MOCO, init="moco"),
        _study(root, "rand", RANDOM, init="random"),
    ]
    main([*rows, "--output", str(tmp_path / "r")])
    table = _csv(tmp_path / "r")
    moco = table[("detection", "moco", "bbox/AP")]
    assert moco["paired_p_supervised"] == "" and table[("detection", "sup", "bbox/AP")][
        "paired_p_random"] == ""  # fmt: skip
    assert float(moco["paired_holm_p_random"]) == pytest.approx(
        min(1.0, 3 * float(moco["paired_p_random"])), rel=1e-12
    )
