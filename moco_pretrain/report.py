"""``moco-report``: mean ± std over trials, and for each row against the supervised and random
rows a Welch interval over trials, one over backbone means and a two-level bootstrap interval
(both with pretraining variance) and, where valid, a paired interval, each with its raw and
Holm-adjusted p; and each row against its expected numbers.

    moco-report supervised=out/voc_sup moco=out/voc_moco random=out/voc_random --output report/

Each ``[LABEL=]DIR`` is one row: every ``results.json`` below ``DIR`` (written per trial by
``moco-transfer``, and by ``moco-knn`` / ``moco-lincls``) is one trial. The analyses (those of
:mod:`moco_pretrain.comparison`), the primary metric and the Holm families, backbones, pairing,
pooling, class partitions, bad files and expected numbers are described in docs/transfer.md,
section "3. Report". Writes ``report.md``, ``report.csv`` and ``report.png`` into ``--output``,
each replaced atomically and computed from the files alone (a file reached through two rows is an
error); bad input is one line and exit status 2, with nothing written. The standard deviation is
the sample one (n - 1), as the paper's 5-trial std; n = 1 gives none.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .cli.common import exit_on_user_error
from .comparison import (
    LIKELY_CAUSES,
    RESAMPLES,
    TESTS,
    Difference,
    Expected,
    Observation,
    Sample,
    by_backbone,
    config_value,
    find_expected,
    holm,
    load_expected,
    pair,
    paired_t,
    two_level_bootstrap,
    welch,
)
from .files import atomic_write
from .recipes import config_root
from .results import RESULTS_FILE, read_results

__all__ = [
    "Row",
    "Trial",
    "collect_rows",
    "primary_metrics",
    "render_csv",
    "render_markdown",
    "main",
]

# the paper's column order (VOC: AP50, AP, AP75; COCO: AP^bb..., AP^mk...); then kNN/linear top-k
DEFAULT_METRICS = (
    "bbox/AP50", "bbox/AP", "bbox/AP75", "segm/AP50", "segm/AP", "segm/AP75",
    "keypoints/AP50", "keypoints/AP", "keypoints/AP75", "sem_seg/mIoU", "sem_seg/fwIoU",
    "sem_seg/pACC", "top1", "top5",
)  # fmt: skip
TASKS = ("detection", "sem_seg", "lincls", "knn", "supervised")
BASELINE_NAMES = ("supervised", "random")
PRIMARY_KEY = "MOCO.PRIMARY_METRIC"
TEST_NAMES = {
    "welch": "Welch", "backbones": "Welch over backbone means", "bootstrap": "two-level bootstrap",
    "paired": "paired t",
}  # fmt: skip


@dataclass(frozen=True)
class Trial:
    """One ``results.json``: its metrics and what it shares with other trials."""

    metrics: dict[str, float]
    backbone: str  # checkpoint_sha256, else the weights path or URL; random init: the file
    backbone_name: str  # "pretraining seed 3", a short sha256, the path
    pretrained: bool  # False: the trial's own random init
    seed: int | None  # the fine-tuning seed
    pretraining_seed: int | None

    def observation(self, metric: str) -> Observation:
        return Observation(self.metrics[metric], self.backbone, self.seed, self.pretraining_seed)


@dataclass
class Row:
    """The trials of one ``LABEL=DIR`` argument for one task and protocol."""

    label: str
    task: str
    base_label: str = ""  # the LABEL given, when the label carries a protocol suffix
    inits: set[str] = field(default_factory=set)
    trials: list[Trial] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)  # the first trial's recorded config
    recipe: str | None = None  # protocol.recipe_sha256 where recorded: pairing needs it
    declared: dict[str, int] = field(default_factory=dict)  # MOCO.PRIMARY_METRIC -> trials
    pretraining: dict[str, Any] = field(default_factory=dict)  # and its weights' provenance
    expected: Expected | None = None

    def sample(self, metric: str) -> Sample:
        """``metric`` over the trials that report it (NaN std when n < 2)."""
        return Sample.of([t.metrics[metric] for t in self.trials if metric in t.metrics])

    def observations(self, metric: str) -> list[Observation]:
        return [t.observation(metric) for t in self.trials if metric in t.metrics]

    def backbone_sample(self, metric: str) -> Sample:
        """``metric`` over the backbones: each backbone's mean over its trials is one value (the
        backbone as the unit, as a user re-running the recipe meets it)."""
        groups = by_backbone(self.observations(metric)).values()
        return Sample.of([statistics.fmean(values) for values in groups])

    def backbones(self) -> dict[str, list[Trial]]:
        """The trials per backbone, in the order the backbones first appear."""
        groups: dict[str, list[Trial]] = {}
        for trial in self.trials:
            groups.setdefault(trial.backbone, []).append(trial)
        return groups


def _parse_row_arg(arg: str) -> tuple[str, Path]:
    label, sep, path = arg.partition("=")
    return (label, Path(path)) if sep else (Path(arg).name, Path(arg))


def _integer(where: dict[str, Any], key: str, path: Path) -> int | None:
    value = where.get(key)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
        raise ValueError(f"{path}: {key!r} must be an integer, got {value!r}")
    return value


def _trial(result: dict[str, Any], path: Path) -> Trial:
    """The :class:`Trial` of a results record read from ``path``.

    Raises:
        ValueError: naming ``path``: a seed that is no integer, or a malformed ``pretraining``.
    """
    pretraining = result.get("pretraining") or {}
    if not isinstance(pretraining, dict):
        raise ValueError(f"{path}: 'pretraining' must be an object")
    seed, pretraining_seed = _integer(result, "seed", path), _integer(pretraining, "seed", path)
    sha256, weights = result.get("checkpoint_sha256"), result.get("checkpoint")
    backbone = sha256 or weights or str(path)
    if pretraining_seed is not None:
        name = f"pretraining seed {pretraining_seed}"
    else:
        name = sha256[:8] if sha256 else str(backbone)
    metrics = {k: float(v) for k, v in result["metrics"].items()}
    return Trial(metrics, backbone, name, bool(sha256 or weights), seed, pretraining_seed)


def _partition(result: dict[str, Any], path: Path) -> tuple[tuple[str, ...], ...] | None:
    """``partition``'s (source classes, target classes), each sorted; None where unrecorded."""
    partition = result.get("partition")
    if partition is None:
        return None
    if not isinstance(partition, dict) or not all(
        isinstance(partition.get(k), list) for k in ("source", "target")
    ):
        raise ValueError(f"{path}: 'partition' must hold 'source' and 'target' lists of classes")
    return tuple(tuple(sorted(map(str, partition[k]))) for k in ("source", "target"))


