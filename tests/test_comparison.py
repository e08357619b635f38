"""The statistics of moco-report against closed forms, worked examples and scipy."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
from scipy import stats

from moco_pretrain.comparison import (
    SINGLE_TRIAL,
    Observation,
    Sample,
    bootstrap_p,
    holm,
    mean_interval,
    pair,
    paired_t,
    resample_two_level,
    two_level_bootstrap,
    welch,
)


def _sample(values: list[float]) -> Sample:
    return Sample(len(values), statistics.fmean(values), statistics.stdev(values))


def _row(values_per_backbone: list[list[float]], **fields) -> list[Observation]:
    """Backbone k's trials, with trial seeds 0, 1, ... in each backbone."""
    return [
        Observation(value, f"backbone {k}", seed, **fields)
        for k, values in enumerate(values_per_backbone)
        for seed, value in enumerate(values)
    ]


def test_holm_on_a_worked_example():
    """m = 4, sorted 0.005 0.01 0.03 0.04: x4 = 0.02, x3 = 0.03, x2 = 0.06, x1 = 0.04 raised to
    the 0.06 before it. Capped at 1; NaN (no test) stays NaN and is not counted in m."""
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.6]) == [1.0, 1.0]
    adjusted = holm([0.02, math.nan, 0.04])
    assert adjusted[0] == adjusted[2] == pytest.approx(0.04) and math.isnan(adjusted[1])
    assert holm([]) == []


@pytest.mark.parametrize(
    ("row", "baseline"),
    [([1.0, 2.0, 3.0, 4.0, 7.0], [2.0, 5.0, 7.0]), ([10.2, 9.8, 10.1], [12.0, 11.1, 13.5, 12.2])],
)
def test_welch_p_and_interval_match_scipy(row, baseline):
    difference = welch(_sample(row), _sample(baseline))
    reference = stats.ttest_ind(row, baseline, equal_var=False)
    assert difference.p == pytest.approx(reference.pvalue, rel=1e-10)
    half = stats.t.ppf(0.975, reference.df) * difference.diff / reference.statistic  # t_q se
    assert (difference.low, difference.high) == pytest.approx(
        (difference.diff - half, difference.diff + half), rel=1e-10
    )


def test_paired_p_and_interval_match_scipy():
    row, baseline = [31.2, 29.8, 33.1, 30.5], [30.1, 29.9, 31.0, 29.2]
    difference = paired_t([a - b for a, b in zip(row, baseline, strict=True)])
    reference = stats.ttest_rel(row, baseline)
    assert difference.p == pytest.approx(reference.pvalue, rel=1e-10)
    assert difference.diff == pytest.approx(statistics.fmean(row) - statistics.fmean(baseline))
    half = stats.t.ppf(0.975, 3) * difference.diff / reference.statistic
    assert difference.high - difference.low == pytest.approx(2 * half, rel=1e-10)
    assert paired_t([1.5]).verdict == SINGLE_TRIAL


def test_the_bootstrap_p_inverts_the_percentile_interval():
    """p = 2 (1 + min(#{d* <= 0}, #{d* >= 0})) / (B + 1), capped at 1."""
    assert bootstrap_p(np.array([-1.0, 1.0, 2.0, 3.0])) == pytest.approx(2 * 2 / 5)
    assert bootstrap_p(np.array([1.0, 2.0, 3.0, 4.0])) == pytest.approx(2 / 5)
    assert bootstrap_p(np.array([0.0, 0.0])) == 1.0


def test_the_two_level_resampling_variance_is_its_closed_form():
    """A slot draws backbone c uniformly, then the mean of n_c of its trials: its variance is the
    plug-in variance of the backbone means plus the mean plug-in within-variance / n_k; the mean
    of K independent slots has 1/K of it. One backbone of [0, 3, 6] and three backbones of one
    trial each are both the ordinary bootstrap of the mean of 3: 6 / 3 = 2."""
    rng = np.random.default_rng(0)
    spread = [[m - 0.1, m, m + 0.1] for m in (0.0, 10.0, 20.0)]
    between, within = 200 / 3, 0.02 / 3 / 3
    assert resample_two_level(spread, rng=rng, resamples=10_000).var() == pytest.approx(
        (between + within) / 3, rel=0.05
    )
    for groups in ([[0.0, 3.0, 6.0]], [[0.0], [3.0], [6.0]]):
        assert resample_two_level(groups, rng=rng, resamples=10_000).var() == pytest.approx(
            2.0, rel=0.05
        )


