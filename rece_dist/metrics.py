"""Held-out metrics for quantile predictions (pure numpy, so they are easy to check by hand).

For observations y and predicted quantiles q_tau:

    pinball_tau   = mean( max(tau * (y - q), (tau - 1) * (y - q)) )
    coverage_tau  = mean( y <= q_tau )                     (ideal: tau)
    interval_cov  = mean( q_lo <= y <= q_hi )              (ideal: tau_hi - tau_lo)
    width         = median( q_hi - q_lo )
    mape_p50      = median( |q_0.5 - y| / |y| )            (rows with y != 0)
    rel_pinball   = mean_tau( pinball_tau ) / mean( |y| )  (scale-free: comparable across configurations)
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def pinball(y: np.ndarray, q: np.ndarray, tau: float) -> float:
    r = y - q
    return float(np.mean(np.maximum(tau * r, (tau - 1.0) * r))) if len(y) else float("nan")


def coverage(y: np.ndarray, q: np.ndarray) -> float:
    return float(np.mean(y <= q)) if len(y) else float("nan")


def interval_coverage(y: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> float:
    return float(np.mean((y >= lo) & (y <= hi))) if len(y) else float("nan")


def median_width(lo: np.ndarray, hi: np.ndarray) -> float:
    return float(np.median(hi - lo)) if len(lo) else float("nan")


def mape(y: np.ndarray, q: np.ndarray) -> float:
    ok = y != 0
    return float(np.median(np.abs(q[ok] - y[ok]) / np.abs(y[ok]))) if ok.any() else float("nan")


def quantile_metrics(y: np.ndarray, values: np.ndarray, quantiles: tuple[float, ...]) -> dict[str, float]:
    """All metrics for one set of rows; ``values`` is (rows, quantiles), sorted along axis 1."""
    out: dict[str, float] = {"rows": float(len(y))}
    for j, tau in enumerate(quantiles):
        out[f"pinball_{tau:g}"] = pinball(y, values[:, j], tau)
        out[f"coverage_{tau:g}"] = coverage(y, values[:, j])
    lo, hi = values[:, 0], values[:, -1]
    out["interval_coverage"] = interval_coverage(y, lo, hi)
    out["interval_width"] = median_width(lo, hi)
    if 0.5 in quantiles:
        out["mape_p50"] = mape(y, values[:, quantiles.index(0.5)])
    return out


def relative_pinball(y: np.ndarray, values: np.ndarray, quantiles: Sequence[float]) -> float:
    """Mean pinball loss over the quantiles divided by mean |y|: comparable across configurations."""
    if not len(y):
        return float("nan")
    loss = np.mean([pinball(y, values[:, j], tau) for j, tau in enumerate(quantiles)])
    return float(loss / np.mean(np.abs(y)))