def _partition_text(partition: tuple[tuple[str, ...], ...] | None) -> str:
    if partition is None:
        return "no partition recorded"
    source, target = (", ".join(classes) for classes in partition)
    return f"source [{source}] / target [{target}]"


def collect_rows(folders: Sequence[tuple[str, Path]]) -> tuple[list[Row], list[str]]:
    """Read every ``results.json`` under each ``(label, folder)``; one :class:`Row` per label,
    task and protocol. Returns the rows and notes (files skipped, rows split by protocol).

    Raises:
        ValueError: a file belongs to two rows, or trials of one task record different class
            partitions.
    """
    groups: dict[tuple[str, str], dict[tuple[str | None, str | None], Row]] = {}
    partitions: dict[str, dict[Any, str]] = {}  # task -> partition -> the first row with it
    seen: dict[Path, str] = {}
    notes: list[str] = []
    for label, root in folders:
        files = [root] if root.is_file() else sorted(root.rglob(RESULTS_FILE))
        if not files:
            raise FileNotFoundError(f"no {RESULTS_FILE} under {root} (row {label!r})")
        for path in files:
            resolved = path.resolve()
            if resolved in seen:
                raise ValueError(f"{path} belongs to rows {seen[resolved]!r} and {label!r}")
            seen[resolved] = label
            try:
                result = read_results(path)
                trial, partition = _trial(result, path), _partition(result, path)
            except ValueError as err:
                notes.append(f"skipped {err}")
                continue
            task = result["task"]
            if task not in TASKS:
                notes.append(f"skipped {path}: task {task!r} is none of {TASKS}")
                continue
            _check_partition(partitions.setdefault(task, {}), partition, label, task)
            protocol = result.get("protocol") or {}
            recipe = protocol.get("recipe_sha256")
            key = (recipe or protocol.get("config_sha256"), result.get("init"))
            row = groups.setdefault((label, task), {}).setdefault(key, Row(label, task))
            row.trials.append(trial)
            row.recipe = recipe
            row.config = row.config or result.get("config") or {}
            declared = config_value(result.get("config") or {}, PRIMARY_KEY)
            if declared:
                row.declared[declared] = row.declared.get(declared, 0) + 1
            row.pretraining = row.pretraining or result.get("pretraining") or {}
            if result.get("init"):
                row.inits.add(result["init"])
    rows = []
    for (label, task), by_protocol in groups.items():
        if len(by_protocol) > 1:
            tags = _tags(list(by_protocol))
            counts = ", ".join(f"{tags[k]}: {len(r.trials)}" for k, r in by_protocol.items())
            notes.append(
                f"row {label!r} ({task}): its trials ran {len(by_protocol)} different protocols"
                f" (recipe hash or init: trials {counts}); not pooled, one row each"
            )
            for key, row in by_protocol.items():
                row.base_label = label
                row.label = f"{label} [{tags[key]}]"
        rows.extend(by_protocol.values())
    return rows, notes


