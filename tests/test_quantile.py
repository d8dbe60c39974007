"""Exact quantile regression: independent references (scikit-learn, a direct cvxpy primal),
reduced vs full solves, distributed vs single-process, non-crossing, duplicates, errors."""

from __future__ import annotations

import warnings

import cvxpy as cp
import numpy as np
import pytest

from rece_dist.errors import SolverError
from rece_dist.quantile import (
    QuantileInputError,
    ReduceOptions,
    fit_quantile,
    fit_quantile_sharded,
    fit_quantiles,
    pinball_loss,
    resolve_crossings,
)
from rece_dist.quantile.highs import ArrayHighs
from rece_dist.quantile.lp import _DualLP
from rece_dist.quantile.problem import _dedupe
from rece_dist.quantile.sharded import _groups


def heavy_tailed(n, p=21, seed=0):
    """Bias column + lognormal features; Student-t(3) noise whose scale grows with x1, x2."""
    rng = np.random.default_rng(seed)
    X = np.empty((n, p))
    X[:, 0] = 1.0
    X[:, 1:] = rng.lognormal(0.0, 0.5, size=(n, p - 1))
    beta = rng.uniform(0.5, 2.0, size=p)
    scale = 0.5 + 0.3 * X[:, 1] + 0.2 * X[:, 2]
    y = X @ beta + scale * rng.standard_t(3, size=n)
    return X, y


def objective(X, y, coef, tau, w=None, l1=0.0, pen=None):
    """The documented objective, computed here independently of the module."""
    w = np.ones(len(y)) if w is None else w
    r = y - X @ coef
    loss = np.sum(w * np.maximum(tau * r, (tau - 1) * r)) / np.sum(w)
    pen = np.ones(X.shape[1], dtype=bool) if pen is None else pen
    return loss + l1 * np.sum(np.abs(coef[pen]))


def rel(a, b):
    return abs(a - b) / max(abs(a), abs(b), 1e-300)


# --------------------------------------------------------------------------- vs scikit-learn


