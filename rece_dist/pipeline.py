"""The RECE fits: store -> features -> embedding/clustering -> fits -> artifact document.

Data flows one way and every heavy step is a Ray task over plain numpy data (the recipe's
validation refits and the job itself, ``train``, are ``recipe.py``'s):

1. ``shards.featurize_store``: one task per (configuration, date) shard reads only the
   columns it needs (or takes them from the feature cache) and returns alpha/beta feature
   matrices (natural units), targets and a held-out mask. Settings: ``settings.py``.
2. ``fit_profile`` fits the embedding's pooled P50 model on a capped row sample; the driver
   embeds the configurations (``embedding.LatencyProfile``) and clusters them into specialists.
3. ``sample_rows``: per shard, target and sampled share, the training rows are put in the
   object store once (``fitcache.RowSamples``) and passed by reference to every fit that
   takes that share of the shard; each configuration counts by its share inside its
   specialist (members equally, borrowed configurations through a row sample), and a fit task
   scales and weights its samples itself (``part_rows``).
4. ``fit``: one task per (target, specialist, quantile) solves the pinball LP in cvxpy;
   with non-crossing on, one task per (target, specialist) then removes crossings. A
   specialist above ``max_fit_rows`` is never stacked in one task: a ``fit_sharded`` task
   drives the row reduction, whose passes are tasks over its shards
   (``quantile.fit_quantile_sharded``).
5. The artifact is assembled, and ``evaluate_shard`` tasks score the held-out rows with
   exactly the model the artifact describes; metrics are pooled in tasks too, so the
   driver never holds rows or predictions.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import ray

from . import artifact as artifact_mod
from .config import DeploymentConfig
from .embedding import LatencyProfile, probe_rows, typical_grid
from .ensemble import RECEModel, _qkey
from .errors import StoreError
from .features import FEATURES, TARGET_DEFINITION, TARGET_UNITS, column_scale
from .fitcache import FitBatch, FitCache, RowSamples, fit_key
from .metrics import quantile_metrics
from .progress import RETRIES, gather, log
from .quantile import fit_quantile, fit_quantile_sharded, fit_quantiles, resolve_crossings
from .settings import PROFILE_ROWS_PER_CONFIG, TrainSettings
from .shards import TARGETS, FeatureSet, Shard, featurize_store, probe_ranges
from .specialists import Clustering, cluster

__all__ = ["TARGETS", "FeatureSet", "TrainSettings", "featurize_store", "fit_ensemble"]


def independent_columns(gram: np.ndarray, scale: np.ndarray, rtol: float = 1e-9) -> np.ndarray:
    """Greedy, in feature order: keep a column unless it lies in the span of the kept ones.

    Inside one specialist, configuration-level features (1/tp, weight read time, flags) are
    constant or collinear with the bias. The LP optimum is then not unique and the split
    between such columns would be arbitrary, which matters the moment the model is evaluated
    for another configuration. Dropping them (coefficient 0) makes the fit unique and the
    choice documented: earlier features win. Works on the Gram matrix, so shards only ship
    p x p sums.
    """
    G = gram / np.outer(scale, scale)
    keep: list[int] = []
    for j in range(len(G)):
        if G[j, j] <= 0:
            continue
        if keep:
            K = G[np.ix_(keep, keep)]
            g = G[keep, j]
            resid = G[j, j] - g @ np.linalg.lstsq(K, g, rcond=None)[0]
        else:
            resid = G[j, j]
        if resid > rtol * G[j, j]:
            keep.append(j)
    mask = np.zeros(len(G), dtype=bool)
    mask[keep] = True
    return mask


# --- Ray tasks --------------------------------------------------------------------------------

def shard_rng(shard: Shard, seed: int, *salt: int) -> np.random.Generator:
    """A generator fixed by the seed and the shard's configuration and date (and ``salt``): a
    shard's sampled rows do not depend on which task or process draws them."""
    key = hashlib.sha256(f"{shard.config_id}/{shard.date}".encode()).digest()
    return np.random.default_rng([seed, int.from_bytes(key[:8], "little"), *salt])


