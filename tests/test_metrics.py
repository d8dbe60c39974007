"""Metric functions against values worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from rece_dist.metrics import coverage, interval_coverage, mape, median_width, pinball, quantile_metrics


def test_pinball_by_hand():
    y = np.array([10.0, 0.0, 5.0])
    q = np.array([8.0, 1.0, 5.0])
    # residuals 2, -1, 0: tau=0.9 -> 0.9*2, 0.1*1, 0 ; mean = (1.8 + 0.1) / 3
    assert pinball(y, q, 0.9) == pytest.approx(1.9 / 3)
    # tau=0.1 -> 0.1*2, 0.9*1, 0
    assert pinball(y, q, 0.1) == pytest.approx(1.1 / 3)


def test_coverage_width_and_mape_by_hand():
    y = np.array([1.0, 2.0, 3.0, 4.0])
    lo = np.array([0.0, 2.5, 2.0, 5.0])
    hi = np.array([2.0, 3.0, 3.0, 3.5])
    assert coverage(y, hi) == pytest.approx(0.75)              # 1<=2, 2<=3, 3<=3, not 4<=3.5
    assert interval_coverage(y, lo, hi) == pytest.approx(0.5)  # rows 0 and 2
    assert median_width(lo, hi) == pytest.approx(0.75)         # widths 2, .5, 1, -1.5
    assert mape(np.array([2.0, 4.0, 0.0]), np.array([3.0, 3.0, 9.0])) == pytest.approx(0.375)  # .5, .25


def test_quantile_metrics_keys():
    y = np.array([1.0, 2.0, 3.0])
    vals = np.array([[0.0, 1.0, 2.0], [1.0, 2.0, 3.0], [2.0, 3.0, 4.0]])
    m = quantile_metrics(y, vals, (0.1, 0.5, 0.9))
    assert m["rows"] == 3
    # P50 equals y on every row: no loss, full one-sided coverage, zero error
    assert m["pinball_0.5"] == 0 and m["coverage_0.5"] == 1 and m["mape_p50"] == 0
    # P10 is y - 1 everywhere: loss 0.1 per row, never covers
    assert m["pinball_0.1"] == pytest.approx(0.1) and m["coverage_0.1"] == 0
    assert m["interval_coverage"] == 1 and m["interval_width"] == 2
