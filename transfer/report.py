"""``moco-report``: mean ± std over trials, differences vs the supervised and random rows.

    moco-report supervised=out/voc_sup moco=out/voc_moco random=out/voc_random --output report/

Each ``[LABEL=]DIR`` is one row; its trials are every ``results.json`` below ``DIR`` (written by
``moco-transfer`` per trial, and by ``moco-knn`` / ``moco-lincls``: ``{"task", "metrics", ...}``).
Rows are tabulated per task. The supervised and random baselines are ``--supervised`` /
``--random``, or else the one row whose results record ``init`` "supervised" (then
"supervised-tv") / "random". Writes ``report.md``, ``report.csv`` and ``report.png`` (bars with
± std error bars) into ``--output``, each replaced atomically and computed from the files alone:
rerunning never loses or double-counts a trial (a file reached through two rows is an error).
The standard deviation is the sample one (n - 1), as the paper's 5-trial std; n = 1 gives none.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from moco_pretrain.commandline import exit_on_user_error
from moco_pretrain.files import atomic_write
from moco_pretrain.results import RESULTS_FILE, read_results

__all__ = ["Row", "collect_rows", "render_csv", "render_markdown", "main"]

# the paper's column order (VOC: AP50, AP, AP75; COCO: AP^bb..., AP^mk...); then kNN/linear top-k
DEFAULT_METRICS = (
    "bbox/AP50", "bbox/AP", "bbox/AP75", "segm/AP50", "segm/AP", "segm/AP75", "top1", "top5",
)  # fmt: skip


@dataclass
class Row:
    """The trials of one ``LABEL=DIR`` argument for one task."""

    label: str
    task: str
    inits: set[str] = field(default_factory=set)
    trials: list[dict[str, float]] = field(default_factory=list)

    def stats(self, metric: str) -> tuple[int, float, float]:
        """(n, mean, sample std; NaN when n < 2) of ``metric`` over the trials that report it."""
        values = [t[metric] for t in self.trials if metric in t]
        if not values or any(map(math.isnan, values)):  # COCO reports NaN for an empty size range
            return len(values), math.nan, math.nan
        std = statistics.stdev(values) if len(values) > 1 else math.nan
        return len(values), statistics.fmean(values), std


def _parse_row_arg(arg: str) -> tuple[str, Path]:
    label, sep, path = arg.partition("=")
    return (label, Path(path)) if sep else (Path(arg).name, Path(arg))


def collect_rows(row_args: Sequence[str]) -> list[Row]:
    """Read every ``results.json`` under each ``[LABEL=]DIR``; one :class:`Row` per label/task."""
    rows: dict[tuple[str, str], Row] = {}
    seen: dict[Path, str] = {}
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
            result = read_results(path)
            row = rows.setdefault((label, result["task"]), Row(label, result["task"]))
            row.trials.append({k: float(v) for k, v in result["metrics"].items()})
            if result.get("init"):
                row.inits.add(result["init"])
    return list(rows.values())


def _baseline(rows: list[Row], explicit: str | None, inits: Sequence[str]) -> str | None:
    if explicit is not None:
        if not any(r.label == explicit for r in rows):
            raise ValueError(f"baseline row {explicit!r} is not among {[r.label for r in rows]}")
        return explicit
    for init in inits:
        labels = {r.label for r in rows if r.inits == {init}}
        if len(labels) == 1:
            return labels.pop()
    return None


def _metrics(rows: list[Row], wanted: Sequence[str]) -> list[str]:
    present = {m for r in rows for t in r.trials for m in t}
    return [m for m in wanted if m in present]


def _table(rows, baselines, wanted):
    """Per task: (task, metrics, [(row, {metric: (n, mean, std, diff_sup, diff_rand)})])."""
    tables = []
    for task in dict.fromkeys(r.task for r in rows):
        task_rows = [r for r in rows if r.task == task]
        metrics = _metrics(task_rows, wanted)
        by_label = {r.label: r for r in task_rows}
        body = []
        for row in task_rows:
            cells = {}
            for m in metrics:
                n, mean, std = row.stats(m)
                diffs = [
                    mean - by_label[b].stats(m)[1] if b in by_label else math.nan for b in baselines
                ]
                cells[m] = (n, mean, std, *diffs)
            body.append((row, cells))
        tables.append((task, metrics, body))
    return tables


def _fmt(value: float, signed: bool = False) -> str:
    return "–" if math.isnan(value) else f"{value:+.2f}" if signed else f"{value:.2f}"


def render_markdown(tables, baselines: tuple[str | None, str | None]) -> str:
    lines = []
    for task, metrics, body in tables:
        lines += [f"## {task}", "", "| row | n | " + " | ".join(metrics) + " |"]
        lines.append("|---" * (len(metrics) + 2) + "|")
        for row, cells in body:
            n = max((cells[m][0] for m in metrics), default=0)
            values = [f"{_fmt(c[1])} ± {_fmt(c[2])}" for c in map(cells.get, metrics)]
            lines.append(f"| {row.label} | {n} | " + " | ".join(values) + " |")
        if not any(row.label in baselines for row, _ in body):
            lines.append("")
            continue  # no supervised or random row for this task
        names = [b or "(none)" for b in baselines]
        lines += ["", f"Difference of the means vs {names[0]} / vs {names[1]}:", ""]
        lines += ["| row | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
        for row, cells in body:
            diffs = [f"{_fmt(c[3], True)} / {_fmt(c[4], True)}" for c in map(cells.get, metrics)]
            lines.append(f"| {row.label} | " + " | ".join(diffs) + " |")
        lines.append("")
    return "\n".join(lines)


def render_csv(tables) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["task", "row", "metric", "n", "mean", "std", "diff_supervised", "diff_random"])
    for task, metrics, body in tables:
        for row, cells in body:
            for m in metrics:
                n, *numbers = cells[m]
                writer.writerow(
                    [task, row.label, m, n, *("" if math.isnan(x) else x for x in numbers)]
                )
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
            means = [cells[m][1] for m in metrics]
            errors = [0.0 if math.isnan(cells[m][2]) else cells[m][2] for m in metrics]
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with exit_on_user_error("moco-report"):
        rows = collect_rows(args.rows)
        baselines = (
            _baseline(rows, args.supervised, ("supervised", "supervised-tv")),
            _baseline(rows, args.random, ("random",)),
        )
    tables = _table(rows, baselines, args.metrics)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    markdown = render_markdown(tables, baselines)
    atomic_write(output / "report.md", lambda f: f.write(markdown.encode()))
    atomic_write(output / "report.csv", lambda f: f.write(render_csv(tables).encode()))
    atomic_write(output / "report.png", lambda f: f.write(render_png(tables)))
    print(markdown)
    print(f"wrote {output}/report.md, report.csv, report.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
