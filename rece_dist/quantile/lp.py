"""The dual LP in cvxpy and its solver routes.

cvxpy gets the dual  max y'd  s.t.  X'd (= or within +-lambda of) 0,  -(1-tau)w <= d <= tau*w
(written with a = d + (1-tau)w in [0, w]); the coefficients are the multipliers of its p
constraints.  y enters only as the cost vector, which is centred and scaled by a power of two
before HiGHS sees it (exact, see `_cost_shift_scale`); a solver failure is re-solved by another
route (HiGHS's other algorithm, then CLARABEL), named in the fit's `solver` field.  The same
class holds K quantile blocks tied by ordering multipliers for the joint non-crossing LP.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import sys
import warnings
from typing import Any, Sequence

import numpy as np

from rece_dist.errors import SolverError

from .problem import _dedupe, QuantileInputError

_log = logging.getLogger(__name__)

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


@functools.cache
def _array_highs() -> Any:
    from .highs import ArrayHighs  # cvxpy: imported when the first LP is solved

    return ArrayHighs()  # one instance per process: cvxpy keeps a problem's compiled form per solver object


def _cvxpy_solver(name: str) -> Any:
    """What ``problem.solve`` gets for a solver name: HiGHS through ``highs.ArrayHighs``."""
    return _array_highs() if name == "HIGHS" else name


class _DualLP:
    """max sum_k c'a_k  s.t. per block k:  X'a_k - X_{C_k}'mu_k + X_{C_{k-1}}'mu_{k-1}  =  rhs_k
    (unpenalised columns) or within +-lam of it (penalised columns), lo <= a_k <= hi, mu >= 0,
    with costs c = (y - X g) / s (see `_cost_shift_scale`; `coefs` undoes it).

    One block (K=1, no mu) is the ordinary quantile-regression dual.  ``blocks`` (index arrays
    into X, one per block) gives each block its own rows as columns; by default every block
    has every row.  Bounds and right-hand sides are cvxpy Parameters so fix-up rounds and
    other taus re-solve the same compiled problem (warm start); X and y are constants (a
    Parameter matrix costs more per solve than compiling afresh, measured)."""

    def __init__(self, X: np.ndarray, y: np.ndarray, pen: np.ndarray, lams: Sequence[float],
                 solver: str, solver_options: dict | None, cross: Sequence[np.ndarray] = (),
                 blocks: Sequence[np.ndarray] | None = None):
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
        self.blocks = [slice(None)] * K if blocks is None else [np.asarray(b) for b in blocks]
        size = [m if blocks is None else len(b) for b in self.blocks]
        self.lo = [cp.Parameter(size[k], name=f"lo{k}") for k in range(K)]
        self.hi = [cp.Parameter(size[k], name=f"hi{k}") for k in range(K)]
        self.rhs = [cp.Parameter(p, name=f"rhs{k}") for k in range(K)]
        self.a = [cp.Variable(size[k], bounds=[self.lo[k], self.hi[k]], name=f"a{k}") for k in range(K)]
        self.mu = [cp.Variable(len(c), nonneg=True, name=f"mu{k}") if len(c) else None
                   for k, c in enumerate(cross)]
        U = np.flatnonzero(~pen)
        P = np.flatnonzero(pen)
        self.U, self.P = U, P
        any_lam = any(float(lam) > 0 for lam in lams)
        self.g, self.s = _cost_shift_scale(X, y, U if any_lam else np.arange(p))
        cost = (y - X @ self.g) / self.s
        self.cons_eq, self.cons_up, self.cons_lo = [], [], []
        cons = []
        for k in range(K):
            expr = np.ascontiguousarray(X[self.blocks[k]].T) @ self.a[k]
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
        self.problem = cp.Problem(cp.Maximize(sum(cost[self.blocks[k]] @ self.a[k] for k in range(K))), cons)
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
                self.problem.solve(solver=_cvxpy_solver(solver), warm_start=warm, **opts)
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
                phase1.solve(solver=_cvxpy_solver(self.solver), **self._options(self.solver, self.m, False, algo="ipm"))
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
    y, w = lp.y[lp.blocks[k]], lp.w[lp.blocks[k]]
    return float(y @ a - (1.0 - tau) * (y @ w) + tau * Y_hi_out - (1.0 - tau) * Y_lo_out)
