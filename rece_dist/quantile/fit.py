"""The public fits: one quantile, several quantiles, and one quantile over Ray shards.

Each validates its input once, then takes the staged reduction above `_AUTO_REDUCE_FROM` rows
(`reduce.py`) or one direct LP (`lp.py`); `fit_quantiles` can hand the results to the joint
non-crossing re-solve (`crossing.py`).
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np

from rece_dist.errors import SolverError

from .crossing import _crossing_counts, _resolve_validated
from .lp import _direct_lp, _dual_value, _fail, _solver_label, _solver_name
from .problem import (CrossingReport, QuantileFit, QuantileInputError, ReduceOptions, _check_l1, _check_tau,
                      _check_taus, _penalty_mask, _prepare_penalty, _rho_sum, _validate_arrays)
from .reduce import _NoReduction, _Reducer
from .sharded import _TASK_ROWS, _LocalBackend, _RayBackend

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
                         solver_options: dict | None = None, task_rows: int = _TASK_ROWS) -> QuantileFit:
    """Exact fit over shards held in Ray's object store (refs to (X, y, w) tuples).

    Ray tasks stream their shards (consecutive ones grouped up to ``task_rows`` rows a task):
    they draw their share of each random subset, glob rows whose sign is certain into two sums,
    return the middle rows, and verify signs of globbed rows at each new fit.  The caller
    solves the reduced LPs in cvxpy.  Tasks read their shards in place and hold chunk
    temporaries; the caller holds only subsets and middle rows.  The result does not depend on
    ``task_rows``."""
    t0 = time.perf_counter()
    tau = _check_tau(tau)
    l1 = _check_l1(l1)
    solver = _solver_name(solver)
    if len(shards) == 0:
        raise QuantileInputError("fit_quantile_sharded needs at least one shard")
    be = _RayBackend(shards, task_rows)
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
