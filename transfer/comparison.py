"""Is a difference real? Welch intervals between rows, and rows against their expected numbers.

Torch-free; used by ``moco-report``. A row's trials are independent fine-tuning runs (other seeds),
so two rows are compared as two samples with unequal variances (Welch 1947): the difference of
the means, its 95 % confidence interval with the Welch-Satterthwaite degrees of freedom, and a
verdict: ``better`` / ``worse`` when the interval excludes 0, else ``within noise``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from scipy import stats

SINGLE_TRIAL = "single trial: no interval"
NO_DATA = "no data"
# What most often moves a detection-transfer number away from the published one.
LIKELY_CAUSES = (
    "the total batch or the number of GPUs (SOLVER.IMS_PER_BATCH, SOLVER.REFERENCE_WORLD_SIZE: the"
    " SyncBN batch, 2 images x GPUs, changes with them), the weights (MODEL.WEIGHTS: another"
    " checkpoint, or converted with another --arch), the input format (INPUT.FORMAT,"
    " MODEL.PIXEL_MEAN/STD must match how the backbone was trained)"
)


@dataclass(frozen=True)
class Sample:
    """``n`` trials of one metric: their mean and sample standard deviation (NaN when n < 2)."""

    n: int
    mean: float
    std: float


@dataclass(frozen=True)
class Difference:
    """``row - baseline``: the difference of the means, its 95 % interval and the verdict."""

    diff: float
    low: float
    high: float
    verdict: str


def welch(row: Sample, baseline: Sample, *, confidence: float = 0.95) -> Difference:
    """Welch's interval for ``row.mean - baseline.mean``.

    With fewer than 2 trials on either side there is no variance estimate: the difference comes
    without an interval, verdict :data:`SINGLE_TRIAL`.
    """
    diff = row.mean - baseline.mean
    if row.n == 0 or baseline.n == 0 or math.isnan(diff):  # no trial, or a NaN metric
        return Difference(diff, math.nan, math.nan, NO_DATA)
    if row.n < 2 or baseline.n < 2:
        return Difference(diff, math.nan, math.nan, SINGLE_TRIAL)
    var_row, var_base = row.std**2 / row.n, baseline.std**2 / baseline.n
    se = math.sqrt(var_row + var_base)
    if se == 0.0:  # identical trials on both sides: the difference is exact
        low = high = diff
    else:
        dof = se**4 / (var_row**2 / (row.n - 1) + var_base**2 / (baseline.n - 1))
        half = stats.t.ppf(0.5 + confidence / 2, dof) * se
        low, high = diff - half, diff + half
    verdict = "better" if low > 0 else "worse" if high < 0 else "within noise"
    return Difference(diff, low, high, verdict)


# How an expected entry's numbers were checked: against the source itself (the paper's text, the
# official README, this repository's committed study), only against a public transcription of
# the paper's table, or not at all. Only the first three can flag a row.
VERIFIED = ("paper", "readme", "study")
CHECKED = (*VERIFIED, "transcription", "no")


@dataclass(frozen=True)
class Expected:
    """A reference result: who reported it, with how many trials, per metric (mean, std), and how
    its numbers were checked against that source (one of :data:`CHECKED`)."""

    name: str
    source: str
    trials: int
    metrics: dict[str, tuple[float, float | None]]
    checked: str

    @property
    def verified(self) -> bool:
        """Checked against the source itself: only then can a row be flagged against it."""
        return self.checked in VERIFIED

    def check(self, metric: str, row: Sample) -> str | None:
        """``"below expected"`` / ``"above expected"`` when ``row``'s mean lies further from the
        reference than two combined standard errors, else None (also when no std is known, and
        for an entry that is not :attr:`verified`).

        A row of one trial has no std of its own: the reference's std stands in for it. Two
        standard errors, not a t quantile: with 3 trials a row in agreement is flagged about one
        time in eight, so a flag asks for a look, it is no verdict.
        """
        if not self.verified:
            return None
        mean, std = self.metrics[metric]
        row_std = row.std if row.n > 1 else std
        if std is None or row_std is None or math.isnan(row.mean):
            return None
        combined = math.sqrt(row_std**2 / row.n + std**2 / self.trials)
        if abs(row.mean - mean) <= 2 * combined:
            return None
        return "below expected" if row.mean < mean else "above expected"


def load_expected(path: str | Path) -> list[tuple[dict[str, Any], Expected]]:
    """The entries of an expected-results file: (the values they hold for, the result).

    Raises:
        ValueError: an entry lacks a field, has a malformed metric or a ``checked`` outside
            :data:`CHECKED`.
    """
    entries = []
    for i, entry in enumerate(yaml.safe_load(Path(path).read_text()) or []):
        try:
            metrics = {
                name: (float(value[0]), None if value[1] is None else float(value[1]))
                for name, value in entry["metrics"].items()
            }
            if entry["checked"] not in CHECKED:
                raise ValueError(f"checked is {entry['checked']!r}, expected one of {CHECKED}")
            expected = Expected(
                entry["name"], entry["source"], int(entry["trials"]), metrics, entry["checked"]
            )
            entries.append((dict(entry["match"]), expected))
        except (KeyError, TypeError, IndexError, ValueError) as err:
            raise ValueError(
                f"{path}: entry {i} is malformed ({type(err).__name__}: {err})"
            ) from None
    return entries


def config_value(config: dict[str, Any], dotted: str) -> Any:
    """``config["SOLVER"]["MAX_ITER"]`` for ``"SOLVER.MAX_ITER"``; None where a key is missing."""
    value: Any = config
    for key in dotted.split("."):
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def find_expected(
    entries: list[tuple[dict[str, Any], Expected]],
    config: dict[str, Any],
    pretraining: dict[str, Any] | None = None,
) -> list[Expected]:
    """The entries whose every ``match`` key has the value the trial records (one, normally).

    A key ``pretraining.K`` is looked up as ``K`` in ``pretraining`` (a ``results.json``'s
    ``pretraining``: how the weights were pretrained, e.g. ``method`` and ``epochs``; None or
    empty for weights without one), every other key in ``config``.
    """

    def value(key: str) -> Any:
        if key.startswith("pretraining."):
            return config_value(pretraining or {}, key.removeprefix("pretraining."))
        return config_value(config, key)

    return [e for match, e in entries if all(value(k) == v for k, v in match.items())]