def _check_partition(seen: dict[Any, str], partition: Any, label: str, task: str) -> None:
    """Refuse a second class partition within one task (none recorded counts as one)."""
    seen.setdefault(partition, label)
    if len(seen) > 1:
        (first, first_label), (second, second_label) = seen.items()
        rows = (f"row {first_label!r} ({task}) holds trials of" if first_label == second_label
                else f"rows {first_label!r} and {second_label!r} ({task}) record")  # fmt: skip
        raise ValueError(
            f"{rows} different class partitions, which are not comparable:"
            f" {_partition_text(first)} vs {_partition_text(second)}"
        )


def _tags(keys: list[tuple[str | None, str | None]]) -> dict[tuple[str | None, str | None], str]:
    """The short names of a split row's parts: what differs of recipe hash and init."""
    hashes_differ, inits_differ = (len({key[i] for key in keys}) > 1 for i in (0, 1))
    return {
        (protocol, init): " ".join(
            ([_tag(protocol)] if hashes_differ or not inits_differ else [])
            + ([init or "no init"] if inits_differ else [])
        )
        for protocol, init in keys
    }


def _tag(protocol: str | None) -> str:
    """A protocol's short name in labels and notes."""
    return protocol[:8] if protocol else "unrecorded"


def primary_metrics(
    rows: list[Row], override: str | None, notes: list[str]
) -> dict[str, tuple[str, str] | None]:
    """Per task, its primary metric and where it comes from: ``override`` where the task's trials
    report it, else the one its rows declare (``MOCO.PRIMARY_METRIC``), else None.

    Raises:
        ValueError: rows of a task declare different metrics, the primary metric of a task is not
            among the metrics its trials report, or no task reports ``override``.
    """
    if override is not None and not any(override in t.metrics for r in rows for t in r.trials):
        reported = {m for r in rows for t in r.trials for m in t.metrics}
        raise ValueError(f"--primary {override!r} is not among the metrics the trials report:"
                         f" {_reported(reported)}")  # fmt: skip
    primaries: dict[str, tuple[str, str] | None] = {}
    for task in dict.fromkeys(r.task for r in rows):
        task_rows = [r for r in rows if r.task == task]
        reported = {m for r in task_rows for t in r.trials for m in t.metrics}
        declared: dict[str, list[str]] = {}
        for row in task_rows:
            for metric in row.declared:
                declared.setdefault(metric, []).append(row.label)
        if override is not None and override in reported:
            primaries[task] = override, "set by --primary"
            if set(declared) - {override}:
                notes.append(f"{task}: primary metric {override!r} set by --primary, not the"
                             f" declared {_declarations(declared)}")  # fmt: skip
            continue
        if len(declared) > 1:
            raise ValueError(f"rows of {task} declare different primary metrics"
                             f" ({PRIMARY_KEY}): {_declarations(declared)}")  # fmt: skip
        if not declared:
            primaries[task] = None
            continue
        ((metric, labels),) = declared.items()
        if metric not in reported:
            raise ValueError(
                f"the primary metric {metric!r} ({task}, {PRIMARY_KEY} of {', '.join(labels)})"
                f" is not among the metrics its trials report: {_reported(reported)}"
            )
        silent = [r.label for r in task_rows if not r.declared]
        if silent or any(sum(r.declared.values()) < len(r.trials) for r in task_rows):
            notes.append(f"{task}: primary metric {metric!r} declared by the trials of"
                         f" {', '.join(labels)}, not by every trial")  # fmt: skip
        primaries[task] = metric, f"declared in {PRIMARY_KEY}"
    return primaries


