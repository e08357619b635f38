"""Is a difference real? Intervals and p-values between rows, Holm's correction, and rows against
their expected numbers.

Torch-free; used by ``moco-report``. Each analysis of ``row - baseline`` gives an estimate, its
95 % interval, a verdict (``better`` / ``worse`` when the interval excludes 0, else ``within
noise``) and a two-sided p-value of "no difference":

- :func:`welch`: the trials of each row as two independent samples with unequal variances (Welch
  1947), Student's t with the Welch-Satterthwaite degrees of freedom. Right for rows of one
  pretrained backbone each, where it answers "is this backbone better on this recipe"; trials of
  several backbones it treats as independent, which they are not (they share their backbone).
- :func:`two_level_bootstrap`: the answer for a user who re-runs the recipe, pretraining included.
  A row may hold several backbones (pretraining seeds), each fine-tuned with several trial seeds;
  each resample draws the row's backbones with replacement, then each drawn backbone's trials
  with replacement (the two-stage bootstrap of nested data, Davison & Hinkley 1997, sec. 3.8),
  the two rows independently. The estimate is the mean over backbones of each backbone's mean:
  a re-run draws one backbone and fine-tunes it, so every backbone weighs the same however many
  trials it got (the mean over all trials would weigh a backbone by its trial count; with equal
  counts the two agree). The interval is the equal-tailed percentile interval of the resampled
  differences; the p-value inverts it (:func:`bootstrap_p`). Seeded, so a report is reproducible.
  Why not a linear mixed model: with the 2-5 backbones a study affords, its between-backbone
  variance is estimated badly (often 0, at the boundary) and its degrees of freedom are a guess;
  the bootstrap assumes no distribution. Its known caveat: with few backbones the interval is
  too narrow. The resampled between-backbone variance is the plug-in (divisor K) one, (K - 1) / K
  of the unbiased (2/3 with 3 backbones, which have only 10 distinct resamples), and percentile
  tails are a normal's, not a t's with K - 1 degrees of freedom (1.96 against 4.30 for K = 3).
  Read an interval over 3 backbones as a lower bound on the uncertainty. With one backbone per
  row it is the ordinary bootstrap of the trials.
- :func:`paired_t`: where two rows ran the same recipe apart from the weights on the same trial
  seeds, a seed fixes the data order and the init of the new layers in both, so the per-seed
  differences cancel that part of the trial noise (:func:`pair` forms the pairs, or says why
  there are none); Student's t on the differences with n - 1 degrees of freedom.

:func:`holm` corrects a family of p-values for multiplicity (Holm 1979).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from scipy import stats

SINGLE_TRIAL = "single trial: no interval"
NO_DATA = "no data"
# The analyses of a comparison, as the report names them; "backbones": Welch over backbone means.
TESTS = ("welch", "backbones", "bootstrap", "paired")
RESAMPLES = 10_000  # of the two-level bootstrap
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

    @classmethod
    def of(cls, values: Sequence[float]) -> Sample:
        """Mean and sample std of ``values``; NaN both when any value is NaN (COCO reports NaN
        for an empty size range) or there is none."""
        if not values or any(map(math.isnan, values)):
            return cls(len(values), math.nan, math.nan)
        std = statistics.stdev(values) if len(values) > 1 else math.nan
        return cls(len(values), statistics.fmean(values), std)


@dataclass(frozen=True)
class Difference:
    """``row - baseline``: the estimate, its interval, the verdict and the two-sided p-value."""

    diff: float
    low: float
    high: float
    verdict: str
    p: float = math.nan


@dataclass(frozen=True)
class Observation:
    """One trial's value of one metric, and what it shares with other trials."""

    value: float
    backbone: str  # the pretrained weights (sha256 or path); a random-init trial's own id
    seed: int | None = None  # the fine-tuning seed: data order and init of the new layers
    pretraining_seed: int | None = None  # the seed that pretrained the backbone


def _verdict(low: float, high: float) -> str:
    return "better" if low > 0 else "worse" if high < 0 else "within noise"


def _t_test(diff: float, se: float, dof: float, confidence: float) -> Difference:
    """The t interval ``diff ± t_dof se`` and the two-sided p of ``diff / se``; with ``se`` 0 the
    difference is exact: p 0, or 1 when it is 0."""
    if se == 0.0:
        return Difference(diff, diff, diff, _verdict(diff, diff), float(diff == 0.0))
    half = float(stats.t.ppf(0.5 + confidence / 2, dof)) * se
    p = 2 * float(stats.t.sf(abs(diff) / se, dof))
    return Difference(diff, diff - half, diff + half, _verdict(diff - half, diff + half), p)


