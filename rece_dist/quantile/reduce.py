"""Portnoy-Koenker globbing, in stages: the driver of an exact fit on many rows.

Given a preliminary fit, rows whose scaled residual r_i / sqrt(Var x_i'b) lies confidently above
(below) the tau-quantile band are globbed: their dual variable is fixed at its bound, so they
enter the LP only through its right-hand side.  The reduced optimum is the full optimum once
every globbed residual has its assumed sign (verified, with the duality gap as a certificate);
violators are freed or added, then the band is widened, never a wrong answer.  Preliminary fits
come from nested random subsets growing geometrically.  The passes over the rows run on a
backend (`sharded.py`); this module only solves the small LPs.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from rece_dist.errors import SolverError

from .lp import _DualLP, _direct_lp, _dual_value, _fail
from .problem import ReduceOptions, _dedupe, _weighted_level

_log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- staged reduction


# largest share of the returned rows carrying an unbounded direction for which the band is
# tilted along it (rare-feature rays measured at 0.0002-0.18, dense ones at 0.99-1.0)
_TILT_MAX_CARRY = 0.25


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
        self.want_ray = True             # whether a failed reduced LP's ray is worth its phase-one LP

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
        such row's band 2x wider (4x, 8x, ... on each further tilt of the fit).  Only for a
        direction that few of the returned rows carry: on pooled configurations the rays of
        the final stage are dense (every row carries them) and tilt after tilt did not help
        (a 1,126,281-row alpha P50 fit: 17 tilts, 79 s; doubling the band instead: 11 s)."""
        rd = rows @ d
        carried = np.abs(rd)
        if rows.shape[0] and (carried > 1e-9 * carried.max()).mean() > _TILT_MAX_CARRY:
            # a direction of most rows: the whole band is too narrow, double it; the stage's
            # later failures double too, without the phase-one LP (0.3-1 s at 10^4-10^5 rows)
            self.want_ray = False
            return False
        V = self.Linv.T @ self.Linv
        Z = rows @ self.Linv.T
        t = rd ** 2 / np.maximum(np.einsum("ij,ij->i", Z, Z), 1e-300)
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
        widened = tilted = 0
        self.want_ray = True
        while True:
            self.want_ray = self.want_ray and tilted < o.max_tilts
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
            done = self.solve_rounds(agg, frac, h_in, h_out, pilot_frac, last=widened == o.max_widen)
            if done is not None:
                return done
            if self.ray is not None and self.tilt(self.ray, agg["X"]):  # a ray only while want_ray
                tilted += 1
                _log.debug("stage rows=%d: reduced LP unbounded along a direction, widening "
                           "the band along it", agg["n_st"])
                continue
            if widened == o.max_widen:
                break
            widened += 1
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

    def solve_rounds(self, agg, frac, h_in, h_out, pilot_frac, final=False, last=False):
        """Place the free/carried band within the returned rows, then LP + verify rounds.
        Returns (b, info) when the signs verify, None when the band must be widened.

        Many violators usually mean a band placed off-centre, and a wider band is cheaper than
        many fix-up rounds; on the ``last`` band (no doubling left) every violator joins the LP
        instead, up to ``max_rounds``: a few thousand added rows still beat the exact fallback's
        LP over every row of the stage (measured: a 552,881-row P90 fit went from 24.9 s with
        the fallback to 6.5 s)."""
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
                # (self.ray is None here: stage() resets it before each call)
                if status == "infeasible" and self.want_ray:
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
            crowded = nbad > max(0.1 * max(int((Ls == 0).sum()), 1), 10 * p)
            if not final and ((crowded and not last) or rounds >= o.max_rounds):
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