@pytest.mark.parametrize("tau", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("l1", [0.0, 0.02])
def test_matches_sklearn(tau, weighted, l1):
    from sklearn.linear_model import QuantileRegressor

    X, y = heavy_tailed(400, p=8, seed=int(tau * 10) + 3 * weighted)
    w = np.random.default_rng(5).uniform(0.2, 3.0, size=len(y)) if weighted else None
    pen = np.array([False] + [True] * (X.shape[1] - 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sk = QuantileRegressor(quantile=tau, alpha=l1, fit_intercept=True, solver="highs")
        sk.fit(X[:, 1:], y, sample_weight=w)
    sk_coef = np.r_[sk.intercept_, sk.coef_]
    fit = fit_quantile(X, y, tau, weights=w, l1=l1, penalize=pen)
    ours = objective(X, y, fit.coef, tau, w, l1, pen)
    theirs = objective(X, y, sk_coef, tau, w, l1, pen)
    assert fit.status == "optimal"
    assert rel(fit.objective, ours) < 1e-12          # the reported objective is the objective
    assert rel(ours, theirs) <= 1e-6
    assert ours <= theirs * (1 + 1e-9)               # never worse than the reference
    if l1 > 0:  # default mask: every non-constant column penalised == explicit mask here
        dflt = fit_quantile(X, y, tau, weights=w, l1=l1)
        assert rel(dflt.objective, fit.objective) < 1e-9


def test_clarabel_alternative_agrees():
    X, y = heavy_tailed(1500, p=6, seed=11)
    a = fit_quantile(X, y, 0.7, solver="HIGHS")
    b = fit_quantile(X, y, 0.7, solver="CLARABEL")
    assert b.solver == "CLARABEL" and b.status == "optimal"
    assert rel(a.objective, b.objective) < 1e-8


def test_pinball_loss():
    y = np.array([1.0, 2.0, 3.0])
    pred = np.array([2.0, 2.0, 2.0])
    assert pinball_loss(y, pred, 0.9) == pytest.approx((0.1 * 1 + 0 + 0.9 * 1) / 3)
    assert pinball_loss(y, pred, 0.9, weights=[0, 1, 1]) == pytest.approx(0.9 / 2)


# --------------------------------------------------------------------------- reduced vs full


@pytest.fixture(scope="module")
def medium():
    X, y = heavy_tailed(20_000, seed=1)
    full = fit_quantile(X, y, 0.9, reduce="never")
    return X, y, full


def test_reduced_equals_full(medium):
    X, y, full = medium
    red = fit_quantile(X, y, 0.9, reduce="always")
    assert full.n_solved_rows == 20_000 and full.rounds == 0
    assert red.n_solved_rows < 20_000 / 2 and red.rounds >= 1
    assert rel(red.objective, full.objective) <= 1e-9
    assert rel(objective(X, y, red.coef, 0.9), full.objective) <= 1e-9
    np.testing.assert_allclose(red.coef, full.coef, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("order", ["y", "residual"])
def test_adversarial_row_order(medium, order):
    X, y, full = medium
    key = y if order == "y" else y - X @ full.coef
    idx = np.argsort(key)
    fit = fit_quantile(X[idx], y[idx], 0.9, reduce="always", seed=3)
    assert rel(fit.objective, full.objective) <= 1e-9
    np.testing.assert_allclose(fit.coef, full.coef, rtol=1e-7, atol=1e-9)


def test_wrong_first_globs_force_fixups(medium):
    """A tiny first subset and a band far too narrow: globbed signs are wrong, fix-up rounds and
    band doublings follow, and the answer is still the exact optimum."""
    X, y, full = medium
    opts = ReduceOptions(first_stage_rows=300, growth=100.0, z_inner=0.05, z_outer=0.08,
                         min_free=30)
    fit = fit_quantile(X, y, 0.9, reduce=opts)
    assert fit.rounds >= 2
    assert rel(fit.objective, full.objective) <= 1e-9
    np.testing.assert_allclose(fit.coef, full.coef, rtol=1e-7, atol=1e-9)


def test_weighted_l1_reduced_equals_full():
    X, y = heavy_tailed(25_000, p=10, seed=4)
    w = np.random.default_rng(2).exponential(1.0, size=len(y))
    w[::7] = 0.0  # zero-weight rows are legal and do not count
    full = fit_quantile(X, y, 0.25, weights=w, l1=1e-3, reduce="never")
    red = fit_quantile(X, y, 0.25, weights=w, l1=1e-3, reduce="always")
    assert rel(red.objective, full.objective) <= 1e-9
    assert rel(objective(X, y, red.coef, 0.25, w, 1e-3, np.r_[False, [True] * 9]),
               full.objective) <= 1e-9


@pytest.mark.parametrize("case", ["heavy", "rare"])
def test_last_band_fixes_up_instead_of_solving_every_row(medium, case):
    """Regression: once the band could not be doubled any more, a round with many violators
    went straight to the exact fallback (every row in one LP: 552,881 rows, 24.9 s on a beta P90
    specialist of 100 configurations).  On the last band the violators now join the LP."""
    if case == "heavy":
        (X, y, full), w = medium, None
    else:
        X, y, w = rare_event_borrowed()
        full = fit_quantile(X, y, 0.9, weights=w, reduce="never")
    opts = ReduceOptions(z_inner=1.0, z_outer=1.6, max_widen=1, first_stage_rows=300, min_free=30)
    fit = fit_quantile(X, y, 0.9, weights=w, reduce=opts)
    assert fit.rounds >= 2 and fit.n_solved_rows < len(y) / 4
    assert rel(fit.objective, full.objective) <= 1e-9
    assert rel(objective(X, y, fit.coef, 0.9, w), full.objective) <= 1e-9


# --------------------------------------------------------------------------- trace-like data


def bimodal_latency(n=10_000, p=16, seed=0, big=1.4e6, base=3.5e4):
    """Like the trace generator's training data: y in microseconds, X column-scaled to max 1,
    bias + dense features, and a rare group (12% of rows) whose interaction columns are zero
    outside it and whose latencies are bimodal (30% ~1.4e6 us, the rest ~3.5e4 us)."""
    rng = np.random.default_rng(seed)
    X = np.zeros((n, p))
    X[:, 0] = 1.0
    g = rng.random(n) < 0.12
    nd = p - 5
    X[:, 5:] = rng.random((n, nd)) ** 2
    for j in range(1, 5):
        X[g, j] = rng.random(g.sum()) ** 2
    level = 0.7 + 0.5 * X[:, 5:] @ rng.uniform(0, 1, nd) / nd
    y = base * level * (1 + 0.05 * rng.standard_normal(n))
    hot = g & (rng.random(n) < 0.3)
    y[hot] = big * (0.9 + 0.1 * rng.random(hot.sum()))
    X /= np.abs(X).max(axis=0)
    return X, y


@pytest.mark.parametrize("seed, unit", [(5, 1.0), (4, 2.0)])
def test_microsecond_latencies_with_bimodal_group(seed, unit):
    """Regression: HiGHS's dual simplex failed ("ratio test failed due to excessive dual
    values" -> SolverError) on LPs whose costs are y in microseconds: with seed 5 on the
    all-rows LP (also reduce="never"), with seed 4 on an infeasible reduced LP.  The reduced
    LPs went infeasible because the homoscedastic band globbed the whole high-spread group."""
    X, y = bimodal_latency(seed=seed)
    y = y * unit
    pen = np.r_[False, np.ones(X.shape[1] - 1, dtype=bool)]
    full = fit_quantile(X, y, 0.9, penalize=pen, reduce="never")
    red = fit_quantile(X, y, 0.9, penalize=pen, reduce="always")
    for f in (full, red):
        assert f.status == "optimal" and f.solver == "HIGHS"   # no fallback route was needed
        assert rel(objective(X, y, f.coef, 0.9, pen=pen), f.objective) < 1e-12
    assert rel(red.objective, full.objective) <= 1e-9
    assert red.n_solved_rows < len(y) / 2 and red.rounds <= 3   # the band covers the group


def rare_event_borrowed(n=40_000, seed=3):
    """Like a specialist that borrows other configurations (pipeline --borrow): six groups,
    two at weight 1 and four at 0.1, group-level columns that do not separate every group, and
    a rare event (1% of three groups' rows: offload, preemption) whose column is zero elsewhere
    and whose latency cost is Pareto(1.5)-tailed."""
    rng = np.random.default_rng(seed)
    g = rng.integers(0, 6, n)
    w = np.where(g < 2, 1.0, 0.1)
    x1 = rng.gamma(2.0, 1.0, n)
    amount = ((rng.random(n) < 0.01) & (g >= 3)) * rng.integers(1, 20, n) / 20
    X = np.column_stack([np.ones(n), x1, amount, np.eye(6)[g][:, 1:4], x1 * (g == 2)])
    y = (1 + 2 * x1 + 0.5 * g + amount * 50 * (1 + rng.pareto(1.5, n))
         + (1 + 0.3 * x1) * rng.standard_t(3, n))
    return X, y, w


def test_rare_feature_globbed_to_one_side_is_repaired_along_its_ray():
    """Regression: the rare event's rows all fell above the band, so the reduced primal was
    unbounded along that column; doubling the whole band four times ended in the all-rows LP
    (here 40,000 of 40,000 rows; 216,000 rows and 350 s on a borrowed beta specialist).  The
    band is now widened along the LP's unbounded direction only."""
    X, y, w = rare_event_borrowed()
    full = fit_quantile(X, y, 0.9, weights=w, reduce="never")
    red = fit_quantile(X, y, 0.9, weights=w, reduce="always")
    assert rel(red.objective, full.objective) <= 1e-9
    assert rel(objective(X, y, red.coef, 0.9, w), full.objective) <= 1e-9
    np.testing.assert_allclose(red.coef, full.coef, rtol=1e-7, atol=1e-9)
    assert red.n_solved_rows < len(y) / 4


def test_solver_failure_is_resolved_by_another_route(monkeypatch):
    """A failed solve is re-solved (HiGHS IPM, then CLARABEL), named in `solver`, still exact."""
    from rece_dist.quantile import lp as q

    X, y = heavy_tailed(8_000, p=8, seed=21)
    ref = fit_quantile(X, y, 0.8, reduce="never")
    run = q._DualLP._run

    def failing(bad):
        def _run(self, solver, opts, warm):
            algo = opts.get("highs_options", {}).get("solver")
            if solver == "HIGHS" and algo in bad:
                self.solves += 1
                return "solver_error: injected"
            return run(self, solver, opts, warm)
        return _run

    monkeypatch.setattr(q._DualLP, "_run", failing({"simplex"}))
    fit = fit_quantile(X, y, 0.8, reduce="always")
    assert fit.solver == "HIGHS+HIGHS(ipm)"
    assert rel(fit.objective, ref.objective) <= 1e-9
    monkeypatch.setattr(q._DualLP, "_run", failing({"simplex", "ipm"}))
    for mode in ("always", "never"):
        fit = fit_quantile(X, y, 0.8, reduce=mode)
        assert fit.solver == "HIGHS+CLARABEL"
        assert rel(fit.objective, ref.objective) <= 1e-9
    monkeypatch.undo()
    # a user limit is the caller's choice: not retried
    with pytest.raises(SolverError, match="user_limit"):
        fit_quantile(X, y, 0.8, reduce="never",
                     solver_options={"highs_options": {"time_limit": 0.0}})


# --------------------------------------------------------------------------- distributed


def test_sharded_equals_single_process(ray_local):
    ray = ray_local
    X, y = heavy_tailed(30_000, p=12, seed=7)
    w = np.random.default_rng(8).uniform(0.5, 2.0, size=len(y))
    single = fit_quantile(X, y, 0.8, weights=w, reduce="never")
    cuts = [0, 4_000, 15_000, 30_000]
    shards = [ray.put((X[a:b], y[a:b], w[a:b])) for a, b in zip(cuts, cuts[1:])]
    dist = fit_quantile_sharded(shards, 0.8, reduce=ReduceOptions(first_stage_rows=1500))
    assert dist.n_rows == 30_000 and dist.stages >= 1
    assert dist.n_solved_rows < 30_000 / 2
    assert rel(dist.objective, single.objective) <= 1e-9
    assert rel(objective(X, y, dist.coef, 0.8, w), single.objective) <= 1e-9


def test_grouped_pass_tasks_give_the_same_fit(ray_local):
    """Pass tasks over groups of shards ([4,000 + 11,000] and [15,000] rows here) must return
    exactly what one task per shard returns: same rows, same order, same optimum, same bits."""
    ray = ray_local
    X, y = heavy_tailed(30_000, p=8, seed=11)
    cuts = [0, 4_000, 15_000, 30_000]
    shards = [ray.put((X[a:b], y[a:b], np.ones(b - a))) for a, b in zip(cuts, cuts[1:])]
    assert _groups([4_000, 11_000, 15_000], 10_000) == [[0, 1], [2]]
    assert _groups([4_000, 11_000, 15_000], 1) == [[0], [1], [2]]
    opts = ReduceOptions(first_stage_rows=1500)
    per_shard = fit_quantile_sharded(shards, 0.3, reduce=opts, task_rows=1)
    grouped = fit_quantile_sharded(shards, 0.3, reduce=opts, task_rows=10_000)
    assert grouped.n_solved_rows == per_shard.n_solved_rows and grouped.rounds == per_shard.rounds
    np.testing.assert_array_equal(grouped.coef, per_shard.coef)
    single = fit_quantile(X, y, 0.3, reduce="never")
    assert rel(grouped.objective, single.objective) <= 1e-9


def test_sharded_rejects_bad_shard(ray_local):
    ray = ray_local
    X, y = heavy_tailed(500, p=4, seed=9)
    y = y.copy()
    y[3] = np.nan
    good = ray.put((X, np.nan_to_num(y), np.ones(500)))
    with pytest.raises(QuantileInputError, match=r"y contains 1 NaN.*shard 1"):
        fit_quantile_sharded([good, ray.put((X, y, np.ones(500)))], 0.5)


# --------------------------------------------------------------------------- non-crossing


def joint_reference(X, y, taus):
    """Joint non-crossing problem with ordering at every row, primal form, solved directly."""
    K = len(taus)
    B = cp.Variable((X.shape[1], K))
    R = y[:, None] - X @ B
    obj = sum(taus[k] * cp.sum(cp.pos(R[:, k])) + (1 - taus[k]) * cp.sum(cp.neg(R[:, k]))
              for k in range(K))
    cons = [X @ B[:, k] <= X @ B[:, k + 1] for k in range(K - 1)]
    prob = cp.Problem(cp.Minimize(obj / len(y)), cons)
    prob.solve(solver="CLARABEL")
    assert prob.status == "optimal"
    return prob.value


def test_noncrossing_removes_every_crossing():
    rng = np.random.default_rng(3)
    n, p = 60, 25  # few rows, many features, close taus: independent fits cross
    X = np.c_[np.ones(n), rng.normal(size=(n, p - 1))]
    y = X[:, 1] + rng.standard_t(2, size=n)
    taus = [0.45, 0.5, 0.55]
    indep, rep0 = fit_quantiles(X, y, taus)
    fits, rep = fit_quantiles(X, y, taus, noncrossing=True)
    assert rep0.crossings_before > 0 and rep.before == rep0.before
    assert rep.after == (0, 0) and rep.rounds >= 1 and rep.constraints > 0
    P = X @ np.column_stack([f.coef for f in fits])
    assert np.all(P[:, 0] <= P[:, 1] + 1e-9) and np.all(P[:, 1] <= P[:, 2] + 1e-9)
    for a, b in zip(indep, fits):
        assert b.tau == a.tau
        assert b.objective >= a.objective - 1e-12   # constrained is no better than free
        assert rel(objective(X, y, b.coef, b.tau), b.objective) < 1e-12
    # the cutting plane reaches the optimum of ordering at *every* row
    assert rel(sum(f.objective for f in fits), joint_reference(X, y, taus)) < 1e-6


def test_resolve_crossings_large_globbed():
    X, y = heavy_tailed(12_000, p=21, seed=5)
    taus = [0.5, 0.502, 0.504]
    fits = [fit_quantile(X, y, t) for t in taus]
    new, rep = resolve_crossings(X, y, fits[::-1])   # any order in, same order out
    assert [f.tau for f in new] == taus[::-1]
    assert rep.crossings_before > 0 and rep.crossings_after == 0
    assert new[0].n_solved_rows < 12_000
    for a, b in zip(fits[::-1], new):
        assert b.objective >= a.objective - 1e-12


def test_resolve_crossings_windows_reach_joint_optimum():
    """Each block carries only its own window of rows (the rest globbed per block), yet the
    result is the optimum of ordering at every row (an independent primal solve)."""
    X, y = heavy_tailed(8_000, p=10, seed=5)
    taus = [0.5, 0.502, 0.504]
    new, rep = resolve_crossings(X, y, [fit_quantile(X, y, t) for t in taus])
    assert rep.crossings_before > 0 and rep.crossings_after == 0
    assert new[0].n_solved_rows < 8_000 / 2
    assert rel(sum(f.objective for f in new), joint_reference(X, y, taus)) < 1e-6


# --------------------------------------------------------------------------- duplicates


def test_duplicates_merged_same_objective():
    rng = np.random.default_rng(12)
    Xu = np.c_[np.ones(300), rng.integers(0, 5, size=(300, 3)).astype(float)]
    yu = Xu @ [1.0, 0.5, -0.2, 0.3] + rng.integers(-3, 4, size=300)
    reps = rng.integers(1, 5, size=300)
    X = np.repeat(Xu, reps, axis=0)
    y = np.repeat(yu, reps)
    perm = rng.permutation(len(y))
    merged = fit_quantile(X[perm], y[perm], 0.3)
    weighted = fit_quantile(Xu, yu, 0.3, weights=reps.astype(float))
    assert merged.n_solved_rows < len(y)
    assert rel(merged.objective, weighted.objective) < 1e-12
    assert rel(objective(X, y, merged.coef, 0.3), objective(X, y, weighted.coef, 0.3)) < 1e-12


def test_dedupe_hash_check_keeps_distinct_rows_and_merges_equal_ones():
    """Rows equal up to the sign of zero merge; a row one bit away does not; all-distinct rows
    come back as they were (the hash fast path), in order."""
    tiny = np.nextafter(0.0, 1.0)
    X = np.array([[1.0, 0.0], [1.0, -0.0], [1.0, tiny], [2.0, 0.0]])
    y = np.array([5.0, 5.0, 5.0, 5.0])
    Xd, yd, wd, inv = _dedupe(X, y, np.array([1.0, 2.0, 4.0, 8.0]))
    assert len(yd) == 3 and inv[0] == inv[1] != inv[2] and wd[inv[0]] == 3.0 and wd[inv[2]] == 4.0
    rng = np.random.default_rng(4)
    Xr, yr, wr = rng.random((2000, 6)), rng.random(2000), np.ones(2000)
    out = _dedupe(Xr, yr, wr)
    assert out[0] is Xr and out[1] is yr and np.array_equal(out[-1], np.arange(2000))


def test_array_highs_returns_what_cvxpys_own_highs_interface_returns():
    """The same compiled LP solved through cvxpy's HIGHS and through ArrayHighs: the same status,
    bit-identical primal and dual values, the same simplex iterations (equality-only and
    penalised duals, several taus), and the same verdict on an infeasible LP."""
    X, y = heavy_tailed(3000, p=6, seed=8)
    w = np.ones(len(y))
    for lam in (0.0, 30.0):
        pen = np.ones(X.shape[1], dtype=bool)
        pen[0] = False
        lp = _DualLP(X, y, pen, [lam], "HIGHS", None)
        for tau in (0.1, 0.5, 0.9):
            lp.set(0, np.zeros(len(y)), w, (1 - tau) * (w @ X))
            got = []
            for solver in ("HIGHS", ArrayHighs()):
                lp.problem.solve(solver=solver, highs_options={"presolve": "off", "solver": "simplex"})
                got.append((lp.problem.status, lp.avalue(0), lp.coefs(0), lp.problem.solver_stats.num_iters))
            (s0, a0, b0, i0), (s1, a1, b1, i1) = got
            assert s0 == s1 == "optimal" and i0 == i1 > 0
            assert np.array_equal(a0, a1) and np.array_equal(b0, b1)
    x = cp.Variable(2, bounds=[np.zeros(2), np.ones(2)])
    infeasible = cp.Problem(cp.Minimize(cp.sum(x)), [x[0] + x[1] >= 3])
    statuses = []
    for solver in ("HIGHS", ArrayHighs()):
        infeasible.solve(solver=solver)
        statuses.append(infeasible.status)
    assert statuses == ["infeasible", "infeasible"]


# --------------------------------------------------------------------------- errors


def test_input_errors():
    X, y = heavy_tailed(50, p=3)
    bad = y.copy()
    bad[7] = np.nan
    with pytest.raises(ValueError, match="y contains 1 NaN"):
        fit_quantile(X, bad, 0.5)
    with pytest.raises(ValueError, match=r"strictly inside \(0, 1\)"):
        fit_quantile(X, y, 1.0)
    w = np.ones(50)
    w[2] = -1
    with pytest.raises(ValueError, match="negative"):
        fit_quantile(X, y, 0.5, weights=w)
    with pytest.raises(QuantileInputError, match="50 rows but y has 49"):
        fit_quantile(X, y[:-1], 0.5)
    Xn = X.copy()
    Xn[0, 1] = np.inf
    with pytest.raises(QuantileInputError, match="X contains NaN or infinite"):
        fit_quantile(Xn, y, 0.5)


def test_solver_error_names_tau_rows_and_solver():
    X, y = heavy_tailed(200, p=3)
    with pytest.raises(SolverError, match=r"tau=0\.37 on 200 rows: solver HIGHS .*user_limit"):
        fit_quantile(X, y, 0.37, solver_options={"highs_options": {"time_limit": 0.0}})