def _declarations(declared: dict[str, list[str]]) -> str:
    return "; ".join(f"{m!r} by {', '.join(labels)}" for m, labels in declared.items())


def _reported(metrics: set[str]) -> str:
    """The metrics of the paper's columns among ``metrics``, else all of them."""
    shown = [m for m in DEFAULT_METRICS if m in metrics] or sorted(metrics)
    return ", ".join(shown)


def _baseline(
    rows: list[Row], explicit: str | None, inits: Sequence[str], notes: list[str]
) -> str | None:
    """The label of the baseline row: ``explicit``, else the one row whose trials record one of
    ``inits``. A baseline split by protocol is its part with the most trials (with a note)."""
    if explicit is not None:
        candidates = [r for r in rows if explicit in (r.label, r.base_label)]
        if not candidates:
            raise ValueError(f"baseline row {explicit!r} is not among {[r.label for r in rows]}")
    else:
        candidates = []
        for init in inits:
            candidates = [r for r in rows if r.inits == {init}]
            if len({r.base_label or r.label for r in candidates}) == 1:
                break
            candidates = []
    if not candidates:
        return None
    chosen = max(candidates, key=lambda r: len(r.trials))
    if len({r.label for r in candidates}) > 1:  # split by protocol (not: one label, other tasks)
        notes.append(f"baseline {chosen.base_label!r} ran several protocols: compared with"
                     f" {chosen.label!r} ({len(chosen.trials)} trials)")  # fmt: skip
    return chosen.label


@dataclass
class Comparison:
    """``row - baseline`` on one metric: each analysis, how the pairs were formed (or why there
    are none), and each analysis's Holm-adjusted p within its family."""

    tests: dict[str, Difference]  # TESTS: "paired" only where valid
    pairing: str
    holm: dict[str, float] = field(default_factory=dict)


@dataclass
class Cell:
    """One row's metric: its sample, expected value and flag, comparisons with the baselines."""

    sample: Sample
    expected: tuple[float, float | None, int] | None = None
    flag: str | None = None
    vs: list[Comparison | None] = field(default_factory=list)


@dataclass
class Table:
    """One task: its primary metric (None: undeclared) and where it comes from, the metrics shown
    (primary first), and per row its cells."""

    task: str
    primary: str | None
    primary_source: str
    metrics: list[str]
    body: list[tuple[Row, dict[str, Cell]]]
    confirmatory: frozenset[str] | None = None  # rows compared confirmatorily (None: all)

    def families(self) -> dict[str, list[str]]:
        """The metrics of each section: the primary metric, and the others; or all in one."""
        if self.primary is None:
            return {"all": self.metrics}
        return {"primary": [self.primary], "secondary": self.metrics[1:]}

    def family_of(self, row: Row, metric: str) -> str:
        """The Holm family of ``row``'s comparisons on ``metric``: the primary metric's
        comparisons of the confirmatory rows are "primary"; the rest "secondary" (or "all")."""
        if self.primary is None:
            return "all"
        confirmed = self.confirmatory is None or row.label in self.confirmatory
        return "primary" if metric == self.primary and confirmed else "secondary"

    def holm_families(self) -> dict[str, list[Comparison]]:
        families: dict[str, list[Comparison]] = {}
        for row, cells in self.body:
            for m in self.metrics:
                family = families.setdefault(self.family_of(row, m), [])
                family.extend(c for c in cells[m].vs if c)
        return families


def _compare(row: Row, baseline: Row, metric: str) -> Comparison:
    observations = row.observations(metric), baseline.observations(metric)
    tests = {
        "welch": welch(row.sample(metric), baseline.sample(metric)),
        "backbones": welch(row.backbone_sample(metric), baseline.backbone_sample(metric)),
        "bootstrap": two_level_bootstrap(*observations),
    }
    if row.recipe is None or baseline.recipe is None:
        pairing = "not shown: recipe hash (protocol.recipe_sha256) not recorded"
    elif row.recipe != baseline.recipe:
        pairing = "not shown: the recipes differ beyond the weights (protocol.recipe_sha256)"
    else:
        differences, pairing = pair(*observations)
        if differences is not None:
            tests["paired"] = paired_t(differences)
    return Comparison(tests, pairing)


