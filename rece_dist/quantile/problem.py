"""The problem every fit solves: its inputs checked, its results, and small shared helpers.

Data checks (shapes, NaN/inf, weights, tau), the weighted pinball loss, duplicate-row merging
and the weighted level search that places a band; `QuantileFit`, `CrossingReport` and
`ReduceOptions` are what the other modules of this package return or take.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from rece_dist.errors import ReceError

_CHUNK = 1 << 16  # rows per chunk in the data passes (fixed: the row sampling depends on it)
_SHARD_SHIFT = 40  # global row id = shard << 40 | local row


class QuantileInputError(ReceError, ValueError):
    """Bad input to a quantile fit (shape, NaN/inf, negative weights, tau outside (0, 1))."""


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class QuantileFit:
    tau: float
    coef: np.ndarray
    objective: float
    status: str
    solver: str
    n_rows: int
    n_solved_rows: int        # LP rows cvxpy saw in the final solve (merged, reduced; globs excluded)
    rounds: int               # reduced-LP solves in the final stage: 1 = first globs verified,
                              # >= 2 = fix-up rounds (incl. band doublings); 0 = one direct LP
    seconds: float
    # Diagnostics (not part of the pipeline contract).
    gap: float = 0.0          # certificate: (primal - dual) / max(|primal|, tiny) of the final LP
    stages: int = 0           # preliminary stages before the final one (0: one direct LP)
    lp_solves: int = 1        # cvxpy solves in total

    def predict(self, X) -> np.ndarray:
        return np.asarray(X, dtype=np.float64) @ self.coef


@dataclass(frozen=True)
class CrossingReport:
    taus: tuple[float, ...]
    before: tuple[int, ...]   # training rows where fit k predicts above fit k+1, per adjacent pair
    after: tuple[int, ...]
    rounds: int               # cutting-plane rounds (joint LP solves); 0 when nothing crossed
    constraints: int = 0      # ordering constraints in the final joint LP

    @property
    def crossings_before(self) -> int:
        return int(sum(self.before))

    @property
    def crossings_after(self) -> int:
        return int(sum(self.after))


@dataclass(frozen=True)
class ReduceOptions:
    """Tuning of the staged Portnoy-Koenker reduction (defaults are measured, see bench/).

    z_inner / z_outer: half-width of the free / carried band, in standard errors of the
    preliminary fit (the band's probability half-width is z*sqrt(tau(1-tau)p/n_prev)).
    """

    min_stage_rows: int = 2000    # smallest (first) subset; solved as a plain LP
    growth: float = 12.0          # max ratio between consecutive stage sizes
    z_inner: float = 2.5
    z_outer: float = 4.0
    min_free: int = 400           # at least this many free LP rows per stage (and >= 10 p)
    max_rounds: int = 8           # fix-up rounds per band before doubling it
    max_widen: int = 4            # band doublings before the exact fallback
    max_tilts: int = 8            # tilts along rare-feature rays per stage, besides max_widen
    pilot_rows: int = 200_000     # rows whose scaled residuals place the band of the next stage
    first_stage_rows: int | None = None  # override the first subset size (tests)


# --------------------------------------------------------------------------- small helpers


def pinball_loss(y, pred, tau, weights=None) -> float:
    """Weighted mean pinball loss sum w rho_tau(y - pred) / sum w."""
    y = np.asarray(y, dtype=np.float64).ravel()
    pred = np.asarray(pred, dtype=np.float64).ravel()
    if y.shape != pred.shape:
        raise QuantileInputError(f"y has {y.size} values but pred has {pred.size}")
    r = y - pred
    loss = np.maximum(tau * r, (tau - 1.0) * r)
    if weights is None:
        return float(loss.mean()) if loss.size else 0.0
    w = np.asarray(weights, dtype=np.float64).ravel()
    if w.shape != y.shape:
        raise QuantileInputError(f"weights has {w.size} values but y has {y.size}")
    return float(w @ loss / w.sum())


def _rho_sum(r: np.ndarray, w: np.ndarray, tau: float) -> float:
    return float(w @ np.maximum(tau * r, (tau - 1.0) * r))


def _check_tau(tau) -> float:
    try:
        t = float(tau)
    except (TypeError, ValueError):
        raise QuantileInputError(f"tau must be a number in (0, 1), got {tau!r}") from None
    if not (0.0 < t < 1.0) or not math.isfinite(t):
        raise QuantileInputError(f"tau must lie strictly inside (0, 1), got {tau!r}")
    return t


def _check_l1(l1) -> float:
    l1 = float(l1)
    if not math.isfinite(l1) or l1 < 0:
        raise QuantileInputError(f"l1 must be a finite number >= 0, got {l1!r}")
    return l1


def _all_finite(a: np.ndarray) -> bool:
    if a.ndim == 1:
        return bool(np.isfinite(a).all())
    for c0 in range(0, a.shape[0], _CHUNK):
        if not np.isfinite(a[c0:c0 + _CHUNK]).all():
            return False
    return True


def _validate_arrays(X, y, weights, where: str = "") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    sfx = f" ({where})" if where else ""
    if X.ndim != 2:
        raise QuantileInputError(f"X must be a 2-D array (rows x columns), got shape {X.shape}{sfx}")
    if y.ndim != 1:
        if y.ndim == 2 and 1 in y.shape:
            y = y.ravel()
        else:
            raise QuantileInputError(f"y must be 1-D, got shape {y.shape}{sfx}")
    n, p = X.shape
    if n == 0 or p == 0:
        raise QuantileInputError(f"X is empty (shape {X.shape}){sfx}")
    if y.shape[0] != n:
        raise QuantileInputError(f"X has {n} rows but y has {y.shape[0]} values{sfx}")
    if not _all_finite(X):
        raise QuantileInputError(f"X contains NaN or infinite values{sfx}")
    if not np.isfinite(y).all():
        bad = int((~np.isfinite(y)).sum())
        raise QuantileInputError(f"y contains {bad} NaN or infinite values{sfx}")
    if weights is None:
        w = np.ones(n)
    else:
        w = np.asarray(weights, dtype=np.float64).ravel()
        if w.shape[0] != n:
            raise QuantileInputError(f"weights has {w.shape[0]} values but X has {n} rows{sfx}")
        if not np.isfinite(w).all():
            raise QuantileInputError(f"weights contain NaN or infinite values{sfx}")
        if (w < 0).any():
            raise QuantileInputError(
                f"weights must be >= 0; {int((w < 0).sum())} are negative (min {w.min():g}){sfx}")
    return X, y, w


def _penalty_mask(penalize, p: int, const_cols: np.ndarray) -> np.ndarray:
    if penalize is None:
        return ~const_cols
    m = np.asarray(penalize)
    if m.dtype != bool:
        raise QuantileInputError("penalize must be a boolean mask over the columns of X")
    m = m.ravel()
    if m.shape[0] != p:
        raise QuantileInputError(f"penalize has {m.shape[0]} entries but X has {p} columns")
    return m.copy()


def _column_range(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-column min and max, chunked so no n x p temporary is made."""
    lo = np.full(X.shape[1], np.inf)
    hi = np.full(X.shape[1], -np.inf)
    for c0 in range(0, X.shape[0], _CHUNK):
        ch = X[c0:c0 + _CHUNK]
        lo = np.minimum(lo, ch.min(axis=0))
        hi = np.maximum(hi, ch.max(axis=0))
    return lo, hi


def _constant_columns(X: np.ndarray) -> np.ndarray:
    lo, hi = _column_range(X)
    return lo == hi


def _all_distinct(key: np.ndarray) -> bool:
    """True when no two rows of ``key`` have equal bytes, shown by distinct 64-bit row hashes.

    Why: sorting rows as byte strings (below) costs ~9 ms at 19,000 rows, 5% of a design's
    fit, and rows are almost always distinct; equal rows always hash equal, so a False here
    (a duplicate or, rarely, a collision) only sends the rows to the exact path."""
    words = np.ascontiguousarray(key).view(np.uint64)
    h = np.zeros(len(words), dtype=np.uint64)
    for j in range(words.shape[1]):  # FNV-style: a bijection in each column given the ones before
        h ^= words[:, j]
        h *= np.uint64(0x100000001B3)
    h.sort()
    return not bool((h[1:] == h[:-1]).any())


def _dedupe(X: np.ndarray, y: np.ndarray, w: np.ndarray, *extra: np.ndarray):
    """Merge rows with identical (x, y) into one row with the summed weight.

    `extra` arrays (row attributes that are equal for duplicates by construction) are reduced
    by taking the first member.  Returns (X, y, w, *extra, inverse)."""
    n = X.shape[0]
    if n <= 1:
        return (X, y, w, *extra, np.zeros(n, dtype=np.int64))
    key = np.empty((n, X.shape[1] + 1))
    key[:, :-1] = X
    key[:, -1] = y
    key += 0.0  # -0.0 -> 0.0 so that equal numbers have equal bytes
    if _all_distinct(key):
        return (X, y, w, *extra, np.arange(n))
    v = np.ascontiguousarray(key).view(np.dtype((np.void, key.dtype.itemsize * key.shape[1]))).ravel()
    _, first, inv = np.unique(v, return_index=True, return_inverse=True)
    if first.size == n:
        return (X, y, w, *extra, np.arange(n))
    wsum = np.bincount(inv.ravel(), weights=w, minlength=first.size)
    return (X[first], y[first], wsum, *(e[first] for e in extra), inv.ravel())


def _weighted_level(s: np.ndarray, w: np.ndarray, offset: float, target: float) -> float:
    """Smallest s value at which offset + cumulative weight (in increasing s) reaches target."""
    if s.size == 0:
        return -np.inf if target <= offset else np.inf
    order = np.argsort(s, kind="stable")
    cum = offset + np.cumsum(w[order])
    if target <= offset:
        return -np.inf
    k = int(np.searchsorted(cum, target, side="left"))
    if k >= s.size:
        return np.inf
    return float(s[order[k]])


def _prepare_penalty(X, w, l1, penalize) -> np.ndarray:
    if w.sum() <= 0:
        raise QuantileInputError("weights sum to zero: nothing to fit")
    p = X.shape[1]
    const = _constant_columns(X) if (l1 > 0 and penalize is None) else np.zeros(p, dtype=bool)
    return _penalty_mask(penalize, p, const)


def _check_taus(taus) -> list[float]:
    ts = [_check_tau(t) for t in taus]
    if not ts:
        raise QuantileInputError("taus is empty")
    if len(set(ts)) != len(ts):
        raise QuantileInputError(f"taus must be distinct, got {ts}")
    return ts