@ray.remote(max_retries=RETRIES)
def sample_rows(shard: Shard, target: str, keep: float = 1.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One shard's training rows of a target, every feature column: all of them, or with ``keep``
    < 1 that share (a fixed sample for a shard and seed, so every specialist, quantile and fold
    that takes this share of the shard sees the same rows).

    A task per (shard, target, share), shared through ``fitcache.RowSamples`` by every design
    that takes that share of the shard: e12's evaluation (~600 designs of ~30 shards each) reads
    ~280 samples, where a task per design and shard made ~13,500."""
    train = ~shard.holdout[target]
    if keep < 1:
        train &= shard_rng(shard, seed).random(train.size) < keep
    return shard.X[target][train], shard.y[target][train]


def part_rows(sample: tuple[np.ndarray, np.ndarray], scale: np.ndarray, columns: np.ndarray,
              row_weight: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A sample as one design's part: kept columns in the solver's scale, the target, row weights."""
    X, y = sample
    return X[:, columns] / scale[columns], y, np.full(len(y), row_weight)


@dataclass(frozen=True)
class PartSpec:
    """What turns a design's samples into its parts (``part_rows``): small, sent with every fit task."""

    scale: np.ndarray
    columns: np.ndarray
    row_weights: tuple[float, ...]  # per part: the configuration's row weight / its sampled share


def _stack(spec: PartSpec, samples: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, ...]:
    parts = [part_rows(s, spec.scale, spec.columns, w) for s, w in zip(samples, spec.row_weights)]
    return tuple(np.concatenate([p[i] for p in parts]) for i in range(3))


@ray.remote(max_retries=RETRIES)
def prepare(sample: tuple[np.ndarray, np.ndarray], scale: np.ndarray, columns: np.ndarray,
            row_weight: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``part_rows`` as a task: the parts of a design fitted over its shards (``fit_sharded``),
    whose reduction passes read (X, y, w) from the object store."""
    return part_rows(sample, scale, columns, row_weight)


def config_shares(ids: list[str], members: list[str], borrow: float) -> dict[str, float]:
    """Total weight of each configuration in one specialist's fit: 1 for a member, ``borrow`` else.

    Rows are weighted so each configuration counts by its share, not by its row count. With
    ``borrow`` 0 a specialist sees only its members: inside it, configuration-level features
    are nearly collinear, so their split is set by two or three configurations and extrapolates
    badly to an unseen one. A small share of every other configuration pins those directions
    down (what a global model knows) while the members still dominate the fit; ``borrow`` 1 is
    the global model. A share below 1 is taken as that share of the configuration's rows (a
    fixed random sample) at a member's row weight, not as every row at a small weight: the LP
    stays ~(1 + borrow x others) x the members' rows instead of all rows, and equal row weights
    keep the exact solver's row reduction effective (measured on 12 configurations x 20,000
    steps, 4 specialists: fit stage 794 s with weighted rows, see bench/bench_train.py).
    """
    if borrow <= 0:
        return {c: 1.0 for c in members}
    inside = set(members)
    return {c: 1.0 if c in inside else borrow for c in ids}


# The specialist index under which a pooled target's one model is fitted (every specialist carries it).
POOLED = -1


@dataclass(frozen=True)
class Design:
    """What one specialist's fits of one target train on: per shard (index, weight, sampled share),
    the solver's column scale and kept columns, the members' training rows, the features zero on
    every training row, and the rows the fits will see."""

    parts: list[tuple[int, float, float]]
    scale: np.ndarray
    columns: np.ndarray
    rows: int
    unobserved: np.ndarray
    size: float

    def spec(self) -> PartSpec:
        return PartSpec(self.scale, self.columns, tuple(w / keep for _, w, keep in self.parts))

    def samples(self, fs: FeatureSet, target: str, seed: int, store: RowSamples) -> list[ray.ObjectRef]:
        """The design's training rows, a ``sample_rows`` task per shard (one per share of it,
        whichever design asks first), left in the object store."""
        return [store.get((i, target, keep, seed),
                          lambda i=i, keep=keep: sample_rows.remote(fs.shard_refs[i], target, keep, seed))
                for i, _, keep in self.parts]

    def prepared(self, fs: FeatureSet, target: str, seed: int, store: RowSamples) -> list[ray.ObjectRef]:
        """The design's parts as (X, y, w) objects, one ``prepare`` task per shard (``fit_sharded``)."""
        spec = self.spec()
        return [prepare.remote(r, self.scale, self.columns, w)
                for r, w in zip(self.samples(fs, target, seed, store), spec.row_weights)]