def _table(
    rows: list[Row],
    baselines: tuple[str | None, ...],
    wanted: Sequence[str],
    primaries: dict[str, tuple[str, str] | None],
    confirmatory: Sequence[str] | None = None,
) -> list[Table]:
    """Per task, a :class:`Table` with every comparison computed and Holm-corrected."""
    tables = []
    for task in dict.fromkeys(r.task for r in rows):
        task_rows = [r for r in rows if r.task == task]
        present = {m for r in task_rows for t in r.trials for m in t.metrics}
        primary, source = primaries.get(task) or (None, "")
        metrics = ([primary] if primary else []) + [
            m for m in wanted if m in present and m != primary
        ]
        by_label = {r.label: r for r in task_rows}
        body = []
        for row in task_rows:
            cells = {}
            for m in metrics:
                cell = Cell(row.sample(m))
                if row.expected and m in row.expected.metrics:
                    mean, std = row.expected.metrics[m]
                    cell.expected = (mean, std, row.expected.trials)
                    cell.flag = row.expected.check(m, cell.sample)
                for b in baselines:
                    other = by_label.get(b)
                    # each pair once: the random baseline is not compared back with the supervised
                    mirrored = row.label == baselines[-1] and b == baselines[0]
                    compared = other is not None and other is not row and not mirrored
                    cell.vs.append(_compare(row, other, m) if compared else None)
                cells[m] = cell
            body.append((row, cells))
        chosen = None if confirmatory is None else frozenset(confirmatory)
        table = Table(task, primary, source, metrics, body, chosen)
        for comparisons in table.holm_families().values():
            for test in TESTS:
                # m is the family's hypotheses: a comparison this analysis cannot make (not
                # paired, one trial) counts as p = 1, so no analysis is corrected over fewer
                raw = [c.tests[test].p if test in c.tests else math.nan for c in comparisons]
                counted = [1.0 if math.isnan(p) else p for p in raw]
                for comparison, p, adjusted in zip(comparisons, raw, holm(counted), strict=True):
                    if test in comparison.tests:
                        comparison.holm[test] = math.nan if math.isnan(p) else adjusted
        tables.append(table)
    return tables


def _fmt(value: float, signed: bool = False) -> str:
    return "–" if math.isnan(value) else f"{value:+.2f}" if signed else f"{value:.2f}"


def _p(p: float) -> str:
    return "–" if math.isnan(p) else f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def _difference(d: Difference | None) -> str:
    if d is None:
        return "–"
    if math.isnan(d.low):
        return f"{_fmt(d.diff, True)} ({d.verdict})"
    return f"{_fmt(d.diff, True)} [{_fmt(d.low, True)}, {_fmt(d.high, True)}] {d.verdict}"


def _test_cell(comparison: Comparison, test: str) -> str:
    d = comparison.tests.get(test)
    if d is None or math.isnan(d.p):
        return _difference(d)
    return f"{_difference(d)}; p {_p(d.p)}, Holm {_p(comparison.holm[test])}"


def render_markdown(
    tables: list[Table], baselines: tuple[str | None, ...], notes: Sequence[str]
) -> str:
    lines = []
    for table in tables:
        lines += [f"## {table.task}", ""]
        families = table.families()
        counts = {name: len(family) for name, family in table.holm_families().items()}
        if table.primary is None:
            if counts["all"]:
                lines += [f"No primary metric declared ({PRIMARY_KEY} or --primary): the"
                          f" {counts['all']} comparisons of all metrics are one Holm family.", ""]  # fmt: skip
            lines += _means(table.body, table.metrics)
            lines += _comparisons(table, table.metrics, baselines)
        else:
            lines += [
                f"### Primary metric: {table.primary}",
                "",
                _confirmatory_line(table, counts),
                "",
            ]
            lines += _means(table.body, families["primary"])
            lines += _comparisons(table, families["primary"], baselines)
            if families["secondary"]:
                lines += ["", "### Secondary metrics", "",
                          f"Holm over the {counts.get('secondary', 0)} secondary comparisons.", ""]  # fmt: skip
                lines += _means(table.body, families["secondary"])
                lines += _comparisons(table, families["secondary"], baselines)
        lines += _backbone_lines(table.body, table.metrics)
        lines += _analysis_lines(table, baselines)
        lines += _expected_lines(table.body, table.metrics)
        lines.append("")
    if notes:
        lines += ["## Notes", "", *(f"- {note}" for note in notes), ""]
    return "\n".join(lines)


