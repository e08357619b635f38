"""``moco-report``: mean ± std over trials, Welch intervals vs the supervised and random rows,
and each row against its expected numbers.

    moco-report supervised=out/voc_sup moco=out/voc_moco random=out/voc_random --output report/

Each ``[LABEL=]DIR`` is one row; its trials are every ``results.json`` below ``DIR`` (written by
``moco-transfer`` per trial, and by ``moco-knn`` / ``moco-lincls``: ``{"task", "metrics", ...}``).
Rows are tabulated per task. The supervised and random baselines are ``--supervised`` /
``--random``, or else the one row whose results record ``init`` "supervised" (then
"supervised-tv") / "random". Every other row gets the difference of the means against each
baseline with its 95 % Welch interval and a verdict (:mod:`transfer.comparison`).

Trials are pooled only when they ran the same protocol (``protocol.config_sha256``, written by
``moco-transfer``): a row whose trials differ is split into one row per protocol, with a note.
A file that cannot be read (truncated, no task or metrics, non-numeric metrics, an unknown task)
is named in one line and skipped. Expected numbers come from ``configs/expected.yaml`` (or
``--expected``), matched on the trials' recorded config and on how their weights were pretrained
(``pretraining``); a row further than two combined standard errors from numbers checked against
their source is flagged with the likeliest causes (unverified numbers are shown, never flagged).

Writes ``report.md``, ``report.csv`` and ``report.png`` (bars with ± std error bars) into
``--output``, each replaced atomically and computed from the files alone: rerunning never loses
or double-counts a trial (a file reached through two rows is an error). The standard deviation is
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

from moco_pretrain.commandline import exit_on_user_error
from moco_pretrain.config import config_root
from moco_pretrain.files import atomic_write
from moco_pretrain.results import RESULTS_FILE, read_results

from .comparison import (
    LIKELY_CAUSES,
    Difference,
    Expected,
    Sample,
    find_expected,
    load_expected,
    welch,
)

__all__ = ["Row", "collect_rows", "render_csv", "render_markdown", "main"]

# the paper's column order (VOC: AP50, AP, AP75; COCO: AP^bb..., AP^mk...); then kNN/linear top-k
DEFAULT_METRICS = (
    "bbox/AP50", "bbox/AP", "bbox/AP75", "segm/AP50", "segm/AP", "segm/AP75",
    "keypoints/AP50", "keypoints/AP", "keypoints/AP75", "sem_seg/mIoU", "sem_seg/fwIoU",
    "sem_seg/pACC", "top1", "top5",
)  # fmt: skip
TASKS = ("detection", "sem_seg", "lincls", "knn", "supervised")
BASELINE_NAMES = ("supervised", "random")


@dataclass
class Row:
    """The trials of one ``LABEL=DIR`` argument for one task and protocol."""

    label: str
    task: str
    base_label: str = ""  # the LABEL given, when the label carries a protocol suffix
    inits: set[str] = field(default_factory=set)
    trials: list[dict[str, float]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)  # the first trial's recorded config
    pretraining: dict[str, Any] = field(default_factory=dict)  # and its weights' provenance
    expected: Expected | None = None

    def sample(self, metric: str) -> Sample:
        """``metric`` over the trials that report it (NaN std when n < 2)."""
        values = [t[metric] for t in self.trials if metric in t]
        if not values or any(map(math.isnan, values)):  # COCO reports NaN for an empty size range
            return Sample(len(values), math.nan, math.nan)
        std = statistics.stdev(values) if len(values) > 1 else math.nan
        return Sample(len(values), statistics.fmean(values), std)


def _parse_row_arg(arg: str) -> tuple[str, Path]:
    label, sep, path = arg.partition("=")
    return (label, Path(path)) if sep else (Path(arg).name, Path(arg))


def collect_rows(row_args: Sequence[str]) -> tuple[list[Row], list[str]]:
    """Read every ``results.json`` under each ``[LABEL=]DIR``; one :class:`Row` per label, task
    and protocol. Returns the rows and notes (files skipped, rows split by protocol)."""
    groups: dict[tuple[str, str], dict[str | None, Row]] = {}
    seen: dict[Path, str] = {}
    notes: list[str] = []
    for arg in row_args:
        label, root = _parse_row_arg(arg)
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
            except ValueError as err:
                notes.append(f"skipped {err}")
                continue
            if result["task"] not in TASKS:
                notes.append(f"skipped {path}: task {result['task']!r} is none of {TASKS}")
                continue
            protocol = (result.get("protocol") or {}).get("config_sha256")
            by_protocol = groups.setdefault((label, result["task"]), {})
            row = by_protocol.setdefault(protocol, Row(label, result["task"]))
            row.trials.append({k: float(v) for k, v in result["metrics"].items()})
            row.config = row.config or result.get("config") or {}
            row.pretraining = row.pretraining or result.get("pretraining") or {}
            if result.get("init"):
                row.inits.add(result["init"])
    rows = []
    for (label, task), by_protocol in groups.items():
        if len(by_protocol) > 1:
            counts = ", ".join(f"{_tag(p)}: {len(r.trials)}" for p, r in by_protocol.items())
            notes.append(
                f"row {label!r} ({task}): its trials ran {len(by_protocol)} different protocols"
                f" (config hash: trials {counts}); not pooled, one row each"
            )
            for protocol, row in by_protocol.items():
                row.base_label = label
                row.label = f"{label} [{_tag(protocol)}]"
        rows.extend(by_protocol.values())
    return rows, notes


def _tag(protocol: str | None) -> str:
    """A protocol's short name in labels and notes."""
    return protocol[:8] if protocol else "unrecorded"


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
class Cell:
    """One row's metric: its sample, expected value and flag, differences to the baselines."""

    sample: Sample
    expected: tuple[float, float | None, int] | None = None
    flag: str | None = None
    vs: list[Difference | None] = field(default_factory=list)


