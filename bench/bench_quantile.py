"""Benchmark: exact large-n quantile regression (rece_dist.quantile) against the field.

For each n (p = 21 incl. bias, tau = 0.9, heavy-tailed heteroscedastic data) and each method,
one fresh subprocess generates the same data, fits, and reports wall time of the fit, peak RSS
of the process (data included: X alone is n*p*8 bytes) and the objective, evaluated here by one
formula for every method.  Methods:

  ours        rece_dist.quantile.fit_quantile (cvxpy + HiGHS, staged Portnoy-Koenker reduction)
  sharded     rece_dist.quantile.fit_quantile_sharded over 4 Ray shards (ray.init(address="local", num_cpus=2));
              time excludes ray.init and ray.put; RSS is the driver's only
  reference   bench/reference_fn.py: numpy port of R quantreg rq.fit.pfn + rq.fit.fnb
  statsmodels statsmodels QuantReg (IRLS; approximate, max_iter=1000)
  sklearn     scikit-learn QuantileRegressor(alpha=0, solver="highs"), capped by --sklearn-max
              rows and --timeout seconds

    python bench/bench_quantile.py                       # n = 1e5, 1e6, 1e7
    python bench/bench_quantile.py --sizes 1e5,1e6       # quick
    python bench/bench_quantile.py --formulations        # cvxpy primal vs dual LP timings

Run one benchmark at a time on a 2-core machine: methods run one after another by design.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TAU = 0.9
P = 21
BLAS_THREADS = 1


def make_data(n: int, p: int = P, seed: int = 0):
    """Bias + lognormal features; Student-t(3) noise with scale growing in x1, x2."""
    rng = np.random.default_rng(seed)
    X = np.empty((n, p))
    X[:, 0] = 1.0
    for c0 in range(0, n, 1 << 20):  # chunked: no n x p temporaries
        c1 = min(n, c0 + (1 << 20))
        X[c0:c1, 1:] = rng.lognormal(0.0, 0.5, size=(c1 - c0, p - 1))
    beta = np.random.default_rng(seed + 1).uniform(0.5, 2.0, size=p)
    y = X @ beta
    y += (0.5 + 0.3 * X[:, 1] + 0.2 * X[:, 2]) * rng.standard_t(3, size=n)
    return X, y


def objective(X, y, b, tau=TAU) -> float:
    tot = 0.0
    for c0 in range(0, X.shape[0], 1 << 18):
        r = y[c0:c0 + (1 << 18)] - X[c0:c0 + (1 << 18)] @ b
        tot += float(np.maximum(tau * r, (tau - 1) * r).sum())
    return tot / X.shape[0]


# --------------------------------------------------------------------------- one method, one n


def worker(method: str, n: int, seed: int) -> dict:
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(HERE))
    X, y = make_data(n, seed=seed)
    extra: dict = {}
    if method == "ours":
        from rece_dist.quantile import fit_quantile

        fit_quantile(X[:2000], y[:2000], TAU)  # import/compile warm-up, not timed
        t = time.perf_counter()
        f = fit_quantile(X, y, TAU, seed=seed)
        secs = time.perf_counter() - t
        b = f.coef
        extra = {"lp_rows": f.n_solved_rows, "rounds": f.rounds, "lp_solves": f.lp_solves,
                 "stages": f.stages}
    elif method == "sharded":
        os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
        import ray

        from rece_dist.quantile import fit_quantile_sharded

        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        cuts = np.linspace(0, n, 5).astype(int)
        refs = [ray.put((X[a:b], y[a:b], np.ones(b - a))) for a, b in zip(cuts, cuts[1:])]
        t = time.perf_counter()
        f = fit_quantile_sharded(refs, TAU, seed=seed)
        secs = time.perf_counter() - t
        b = f.coef
        extra = {"lp_rows": f.n_solved_rows, "rounds": f.rounds, "lp_solves": f.lp_solves}
        ray.shutdown()
    elif method == "reference":
        from reference_fn import rq_fit_pfn

        t = time.perf_counter()
        info = rq_fit_pfn(X, y, tau=TAU, seed=seed)
        secs = time.perf_counter() - t
        b = info["coef"]
        extra = {"lp_rows": max(info["fnb_rows"]), "fixups": info["fixups"]}
    elif method == "statsmodels":
        import warnings

        from statsmodels.regression.quantile_regression import QuantReg

        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = QuantReg(y, X).fit(q=TAU, max_iter=1000)
        secs = time.perf_counter() - t
        b = np.asarray(res.params)
    elif method == "sklearn":
        import warnings

        from sklearn.linear_model import QuantileRegressor

        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m = QuantileRegressor(quantile=TAU, alpha=0.0, solver="highs").fit(X[:, 1:], y)
        secs = time.perf_counter() - t
        b = np.r_[m.intercept_, m.coef_]
    else:
        raise SystemExit(f"unknown method {method}")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    return {"method": method, "n": n, "seconds": secs, "peak_rss": rss,
            "objective": objective(X, y, b), "coef": list(map(float, b)), **extra}


def run_one(method: str, n: int, seed: int, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", method, "--n", str(n),
           "--seed", str(seed)]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if BLAS_THREADS:
        for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[k] = str(BLAS_THREADS)
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"method": method, "n": n, "timeout": timeout}
    if out.returncode != 0:
        return {"method": method, "n": n, "error": (out.stderr.strip().splitlines() or ["?"])[-1]}
    for line in out.stdout.splitlines()[::-1]:
        if line.startswith("{"):
            return json.loads(line)
    return {"method": method, "n": n, "error": "no result"}


# --------------------------------------------------------------------------- formulations


def formulations(sizes=(10_000, 30_000)) -> None:
    """cvxpy + HiGHS: primal LP (pos/neg parts) vs dual LP, same data, wall time."""
    import warnings

    import cvxpy as cp

    print("| n | formulation | HiGHS algorithm | wall s | objective |")
    print("|---|---|---|---|---|")
    for n in sizes:
        X, y = make_data(n)
        for form in ("dual", "primal"):
            for algo in ("simplex", "ipm"):
                if form == "primal" and algo == "simplex" and n > 10_000:
                    print(f"| {n:,} | {form} | {algo} | (skipped: >150 s at 3e4) | |")
                    continue
                if form == "dual":
                    a = cp.Variable(n, bounds=[np.zeros(n), np.ones(n)])
                    prob = cp.Problem(cp.Maximize(y @ a), [X.T @ a == (1 - TAU) * X.sum(0)])
                else:
                    b = cp.Variable(P)
                    r = y - X @ b
                    prob = cp.Problem(cp.Minimize(TAU * cp.sum(cp.pos(r)) + (1 - TAU) * cp.sum(cp.neg(r))))
                t = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    prob.solve(solver="HIGHS", highs_options={"solver": algo})
                secs = time.perf_counter() - t
                val = prob.value / n if form == "primal" else (prob.value - (1 - TAU) * y.sum()) / n
                print(f"| {n:,} | {form} | {algo} | {secs:.2f} | {val:.12g} |", flush=True)


# --------------------------------------------------------------------------- table


def fmt_bytes(b: float) -> str:
    return f"{b / 2**30:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1e5,1e6,1e7")
    ap.add_argument("--methods", default="ours,reference,statsmodels,sklearn,sharded")
    ap.add_argument("--sklearn-max", type=float, default=1e5)
    ap.add_argument("--statsmodels-max", type=float, default=2e6)
    ap.add_argument("--sharded-max", type=float, default=1e7)
    ap.add_argument("--timeout", type=float, default=600.0, help="per-method cap, seconds")
    ap.add_argument("--sklearn-timeout", type=float, default=300.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--blas-threads", type=int, default=1,
                    help="BLAS threads for every method (0: library default). 1 by default: on a "
                         "shared 2-core machine oversubscribed OpenBLAS threads measure noise")
    ap.add_argument("--json", help="also write raw results here")
    ap.add_argument("--formulations", action="store_true")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker, a.n, a.seed)))
        return
    if a.formulations:
        formulations()
        return
    global BLAS_THREADS
    BLAS_THREADS = a.blas_threads
    sizes = [int(float(s)) for s in a.sizes.split(",") if s]
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    caps = {"sklearn": a.sklearn_max, "statsmodels": a.statsmodels_max, "sharded": a.sharded_max}
    results = []
    for n in sizes:
        for m in methods:
            if n > caps.get(m, float("inf")):
                results.append({"method": m, "n": n, "skipped": f"n > cap {caps[m]:g}"})
                continue
            tmo = a.sklearn_timeout if m == "sklearn" else a.timeout
            r = run_one(m, n, a.seed, tmo)
            results.append(r)
            print(f"# {m} n={n:,}: " + (f"{r['seconds']:.2f} s" if "seconds" in r else
                                        str({k: v for k, v in r.items() if k not in ('method', 'n')})),
                  file=sys.stderr, flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    print(f"\nMachine: {os.cpu_count()} cores, "
          f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.1f} GiB RAM; "
          f"p = {P}, tau = {TAU}; BLAS threads per method: {BLAS_THREADS or 'default'}; peak RSS includes the data (X is n*{P}*8 bytes)\n")
    print("| n | method | wall s | peak RSS GiB | objective | rel. gap vs reference | LP rows (max) | x reference |")
    print("|---|---|---|---|---|---|---|---|")
    for n in sizes:
        rs = [r for r in results if r["n"] == n]
        ref = next((r for r in rs if r["method"] == "reference" and "objective" in r), None)
        for r in rs:
            if "objective" not in r:
                why = r.get("skipped") or (f"timeout > {r['timeout']:.0f} s" if "timeout" in r else r.get("error"))
                print(f"| {n:,} | {r['method']} | {why} | | | | | |")
                continue
            gap = (r["objective"] - ref["objective"]) / ref["objective"] if ref else float("nan")
            ratio = r["seconds"] / ref["seconds"] if ref else float("nan")
            print(f"| {n:,} | {r['method']} | {r['seconds']:.2f} | {fmt_bytes(r['peak_rss'])} | "
                  f"{r['objective']:.12f} | {gap:+.1e} | {r.get('lp_rows', '')} | {ratio:.2f} |")
    # goals
    print()
    for n in sizes:
        rs = {r["method"]: r for r in results if r["n"] == n}
        ours, ref, sk = rs.get("ours"), rs.get("reference"), rs.get("sklearn")
        if ours and "seconds" in ours and ref and "seconds" in ref:
            print(f"n={n:,}: ours/reference time = {ours['seconds'] / ref['seconds']:.2f} (goal <= 3 at "
                  f"1e6, 1e7); objective gap {(ours['objective'] - ref['objective']) / ref['objective']:+.1e} "
                  "(goal |gap| <= 1e-8)")
        if ours and "seconds" in ours and sk:
            if "seconds" in sk:
                print(f"n={n:,}: sklearn/ours time = {sk['seconds'] / ours['seconds']:.0f}x (goal >= 100 at 1e5)")
            elif "timeout" in sk:
                print(f"n={n:,}: sklearn did not finish in {sk['timeout']:.0f} s: >= "
                      f"{sk['timeout'] / ours['seconds']:.0f}x (goal >= 100 at 1e5)")
        sh = rs.get("sharded")
        if ours and sh and "objective" in sh and "objective" in ours:
            print(f"n={n:,}: distributed vs single objective rel diff = "
                  f"{(sh['objective'] - ours['objective']) / ours['objective']:+.1e}")


if __name__ == "__main__":
    main()