def _confirmatory_line(table: Table, counts: dict[str, int]) -> str:
    source, n = table.primary_source, counts.get("primary", 0)
    if table.confirmatory is None:
        return f"Confirmatory ({source}): Holm over its {n} comparisons."
    if not table.confirmatory:
        return (f"Not confirmatory in this report ({source}; --confirmatory names no row): its"
                " comparisons are Holm-corrected with the secondary ones.")  # fmt: skip
    rows = ", ".join(sorted(table.confirmatory))
    return (f"Confirmatory ({source}) for {rows}: Holm over their {n} comparisons; the other"
            " rows' comparisons are secondary.")  # fmt: skip


def _means(body, metrics: Sequence[str]) -> list[str]:
    lines = ["| row | n trials | n backbones | " + " | ".join(metrics) + " |"]
    lines.append("|---" * (len(metrics) + 3) + "|")
    for row, cells in body:
        n = max((cells[m].sample.n for m in metrics), default=0)
        values = [f"{_fmt(c.sample.mean)} ± {_fmt(c.sample.std)}" for c in map(cells.get, metrics)]
        lines.append(f"| {row.label} | {n} | {len(row.backbones())} | " + " | ".join(values) + " |")
    return lines


def _comparisons(table: Table, metrics: Sequence[str], baselines) -> list[str]:
    """One line per metric and comparison: each analysis's difference, 95 % interval, verdict,
    raw p and Holm-adjusted p."""
    found = [
        (m, row, baseline, cells[m].vs[i])
        for m in metrics
        for i, baseline in enumerate(baselines)
        for row, cells in table.body
        if cells[m].vs[i] is not None
    ]
    if not found:
        return []
    header = "| metric | comparison | " + " | ".join(f"{TEST_NAMES[t]} 95 %" for t in TESTS) + " |"
    lines = ["", header, "|---" * (len(TESTS) + 2) + "|"]
    for m, row, baseline, comparison in found:
        tests = " | ".join(_test_cell(comparison, t) for t in TESTS)
        lines.append(f"| {m} | {row.label} - {baseline} | {tests} |")
    return lines


def _backbone_lines(body, metrics: Sequence[str]) -> list[str]:
    """Per-backbone mean ± std of the rows with several pretrained backbones."""
    rows = [
        row for row, _ in body if len(row.backbones()) > 1 and any(t.pretrained for t in row.trials)
    ]
    if not rows:
        return []
    lines = ["", "Per backbone (rows with several pretrained backbones):", ""]
    lines += ["| row | backbone | n trials | " + " | ".join(metrics) + " |"]
    lines.append("|---" * (len(metrics) + 3) + "|")
    for row in rows:
        for trials in row.backbones().values():
            part = Row(row.label, row.task, trials=trials)
            values = [f"{_fmt(s.mean)} ± {_fmt(s.std)}" for s in map(part.sample, metrics)]
            lines.append(f"| {row.label} | {trials[0].backbone_name} | {len(trials)} | "
                         + " | ".join(values) + " |")  # fmt: skip
    return lines


def _analysis_lines(table: Table, baselines) -> list[str]:
    """What each analysis is, and how each comparison was paired or why not (per metric where
    the metrics differ)."""
    outcomes: dict[str, dict[str, list[str]]] = {}
    for i, baseline in enumerate(baselines):
        for row, cells in table.body:
            for m in table.metrics:
                if cells[m].vs[i] is not None:
                    by_outcome = outcomes.setdefault(f"{row.label} - {baseline}", {})
                    by_outcome.setdefault(cells[m].vs[i].pairing, []).append(m)
    if not outcomes:
        return []
    lines = [
        "", "Each cell: difference [95 % interval] verdict; two-sided p, Holm-adjusted p.",
        "", "- Welch: the trials of each row as independent samples; right for one backbone per"
        " row, while with several it takes trials that share a backbone for independent ones.",
        "- Welch over backbone means: each backbone's mean is one value (a random-init trial is"
        " its own backbone), so pretraining variance is in the interval with the t tails its few"
        " backbones call for; a row of one backbone has no interval.",
        f"- Two-level bootstrap: {RESAMPLES:,} resamples (seed 0) of each row's backbones, then"
        " of each drawn backbone's trials; the difference of the means of backbone means,"
        " percentile interval, p by inverting it. It includes pretraining variance, but is too"
        " narrow with few backbones (with 3, read it as a lower bound).",
        "- Paired t, where valid: both rows ran the same recipe apart from the weights"
        " (protocol.recipe_sha256) on the same trial seeds, so a seed fixed the same data order"
        " and the same init of the new layers on both sides:",
    ]  # fmt: skip
    for name, by_outcome in outcomes.items():
        if len(by_outcome) == 1:
            lines.append(f"  - {name}: {next(iter(by_outcome))}")
        else:
            parts = [f"{', '.join(ms)}: {how}" for how, ms in by_outcome.items()]
            lines.append(f"  - {name}: " + "; ".join(parts))
    return lines


