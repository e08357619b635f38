"""The pure helpers of tools/keypoint_stability.py: where a loss series stops being finite."""

from __future__ import annotations

import math

import pytest

from tests.tool_loader import load_tool

pytest.importorskip("detectron2", reason="detectron2 is not installed")
study = load_tool("keypoint_stability")


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([], None),
        ([3.0, 2.5, 1e30], None),  # large but finite is not divergence
        ([3.0, math.nan, 1.0], 1),
        ([math.inf], 0),
        ([1.0, 2.0, -math.inf, math.nan], 2),
        ([1.0, None], 1),  # a non-finite loss as stored in JSON
    ],
)
def test_first_non_finite(values, expected):
    assert study.first_non_finite(values) == expected


def test_loss_trace_series_sums_terms_and_writes_non_finite_as_null():
    trace = study.LossTrace()
    trace.losses = {
        0: {"loss_cls": 1.0, "loss_keypoint": 2.0},
        1: {"loss_cls": math.nan, "loss_keypoint": 1.0},
    }

    assert trace.series() == {
        "total": [3.0, None],
        "loss_cls": [1.0, None],
        "loss_keypoint": [2.0, 1.0],
    }


def test_last_mean_skips_missing_values():
    assert study._last_mean([1.0, None, 3.0, 5.0], n=2) == 4.0
    assert math.isnan(study._last_mean([None]))