def design(fs: FeatureSet, target: str, by_config: dict[str, list[int]], members: list[str], borrow: float,
           rows_per_config: int | None) -> Design:
    """The design of a specialist with ``members`` among the training configurations ``by_config``.

    Each configuration weighs its share (``config_shares``) whatever its row count; with
    ``rows_per_config`` a configuration's rows are a fixed random sample of at most that many,
    at the row weight that keeps its share."""
    st = fs.stats
    share = config_shares(sorted(by_config), members, borrow)
    idx = [i for c in share for i in by_config[c]]
    col_max = np.vstack([st[i].col_max[target] for i in idx])
    scale = column_scale(col_max)
    cols = independent_columns(sum(st[i].gram[target] for i in idx), scale)
    n_cfg = {c: sum(st[i].train_rows[target] for i in by_config[c]) for c in share}
    n_fit = {c: min(n, rows_per_config or n) for c, n in n_cfg.items()}
    fit_total = sum(n_fit[c] for c in members)
    keep = {c: share[c] * n_fit[c] / n_cfg[c] for c in share if n_cfg[c]}
    used = [i for i in idx if st[i].train_rows[target]]
    parts = [(i, fit_total * share[st[i].config_id] / (len(members) * n_cfg[st[i].config_id]), keep[st[i].config_id])
             for i in used]
    return Design(parts, scale, cols, sum(n_cfg[c] for c in members), col_max.max(axis=0) == 0,
                  sum(st[i].train_rows[target] * keep[st[i].config_id] for i in used))


def fit_profile(fs: FeatureSet, settings: TrainSettings, by_config: dict[str, list[int]],
                cache: FitCache | None = None) -> LatencyProfile:
    """The embedding (``embedding.LatencyProfile``): probe batches at the training configurations'
    typical inputs, and a pooled P50 beta model on at most ``PROFILE_ROWS_PER_CONFIG`` rows per
    configuration (a profile of ~27 log latencies needs no more, and its cost then does not grow
    with the store)."""
    ids = sorted(by_config)
    ranges = probe_ranges(fs, ids, [i for c in ids for i in by_config[c]])
    grid = typical_grid([ranges[c]["beta"] for c in ids])
    cap = min(settings.rows_per_config or PROFILE_ROWS_PER_CONFIG, PROFILE_ROWS_PER_CONFIG)
    d = design(fs, "beta", by_config, ids, 1.0, cap)
    fits: dict[str, Any] = {}
    store = cache.samples if cache is not None else RowSamples()  # capped: a profile's samples are small
    with FitBatch(cache) as batch:  # folds of one evaluation share the profile of equal training shards
        if batch.claim("profile", fit_key("beta profile P50", d.parts, d.scale, d.columns, settings.to_dict())):
            task = (fit_sharded.remote(0.5, settings.l1, settings.solver, settings.seed, int(np.count_nonzero(d.columns)),
                                       d.prepared(fs, "beta", settings.seed, store))
                    if d.size > settings.max_fit_rows else
                    fit.remote(0.5, settings.l1, settings.solver, settings.seed, d.spec(),
                               *d.samples(fs, "beta", settings.seed, store)))
            fits["profile"] = gather([task], "embedding fit")[0]
    batch.complete(fits, {})
    return LatencyProfile(probe_rows({"beta": grid})["beta"], np.asarray(_natural(fits["profile"].coef, d.scale, d.columns)))


def _penalize(p: int) -> np.ndarray:
    mask = np.ones(p, dtype=bool)
    mask[0] = False  # the bias column, like scikit-learn's unpenalised intercept
    return mask


@ray.remote(max_retries=RETRIES)
def fit(tau: float, l1: float, solver: str, seed: int, spec: PartSpec, *samples: tuple[np.ndarray, np.ndarray]):
    X, y, w = _stack(spec, samples)
    return fit_quantile(X, y, tau, weights=w, l1=l1, penalize=_penalize(X.shape[1]), solver=solver, seed=seed)


