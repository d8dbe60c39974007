"""The data passes of the staged reduction, and the backends that run them over shards.

The reduction needs of the rows only per-row residual signs, two sums and the middle rows, so
each pass is a pure function of one shard (X, y, w) plus small arguments: `_LocalBackend`
runs them in-process over in-memory shards, `_RayBackend` as Ray tasks over shards held in
the object store (each task's memory is its shard plus chunk temporaries).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import numpy as np

from .problem import _CHUNK, _SHARD_SHIFT, _column_range, _rho_sum, _validate_arrays

# --------------------------------------------------------------------------- data passes
#
# Every pass is a pure function of one shard (X, y, w) plus small arguments, so the same code
# runs in-process and as a Ray task.  Stage membership of a row is u < frac with u drawn per
# chunk from a generator seeded by (seed, shard, chunk): nested stages, no n-sized state.


@functools.cache
def _blas_controller():
    """One ``ThreadpoolController`` per process: building one scans every loaded library, which
    cost more than the passes it guards (6.5 s of an evaluation's tasks, measured with py-spy)."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # pragma: no cover - threadpoolctl ships with scikit-learn
        return None
    return ThreadpoolController()


def _single_blas(fn: Callable) -> Callable:
    """Run a pass with one BLAS thread: its products are small (chunk x p), and multithreaded
    OpenBLAS on them is slower, badly so on a shared machine (measured 40x on a 3 x 65536 gemm)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        ctl = _blas_controller()
        if ctl is None:  # pragma: no cover
            return fn(*args, **kwargs)
        with ctl.limit(limits=1, user_api="blas"):
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


# rows a pass task covers, at least, once the shards' sizes are known: consecutive shards are
# grouped up to it. A task's fixed cost (~5-10 ms on this machine) outweighs the pass over a
# borrowed configuration's few thousand rows; at 10^7 rows over 100 shards per-shard tasks made
# a sharded fit 1.7x slower than the same reduction in one process.
_TASK_ROWS = 1_000_000


def _groups(sizes: list[int], task_rows: int) -> list[list[int]]:
    """Consecutive shard indices in groups of at least ``task_rows`` rows (the last may be smaller)."""
    out: list[list[int]] = [[]]
    rows = 0
    for i, n in enumerate(sizes):
        if out[-1] and rows >= task_rows:
            out.append([])
            rows = 0
        out[-1].append(i)
        rows += n
    return out if out[0] else []


def _over_group(fn: Callable, ids: list[int], state: list | None, args: tuple, *shards) -> list:
    """One pass over a group of shards in one task: ``fn``'s result per shard, in order."""
    if state is None:
        return [fn(sh, i, *args) for i, sh in zip(ids, shards)]
    return [fn(sh, i, *args[:2], st, *args[2:]) for i, st, sh in zip(ids, state, shards)]


def _over_group_split(fn: Callable, ids: list[int], state: list | None, args: tuple, *shards):
    """``_over_group`` for passes returning (result, side): the results, and the sides as one
    object that stays in the object store for the group's next pass."""
    pairs = _over_group(fn, ids, state, args, *shards)
    return [r for r, _ in pairs], [sd for _, sd in pairs]


def _shard_objective(shard, _shard_id: int, b: np.ndarray, tau: float) -> float:
    return _pass_objective(shard, b, tau)


class _RayBackend:
    """Runs the passes as Ray tasks over shards held in the object store, one task per group of
    consecutive shards (``_TASK_ROWS``); each task reads its shards in place (zero-copy) and
    holds chunk temporaries; the per-row side state stays in the object store."""

    def __init__(self, refs, task_rows: int = _TASK_ROWS):
        import ray

        from ..progress import RETRIES

        self.ray = ray
        self.refs = list(refs)
        self.task_rows = task_rows
        self.groups = [[i] for i in range(len(self.refs))]  # until stats() knows the sizes
        self.state: list[Any] = [None] * len(self.groups)
        self._stats = ray.remote(max_retries=RETRIES)(_pass_stats)
        self._one = ray.remote(max_retries=RETRIES)(_over_group)
        self._two = ray.remote(max_retries=RETRIES, num_returns=2)(_over_group_split)

    def _shards(self, g: list[int]) -> list:
        return [self.refs[i] for i in g]

    def _map(self, fn: Callable, args: tuple) -> list:
        refs = [self._one.remote(fn, g, None, args, *self._shards(g)) for g in self.groups]
        return [r for out in self.ray.get(refs) for r in out]

    def _map_state(self, fn: Callable, args: tuple, with_state: bool) -> list:
        res = []
        for k, g in enumerate(self.groups):
            out, side = self._two.remote(fn, g, self.state[k] if with_state else None, args, *self._shards(g))
            self.state[k] = side
            res.append(out)
        return [r for out in self.ray.get(res) for r in out]

    def stats(self, need_const):
        st = self.ray.get([self._stats.remote(r, i, need_const) for i, r in enumerate(self.refs)])
        self.groups = _groups([s["n"] for s in st], self.task_rows)
        self.state = [None] * len(self.groups)
        return st

    def sample(self, seed, frac):
        return self._map(_pass_sample, (seed, frac))

    def classify(self, seed, frac, b, Linv, klo, khi):
        return self._map_state(_pass_classify, (seed, frac, b, Linv, klo, khi), with_state=False)

    def verify(self, seed, frac, b, tau, tol, pilot_frac, Linv):
        return self._map_state(_pass_verify, (seed, frac, b, tau, tol, pilot_frac, Linv), with_state=True)

    def objective(self, b, tau):
        return float(sum(self._map(_shard_objective, (b, tau))))
