"""Exact linear quantile regression, solved in cvxpy, for any number of rows.

Every fit here is the exact optimum of the weighted pinball-loss LP

    minimise  sum_i w_i * rho_tau(y_i - x_i'b) / sum_i w_i  +  l1 * sum_{j penalised} |b_j|

where rho_tau(r) = max(tau*r, (tau-1)*r).  cvxpy only ever sees a small problem:

* **Dual LP.**  cvxpy gets the dual  max y'd  s.t.  X'd (= or within +-lambda of) 0,
  -(1-tau)w <= d <= tau*w  (written with a = d + (1-tau)w in [0, w]); the coefficients are the
  multipliers of its p constraints.  Measured on this machine (p=21, tau=0.9, cvxpy 1.9 + HiGHS
  1.16): 0.3 s dual vs 14 s primal at 1e4 rows, 1.1 s vs 26 s at 3e4 -- see bench/.
  y enters only as the cost vector, which is centred and scaled by a power of two before
  HiGHS sees it (exact; HiGHS's dual simplex fails on costs ~1e6, e.g. latencies in
  microseconds); a solver failure is re-solved by another route (HiGHS IPM, CLARABEL), named
  in the fit's `solver` field.
* **Duplicate rows** (identical x and y) become one row with the summed weight.
* **Portnoy-Koenker globbing, in stages.**  Given a preliminary fit, rows whose scaled residual
  r_i / sqrt(Var x_i'b) (a sandwich variance with Hendricks-Koenker local densities, so that
  heteroscedastic data get a band that widens where y spreads) lies confidently above (below)
  the tau-quantile band are
  "globbed": their dual variable is fixed at its bound (a_i = w_i above, 0 below), which is the
  y = +-infinity limit of R quantreg's pseudo-observation and enters the LP only through the
  right-hand side (sum of w_i x_i).  The reduced objective is a lower bound of the full one that
  is tight exactly when every globbed residual has its assumed sign, so once the signs verify
  the reduced optimum *is* the full optimum; the duality gap (full primal objective minus the
  dual value) is checked as a certificate.  Violators are freed (bounds change only: a warm
  re-solve) or added, bounded rounds, then the band is doubled, never a wrong answer.  A
  reduced LP that is unbounded (a rare feature's rows all globbed on one side) instead widens
  the band along its ray, found by a phase-one LP.
  Preliminary fits come from nested random subsets growing geometrically (each stage's exact
  optimum is the next stage's preliminary), so every LP cvxpy sees stays small while the data
  passes are O(n p^2) numpy.
* **Distributed.**  The passes need only per-row residual signs, two sums and the middle
  rows, so `fit_quantile_sharded` runs them as Ray tasks over shards; the driver solves the
  reduced LPs.  The same pass functions serve the single-process path.
* **Non-crossing.**  `resolve_crossings` re-solves the quantiles jointly with ordering
  constraints x_i'b_k <= x_i'b_{k+1} added only at training rows that cross (cutting plane),
  on a globbed row set, until no training row crosses.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import numpy as np

from rece_dist.errors import ReceError, SolverError

__all__ = [
    "QuantileFit",
    "CrossingReport",
    "ReduceOptions",
    "QuantileInputError",
    "pinball_loss",
    "fit_quantile",
    "fit_quantiles",
    "resolve_crossings",
    "fit_quantile_sharded",
]

_log = logging.getLogger(__name__)

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


# --------------------------------------------------------------------------- the LP in cvxpy


# free columns above which a cold HiGHS solve uses IPM (+ crossover).  With presolve off and
# scaled costs the dual simplex wins up to ~1e5 columns (bench data, p=21: 1.1 vs 1.8 s at 4e4,
# 3.2 vs 3.6 s at 8e4, 8.8 vs 7.5 s at 1.6e5; the 1e6-row fit's 31k-row final LP 1.3 vs 1.7 s).
_HIGHS_IPM_FROM = 100_000

# Statuses after which the same LP is re-solved by another route (see _DualLP.solve); a user
# limit (time/iteration) is the caller's choice and is never retried.
_RETRY = ("solver_error", "optimal_inaccurate", "infeasible_inaccurate", "unbounded_inaccurate")
_INFEASIBLE = ("infeasible", "unbounded", "infeasible_inaccurate", "unbounded_inaccurate",
               "infeasible_or_unbounded")


def _retryable(status: str, expect_feasible: bool) -> bool:
    if status.startswith(_RETRY):
        return True
    return expect_feasible and status in _INFEASIBLE


def _cost_shift_scale(X: np.ndarray, y: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, float]:
    """Shift g (zero outside `cols`) and power-of-two scale s of the LP costs c = (y - X g) / s.

    Why: y enters the dual LP only as its cost vector, and HiGHS's dual simplex breaks down on
    large costs ("ratio test failed due to excessive dual values", model status kNotset, which
    cvxpy reports as a solver error): with y in microseconds (~1e6) it fails on the infeasible
    reduced LPs the band search meets, and at ~5e6 even on feasible full LPs.  Exactness: the
    constraints do not involve y, so scaling the costs by 1/s scales every objective by 1/s
    (coefficients b = s b' + g, the penalty l1 |b| scales alike), and shifting y by X g with g
    on equality (unpenalised) columns changes the objective by the constant sum_k g'rhs_k --
    also in the joint non-crossing LP, where the mu terms of adjacent blocks telescope.  A
    power of two makes the scaling itself exact; the shift (a least-squares fit on a subsample)
    only centres the costs, any g is exact."""
    m, p = X.shape
    g = np.zeros(p)
    if cols.size and m > cols.size:
        step = max(1, m // 20_000)
        try:
            sol = np.linalg.lstsq(X[::step][:, cols], y[::step], rcond=None)[0]
        except np.linalg.LinAlgError:  # pragma: no cover - lstsq (SVD) rarely fails
            sol = None
        if sol is not None and np.isfinite(sol).all():
            g[cols] = sol
            # never let the shift cost more precision than it saves
            if float(np.abs(X @ g).max()) > 4.0 * float(np.abs(y).max()):
                g[:] = 0.0
    a = np.abs(y - X @ g)
    big = float(a.max()) if m else 0.0
    if not (big > 0.0 and math.isfinite(big)):
        return g, 1.0
    q = max(float(np.median(a)), big / 1024.0)  # typical cost ~1, largest <= ~1e3
    return g, 2.0 ** round(math.log2(q))


@functools.cache
def _swallow_highs_banner() -> None:
    """HiGHS writes a two-line copyright banner to stdout when a process creates its first
    solver; from Ray workers it lands between the tables a user reads. Create that first
    instance with stdout pointed at /dev/null (once per process; later ones print nothing)."""
    try:
        import highspy
    except ImportError:
        return
    sys.stdout.flush()
    saved, null = os.dup(1), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        highspy.Highs()
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(null)


class _DualLP:
    """max sum_k c'a_k  s.t. per block k:  X'a_k - X_{C_k}'mu_k + X_{C_{k-1}}'mu_{k-1}  =  rhs_k
    (unpenalised columns) or within +-lam of it (penalised columns), lo <= a_k <= hi, mu >= 0,
    with costs c = (y - X g) / s (see `_cost_shift_scale`; `coefs` undoes it).

    One block (K=1, no mu) is the ordinary quantile-regression dual.  Bounds and right-hand
    sides are cvxpy Parameters so fix-up rounds and other taus re-solve the same compiled
    problem (warm start); X and y are constants (a Parameter matrix costs more per solve than
    compiling afresh, measured)."""

    def __init__(self, X: np.ndarray, y: np.ndarray, pen: np.ndarray, lams: Sequence[float],
                 solver: str, solver_options: dict | None, cross: Sequence[np.ndarray] = ()):
        import cvxpy as cp

        self.cp = cp
        if solver == "HIGHS":
            _swallow_highs_banner()
        m, p = X.shape
        K = len(lams)
        self.m, self.p, self.K = m, p, K
        self.solver = solver
        self.solver_options = dict(solver_options or {})
        self.fallbacks: list[str] = []   # routes other than the primary that produced a result
        self.X, self.y = X, y
        self.lo = [cp.Parameter(m, name=f"lo{k}") for k in range(K)]
        self.hi = [cp.Parameter(m, name=f"hi{k}") for k in range(K)]
        self.rhs = [cp.Parameter(p, name=f"rhs{k}") for k in range(K)]
        self.a = [cp.Variable(m, bounds=[self.lo[k], self.hi[k]], name=f"a{k}") for k in range(K)]
        self.mu = [cp.Variable(len(c), nonneg=True, name=f"mu{k}") if len(c) else None
                   for k, c in enumerate(cross)]
        XT = np.ascontiguousarray(X.T)
        U = np.flatnonzero(~pen)
        P = np.flatnonzero(pen)
        self.U, self.P = U, P
        any_lam = any(float(lam) > 0 for lam in lams)
        self.g, self.s = _cost_shift_scale(X, y, U if any_lam else np.arange(p))
        cost = (y - X @ self.g) / self.s
        self.cons_eq, self.cons_up, self.cons_lo = [], [], []
        cons = []
        for k in range(K):
            expr = XT @ self.a[k]
            if k < len(self.mu) and self.mu[k] is not None:
                expr = expr - X[cross[k]].T @ self.mu[k]
            if k >= 1 and k - 1 < len(self.mu) and self.mu[k - 1] is not None:
                expr = expr + X[cross[k - 1]].T @ self.mu[k - 1]
            lam = float(lams[k])
            eqi = U if lam > 0 else np.arange(p)
            pi = P if lam > 0 else np.zeros(0, dtype=np.int64)
            ce = cu = cl = None
            if eqi.size:
                ce = expr[eqi] == self.rhs[k][eqi]
                cons.append(ce)
            if pi.size:
                cu = expr[pi] - self.rhs[k][pi] <= lam
                cl = expr[pi] - self.rhs[k][pi] >= -lam
                cons += [cu, cl]
            self.cons_eq.append((eqi, ce))
            self.cons_up.append((pi, cu, cl))
        self.problem = cp.Problem(cp.Maximize(sum(cost @ self.a[k] for k in range(K))), cons)
        self.lam0 = float(lams[0])
        self.solves = 0

    def set(self, k: int, lo: np.ndarray, hi: np.ndarray, rhs: np.ndarray) -> None:
        self.lo[k].value = lo
        self.hi[k].value = hi
        self.rhs[k].value = rhs

    def _options(self, solver: str, n_free: int, warm: bool, algo: str | None = None) -> dict:
        opts = dict(self.solver_options) if solver == self.solver else {}
        if solver == "HIGHS":
            hopts = dict(opts.pop("highs_options", {}))
            if algo is not None:
                opts.pop("solver", None)
                hopts["solver"] = algo
            elif "solver" not in hopts and "solver" not in opts:
                hopts["solver"] = "simplex" if (warm or n_free <= _HIGHS_IPM_FROM) else "ipm"
            # presolve finds nothing to remove in this LP (p dense equality rows, boxed columns)
            # but costs O(columns) work per solve: 1.0 of 1.1 s at 10,800 columns (measured)
            if "presolve" not in hopts and "presolve" not in opts:
                hopts["presolve"] = "off"
            opts["highs_options"] = hopts
        elif solver == "CLARABEL":
            for key, val in (("tol_gap_abs", 1e-10), ("tol_gap_rel", 1e-10), ("tol_feas", 1e-10),
                             ("tol_ktratio", 1e-8), ("max_iter", 400)):
                opts.setdefault(key, val)
        if solver != self.solver and "verbose" in self.solver_options:
            opts["verbose"] = self.solver_options["verbose"]
        return opts

    def _run(self, solver: str, opts: dict, warm: bool) -> str:
        cp = self.cp
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.problem.solve(solver=solver, warm_start=warm, **opts)
        except cp.error.SolverError as exc:  # solver crashed or is not installed
            return f"solver_error: {exc}"
        finally:
            self.solves += 1
        return str(self.problem.status)

    def _routes(self, n_free: int, warm: bool):
        """Other ways to solve the same LP, tried in order after a solver failure."""
        import cvxpy as cp

        installed = set(cp.installed_solvers())
        if self.solver == "HIGHS":
            opts = self._options("HIGHS", n_free, warm)
            algo = opts["highs_options"].get("solver", opts.get("solver", "choose"))
            other = "ipm" if algo != "ipm" else "simplex"
            yield f"HIGHS({other})", "HIGHS", self._options("HIGHS", n_free, False, algo=other)
        for name in ("CLARABEL", "HIGHS"):
            if name != self.solver and name in installed:
                yield name, name, self._options(name, n_free, False)

    def solve(self, n_free: int, warm: bool, expect_feasible: bool = False) -> str:
        """Solve; after a solver failure (or an infeasible verdict on an LP known to be feasible)
        re-solve the same LP by the next route: the other HiGHS algorithm, then the other solver.
        A user limit of the primary solve is final.  A route that produced the returned result
        is recorded in `fallbacks`; every answer is still verified by the caller."""
        status = self._run(self.solver, self._options(self.solver, n_free, warm), warm)
        if not _retryable(status, expect_feasible):
            return status
        tried = []
        for label, name, opts in self._routes(n_free, warm):
            _log.info("LP on %d rows: %s returned %r; re-solving with %s", self.m, self.solver,
                      status[:80], label)
            st = self._run(name, opts, False)
            if st == "optimal" or (st in _INFEASIBLE and not _retryable(st, expect_feasible)):
                if label not in self.fallbacks:
                    self.fallbacks.append(label)
                return st
            tried.append(f"{label}: {st[:60]}")
        return f"{status} (re-solved: {'; '.join(tried)})" if tried else status

    def unbounded_direction(self) -> np.ndarray | None:
        """For an infeasible one-block LP: the direction d in coefficient space along which the
        reduced primal is unbounded, from the phase-one LP  min ||X'a - rhs||_1 (each penalised
        row only beyond its +-lambda) over the same bounds; d is its multiplier vector.  A rare
        feature whose rows were all globbed on one side gives d = that column.  None when the
        phase-one LP finds no violation (the solver's verdict was numerical) or fails."""
        cp = self.cp
        gap = cp.Variable(self.p)
        cons = [self.X.T @ self.a[0] - self.rhs[0] == gap]
        eqi, _ = self.cons_eq[0]
        pi = self.cons_up[0][0]
        lam = self.lam0
        cost = cp.sum(cp.abs(gap[eqi])) if eqi.size else 0
        if pi.size:
            cost = cost + cp.sum(cp.pos(cp.abs(gap[pi]) - lam))
        phase1 = cp.Problem(cp.Minimize(cost), cons)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                # IPM: the dual simplex took 28 s on a 36,768-row phase one, IPM 1.6 s (measured)
                phase1.solve(solver=self.solver, **self._options(self.solver, self.m, False, algo="ipm"))
        except cp.error.SolverError:
            return None
        if phase1.status != "optimal" or not (phase1.value > 0) or cons[0].dual_value is None:
            return None
        d = np.asarray(cons[0].dual_value, dtype=np.float64).ravel()
        return d if np.isfinite(d).all() and np.abs(d).max() > 0 else None

    def coefs(self, k: int) -> np.ndarray:
        b = np.zeros(self.p)
        eqi, ce = self.cons_eq[k]
        if ce is not None:
            b[eqi] = np.asarray(ce.dual_value, dtype=np.float64).ravel()
        pi, cu, cl = self.cons_up[k]
        if cu is not None:
            b[pi] = (np.asarray(cu.dual_value, dtype=np.float64).ravel()
                     - np.asarray(cl.dual_value, dtype=np.float64).ravel())
        return self.s * b + self.g

    def avalue(self, k: int) -> np.ndarray:
        return np.asarray(self.a[k].value, dtype=np.float64).ravel()


def _solver_label(solver: str, fallbacks: Sequence[str]) -> str:
    """The fit's `solver` field: the requested solver, plus '+route' for every fallback route
    (e.g. 'HIGHS+HIGHS(ipm)', 'HIGHS+CLARABEL') that solved one of its LPs."""
    return "+".join([solver, *dict.fromkeys(fallbacks)])


def _solver_name(solver: str) -> str:
    s = str(solver).upper()
    import cvxpy as cp

    if s not in cp.installed_solvers():
        raise QuantileInputError(
            f"solver {solver!r} is not installed for cvxpy (installed: {', '.join(cp.installed_solvers())})")
    return s


def _fail(tau, rows, solver, status, what="LP") -> SolverError:
    return SolverError(
        f"quantile {what} for tau={tau:g} on {rows} rows: solver {solver} returned status "
        f"{status!r}, not 'optimal'")


# --------------------------------------------------------------------------- data passes
#
# Every pass is a pure function of one shard (X, y, w) plus small arguments, so the same code
# runs in-process and as a Ray task.  Stage membership of a row is u < frac with u drawn per
# chunk from a generator seeded by (seed, shard, chunk): nested stages, no n-sized state.


def _single_blas(fn: Callable) -> Callable:
    """Run a pass with one BLAS thread: its products are small (chunk x p), and multithreaded
    OpenBLAS on them is slower, badly so on a shared machine (measured 40x on a 3 x 65536 gemm)."""

    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:  # pragma: no cover - threadpoolctl ships with scikit-learn
            return fn(*args, **kwargs)
        with threadpool_limits(1, user_api="blas"):
            return fn(*args, **kwargs)

    return wrapper


def _chunk_u(seed: int, shard: int, chunk: int, size: int) -> np.ndarray:
    return np.random.default_rng([int(seed), int(shard), int(chunk), 7]).random(size)


def _stage_chunks(n: int, shard: int, seed: int, frac: float):
    """Yield (chunk_index, local row indices or slice, u or None) for the stage's rows."""
    for ci, c0 in enumerate(range(0, n, _CHUNK)):
        c1 = min(n, c0 + _CHUNK)
        if frac >= 1.0:
            yield ci, slice(c0, c1), None, c0
        else:
            u = _chunk_u(seed, shard, ci, c1 - c0)
            sel = np.flatnonzero(u < frac)
            yield ci, sel + c0, u[sel], c0


@_single_blas
def _pass_stats(shard, shard_id: int, need_const: bool) -> dict:
    X, y, w = shard
    X, y, w = _validate_arrays(X, y, w, where=f"shard {shard_id}")
    out = {"n": X.shape[0], "p": X.shape[1], "W": float(w.sum()), "Sx": w @ X,
           "ymax": float(np.abs(y).max())}
    if need_const:
        out["colmin"], out["colmax"] = _column_range(X)
    return out


@_single_blas
def _pass_sample(shard, shard_id: int, seed: int, frac: float) -> dict:
    X, y, w = (np.asarray(a) for a in shard)
    n = X.shape[0]
    idx = []
    for _ci, rows, _u, _c0 in _stage_chunks(n, shard_id, seed, frac):
        r = np.arange(rows.start, rows.stop) if isinstance(rows, slice) else rows
        idx.append(r[w[r] > 0])
    idx = np.concatenate(idx) if idx else np.zeros(0, dtype=np.int64)
    return {"X": X[idx], "y": y[idx], "w": w[idx], "gid": (int(shard_id) << _SHARD_SHIFT) + idx}


@_single_blas
def _pass_classify(shard, shard_id: int, seed: int, frac: float, b: np.ndarray,
                   Linv: np.ndarray, klo: float, khi: float):
    """Glob rows with scaled residual outside [klo, khi]; return the rest.  Also returns the
    per-row side state (+1 globbed above, -1 below, 0 otherwise) for the verify pass."""
    X, y, w = (np.asarray(a) for a in shard)
    n, p = X.shape
    side = np.zeros(n, dtype=np.int8)
    Sx_lo = np.zeros(p)
    Sx_hi = np.zeros(p)
    Sx_st = np.zeros(p)
    Sy_lo = Sy_hi = W_lo = W_hi = W_st = 0.0
    n_st = 0
    keep_X, keep_y, keep_w, keep_s, keep_g = [], [], [], [], []
    LT = np.ascontiguousarray(Linv.T)
    for _ci, rows, _u, _c0 in _stage_chunks(n, shard_id, seed, frac):
        Xc = X[rows]
        yc = y[rows]
        wc = w[rows]
        loc = np.arange(rows.start, rows.stop) if isinstance(rows, slice) else rows
        n_st += loc.size
        r = yc - Xc @ b
        Z = Xc @ LT
        band = np.sqrt(np.einsum("ij,ij->i", Z, Z))
        s = r / np.maximum(band, 1e-300)
        pos = wc > 0
        lo = (s < klo) & pos
        hi = (s > khi) & pos
        mid = pos & ~lo & ~hi
        Wm = np.empty((3, wc.size))
        np.multiply(wc, lo, out=Wm[0])
        np.multiply(wc, hi, out=Wm[1])
        Wm[2] = wc
        SX = Wm @ Xc
        SY = Wm @ yc
        SW = Wm.sum(axis=1)
        Sx_lo += SX[0]
        Sx_hi += SX[1]
        Sx_st += SX[2]
        Sy_lo += float(SY[0])
        Sy_hi += float(SY[1])
        W_lo += float(SW[0])
        W_hi += float(SW[1])
        W_st += float(SW[2])
        side[loc[lo]] = -1
        side[loc[hi]] = 1
        if mid.any():
            keep_X.append(Xc[mid])
            keep_y.append(yc[mid])
            keep_w.append(wc[mid])
            keep_s.append(s[mid])
            keep_g.append((int(shard_id) << _SHARD_SHIFT) + loc[mid])
    cat = (lambda L, shape: np.concatenate(L) if L else np.zeros(shape))
    res = {
        "n_st": n_st, "W_st": W_st, "Sx_st": Sx_st,
        "Sx_lo": Sx_lo, "Sy_lo": Sy_lo, "W_lo": W_lo,
        "Sx_hi": Sx_hi, "Sy_hi": Sy_hi, "W_hi": W_hi,
        "X": cat(keep_X, (0, p)), "y": cat(keep_y, (0,)), "w": cat(keep_w, (0,)),
        "s": cat(keep_s, (0,)), "gid": cat(keep_g, (0,)).astype(np.int64),
    }
    return res, side


@_single_blas
def _pass_verify(shard, shard_id: int, seed: int, frac: float, side: np.ndarray, b: np.ndarray,
                 tau: float, tol: float, pilot_frac: float, Linv: np.ndarray | None,
                 inplace: bool = False):
    """Check the signs of globbed rows at the new fit b; violators leave the globs (their side
    becomes 0) and are returned.  Also returns sum w rho(r) over the stage's rows and, for
    pilot rows (u < pilot_frac), scaled residuals used to place the next stage's band."""
    X, y, w = (np.asarray(a) for a in shard)
    n, p = X.shape
    if not inplace:
        side = np.array(side, copy=True)
    obj = 0.0
    vX, vy, vw, vg, vside = [], [], [], [], []
    pil_s, pil_w = [], []
    LT = None if Linv is None else np.ascontiguousarray(Linv.T)
    for _ci, rows, u, c0 in _stage_chunks(n, shard_id, seed, frac):
        Xc = X[rows]
        yc = y[rows]
        wc = w[rows]
        loc = np.arange(rows.start, rows.stop) if isinstance(rows, slice) else rows
        r = yc - Xc @ b
        obj += _rho_sum(r, wc, tau)
        sd = side[loc]
        bad = ((sd < 0) & (r > tol)) | ((sd > 0) & (r < -tol))
        if bad.any():
            vX.append(Xc[bad])
            vy.append(yc[bad])
            vw.append(wc[bad])
            vg.append((int(shard_id) << _SHARD_SHIFT) + loc[bad])
            vside.append(sd[bad].astype(np.int8))
            side[loc[bad]] = 0
        if LT is not None and pilot_frac > 0:
            if u is None:
                u = _chunk_u(seed, shard_id, _ci, loc.size)
            pm = (u < pilot_frac) & (wc > 0)
            if pm.any():
                Z = Xc[pm] @ LT
                band = np.sqrt(np.einsum("ij,ij->i", Z, Z))
                pil_s.append(r[pm] / np.maximum(band, 1e-300))
                pil_w.append(wc[pm])
    cat = (lambda L, shape: np.concatenate(L) if L else np.zeros(shape))
    res = {"obj": obj, "X": cat(vX, (0, p)), "y": cat(vy, (0,)), "w": cat(vw, (0,)),
           "gid": cat(vg, (0,)).astype(np.int64), "side": cat(vside, (0,)).astype(np.int8),
           "pilot_s": cat(pil_s, (0,)), "pilot_w": cat(pil_w, (0,))}
    return res, side


@_single_blas
def _pass_objective(shard, b: np.ndarray, tau: float) -> float:
    X, y, w = (np.asarray(a) for a in shard)
    tot = 0.0
    for c0 in range(0, X.shape[0], _CHUNK):
        r = y[c0:c0 + _CHUNK] - X[c0:c0 + _CHUNK] @ b
        tot += _rho_sum(r, w[c0:c0 + _CHUNK], tau)
    return tot


class _LocalBackend:
    """Runs the passes in-process over in-memory shards; side state kept in place."""

    def __init__(self, shards: list[tuple[np.ndarray, np.ndarray, np.ndarray]]):
        self.shards = shards
        self.state: list[Any] = [None] * len(shards)

    def stats(self, need_const):
        return [_pass_stats(s, i, need_const) for i, s in enumerate(self.shards)]

    def sample(self, seed, frac):
        return [_pass_sample(s, i, seed, frac) for i, s in enumerate(self.shards)]

    def classify(self, seed, frac, b, Linv, klo, khi):
        out = []
        for i, s in enumerate(self.shards):
            res, side = _pass_classify(s, i, seed, frac, b, Linv, klo, khi)
            self.state[i] = side
            out.append(res)
        return out

    def verify(self, seed, frac, b, tau, tol, pilot_frac, Linv):
        out = []
        for i, s in enumerate(self.shards):
            res, side = _pass_verify(s, i, seed, frac, self.state[i], b, tau, tol, pilot_frac,
                                     Linv, inplace=True)
            self.state[i] = side
            out.append(res)
        return out

    def objective(self, b, tau):
        return sum(_pass_objective(s, b, tau) for s in self.shards)


class _RayBackend:
    """Runs the passes as Ray tasks over shards held in the object store; each task's memory is
    its shard plus chunk temporaries; the per-row side state stays in the object store."""

    def __init__(self, refs):
        import ray

        self.ray = ray
        self.refs = list(refs)
        self.state: list[Any] = [None] * len(self.refs)
        self._stats = ray.remote(_pass_stats)
        self._sample = ray.remote(_pass_sample)
        self._classify = ray.remote(num_returns=2)(_pass_classify)
        self._verify = ray.remote(num_returns=2)(_pass_verify)
        self._objective = ray.remote(_pass_objective)

    def stats(self, need_const):
        return self.ray.get([self._stats.remote(r, i, need_const) for i, r in enumerate(self.refs)])

    def sample(self, seed, frac):
        return self.ray.get([self._sample.remote(r, i, seed, frac) for i, r in enumerate(self.refs)])

    def classify(self, seed, frac, b, Linv, klo, khi):
        res = []
        for i, r in enumerate(self.refs):
            out, side = self._classify.remote(r, i, seed, frac, b, Linv, klo, khi)
            self.state[i] = side
            res.append(out)
        return self.ray.get(res)

    def verify(self, seed, frac, b, tau, tol, pilot_frac, Linv):
        res = []
        for i, r in enumerate(self.refs):
            out, side = self._verify.remote(r, i, seed, frac, self.state[i], b, tau, tol,
                                            pilot_frac, Linv)
            self.state[i] = side
            res.append(out)
        return self.ray.get(res)

    def objective(self, b, tau):
        return float(sum(self.ray.get([self._objective.remote(r, b, tau) for r in self.refs])))


# --------------------------------------------------------------------------- direct LP


def _direct_lp(X, y, w, tau, pen, lam, solver, solver_options, lp: _DualLP | None = None):
    """Exact LP on all given rows (duplicates merged).  Returns (b, lp, n_rows_seen, status)."""
    if lp is None:
        Xd, yd, wd, _inv = _dedupe(X, y, w)
        lp = _DualLP(Xd, yd, pen, [lam], solver, solver_options)
        lp.w = wd
    m = lp.m
    lp.fallbacks = []  # per fit (the LP may be reused across taus)
    lp.set(0, np.zeros(m), lp.w.copy(), (1.0 - tau) * (lp.w @ lp.X))
    status = lp.solve(m, warm=False, expect_feasible=True)  # a = (1 - tau) w is feasible
    if status != "optimal":
        return None, lp, m, status
    return lp.coefs(0), lp, m, status


def _dual_value(lp: _DualLP, k: int, tau: float, Y_hi_out: float, Y_lo_out: float) -> float:
    a = lp.avalue(k)
    return float(lp.y @ a - (1.0 - tau) * (lp.y @ lp.w) + tau * Y_hi_out - (1.0 - tau) * Y_lo_out)


# --------------------------------------------------------------------------- staged reduction


class _Reducer:
    """Driver of the staged Portnoy-Koenker reduction over a backend of shards."""

    def __init__(self, backend, n, p, W, Sx, ymax, tau, pen, l1, solver, solver_options, seed,
                 opts: ReduceOptions):
        self.be, self.n, self.p, self.W, self.Sx = backend, n, p, W, Sx
        self.ymax = ymax
        self.tau, self.pen, self.l1 = tau, pen, l1
        self.solver, self.solver_options, self.seed, self.o = solver, solver_options, seed, opts
        self.lp_solves = 0
        self.fallbacks: list[str] = []   # fallback routes used by any LP of this fit
        self.ray: np.ndarray | None = None  # unbounded direction of the last failed reduced LP
        self.tilts = 0                   # band-metric tilts along such directions

    # -- schedule: nested subsets n_0 < n_1 < ... < n_K = n, ratio <= growth
    def schedule(self) -> list[int]:
        o = self.o
        first = o.first_stage_rows or max(o.min_stage_rows, 40 * self.p)
        if self.n <= first:
            return [self.n]
        K = max(1, math.ceil(math.log(self.n / first) / math.log(o.growth)))
        return [int(round(self.n * (first / self.n) ** ((K - k) / K))) for k in range(K + 1)]

    def run(self) -> dict:
        t = self.tau
        sizes = self.schedule()
        fr0 = min(1.0, sizes[0] / self.n)
        samp = self.be.sample(self.seed, fr0)
        X0 = np.concatenate([s["X"] for s in samp])
        y0 = np.concatenate([s["y"] for s in samp])
        w0 = np.concatenate([s["w"] for s in samp])
        if len(sizes) == 1 or X0.shape[0] < 2 * self.p:
            raise _NoReduction()
        W0 = float(w0.sum())
        b, lp, m0, status = _direct_lp(X0, y0, w0, t, self.pen, self.l1 * W0, self.solver,
                                       self.solver_options)
        self.lp_solves += 1
        self.fallbacks += lp.fallbacks
        if status != "optimal":
            raise _fail(t, X0.shape[0], self.solver, status, "first-stage LP")
        self.Linv = self.band_metric(lp)
        # sign tolerance: rounding level of y - x'b; accepting a wrong sign this small moves the
        # objective by at most tol * sum(w)
        self.tol = 1e-12 * (self.ymax + float(np.abs(X0 @ b).max())) + 1e-300
        # pilot scaled residuals for the first reduced stage: the first subset itself
        Z = X0 @ self.Linv.T
        pil_s = (y0 - X0 @ b) / np.maximum(np.sqrt(np.einsum("ij,ij->i", Z, Z)), 1e-300)
        pil_w = w0
        n_prev = X0.shape[0]
        info = {}
        for k in range(1, len(sizes)):
            frac = 1.0 if k == len(sizes) - 1 else sizes[k] / self.n
            pilot_frac = min(frac, self.o.pilot_rows / self.n) if k < len(sizes) - 1 else 0.0
            b, info = self.stage(frac, b, n_prev, pil_s, pil_w, pilot_frac)
            pil_s, pil_w = info["pilot_s"], info["pilot_w"]
            n_prev = info["n_st"]
        info["stages"] = len(sizes) - 1
        info["b"] = b
        return info

    def band_metric(self, lp: _DualLP) -> np.ndarray:
        """Linv with ||Linv x||^2 proportional to the variance of x'b of the first-stage fit,
        which scales the residuals that place the band (s = r / ||Linv x||).

        Sandwich H^-1 J H^-1 with J = X'WX and H = X'W diag(f) X, f_i the conditional density
        of y at its tau-quantile given x_i, estimated by Hendricks-Koenker difference quotients
        2h / x_i'(b(tau+h) - b(tau-h)) (Hall-Sheather h; two warm re-solves of the first-stage
        LP).  Homoscedastic data give back J^-1 up to a constant; where the spread of y depends
        on x (a rare group with bimodal latencies, say) the band widens there.  J^-1 alone puts
        such a group's rows outside the band, the reduced LP goes infeasible (its coefficients
        unbounded) and the band doubles until nearly every row is in it.  Only the band's shape
        depends on this: the signs are verified and the answer is exact either way."""
        t, p = self.tau, self.p
        X0, w0 = lp.X, lp.w
        J = (X0 * w0[:, None]).T @ X0
        J += np.eye(p) * (1e-12 * max(np.trace(J) / p, 1e-300))
        Lj = _chol_psd(J)
        h = _hall_sheather(t, X0.shape[0])
        bq = []
        for tq in (t - h, t + h):
            lp.set(0, np.zeros(lp.m), w0.copy(), (1.0 - tq) * (w0 @ X0))
            nfb = len(lp.fallbacks)
            status = lp.solve(lp.m, warm=True, expect_feasible=True)
            self.fallbacks += lp.fallbacks[nfb:]
            self.lp_solves += 1
            if status != "optimal":
                break
            bq.append(lp.coefs(0))
        if len(bq) == 2:
            dq = X0 @ (bq[1] - bq[0])
            pos = dq > 0
            if pos.sum() > p:
                floor = 0.01 * float(np.median(dq[pos]))
                f = np.where(pos, 2.0 * h / np.maximum(dq, floor), 0.0)
                H = (X0 * (w0 * f)[:, None]).T @ X0
                H += np.eye(p) * (1e-12 * max(np.trace(H) / p, 1e-300))
                try:
                    C = np.linalg.solve(H, Lj)      # H^-1 J H^-1 = C C'
                except np.linalg.LinAlgError:
                    C = None
                if C is not None and np.isfinite(C).all():
                    return np.ascontiguousarray(C.T)
        _log.debug("band metric: density estimate unavailable, using (X'WX)^-1")
        return np.linalg.inv(Lj)

    def tilt(self, d: np.ndarray, rows: np.ndarray) -> bool:
        """Add c d d' to the band's variance metric, d the ray of an unbounded reduced LP.

        Why: the globs fix a_i at a bound, so the reduced primal is unbounded when the rows that
        carry some direction d all sit on one side of the band, typically a rare feature
        (offload or preemption steps) whose rows have large residuals under the preliminary
        fit.  Doubling the whole band drags in most rows before those few get in (measured:
        216,000 weighted rows went to a 180,000-row LP, 350 s); inflating the variance along d
        shrinks the scaled residuals of exactly the rows with x'd != 0.  c makes the typical
        such row's band 2x wider (4x, 8x, ... on each further tilt of the fit)."""
        V = self.Linv.T @ self.Linv
        Z = rows @ self.Linv.T
        t = (rows @ d) ** 2 / np.maximum(np.einsum("ij,ij->i", Z, Z), 1e-300)
        t = t[t > 1e-12 * max(float(t.max(initial=0.0)), 1e-300)]
        if t.size:
            base = float(np.median(t))
        else:  # no returned row carries d: the most aligned possible row, max (x'd)^2 / x'Vx
            base = float(np.sum(np.linalg.solve(self.Linv.T, d) ** 2))
        c = 3.0 * 4.0 ** self.tilts / base
        self.tilts += 1
        if not (math.isfinite(c) and c > 0):
            return False
        self.Linv = np.ascontiguousarray(_chol_psd(V + c * np.outer(d, d)).T)
        return True

    def stage(self, frac, b_prev, n_prev, pil_s, pil_w, pilot_frac):
        t, p, o = self.tau, self.p, self.o
        z_in, z_out = o.z_inner, o.z_outer
        se = math.sqrt(t * (1 - t) * p / max(n_prev, 1))
        self.stage_rounds = 0
        for _widen in range(o.max_widen + 1):
            est_rows = frac * self.n
            h_in = max(z_in * se, 0.5 * max(o.min_free, 10 * p) / max(est_rows, 1.0))
            h_out = max(z_out * se, 1.5 * h_in)
            Wp = float(pil_w.sum())
            delta = 4.0 * math.sqrt(t * (1 - t) / max(pil_s.size, 1)) + 2.0 / max(pil_s.size, 1)
            glo = t - h_out - delta
            ghi = t + h_out + delta
            klo = _weighted_level(pil_s, pil_w, 0.0, glo * Wp) if glo > 0 else -np.inf
            khi = _weighted_level(pil_s, pil_w, 0.0, ghi * Wp) if ghi < 1 else np.inf
            res = self.be.classify(self.seed, frac, b_prev, self.Linv, klo, khi)
            agg = _aggregate_classify(res, p)
            self.ray = None
            done = self.solve_rounds(agg, frac, h_in, h_out, pilot_frac)
            if done is not None:
                return done
            if self.ray is not None and self.tilt(self.ray, agg["X"]):
                _log.debug("stage rows=%d: reduced LP unbounded along a direction, widening "
                           "the band along it", agg["n_st"])
                continue
            _log.debug("stage rows=%d: band too narrow, doubling it", agg["n_st"])
            z_in *= 2.0
            z_out *= 2.0
        # exact fallback: every row of the stage is an LP row
        res = self.be.classify(self.seed, frac, b_prev, self.Linv, -np.inf, np.inf)
        agg = _aggregate_classify(res, p)
        done = self.solve_rounds(agg, frac, 1.0, 1.0, pilot_frac, final=True)
        if done is None:
            raise SolverError(
                f"quantile reduction for tau={t:g} on {agg['n_st']} rows did not verify even with "
                f"every row in the LP (solver {self.solver}); refusing to return an inexact fit")
        return done

    def solve_rounds(self, agg, frac, h_in, h_out, pilot_frac, final=False):
        """Place the free/carried band within the returned rows, then LP + verify rounds.
        Returns (b, info) when the signs verify, None when the band must be widened."""
        t, p, o = self.tau, self.p, self.o
        Wst = agg["W_st"]
        lam = self.l1 * Wst
        s, wv = agg["s"], agg["w"]
        off = agg["W_lo"]
        lev = lambda q: _weighted_level(s, wv, off, q * Wst)  # noqa: E731
        ki_lo = lev(t - h_in) if t - h_in > 0 else -np.inf
        ki_hi = lev(t + h_in) if t + h_in < 1 else np.inf
        ko_lo = lev(t - h_out) if t - h_out > 0 else -np.inf
        ko_hi = lev(t + h_out) if t + h_out < 1 else np.inf
        free = (s >= ki_lo) & (s <= ki_hi)
        carried = (s >= ko_lo) & (s <= ko_hi)
        state = np.where(free, 0, np.where(s < ki_lo, -1, 1)).astype(np.int8)
        if int(free.sum()) < p:
            return None
        # rows returned but outside the carried band: globbed by the driver
        drv = ~carried
        dX, dy, dw, dside = agg["X"][drv], agg["y"][drv], agg["w"][drv], state[drv]
        Sx_hi = agg["Sx_hi"] + (dw * (dside > 0)) @ dX
        Sy_hi = agg["Sy_hi"] + float((dw * (dside > 0)) @ dy)
        Sy_lo = agg["Sy_lo"] + float((dw * (dside < 0)) @ dy)
        LX, Ly, Lw, Ls = agg["X"][carried], agg["y"][carried], agg["w"][carried], state[carried]
        LX, Ly, Lw, Ls, _inv = _dedupe(LX, Ly, Lw, Ls)
        lp = self.build(LX, Ly, Lw, lam)
        rhs_base = (1.0 - t) * agg["Sx_st"]
        rounds = 0
        warm = False
        while True:
            lo = np.where(Ls > 0, Lw, 0.0)
            hi = np.where(Ls < 0, 0.0, Lw)
            lp.set(0, lo, hi, rhs_base - Sx_hi)
            # with every row of the stage in the LP (final) it is feasible: a = (1 - tau) w
            nfb = len(lp.fallbacks)
            status = lp.solve(int((Ls == 0).sum()), warm=warm, expect_feasible=final)
            self.fallbacks += lp.fallbacks[nfb:]
            self.lp_solves += 1
            self.stage_rounds += 1
            rounds += 1
            if not final and status in ("infeasible", "unbounded", "infeasible_inaccurate",
                                        "unbounded_inaccurate"):
                # the reduced primal is unbounded: widen the band, along its ray if one is found
                self.ray = None
                if status == "infeasible":
                    self.ray = lp.unbounded_direction()
                    self.lp_solves += 1
                return None
            if status != "optimal":
                raise _fail(t, lp.m, self.solver, status, "reduced LP")
            b = lp.coefs(0)
            # driver-side checks: carried fixed columns and driver-globbed rows
            rL = Ly - LX @ b
            badL = ((Ls < 0) & (rL > self.tol)) | ((Ls > 0) & (rL < -self.tol))
            rd = dy - dX @ b
            badD = ((dside < 0) & (rd > self.tol)) | ((dside > 0) & (rd < -self.tol))
            ver = self.be.verify(self.seed, frac, b, t, self.tol, pilot_frac, self.Linv)
            vX = np.concatenate([v["X"] for v in ver])
            nv_task = vX.shape[0]
            nbad = int(badL.sum()) + int(badD.sum()) + nv_task
            _log.debug("stage rows=%d lp=%d free=%d round=%d warm=%s status=%s viol carried=%d "
                       "driver=%d task=%d", agg["n_st"], lp.m, int((Ls == 0).sum()), rounds, warm,
                       status, int(badL.sum()), int(badD.sum()), nv_task)
            if nbad == 0:
                F = sum(v["obj"] for v in ver) + lam * float(np.abs(b[self.pen]).sum())
                D = _dual_value(lp, 0, t, Sy_hi, Sy_lo)
                gap = (F - D) / max(abs(F), 1e-300)
                if gap > 1e-7 or gap < -1e-7:
                    raise SolverError(
                        f"quantile reduced LP for tau={t:g}: signs verified but the duality gap "
                        f"certificate failed (relative gap {gap:.3g}, solver {self.solver}); "
                        "the solver's solution is not accurate enough")
                return b, {
                    "n_st": agg["n_st"], "W_st": Wst, "F": F, "gap": gap, "rounds": self.stage_rounds,
                    "n_lp": lp.m, "pilot_s": np.concatenate([v["pilot_s"] for v in ver]),
                    "pilot_w": np.concatenate([v["pilot_w"] for v in ver]),
                }
            if not final and (nbad > max(0.1 * max(int((Ls == 0).sum()), 1), 10 * p)
                              or rounds >= o.max_rounds):
                return None
            # fix up: carried fixed columns are freed (bounds only: warm re-solve); rows outside
            # the LP (driver- or task-globbed) join it as free rows (rebuild)
            Ls = np.where(badL, 0, Ls).astype(np.int8)
            add_X, add_y, add_w = [], [], []
            if badD.any():
                add_X.append(dX[badD]); add_y.append(dy[badD]); add_w.append(dw[badD])
                Sx_hi = Sx_hi - (dw * (badD & (dside > 0))) @ dX
                Sy_hi -= float((dw * (badD & (dside > 0))) @ dy)
                Sy_lo -= float((dw * (badD & (dside < 0))) @ dy)
                keep = ~badD
                dX, dy, dw, dside = dX[keep], dy[keep], dw[keep], dside[keep]
            if nv_task:
                vy = np.concatenate([v["y"] for v in ver])
                vw = np.concatenate([v["w"] for v in ver])
                vs = np.concatenate([v["side"] for v in ver])
                add_X.append(vX); add_y.append(vy); add_w.append(vw)
                Sx_hi = Sx_hi - (vw * (vs > 0)) @ vX
                Sy_hi -= float((vw * (vs > 0)) @ vy)
                Sy_lo -= float((vw * (vs < 0)) @ vy)
            if add_X:
                LX = np.concatenate([LX] + add_X)
                Ly = np.concatenate([Ly] + add_y)
                Lw = np.concatenate([Lw] + add_w)
                Ls = np.concatenate([Ls, np.zeros(sum(a.shape[0] for a in add_X), dtype=np.int8)])
                LX, Ly, Lw, Ls, _inv = _dedupe(LX, Ly, Lw, Ls)
                lp = self.build(LX, Ly, Lw, lam)
                warm = False
            else:
                warm = True

    def build(self, X, y, w, lam) -> _DualLP:
        lp = _DualLP(X, y, self.pen, [lam], self.solver, self.solver_options)
        lp.w = w
        return lp


class _NoReduction(Exception):
    pass


def _chol_psd(G: np.ndarray) -> np.ndarray:
    """Lower-triangular L with L L' = G (G symmetric PSD, eigenvalues floored if need be)."""
    try:
        return np.linalg.cholesky(G)
    except np.linalg.LinAlgError:
        ev, V = np.linalg.eigh(G)
        Lc = V * np.sqrt(np.maximum(ev, 1e-12 * max(ev.max(), 1e-300)))
        return np.linalg.qr(Lc.T)[1].T


def _hall_sheather(tau: float, n: int, alpha: float = 0.05) -> float:
    """Hall-Sheather bandwidth (as in R quantreg's summary.rq), kept inside (0, 1)."""
    from statistics import NormalDist

    nd = NormalDist()
    x = nd.inv_cdf(tau)
    h = (n ** (-1.0 / 3.0) * nd.inv_cdf(1.0 - alpha / 2.0) ** (2.0 / 3.0)
         * (1.5 * nd.pdf(x) ** 2 / (2.0 * x * x + 1.0)) ** (1.0 / 3.0))
    return min(h, 0.5 * min(tau, 1.0 - tau))


def _aggregate_classify(res: list[dict], p: int) -> dict:
    agg = {key: sum(r[key] for r in res) for key in
           ("n_st", "W_st", "Sx_st", "Sx_lo", "Sy_lo", "W_lo", "Sx_hi", "Sy_hi", "W_hi")}
    for key in ("X", "y", "w", "s", "gid"):
        agg[key] = np.concatenate([r[key] for r in res])
    return agg


# --------------------------------------------------------------------------- public fits


# rows above which reduce="auto" stages the fit.  Below, one direct LP is as fast (bench data and
# trace-generator data, p = 16-21, 2 shared cores: 0.3 s direct vs 0.65 s staged at 1e4, about
# even at 2e4, 1.3-2.0 s vs 0.9-1.4 s at 4e4): the staged path has a floor of ~0.5 s (first-stage
# LP and its two density re-solves, a compile of the reduced LP, the verify pass).
_AUTO_REDUCE_FROM = 20_000


def fit_quantile(X, y, tau, *, weights=None, l1=0.0, penalize=None, solver="HIGHS",
                 reduce="auto", seed=0, solver_options: dict | None = None) -> QuantileFit:
    """Exact weighted (optionally L1-penalised) linear quantile regression.

    reduce: "auto" (staged Portnoy-Koenker reduction above 20,000 rows), "always", "never", or a
    `ReduceOptions`.  solver: a cvxpy LP solver name (HIGHS default; CLARABEL alternative).
    solver_options are passed to cvxpy's solve (e.g. {"highs_options": {"time_limit": 60}}).
    """
    t0 = time.perf_counter()
    tau = _check_tau(tau)
    l1 = _check_l1(l1)
    solver = _solver_name(solver)
    X, y, w = _validate_arrays(X, y, weights)
    pen = _prepare_penalty(X, w, l1, penalize)
    return _fit_validated(X, y, w, tau, pen, l1, solver, reduce, seed, solver_options, t0)


def _prepare_penalty(X, w, l1, penalize) -> np.ndarray:
    if w.sum() <= 0:
        raise QuantileInputError("weights sum to zero: nothing to fit")
    p = X.shape[1]
    const = _constant_columns(X) if (l1 > 0 and penalize is None) else np.zeros(p, dtype=bool)
    return _penalty_mask(penalize, p, const)


def _reduce_choice(reduce, n) -> tuple[ReduceOptions, bool]:
    if isinstance(reduce, ReduceOptions):
        return reduce, True
    if reduce in ("auto", "always", "never"):
        return ReduceOptions(), reduce == "always" or (reduce == "auto" and n > _AUTO_REDUCE_FROM)
    raise QuantileInputError(
        f"reduce must be 'auto', 'always', 'never' or a ReduceOptions, got {reduce!r}")


def _fit_validated(X, y, w, tau, pen, l1, solver, reduce, seed, solver_options, t0,
                   lp_cache: dict | None = None) -> QuantileFit:
    n, p = X.shape
    ropt, use = _reduce_choice(reduce, n)
    W = float(w.sum())
    if use:
        be = _LocalBackend([(X, y, w)])
        red = _Reducer(be, n, p, W, w @ X, float(np.abs(y).max()), tau, pen, l1, solver,
                       solver_options, seed, ropt)
        try:
            info = red.run()
        except _NoReduction:
            pass
        else:
            return QuantileFit(tau=tau, coef=info["b"], objective=info["F"] / W, status="optimal",
                               solver=_solver_label(solver, red.fallbacks), n_rows=n,
                               n_solved_rows=int(info["n_lp"]),
                               rounds=int(info["rounds"]), seconds=time.perf_counter() - t0,
                               gap=float(info["gap"]), stages=int(info["stages"]),
                               lp_solves=red.lp_solves)
    lp = lp_cache.get("lp") if lp_cache is not None else None
    fit, lp = _fit_direct(X, y, w, tau, pen, l1, solver, solver_options, t0, lp)
    if lp_cache is not None:
        lp_cache["lp"] = lp
    return fit


def _fit_direct(X, y, w, tau, pen, l1, solver, solver_options, t0, lp=None) -> QuantileFit:
    n = X.shape[0]
    W = float(w.sum())
    b, lp, m, status = _direct_lp(X, y, w, tau, pen, l1 * W, solver, solver_options, lp)
    if status != "optimal":
        raise _fail(tau, n, solver, status)
    F = _rho_sum(y - X @ b, w, tau) + l1 * W * float(np.abs(b[pen]).sum())
    D = _dual_value(lp, 0, tau, 0.0, 0.0)
    gap = (F - D) / max(abs(F), 1e-300)
    if abs(gap) > 1e-7 and abs(F - D) > 1e-12 * W * (1.0 + float(np.abs(y).max())):
        raise SolverError(
            f"quantile LP for tau={tau:g} on {n} rows: solver {solver} reported 'optimal' but the "
            f"duality-gap certificate failed (relative gap {gap:.3g})")
    return QuantileFit(tau=tau, coef=b, objective=F / W, status="optimal",
                       solver=_solver_label(solver, lp.fallbacks), n_rows=n, n_solved_rows=m,
                       rounds=0, seconds=time.perf_counter() - t0, gap=float(gap), stages=0,
                       lp_solves=1), lp


def fit_quantile_sharded(shards, tau, *, l1=0.0, penalize=None, solver="HIGHS", seed=0,
                         reduce: ReduceOptions | None = None,
                         solver_options: dict | None = None) -> QuantileFit:
    """Exact fit over shards held in Ray's object store (refs to (X, y, w) tuples).

    Ray tasks stream their shard: they draw their share of each random subset, glob rows whose
    sign is certain into two sums, return the middle rows, and verify signs of globbed rows at
    each new fit.  The driver solves the reduced LPs in cvxpy.  Memory per task is its shard
    plus chunk temporaries; the driver holds only subsets and middle rows."""
    t0 = time.perf_counter()
    tau = _check_tau(tau)
    l1 = _check_l1(l1)
    solver = _solver_name(solver)
    if len(shards) == 0:
        raise QuantileInputError("fit_quantile_sharded needs at least one shard")
    be = _RayBackend(shards)
    st = be.stats(need_const=(l1 > 0 and penalize is None))
    ps = {s["p"] for s in st}
    if len(ps) != 1:
        raise QuantileInputError(f"shards disagree on the number of columns: {sorted(ps)}")
    p = ps.pop()
    n = sum(s["n"] for s in st)
    W = sum(s["W"] for s in st)
    if W <= 0:
        raise QuantileInputError("weights sum to zero: nothing to fit")
    if l1 > 0 and penalize is None:
        const = (np.min([s["colmin"] for s in st], axis=0) == np.max([s["colmax"] for s in st], axis=0))
    else:
        const = np.zeros(p, dtype=bool)
    pen = _penalty_mask(penalize, p, const)
    Sx = np.sum([s["Sx"] for s in st], axis=0)
    ymax = max(s["ymax"] for s in st)
    red = _Reducer(be, n, p, W, Sx, ymax, tau, pen, l1, solver, solver_options, seed,
                   reduce or ReduceOptions())
    try:
        info = red.run()
    except _NoReduction:
        # small enough for one LP: gather the rows (all of them) and solve directly
        samp = be.sample(seed, 1.0)
        Xa = np.concatenate([s["X"] for s in samp])
        ya = np.concatenate([s["y"] for s in samp])
        wa = np.concatenate([s["w"] for s in samp])
        fit, _lp = _fit_direct(Xa, ya, wa, tau, pen, l1, solver, solver_options, t0)
        # rows with zero weight were dropped from the gather; they do not change the objective
        return replace(fit, n_rows=n, objective=fit.objective * float(wa.sum()) / W)
    b = info["b"]
    return QuantileFit(tau=tau, coef=b, objective=info["F"] / W, status="optimal",
                       solver=_solver_label(solver, red.fallbacks), n_rows=n,
                       n_solved_rows=int(info["n_lp"]), rounds=int(info["rounds"]),
                       seconds=time.perf_counter() - t0, gap=float(info["gap"]),
                       stages=int(info["stages"]), lp_solves=red.lp_solves)


# --------------------------------------------------------------------------- several quantiles


def _crossing_counts(P: np.ndarray) -> tuple[int, ...]:
    """Rows where column k of P exceeds column k+1 (beyond rounding), per adjacent pair."""
    out = []
    for k in range(P.shape[1] - 1):
        d = P[:, k] - P[:, k + 1]
        tol = 1e-9 * np.maximum(1.0, np.maximum(np.abs(P[:, k]), np.abs(P[:, k + 1])))
        out.append(int((d > tol).sum()))
    return tuple(out)


def _crossing_rows(P: np.ndarray, k: int) -> np.ndarray:
    d = P[:, k] - P[:, k + 1]
    tol = 1e-9 * np.maximum(1.0, np.maximum(np.abs(P[:, k]), np.abs(P[:, k + 1])))
    return np.flatnonzero(d > tol)


def _check_taus(taus) -> list[float]:
    ts = [_check_tau(t) for t in taus]
    if not ts:
        raise QuantileInputError("taus is empty")
    if len(set(ts)) != len(ts):
        raise QuantileInputError(f"taus must be distinct, got {ts}")
    return ts


def fit_quantiles(X, y, taus, *, weights=None, l1=0.0, penalize=None, solver="HIGHS",
                  noncrossing=False, seed=0, solver_options: dict | None = None
                  ) -> tuple[list[QuantileFit], CrossingReport]:
    """Fit several quantiles of the same data (results in the order of `taus`).

    Small problems reuse one compiled cvxpy problem across taus (only the right-hand side
    changes).  With noncrossing=True the fits are then re-solved jointly with ordering
    constraints at the training rows that cross (see `resolve_crossings`)."""
    ts = _check_taus(taus)
    l1 = _check_l1(l1)
    solver = _solver_name(solver)
    X, y, w = _validate_arrays(X, y, weights)
    pen = _prepare_penalty(X, w, l1, penalize)
    cache: dict = {}
    fits = [_fit_validated(X, y, w, t, pen, l1, solver, "auto", seed, solver_options,
                           time.perf_counter(), lp_cache=cache) for t in ts]
    if noncrossing:
        return _resolve_validated(X, y, w, fits, pen, l1, solver, solver_options)
    order = np.argsort(ts)
    B = np.column_stack([fits[i].coef for i in order])
    counts = _crossing_counts(X @ B)
    return fits, CrossingReport(taus=tuple(ts[i] for i in order), before=counts, after=counts,
                                rounds=0, constraints=0)


def resolve_crossings(X, y, fits, *, weights=None, l1=0.0, penalize=None, solver="HIGHS",
                      solver_options: dict | None = None, max_rounds: int = 60
                      ) -> tuple[list[QuantileFit], CrossingReport]:
    """Joint re-solve of independently fitted quantiles so that no training row crosses.

    Cutting plane: ordering constraints x_i'b_k <= x_i'b_{k+1} (adjacent taus) are added only at
    training rows that cross, the joint LP is re-solved, and rows that cross at the new fits are
    added, until none does.  Rows far from every fitted quantile are globbed per quantile
    (Portnoy-Koenker, verified each round), so the joint LP stays small for large n.  Each
    returned fit is the exact optimum of the joint problem with ordering at every training row.
    `fits` must be exact fits of this (X, y, weights, l1, penalize); results keep their order."""
    X, y, w = _validate_arrays(X, y, weights)
    l1 = _check_l1(l1)
    solver = _solver_name(solver)
    fits = list(fits)
    if not fits:
        raise QuantileInputError("resolve_crossings needs at least one fit")
    _check_taus([f.tau for f in fits])
    for f in fits:
        if np.asarray(f.coef).shape != (X.shape[1],):
            raise QuantileInputError(
                f"fit for tau={f.tau:g} has {np.asarray(f.coef).size} coefficients but X has "
                f"{X.shape[1]} columns")
    pen = _prepare_penalty(X, w, l1, penalize)
    return _resolve_validated(X, y, w, fits, pen, l1, solver, solver_options, max_rounds)


_JOINT_WINDOW_MIN = 3000


def _resolve_validated(X, y, w, fits, pen, l1, solver, solver_options, max_rounds=60):
    t0 = time.perf_counter()
    n, p = X.shape
    order = list(np.argsort([f.tau for f in fits]))
    taus = [float(fits[i].tau) for i in order]
    K = len(taus)
    B = np.column_stack([np.asarray(fits[i].coef, dtype=np.float64) for i in order])
    P = X @ B
    before = _crossing_counts(P)
    if K == 1 or sum(before) == 0:
        return list(fits), CrossingReport(taus=tuple(taus), before=before, after=before,
                                          rounds=0, constraints=0)
    W = float(w.sum())
    lam = l1 * W
    R0 = P - y[:, None]  # minus residuals
    # LP rows: near some fitted quantile, or crossing
    if n <= max(_JOINT_WINDOW_MIN, 4 * p):
        inR = np.ones(n, dtype=bool)
    else:
        m = min(n, max(_JOINT_WINDOW_MIN, int(6 * math.sqrt(n * p))))
        inR = np.zeros(n, dtype=bool)
        for k in range(K):
            inR[np.argpartition(np.abs(R0[:, k]), m - 1)[:m]] = True
    cross = [set(_crossing_rows(P, k).tolist()) for k in range(K - 1)]
    for c in cross:
        inR[list(c)] = True
    # side of each row per quantile (for rows outside R): +1 above the fit, -1 below
    side = np.where(R0 < 0, 1, -1).astype(np.int8)   # R0 = pred - y < 0  <=> residual > 0
    ymax = float(np.abs(y).max())
    rounds = 0
    fallbacks: list[str] = []
    while True:
        rounds += 1
        if rounds > max_rounds:
            raise SolverError(
                f"non-crossing re-solve for taus={taus} on {n} rows did not converge in "
                f"{max_rounds} rounds (solver {solver})")
        Ridx = np.flatnonzero(inR)
        pos = np.full(n, -1, dtype=np.int64)
        pos[Ridx] = np.arange(Ridx.size)
        XR, yR, wR = X[Ridx], y[Ridx], w[Ridx]
        cidx = [pos[np.array(sorted(c), dtype=np.int64)] for c in cross]
        lp = _DualLP(XR, yR, pen, [lam] * K, solver, solver_options, cross=cidx)
        lp.w = wR
        out = ~inR
        Yhi, Ylo = [], []
        for k, t in enumerate(taus):
            hi_out = out & (side[:, k] > 0)
            lo_out = out & (side[:, k] < 0)
            Sx_hi = w[hi_out] @ X[hi_out]
            Yhi.append(float(w[hi_out] @ y[hi_out]))
            Ylo.append(float(w[lo_out] @ y[lo_out]))
            lp.set(k, np.zeros(Ridx.size), wR.copy(), (1.0 - t) * (w @ X) - Sx_hi)
        status = lp.solve(Ridx.size * K, warm=False)
        fallbacks += lp.fallbacks
        if status != "optimal":
            raise SolverError(
                f"non-crossing joint LP for taus={taus} on {Ridx.size} of {n} rows: solver "
                f"{solver} returned status {status!r}, not 'optimal'")
        Bn = np.column_stack([lp.coefs(k) for k in range(K)])
        Pn = X @ Bn
        Rn = y[:, None] - Pn
        tol = 1e-12 * (ymax + float(np.abs(Pn).max()) + 1.0)
        viol = np.zeros(n, dtype=bool)
        for k in range(K):
            viol |= out & (((side[:, k] < 0) & (Rn[:, k] > tol)) | ((side[:, k] > 0) & (Rn[:, k] < -tol)))
        new_cross = False
        for k in range(K - 1):
            rows = _crossing_rows(Pn, k)
            fresh = [r for r in rows.tolist() if r not in cross[k]]
            if fresh:
                new_cross = True
                cross[k].update(fresh)
                inR[fresh] = True
        if not viol.any() and not new_cross:
            break
        inR |= viol
    Fk = [_rho_sum(Rn[:, k], w, taus[k]) + lam * float(np.abs(Bn[pen, k]).sum()) for k in range(K)]
    D = sum(_dual_value(lp, k, taus[k], Yhi[k], Ylo[k]) for k in range(K))
    gap = (sum(Fk) - D) / max(abs(sum(Fk)), 1e-300)
    if abs(gap) > 1e-7:
        raise SolverError(
            f"non-crossing joint LP for taus={taus}: duality-gap certificate failed (relative gap "
            f"{gap:.3g}, solver {solver})")
    after = _crossing_counts(Pn)
    secs = time.perf_counter() - t0
    new = {}
    for j, i in enumerate(order):
        new[i] = QuantileFit(tau=taus[j], coef=Bn[:, j].copy(), objective=Fk[j] / W, status="optimal",
                             solver=_solver_label(solver, fallbacks), n_rows=n,
                             n_solved_rows=int(inR.sum()), rounds=rounds,
                             seconds=secs, gap=float(gap), stages=0, lp_solves=rounds)
    report = CrossingReport(taus=tuple(taus), before=before, after=after, rounds=rounds,
                            constraints=int(sum(len(c) for c in cross)))
    return [new[i] for i in range(K)], report