# Ray ``memory`` a fit over shards reserves: it holds the reduction's random subsets, middle rows
# and LPs, not the shards (bench_scale at 10^7 rows, 1.6-4.3 M-row fits: private memory <= 990 MiB)
SHARDED_FIT_BYTES = 1536 << 20


@ray.remote(max_retries=RETRIES, memory=SHARDED_FIT_BYTES)
def fit_sharded(tau: float, l1: float, solver: str, seed: int, p: int, parts: list[ray.ObjectRef]):
    """An exact fit of a specialist too large to stack (above ``max_fit_rows``), driven from a task.

    The reduction's passes are tasks of their own, each holding one shard; this one holds only
    random subsets and middle rows and solves the small LPs. Blocked on its passes it frees its
    CPU, so many such fits run at once on a cluster (their ``memory`` bounds how many per node)
    and the job's driver holds no rows. ``parts`` stays a list of references: nothing is fetched
    here but what the passes return."""
    return fit_quantile_sharded(parts, tau, l1=l1, penalize=_penalize(p), solver=solver, seed=seed)


# Designs of at most this many rows are fitted in one task, every quantile and the non-crossing
# re-solve together: each of their LPs is one direct cvxpy solve (``quantile.fit._AUTO_REDUCE_FROM``),
# and ``fit_quantiles`` compiles it once and re-solves it warm for the next quantile, where a task
# per quantile would compile it again each time (validation refits are mostly such designs).
BUNDLE_ROWS = 20_000


@ray.remote(max_retries=RETRIES)
def fit_bundle(quantiles: tuple[float, ...], l1: float, solver: str, seed: int, noncrossing: bool, spec: PartSpec,
               *samples: tuple[np.ndarray, np.ndarray]) -> tuple[list, Any]:
    """Every quantile of a small design in one task; the crossing report only with ``noncrossing``."""
    X, y, w = _stack(spec, samples)
    fits, report = fit_quantiles(X, y, quantiles, weights=w, l1=l1, penalize=_penalize(X.shape[1]), solver=solver,
                                 noncrossing=noncrossing, seed=seed)
    return fits, report if noncrossing else None


@ray.remote(max_retries=RETRIES)
def uncross(fits: list, l1: float, solver: str, spec: PartSpec, *samples: tuple[np.ndarray, np.ndarray]):
    X, y, w = _stack(spec, samples)
    return resolve_crossings(X, y, fits, weights=w, l1=l1, penalize=_penalize(X.shape[1]), solver=solver)


def score_shard(doc: dict[str, Any], shard: Shard, cfg: DeploymentConfig, all_rows: bool,
                top_k: int | None, temperature: float | None) -> dict[str, Any]:
    """Predictions for one shard's held-out (or all) rows with the artifact's own model."""
    return predict_with(RECEModel(doc), shard, cfg, all_rows, top_k, temperature)


def predict_with(model: RECEModel, shard: Shard, cfg: DeploymentConfig, all_rows: bool, top_k: int | None,
                 temperature: float | None, masks: Mapping[str, np.ndarray] | None = None) -> dict[str, Any]:
    """Per target: (y, predicted quantiles, rows rearranged) of one shard's held-out (or all) rows,
    or of the rows ``masks`` selects per target (only those are predicted)."""
    w = model.weights(cfg, top_k, temperature)
    out: dict[str, Any] = {}
    for t in TARGETS:
        if masks is not None:
            mask = masks[t]
        else:
            mask = np.ones(len(shard.y[t]), dtype=bool) if all_rows else shard.holdout[t]
        pred = model.predict_matrix(t, shard.X[t][mask], w, model.unseen(cfg))
        out[t] = (shard.y[t][mask], pred.values, pred.rows_sorted)
    return out


evaluate_shard = ray.remote(max_retries=RETRIES)(score_shard)


# --- the driver -------------------------------------------------------------------------------