def mean_interval(values: Sequence[float], *, confidence: float = 0.95) -> tuple[float, float]:
    """The t interval of the mean of ``values``: mean ± t_{n-1} std / sqrt(n) (NaN both for
    fewer than two values)."""
    sample = Sample.of(values)
    if sample.n < 2 or math.isnan(sample.std):
        return math.nan, math.nan
    half = float(stats.t.ppf(0.5 + confidence / 2, sample.n - 1)) * sample.std / math.sqrt(sample.n)
    return sample.mean - half, sample.mean + half


def welch(row: Sample, baseline: Sample, *, confidence: float = 0.95) -> Difference:
    """Welch's interval and p for ``row.mean - baseline.mean``.

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
    dof = se**4 / (var_row**2 / (row.n - 1) + var_base**2 / (baseline.n - 1)) if se else math.inf
    return _t_test(diff, se, dof, confidence)


def by_backbone(observations: Sequence[Observation]) -> dict[str, list[float]]:
    """The values per backbone, in the order the backbones first appear."""
    groups: dict[str, list[float]] = {}
    for obs in observations:
        groups.setdefault(obs.backbone, []).append(obs.value)
    return groups


def mean_of_backbone_means(observations: Sequence[Observation]) -> float:
    """The two-level estimate of a row: each backbone's mean, averaged over backbones."""
    return statistics.fmean(map(statistics.fmean, by_backbone(observations).values()))


def resample_two_level(
    groups: Sequence[Sequence[float]], *, rng: np.random.Generator, resamples: int
) -> np.ndarray:
    """(resamples,) means of backbone means, each drawing the K backbones (``groups``, the values
    of each) with replacement, then the n_k trials of each drawn backbone with replacement."""
    drawn = rng.integers(len(groups), size=(resamples, len(groups)))  # backbone per slot: B x K
    slot_means = np.empty(drawn.shape)  # B x K
    for k, values in enumerate(groups):
        slots = drawn == k
        trials = rng.integers(len(values), size=(int(slots.sum()), len(values)))  # slots x n_k
        slot_means[slots] = np.asarray(values)[trials].mean(axis=1)
    return slot_means.mean(axis=1)


def bootstrap_p(resampled: np.ndarray) -> float:
    """Two-sided p of "no difference" from the bootstrap differences ``d*``: the percentile
    interval inverted, ``2 (1 + min(#{d* <= 0}, #{d* >= 0})) / (B + 1)`` capped at 1, so that
    p <= 1 - confidence where the equal-tailed interval excludes 0. The +1 (as in Monte Carlo
    tests) keeps a finite number of resamples from claiming p = 0: the smallest p is 2 / (B + 1).
    """
    below, above = np.count_nonzero(resampled <= 0), np.count_nonzero(resampled >= 0)
    return min(1.0, 2 * (1 + int(min(below, above))) / (len(resampled) + 1))


def two_level_bootstrap(
    row: Sequence[Observation],
    baseline: Sequence[Observation],
    *,
    resamples: int = RESAMPLES,
    confidence: float = 0.95,
    seed: int = 0,
) -> Difference:
    """The two-level bootstrap of ``row - baseline`` (module docstring): the difference of the
    means of backbone means, its percentile interval and :func:`bootstrap_p`.

    Deterministic: every call draws from ``numpy.random.default_rng(seed)``. Fewer than 2 trials
    on either side: no interval, verdict :data:`SINGLE_TRIAL`.
    """
    if not row or not baseline or any(math.isnan(o.value) for o in (*row, *baseline)):
        return Difference(math.nan, math.nan, math.nan, NO_DATA)
    diff = mean_of_backbone_means(row) - mean_of_backbone_means(baseline)
    if len(row) < 2 or len(baseline) < 2:
        return Difference(diff, math.nan, math.nan, SINGLE_TRIAL)
    rng = np.random.default_rng(seed)
    row_resampled, base_resampled = (
        resample_two_level(list(by_backbone(side).values()), rng=rng, resamples=resamples)
        for side in (row, baseline)
    )
    resampled = row_resampled - base_resampled
    low, high = np.quantile(resampled, [(1 - confidence) / 2, (1 + confidence) / 2])
    return Difference(diff, float(low), float(high), _verdict(low, high), bootstrap_p(resampled))