def _expected_lines(body, metrics: Sequence[str]) -> list[str]:
    rows = [(row, cells) for row, cells in body if row.expected]
    if not rows:
        return []
    lines = ["", "Expected (`configs/expected.yaml`):", ""]
    for row, cells in rows:
        exp = row.expected
        values = [
            f"{m} {_fmt(c.sample.mean)} vs {c.expected[0]:.2f}"
            + (f" ± {c.expected[1]:.2f}" if c.expected[1] is not None else "")
            for m, c in cells.items()
            if c.expected
        ]
        unverified = "" if exp.verified else f"; unverified (checked: {exp.checked}), never flagged"
        lines.append(f"- {row.label}: {exp.name} ({exp.source}; {exp.trials} trials{unverified}): "
                     + ", ".join(values))  # fmt: skip
        flagged = [f"**{cells[m].flag}: {m}**" for m in metrics if cells[m].flag]
        if flagged:
            lines.append(
                f"  - {', '.join(flagged)} (more than two combined standard errors away)."
                f" Likeliest causes: {LIKELY_CAUSES}."
            )
    return lines


# The first columns as before the p-values; then per baseline each analysis's numbers
CSV_COLUMNS = [
    "task", "row", "metric", "n", "mean", "std", "expected_mean", "expected_std", "expected_n",
    "expected_flag",
    *(f"{part}_{name}" for name in BASELINE_NAMES for part in ("diff", "low", "high", "verdict")),
    "n_backbones", "family",
    *(f"{part}_{name}" for name in BASELINE_NAMES for part in ("p", "holm_p")),
    *(f"{test}_{part}_{name}" for name in BASELINE_NAMES for test in TESTS[1:]
      for part in ("diff", "low", "high", "verdict", "p", "holm_p")),
    *(f"pairing_{name}" for name in BASELINE_NAMES),
]  # fmt: skip