def fit_ensemble(fs: FeatureSet, settings: TrainSettings, shards: list[int] | None = None,
                 labels: dict[str, int] | None = None, timings: dict[str, Any] | None = None,
                 cache: FitCache | None = None, pooled: Sequence[str] = ()) -> dict[str, Any]:
    """Embed, cluster and fit on the given shards (default: all); returns the artifact document.

    ``timings``, if given, receives wall times of the fit phases and every LP's own seconds
    (kept out of the artifact, whose bytes must not depend on the clock).

    ``labels`` fixes the specialists instead of clustering (baselines: one global group, one
    group per configuration). A target in ``pooled`` gets one model fitted on every training
    configuration, carried by every specialist (``recipe.select_models`` decides which).
    ``cache`` shares specialist fits between calls (``fitcache.py``). The validation refits
    of the recipe (interval calibration, model selection) are ``recipe.fit_recipe``'s.
    """
    shards = list(range(len(fs.stats))) if shards is None else shards
    ids = sorted({fs.stats[i].config_id for i in shards})
    if not ids:
        raise StoreError("no training shards selected")
    by_config: dict[str, list[int]] = {}
    for i in shards:
        by_config.setdefault(fs.stats[i].config_id, []).append(i)
    profile = fit_profile(fs, settings, by_config, cache)
    E = np.vstack([profile(fs.configs[c]) for c in ids])
    if labels is None:
        clus = cluster(E, settings.specialists, settings.clustering, settings.seed)
    else:
        clus = Clustering.given(E, np.array([labels[c] for c in ids]))
    members = {j: [c for c, lab in zip(ids, clus.labels) if lab == j] for j in range(clus.k)}
    sil = "n/a" if clus.silhouette is None else f"{clus.silhouette:.3f}"
    log(f"[rece] {len(ids)} configurations -> {clus.k} specialists ({clus.method}, silhouette {sil})")

    # samples + fit, every (target, specialist, quantile) an independent task, but small designs
    designs: dict[tuple[str, int], Design] = {}
    fit_refs: dict[tuple[str, int], list[ray.ObjectRef]] = {}
    inputs: dict[tuple[str, int], tuple[PartSpec, list[ray.ObjectRef]]] = {}  # per design: its spec and samples
    # samples outlive this call (in the cache) only under a row cap, which bounds them; uncapped,
    # they are every training row and live as long as this call's fits, like the fits' inputs did
    store = cache.samples if cache is not None and settings.rows_per_config else RowSamples()
    sharded: list[tuple[str, int]] = []
    bundled: set[tuple[str, int]] = set()
    crossing: dict[tuple[str, int], Any] = {}
    uncrossing = settings.noncrossing and len(settings.quantiles) > 1
    todo: list[tuple[float, tuple[str, int], Any, tuple]] = []  # (rows, key, task, its arguments)
    groups = {t: {POOLED: ids} if t in pooled else members for t in TARGETS}
    with FitBatch(cache) as batch:  # on an error, whoever waits for this call's specialists gets it
        for t in TARGETS:
            for j, cids in groups[t].items():
                d = designs[(t, j)] = design(fs, t, by_config, cids, settings.borrow, settings.rows_per_config)
                if not batch.claim((t, j), fit_key(t, d.parts, d.scale, d.columns, settings.to_dict())):
                    continue
                spec, refs = inputs[(t, j)] = d.spec(), d.samples(fs, t, settings.seed, store)
                if d.size > settings.max_fit_rows:
                    sharded.append((t, j))
                    log(f"[rece] {t} specialist {j}: more than {settings.max_fit_rows:,} rows, fitted over "
                        f"{len(refs)} shards; crossings left to rearrangement at prediction (--rows-per-config "
                        f"fits a fixed sample per configuration instead: hours less at 10^8 rows, docs/scaling.md)")
                    todo.append((d.size, (t, j), fit_sharded,
                                 (int(np.count_nonzero(d.columns)), d.prepared(fs, t, settings.seed, store))))
                elif d.size <= BUNDLE_ROWS:
                    bundled.add((t, j))
                    todo.append((d.size, (t, j), fit_bundle, (spec, *refs)))
                else:
                    todo.append((d.size, (t, j), fit, (spec, *refs)))
                fit_refs[(t, j)] = []  # filled below; the keys keep the artifact's order
        # largest first (LPT order): the longest fit must not start last and run alone at the end
        for _, key, task, args in sorted(todo, key=lambda x: -x[0]):
            fit_refs[key] = ([task.remote(settings.quantiles, settings.l1, settings.solver, settings.seed, uncrossing, *args)]
                             if key in bundled else
                             [task.remote(q, settings.l1, settings.solver, settings.seed, *args) for q in settings.quantiles])
        flat = [r for refs in fit_refs.values() for r in refs]
        t0 = time.monotonic()
        lps = len(fit_refs) * len(settings.quantiles)
        fitted = iter(gather(flat, f"fits ({lps} LPs)" if len(flat) == lps else f"fits ({lps} LPs in {len(flat)} tasks)")
                      if flat else [])
        fits = {key: [next(fitted) for _ in refs] for key, refs in fit_refs.items()}
        for key in bundled:
            (fits[key], report), = fits[key]
            if report is not None:
                crossing[key] = report
        t1 = time.monotonic()
        if timings is not None:  # the independent fits' own times, before non-crossing replaces them
            timings.update(lp_seconds=[f.seconds for fl in fits.values() for f in fl],
                           lp_rows=[f.n_rows for fl in fits.values() for f in fl], design_inputs=dict(inputs),
                           design_rows={k: fl[0].n_rows for k, fl in fits.items()},
                           design_cols={k: int(np.count_nonzero(designs[k].columns)) for k in fits})
        if uncrossing:
            keys = [k for k in fits if k not in sharded and k not in bundled]
            refs = [uncross.remote(fits[k], settings.l1, settings.solver, inputs[k][0], *inputs[k][1]) for k in keys]
            for k, (new_fits, report) in zip(keys, gather(refs, "non-crossing") if refs else []):
                fits[k], crossing[k] = new_fits, report
        if timings is not None:
            timings.update(fit_wall_s=t1 - t0, noncrossing_wall_s=time.monotonic() - t1)
    batch.complete(fits, crossing)
    dates = sorted({fs.stats[i].date for i in shards})
    return _assemble(fs.configs, ids, profile, clus, members, fits, designs, crossing, settings, dates, pooled)