def test_the_two_level_bootstrap_is_reproducible_and_weighs_backbones_equally():
    row, baseline = _row([[1.0, 2.0, 4.0], [3.0, 3.5]]), _row([[0.5, 1.0, 0.0, 2.0]])
    first = two_level_bootstrap(row, baseline)
    assert two_level_bootstrap(row, baseline) == first
    assert two_level_bootstrap(row, baseline, seed=1) != first
    # the mean of backbone means: (7/3 + 3.25) / 2 - 0.875, not the mean of the 5 trials
    assert first.diff == pytest.approx((7 / 3 + 3.25) / 2 - 0.875)
    assert two_level_bootstrap(row[:1], baseline).verdict == SINGLE_TRIAL


def test_between_backbone_variance_widens_the_interval_beyond_welchs():
    """Three backbones at 0, 10 and 20 (trials +-0.1 around them) against nine trials of 0: the
    trial-pooled Welch half-width is t_0.975,8 x 8.66 / 3 = 6.7, but a resample draws the backbone
    at 0 three times with probability 1/27 > 2.5 %, so the bootstrap interval reaches down to
    about 0 and up to about 20."""
    spread = [[m - 0.1, m, m + 0.1] for m in (0.0, 10.0, 20.0)]
    row, baseline = _row(spread), _row([[0.0] * 9])
    naive = welch(_sample([v for values in spread for v in values]), Sample(9, 0.0, 0.0))
    bootstrap = two_level_bootstrap(row, baseline)
    assert bootstrap.high - bootstrap.low > 1.4 * (naive.high - naive.low)
    assert bootstrap.low < 0.1 < naive.low and bootstrap.p > 2 * naive.p


def test_rows_of_one_backbone_are_paired_by_trial_seed():
    row, baseline = _row([[31.2, 29.8, 33.1]]), _row([[30.1, 29.9, 31.0]])
    differences, how = pair(row, baseline)
    assert differences == pytest.approx([1.1, -0.1, 2.1]) and how == "by trial seed (3 pairs)"
    # a random-init row: every trial its own backbone, its init drawn by its seed
    random_init = [Observation(v, f"trial {s}", s) for s, v in enumerate([20.0, 21.0, 22.0])]
    assert pair(row, random_init)[0] == pytest.approx([11.2, 8.8, 11.1])


@pytest.mark.parametrize(
    ("baseline", "reason"),
    [
        (_row([[30.1, 29.9]]), "not shown: trial seeds differ ({0, 1, 2} vs {0, 1})"),
        ([Observation(30.0, "b", None)] * 3, "not shown: trial seeds not recorded"),
        (_row([[1.0, 2.0, 3.0], [4.0, 5.0]]), "not shown: not every backbone ran every trial seed"),
    ],
)
def test_no_pairs_where_they_would_not_be_valid(baseline, reason):
    assert pair(_row([[31.2, 29.8, 33.1]]), baseline) == (None, reason)


def test_rows_of_several_backbones_pair_by_pretraining_seed_else_over_backbone_means():
    """Pretraining seeds 0 and 1, trial seeds 0 and 1 each: with pretraining seeds recorded one
    pair per pretraining seed (the mean of its two per-seed differences), else one per trial seed
    (each side the mean over its backbones)."""
    row_values, base_values = [[10.0, 12.0], [20.0, 22.0]], [[9.0, 10.0], [15.0, 18.0]]
    row, baseline = (
        [Observation(o.value, o.backbone, o.seed, int(o.backbone[-1])) for o in _row(values)]
        for values in (row_values, base_values)
    )
    differences, how = pair(row, baseline)
    assert differences == pytest.approx([1.5, 4.5]) and how.startswith("by pretraining seed")
    differences, how = pair(_row(row_values), _row(base_values))
    assert differences == pytest.approx([3.0, 3.0]) and "no pretraining variance" in how
    other_seeds = [
        Observation(o.value, o.backbone, o.seed, o.pretraining_seed + 2) for o in baseline
    ]
    assert pair(row, other_seeds) == (differences, how)


def test_mean_interval_is_the_t_interval_of_the_mean():
    values = [31.2, 29.8, 33.5, 30.1]
    low, high = mean_interval(values)
    expected = stats.t.interval(0.95, 3, loc=np.mean(values), scale=stats.sem(values))
    assert (low, high) == pytest.approx(expected, rel=1e-12)
    assert all(math.isnan(v) for v in mean_interval([1.0]))