def pair(
    row: Sequence[Observation], baseline: Sequence[Observation]
) -> tuple[list[float] | None, str]:
    """The paired differences ``row - baseline`` and how they were paired; or None and why not.

    The caller checks that both rows ran the same recipe apart from the weights; then one trial
    seed means the same data order and the same init of the new layers in both rows. Pairs must be
    independent of each other, so trials that share a backbone are never separate pairs:

    - both rows hold several backbones, each recording its own pretraining seed, over the same
      (pretraining seed, trial seed) pairs: one pair per pretraining seed, the mean over trial
      seeds of the per-seed differences (pretraining variance included, n = the backbones);
    - else, the same trial seeds on both sides, each backbone of a row having run every seed (or
      every trial its own backbone, as random init): one pair per trial seed, each side the mean
      over its backbones of that seed's trial. Conditional on the backbones drawn: no pretraining
      variance.
    """
    if any(o.seed is None for o in (*row, *baseline)):
        return None, "not shown: trial seeds not recorded"
    grids = _seed_grid(row), _seed_grid(baseline)
    if grids[0] is None or grids[1] is None:
        return None, "not shown: a backbone ran one trial seed twice"
    row_grid, base_grid = grids
    seeds = {o.seed for o in row}
    if seeds != {o.seed for o in baseline}:
        listed = (_listed({o.seed for o in side}) for side in (row, baseline))
        return None, "not shown: trial seeds differ ({} vs {})".format(*listed)
    row_backbones, base_backbones = _by_pretraining_seed(row), _by_pretraining_seed(baseline)
    if (
        row_backbones
        and base_backbones
        and {p: row_grid[b].keys() for p, b in row_backbones.items()}
        == {p: base_grid[b].keys() for p, b in base_backbones.items()}
    ):
        diffs = [
            statistics.fmean(row_grid[b][s] - base_grid[base_backbones[p]][s] for s in row_grid[b])
            for p, b in row_backbones.items()
        ]
        return diffs, f"by pretraining seed ({len(diffs)} pairs, each over its trial seeds)"
    if not (_balanced(row_grid, seeds) and _balanced(base_grid, seeds)):
        return None, "not shown: not every backbone ran every trial seed"
    diffs = [_seed_mean(row_grid, s) - _seed_mean(base_grid, s) for s in sorted(seeds)]
    shared = any(len(g) > 1 and all(v.keys() == seeds for v in g.values()) for g in grids)
    over = "; each side the mean over its backbones, no pretraining variance" if shared else ""
    return diffs, f"by trial seed ({len(diffs)} pairs{over})"


def paired_t(differences: Sequence[float], *, confidence: float = 0.95) -> Difference:
    """The paired t interval and p of the mean of ``differences`` (n - 1 degrees of freedom)."""
    if not differences or any(map(math.isnan, differences)):
        return Difference(math.nan, math.nan, math.nan, NO_DATA)
    diff = statistics.fmean(differences)
    if len(differences) < 2:
        return Difference(diff, math.nan, math.nan, SINGLE_TRIAL)
    se = statistics.stdev(differences) / math.sqrt(len(differences))
    return _t_test(diff, se, len(differences) - 1, confidence)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (Holm 1979), in the order given.

    Sorted ascending, the i-th of m p-values (i from 1) becomes ``(m - i + 1) p_(i)``, raised to
    the largest adjusted value before it and capped at 1; rejecting where the adjusted p <= alpha
    keeps the family-wise error rate at alpha under any dependence. NaN p-values (no test) stay
    NaN and do not count in m.
    """
    order = sorted((i for i, p in enumerate(pvalues) if not math.isnan(p)), key=pvalues.__getitem__)
    adjusted = [math.nan] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def _seed_grid(observations: Sequence[Observation]) -> dict[str, dict[int, float]] | None:
    """backbone -> trial seed -> value; None where a backbone ran one seed twice."""
    grid: dict[str, dict[int, float]] = {}
    for obs in observations:
        values = grid.setdefault(obs.backbone, {})
        if obs.seed in values:
            return None
        values[obs.seed] = obs.value
    return grid


def _by_pretraining_seed(observations: Sequence[Observation]) -> dict[int, str] | None:
    """pretraining seed -> its backbone, where every trial records one, the row holds several
    backbones, and seeds and backbones correspond one to one."""
    backbone_of: dict[int, str] = {}
    seed_of: dict[str, int] = {}
    for obs in observations:
        if obs.pretraining_seed is None:
            return None
        if backbone_of.setdefault(obs.pretraining_seed, obs.backbone) != obs.backbone:
            return None  # one pretraining seed, two backbones
        if seed_of.setdefault(obs.backbone, obs.pretraining_seed) != obs.pretraining_seed:
            return None  # one backbone, two pretraining seeds
    return backbone_of if len(backbone_of) > 1 else None


def _balanced(grid: dict[str, dict[int, float]], seeds: set[int]) -> bool:
    """Every backbone ran every seed, or every trial is its own backbone (random init)."""
    return all(g.keys() == seeds for g in grid.values()) or all(len(g) == 1 for g in grid.values())


def _seed_mean(grid: dict[str, dict[int, float]], seed: int) -> float:
    return statistics.fmean(g[seed] for g in grid.values() if seed in g)


def _listed(seeds: set[int]) -> str:
    return "{" + ", ".join(map(str, sorted(seeds))) + "}"


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