def score_refs(doc: dict[str, Any], fs: FeatureSet, shards: list[int], rows: str = "holdout",
               top_k: int | None = None, temperature: float | None = None) -> list[ray.ObjectRef]:
    """One ``evaluate_shard`` task per shard; the predictions stay in the object store.

    ``rows`` is ``"holdout"`` (the held-out slice, for seen configurations) or ``"all"``
    (every row, for configurations or dates the fit never saw).
    """
    if rows not in ("holdout", "all"):
        raise ValueError("rows must be 'holdout' or 'all'")
    doc_ref = ray.put(doc)
    return [evaluate_shard.remote(doc_ref, fs.shard_refs[i], fs.configs[fs.stats[i].config_id], rows == "all",
                                  top_k, temperature) for i in shards]


def predict_shards(doc: dict[str, Any], fs: FeatureSet, shards: list[int], rows: str = "holdout",
                   top_k: int | None = None, temperature: float | None = None) -> list[dict[str, Any]]:
    """Per shard and target: (y, predicted quantiles, rows rearranged) from the artifact's model,
    fetched to the caller (``score_refs`` for what ``rows`` selects)."""
    return gather(score_refs(doc, fs, shards, rows, top_k, temperature), "evaluation")


def _natural(coef: np.ndarray, scale: np.ndarray, columns: np.ndarray) -> list[float]:
    """Solver coefficients (scaled, kept columns) -> natural units over every feature (0 if dropped)."""
    out = np.zeros(len(scale))
    out[columns] = np.asarray(coef) / scale[columns]
    return out.tolist()