def _table(rows: list[Row], baselines: tuple[str | None, ...], wanted: Sequence[str]):
    """Per task: (task, metrics, [(row, {metric: Cell})])."""
    tables = []
    for task in dict.fromkeys(r.task for r in rows):
        task_rows = [r for r in rows if r.task == task]
        present = {m for r in task_rows for t in r.trials for m in t}
        metrics = [m for m in wanted if m in present]
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
                    vs = other is not None and other is not row
                    cell.vs.append(welch(cell.sample, other.sample(m)) if vs else None)
                cells[m] = cell
            body.append((row, cells))
        tables.append((task, metrics, body))
    return tables


def _fmt(value: float, signed: bool = False) -> str:
    return "–" if math.isnan(value) else f"{value:+.2f}" if signed else f"{value:.2f}"


def _difference(d: Difference | None) -> str:
    if d is None:
        return "–"
    if math.isnan(d.low):
        return f"{_fmt(d.diff, True)} ({d.verdict})"
    return f"{_fmt(d.diff, True)} [{_fmt(d.low, True)}, {_fmt(d.high, True)}] {d.verdict}"


def render_markdown(tables, baselines: tuple[str | None, ...], notes: Sequence[str]) -> str:
    lines = []
    for task, metrics, body in tables:
        lines += [f"## {task}", "", "| row | n | " + " | ".join(metrics) + " |"]
        lines.append("|---" * (len(metrics) + 2) + "|")
        for row, cells in body:
            n = max((cells[m].sample.n for m in metrics), default=0)
            values = [
                f"{_fmt(c.sample.mean)} ± {_fmt(c.sample.std)}" for c in map(cells.get, metrics)
            ]
            lines.append(f"| {row.label} | {n} | " + " | ".join(values) + " |")
        for i, (name, baseline) in enumerate(zip(BASELINE_NAMES, baselines, strict=True)):
            labels = {row.label for row, _ in body}
            if baseline not in labels or labels == {baseline}:  # no baseline, or nothing beside it
                continue
            lines += ["", f"Difference vs the {name} row ({baseline}), 95 % Welch interval:", ""]
            lines += ["| row | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
            for row, cells in body:
                if row.label != baseline:
                    diffs = [_difference(cells[m].vs[i]) for m in metrics]
                    lines.append(f"| {row.label} | " + " | ".join(diffs) + " |")
        lines += _expected_lines(body, metrics)
        lines.append("")
    if notes:
        lines += ["## Notes", "", *(f"- {note}" for note in notes), ""]
    return "\n".join(lines)


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


CSV_COLUMNS = [
    "task", "row", "metric", "n", "mean", "std", "expected_mean", "expected_std", "expected_n",
    "expected_flag",
    *(f"{part}_{name}" for name in BASELINE_NAMES for part in ("diff", "low", "high", "verdict")),
]  # fmt: skip


def render_csv(tables) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    blank = lambda x: "" if x is None or (isinstance(x, float) and math.isnan(x)) else x  # noqa: E731
    for task, metrics, body in tables:
        for row, cells in body:
            for m in metrics:
                c = cells[m]
                values = [task, row.label, m, c.sample.n, c.sample.mean, c.sample.std]
                values += list(c.expected or (None, None, None)) + [c.flag]
                for d in c.vs:
                    values += [d.diff, d.low, d.high, d.verdict] if d else [None] * 4
                writer.writerow([blank(v) for v in values])
    return out.getvalue()


def render_png(tables) -> bytes:
    """Grouped bars (one group per metric, one bar per row) with ± std error bars, per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tables), figsize=(6 * len(tables), 4), squeeze=False)
    for ax, (task, metrics, body) in zip(axes[0], tables, strict=True):
        width = 0.8 / max(len(body), 1)
        for i, (row, cells) in enumerate(body):
            means = [cells[m].sample.mean for m in metrics]
            errors = [
                0.0 if math.isnan(cells[m].sample.std) else cells[m].sample.std for m in metrics
            ]
            x = [j + (i - (len(body) - 1) / 2) * width for j in range(len(metrics))]
            ax.bar(x, means, width, yerr=errors, capsize=3, label=row.label)
        ax.set_xticks(range(len(metrics)), metrics)
        ax.set_title(task)
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
        "--expected", default=str(config_root() / "expected.yaml"),
        help="expected results per config (default: %(default)s; '' for none)",
    )  # fmt: skip
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with exit_on_user_error("moco-report"):
        rows, notes = collect_rows(args.rows)
        if not rows:
            raise ValueError(f"no readable results in {args.rows}: " + "; ".join(notes))
        entries = load_expected(args.expected) if args.expected else []
        for row in rows:
            found = find_expected(entries, row.config, row.pretraining)
            row.expected = found[0] if len(found) == 1 else None
            if len(found) > 1:
                notes.append(f"row {row.label!r} matches {len(found)} expected entries"
                             f" ({', '.join(e.name for e in found)}): none shown")  # fmt: skip
        baselines = (
            _baseline(rows, args.supervised, ("supervised", "supervised-tv"), notes),
            _baseline(rows, args.random, ("random",), notes),
        )
    for note in notes:
        print(f"moco-report: {note}", file=sys.stderr)
    tables = _table(rows, baselines, args.metrics)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    markdown = render_markdown(tables, baselines, notes)
    atomic_write(output / "report.md", lambda f: f.write(markdown.encode()))
    atomic_write(output / "report.csv", lambda f: f.write(render_csv(tables).encode()))
    atomic_write(output / "report.png", lambda f: f.write(render_png(tables)))
    print(markdown)
    print(f"wrote {output}/report.md, report.csv, report.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