def render_csv(tables: list[Table]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    blank = lambda x: "" if x is None or (isinstance(x, float) and math.isnan(x)) else x  # noqa: E731
    for table in tables:
        for row, cells in table.body:
            for m in table.metrics:
                c = cells[m]
                values = dict(zip(CSV_COLUMNS[:10], [
                    table.task, row.label, m, c.sample.n, c.sample.mean, c.sample.std,
                    *(c.expected or (None, None, None)), c.flag,
                ], strict=True))  # fmt: skip
                values |= {"n_backbones": len(row.backbones()), "family": table.family_of(row, m)}
                for name, comparison in zip(BASELINE_NAMES, c.vs, strict=True):
                    if comparison is None:
                        continue
                    for test, d in comparison.tests.items():
                        prefix = "" if test == "welch" else f"{test}_"
                        values |= {f"{prefix}{part}_{name}": getattr(d, part)
                                   for part in ("diff", "low", "high", "verdict", "p")}  # fmt: skip
                        values[f"{prefix}holm_p_{name}"] = comparison.holm[test]
                    values[f"pairing_{name}"] = comparison.pairing
                writer.writerow({k: blank(v) for k, v in values.items()})
    return out.getvalue()


def render_png(tables: list[Table]) -> bytes:
    """Grouped bars (one group per metric, the primary first; one bar per row) with ± std error
    bars, per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tables), figsize=(6 * len(tables), 4), squeeze=False)
    for ax, table in zip(axes[0], tables, strict=True):
        metrics, body = table.metrics, table.body
        width = 0.8 / max(len(body), 1)
        for i, (row, cells) in enumerate(body):
            means = [cells[m].sample.mean for m in metrics]
            errors = [
                0.0 if math.isnan(cells[m].sample.std) else cells[m].sample.std for m in metrics
            ]
            x = [j + (i - (len(body) - 1) / 2) * width for j in range(len(metrics))]
            ax.bar(x, means, width, yerr=errors, capsize=3, label=row.label)
        ax.set_xticks(range(len(metrics)), metrics)
        ax.set_title(table.task)
        ax.legend(fontsize="small")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    return buffer.getvalue()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moco-report",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("rows", nargs="+", metavar="[LABEL=]DIR", help="one row per output folder")
    parser.add_argument("--output", required=True, help="folder for report.{md,csv,png}")
    parser.add_argument("--supervised", default=None, help="label of the supervised row")
    parser.add_argument("--random", default=None, help="label of the random-init row")
    parser.add_argument("--metrics", nargs="+", default=list(DEFAULT_METRICS))
    parser.add_argument(
        "--primary", default=None,
        help=f"the primary metric, instead of the one the trials declare ({PRIMARY_KEY})",
    )  # fmt: skip
    parser.add_argument(
        "--confirmatory", nargs="*", default=None, metavar="LABEL",
        help="the rows whose primary-metric comparisons are confirmatory (default: all rows;"
        " none given: no confirmatory comparison in this report, e.g. a secondary schedule)",
    )  # fmt: skip
    parser.add_argument(
        "--expected", default=None,
        help=f"expected results per config (default: {config_root() / 'expected.yaml'}; '' for none)",
    )  # fmt: skip
    return parser


def write_report(
    rows: Sequence[tuple[str, Path]], output: Path, *, supervised: str | None = None,
    random: str | None = None, metrics: Sequence[str] = DEFAULT_METRICS,
    primary: str | None = None, confirmatory: Sequence[str] | None = None,
    expected: str | Path | None = None,
) -> str:  # fmt: skip
    """Write ``report.{md,csv,png}`` of the ``(label, folder)`` rows into ``output`` and return
    the markdown. ``supervised`` / ``random`` label the baselines (default: found by the trials'
    ``init``); ``confirmatory`` the rows whose primary comparisons are confirmatory (None: all,
    empty: none); ``expected``: a YAML of expected numbers (None: ``configs/expected.yaml``, "":
    none). Bad input raises ValueError (or FileNotFoundError) before anything is written."""
    found, notes = collect_rows(rows)
    if not found:
        raise ValueError(f"no readable results in {[str(f) for _, f in rows]}: " + "; ".join(notes))
    expected = config_root() / "expected.yaml" if expected is None else expected
    entries = load_expected(expected) if expected else []
    for row in found:
        matches = find_expected(entries, row.config, row.pretraining)
        row.expected = matches[0] if len(matches) == 1 else None
        if len(matches) > 1:
            notes.append(f"row {row.label!r} matches {len(matches)} expected entries"
                         f" ({', '.join(e.name for e in matches)}): none shown")  # fmt: skip
    baselines = (
        _baseline(found, supervised, ("supervised", "supervised-tv"), notes),
        _baseline(found, random, ("random",), notes),
    )
    primaries = primary_metrics(found, primary, notes)
    unknown = set(confirmatory or ()) - {r.label for r in found}
    if unknown:
        raise ValueError(f"confirmatory rows that are not here: {sorted(unknown)}")
    for note in notes:
        print(f"moco-report: {note}", file=sys.stderr)
    tables = _table(found, baselines, metrics, primaries, confirmatory)
    output.mkdir(parents=True, exist_ok=True)
    markdown = render_markdown(tables, baselines, notes)
    atomic_write(output / "report.md", lambda f: f.write(markdown.encode()))
    atomic_write(output / "report.csv", lambda f: f.write(render_csv(tables).encode()))
    atomic_write(output / "report.png", lambda f: f.write(render_png(tables)))
    print(markdown)
    print(f"wrote {output}/report.md, report.csv, report.png")
    return markdown


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with exit_on_user_error("moco-report"):
        write_report(
            [_parse_row_arg(arg) for arg in args.rows], Path(args.output),
            supervised=args.supervised, random=args.random, metrics=args.metrics,
            primary=args.primary, confirmatory=args.confirmatory, expected=args.expected,
        )  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