def _assemble(configs, ids, profile: LatencyProfile, clus: Clustering, members, fits, designs: dict[tuple[str, int], Design],
              crossing, settings: TrainSettings, dates: list[str], pooled: Sequence[str]) -> dict[str, Any]:
    specialists = []
    for j, cids in members.items():
        key = {t: (t, POOLED if t in pooled else j) for t in TARGETS}
        dj = {t: designs[key[t]] for t in TARGETS}
        specialists.append({
            "id": j,
            "centroid": clus.centroids[j].tolist(),
            "members": cids,
            "rows": {t: dj[t].rows for t in TARGETS},
            "coefficients": {t: {_qkey(f.tau): _natural(f.coef, dj[t].scale, dj[t].columns) for f in fits[key[t]]}
                             for t in TARGETS},
            "solver_scale": {t: dj[t].scale.tolist() for t in TARGETS},
            "fitted_columns": {t: dj[t].columns.tolist() for t in TARGETS},
            "unobserved_columns": {t: dj[t].unobserved.tolist() for t in TARGETS},
            "fit": {t: [{"tau": f.tau, "objective": f.objective, "status": f.status, "rows_solved": f.n_solved_rows,
                         "rounds": f.rounds} for f in fits[key[t]]] for t in TARGETS},
            "crossings": {t: _crossing_dict(crossing.get(key[t])) for t in TARGETS},
        })
    return {
        "schema_version": artifact_mod.SCHEMA_VERSION,
        "quantiles": list(settings.quantiles),
        "targets": {t: {"definition": TARGET_DEFINITION[t], "units": TARGET_UNITS[t],
                        "features": [{"name": f.name, "formula": f.formula, "units": f.units} for f in FEATURES[t]],
                        "model": "pooled" if t in pooled else "specialists"}
                    for t in TARGETS},
        "embedding": profile.to_doc(),
        "mixing": {"rule": "softmax-rms-distance", "temperature": settings.temperature, "top_k": settings.top_k,
                   "noncrossing": "monotone-rearrangement"},
        "clustering": {"method": clus.method, "k_requested": clus.k_requested, "k": clus.k,
                       "silhouette": clus.silhouette},
        "specialists": specialists,
        "configurations": {c: {"label": configs[c].label, "specialist": int(clus.labels[i]), **configs[c].to_dict()}
                           for i, c in enumerate(ids)},
        "training": {
            "rows": {t: int(sum(d.rows for (tt, j), d in designs.items() if tt == t)) for t in TARGETS},
            "configurations": len(ids),
            "date_window": [dates[0], dates[-1]],
            "settings": settings.to_dict(),
            "settings_sha256": hashlib.sha256(json.dumps(settings.to_dict(), sort_keys=True).encode()).hexdigest(),
            "versions": artifact_mod.library_versions(),
            "git_commit": artifact_mod.git_commit(),
        },
    }


def _crossing_dict(report: Any) -> dict[str, Any] | None:
    return None if report is None else dataclasses.asdict(report)


@ray.remote(max_retries=RETRIES)
def _pooled_metrics(target: str, quantiles: tuple[float, ...], *outs: dict[str, Any]) -> dict[str, Any]:
    """``quantile_metrics`` over one group's pooled held-out rows, in a task: the predictions go
    from the scoring tasks to this one through the object store, never to the driver."""
    y = np.concatenate([o[target][0] for o in outs])
    m = quantile_metrics(y, np.vstack([o[target][1] for o in outs]), quantiles)
    m["rows_rearranged"] = float(sum(o[target][2] for o in outs))
    return m


def held_out_metrics(doc: dict[str, Any], fs: FeatureSet, settings: TrainSettings) -> dict[str, Any]:
    """Held-out metrics per specialist and overall, from the artifact's own predictions.

    The driver holds only the metric dicts, whatever the row count; one task per (target,
    group) pools that group's held-out predictions (a tenth of its rows by default)."""
    shards = list(range(len(fs.stats)))
    outs = score_refs(doc, fs, shards)
    spec_of = {c: v["specialist"] for c, v in doc["configurations"].items()}
    groups: dict[str, list[int]] = {"all": shards}
    for i in shards:
        groups.setdefault(f"specialist_{spec_of[fs.stats[i].config_id]}", []).append(i)
    keys = [(t, name) for t in TARGETS for name in sorted(groups)]
    refs = [_pooled_metrics.remote(t, settings.quantiles, *[outs[i] for i in groups[name]]) for t, name in keys]
    out: dict[str, Any] = {"held_out": {t: {} for t in TARGETS}}
    for (t, name), m in zip(keys, gather(refs, "held-out metrics")):
        out["held_out"][t][name] = m
    return out
