"""Bench-only reference: Frisch-Newton interior point + Portnoy-Koenker preprocessing in numpy.

A port of the algorithms of R quantreg's `rq.fit.fnb` (Koenker & Ng's primal-dual log-barrier
LP solver after Lustig, Marsten & Shanno 1992, with Mehrotra predictor-corrector steps) and
`rq.fit.pfn` (Portnoy & Koenker 1997 preprocessing: subsample m = ((p+1) n)^(2/3), band from
the subsample's (X'X)^-1, glob rows outside the kappa band into two pseudo-observations, verify
signs, fix up at most 3 times, double m when more than 0.1 M signs are wrong).  Same defaults:
beta = 0.99995, eps = 1e-6, maxit = 50, Mm.factor = 0.8.  Unweighted; dense numpy.  One
departure: where R's `chol` stops on a subsample or a band that misses a rare column (a
singular X'X), the subsample is doubled, as R does when too many signs are wrong.

Used only to benchmark rece_dist.quantile against the state of the art; never imported by the
package.  The band is computed in row chunks (the same numbers as R's x %*% xxinv, without the
n x p temporary).
"""

from __future__ import annotations

import numpy as np
import scipy.linalg as sla

_CHUNK = 1 << 16


def rq_fit_fnb(x: np.ndarray, y: np.ndarray, tau: float = 0.5, beta: float = 0.99995,
               eps: float = 1e-6, maxit: int = 50) -> tuple[np.ndarray, int]:
    """Frisch-Newton LP for min sum rho_tau(y - x b): solves the dual
    max y'a s.t. x'a = (1-tau) x'1, 0 <= a <= 1 (written as min c'x, c = -y).
    Returns (coef, iterations)."""
    n, p = x.shape
    if not (eps < tau < 1 - eps):
        raise ValueError("tau must be in (0, 1)")
    A = np.ascontiguousarray(x.T)           # p x n
    c = -np.asarray(y, dtype=np.float64)
    b = (1.0 - tau) * x.sum(axis=0)         # rhs
    u = np.ones(n)
    xv = np.full(n, 1.0 - tau)              # primal (the rq dual) variable
    # start at the OLS estimate for the dual vector y
    ada = A @ A.T
    cf = sla.cho_factor(ada, lower=False)
    yv = sla.cho_solve(cf, A @ c)
    s = c - A.T @ yv                        # residuals, temporarily in s
    z = np.maximum(s, 0.0)
    w = np.maximum(-s, 0.0)
    small = np.abs(s) < eps
    z[small] += eps
    w[small] += eps
    s = u - xv
    gap = z @ xv + w @ s
    it = 0
    while gap > eps and it < maxit:
        it += 1
        d = 1.0 / (z / xv + w / s)
        ds = z - w
        dz = d * ds
        rhs = b - A @ xv + A @ dz
        ada = (A * d) @ A.T
        cf = sla.cho_factor(ada, lower=False)
        dy = sla.cho_solve(cf, rhs)
        ds = A.T @ dy - ds
        dx = d * ds
        ds = -dx
        dz = -z * (dx / xv + 1.0)
        dw = -w * (ds / s + 1.0)
        deltap, deltad = _steps(xv, s, z, w, dx, ds, dz, dw, beta)
        if min(deltap, deltad) < 1.0:
            # Mehrotra corrector: update mu, modified step
            mu = xv @ z + s @ w
            g = (mu + deltap * (dx @ z) + deltad * (dz @ xv) + deltap * deltad * (dz @ dx)
                 + deltap * (ds @ w) + deltad * (dw @ s) + deltap * deltad * (ds @ dw))
            mu = mu * (g / mu) ** 3 / (2.0 * n)
            dr = d * (mu * (1.0 / s - 1.0 / xv) + dx * dz / xv - ds * dw / s)
            dy = sla.cho_solve(cf, rhs + A @ dr)
            atdy = A.T @ dy
            dxdz = dx * dz
            dsdw = ds * dw
            dx = d * (atdy - z + w) - dr
            ds = -dx
            dz = -z + (mu - z * dx - dxdz) / xv
            dw = -w + (mu - w * ds - dsdw) / s
            deltap, deltad = _steps(xv, s, z, w, dx, ds, dz, dw, beta)
        xv += deltap * dx
        s += deltap * ds
        yv += deltad * dy
        z += deltad * dz
        w += deltad * dw
        gap = z @ xv + w @ s
    return -yv, it


def _steps(xv, s, z, w, dx, ds, dz, dw, beta):
    def ratio(v, dv):
        neg = dv < 0
        return np.min(-v[neg] / dv[neg]) if neg.any() else np.inf

    deltap = min(ratio(xv, dx), ratio(s, ds))
    deltad = min(ratio(z, dz), ratio(w, dw))
    return min(beta * deltap, 1.0), min(beta * deltad, 1.0)


def rq_fit_pfn(x: np.ndarray, y: np.ndarray, tau: float = 0.5, Mm_factor: float = 0.8,
               max_bad_fixups: int = 3, eps: float = 1e-6, seed: int = 0) -> dict:
    """Portnoy-Koenker preprocessing around rq_fit_fnb.  Returns coef and diagnostics."""
    rng = np.random.default_rng(seed)
    n, p = x.shape
    m = int(round(((p + 1) * n) ** (2.0 / 3.0)))
    info = {"m": m, "fixups": 0, "doublings": 0, "fnb_rows": []}
    while True:
        if m >= n:
            b, _ = rq_fit_fnb(x, y, tau=tau, eps=eps)
            info["fnb_rows"].append(n)
            break
        s_idx = rng.choice(n, size=m, replace=False)
        xx = x[s_idx]
        yy = y[s_idx]
        try:
            z, _ = rq_fit_fnb(xx, yy, tau=tau, eps=eps)
            U = np.linalg.cholesky(xx.T @ xx).T    # R's chol(): upper U with U'U = X'X
        except np.linalg.LinAlgError:  # the subsample missed a rare column: a larger one (R stops here)
            m, info["doublings"] = 2 * m, info["doublings"] + 1
            continue
        info["fnb_rows"].append(m)
        xxinv = sla.solve_triangular(U, np.eye(p), lower=False)
        band = np.empty(n)
        for c0 in range(0, n, _CHUNK):
            q = x[c0:c0 + _CHUNK] @ xxinv
            band[c0:c0 + _CHUNK] = np.sqrt(np.einsum("ij,ij->i", q, q))
        r = y - x @ z
        M = Mm_factor * m
        lo_q = max(1.0 / n, tau - M / (2.0 * n))
        hi_q = min(tau + M / (2.0 * n), (n - 1.0) / n)
        kappa = np.quantile(r / np.maximum(eps, band), [lo_q, hi_q])
        sl = r < band * kappa[0]
        su = r > band * kappa[1]
        del band
        bad_fixups = 0
        not_optimal = True
        while not_optimal and bad_fixups < max_bad_fixups:
            mid = ~su & ~sl
            xx = x[mid]
            yy = y[mid]
            if sl.any():
                xx = np.vstack([xx, sl.astype(np.float64) @ x])
                yy = np.append(yy, y[sl].sum())
            if su.any():
                xx = np.vstack([xx, su.astype(np.float64) @ x])
                yy = np.append(yy, y[su].sum())
            try:
                b, _ = rq_fit_fnb(xx, yy, tau=tau, eps=eps)
            except np.linalg.LinAlgError:  # the band's rows miss a rare column, as above
                m, info["doublings"] = 2 * m, info["doublings"] + 1
                break
            info["fnb_rows"].append(xx.shape[0])
            r = y - x @ b
            su_bad = (r < 0) & su
            sl_bad = (r > 0) & sl
            nbad = int(su_bad.sum() + sl_bad.sum())
            if nbad:
                if nbad > 0.1 * M:
                    m = 2 * m
                    info["doublings"] += 1
                    break
                su &= ~su_bad
                sl &= ~sl_bad
                bad_fixups += 1
                info["fixups"] += 1
            else:
                not_optimal = False
        if not not_optimal:
            break
    info["coef"] = b
    return info
