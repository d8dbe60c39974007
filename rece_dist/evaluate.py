"""Does RECE transfer? Validation protocols, baselines, metric tables, embedding validation, tuning.

RECE's claim is that specialists mixed by configuration similarity predict quantiles for a
configuration the fit never saw, better than the alternatives. Everything here re-fits on
subsets of one featurized store (``pipeline.fit_ensemble``, Ray tasks) and scores the rows
the fit did not see:

- **Protocols** hold out one configuration (``loco``), one GPU type (``logo``), one model
  (``lomo``) or the newest date (``temporal``). *Seen* rows are the held-out slice
  (``features.holdout_mask``) of the training shards; *unseen* rows are every row of the
  held-out configurations or dates.
- **Methods**, fitted on exactly the same training shards of each fold: one global quantile
  model, per-configuration models (scored only where the configuration has its own training
  data), the nearest configuration as a donor (per-configuration models mixed with top-1 by
  embedding similarity, scored only where the configuration has no data), and RECE mixed
  densely and sparsely (top-k).
- **Metrics** are ``metrics.quantile_metrics`` over pooled rows, plus a scale-free relative
  pinball loss (pinball / mean |y|) averaged per configuration, which is what tuning
  minimises: latencies differ tenfold between deployments, and a pooled loss in microseconds
  would let the slowest configuration decide.
- **Embedding validation** asks whether embedding distance tracks latency behaviour (Spearman
  over configuration pairs, with a Mantel permutation p-value because pairs share
  configurations), and how good the clusters are.
- **Tuning** picks K, temperature and top-k by grouped cross-validation over configurations.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import polars as pl
import ray
from scipy.stats import spearmanr
from sklearn.metrics import silhouette_score

from .config import DeploymentConfig, config_vector
from .ensemble import RECEModel, rows_frame
from .errors import ArtifactError, ReceError
from .features import FEATURES, feature_matrix, kv_read_us_per_usage
from .metrics import pinball, quantile_metrics
from .pipeline import TARGETS, FeatureSet, TrainSettings, evaluate_shard, fit_ensemble
from .progress import gather, log
from .specialists import Embedding, cluster

if TYPE_CHECKING:
    from .donors import DonorExperiment
    from .drift import DriftReport

PROTOCOLS = ("loco", "logo", "lomo", "temporal")
PROTOCOL_TITLES = {
    "loco": "leave one configuration out",
    "logo": "leave one GPU out",
    "lomo": "leave one model out",
    "temporal": "train on older dates, test on the newest",
    "cv": "grouped cross-validation over configurations",
}
SPLITS = ("seen", "unseen")


class EvaluationError(ReceError):
    """A protocol cannot run on this store (too few configurations, GPUs, models or dates)."""


# --- folds ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Fold:
    """One train/test split of a FeatureSet's shards (indices into ``fs.stats``)."""

    protocol: str
    name: str
    train: tuple[int, ...]        # shards the fits see (their training rows)
    seen: tuple[int, ...]         # shards scored on their held-out slice
    unseen: tuple[int, ...]       # shards scored on every row
    held_out_configs: frozenset[str] = frozenset()
    held_out_dates: frozenset[str] = frozenset()


GROUP_OF: dict[str, Callable[[DeploymentConfig], str]] = {
    "loco": lambda c: c.config_id,
    "logo": lambda c: c.gpu.name,
    "lomo": lambda c: c.model.name,
}


def short_label(cfg: DeploymentConfig) -> str:
    """Model, GPU and TP: short enough for a plot axis, and what tells most configurations apart."""
    return f"{cfg.model.name}/{cfg.gpu.name}/tp{cfg.serving.tp}"


def group_folds(fs: FeatureSet, protocol: str) -> list[Fold]:
    """Hold out every configuration of one group (configuration, GPU or model) per fold."""
    key = GROUP_OF[protocol]
    ids = fs.config_ids
    groups: dict[str, set[str]] = {}
    for c in ids:
        groups.setdefault(key(fs.configs[c]), set()).add(c)
    if len(groups) < 2:
        raise EvaluationError(f"{protocol} ({PROTOCOL_TITLES[protocol]}) needs at least 2 distinct groups; "
                              f"the store has {len(groups)}")
    folds = []
    for g, out in sorted(groups.items()):
        train = tuple(fs.shards_of(set(ids) - out))
        name = fs.configs[g].label if protocol == "loco" else g
        folds.append(Fold(protocol, name, train, train, tuple(fs.shards_of(out)), frozenset(out)))
    return folds


def temporal_folds(fs: FeatureSet, test_dates: int = 1) -> list[Fold]:
    """One fold: train on every date but the newest ``test_dates``, test on those."""
    dates = fs.dates
    if len(dates) <= test_dates:
        raise EvaluationError(f"temporal validation needs more than {test_dates} date(s); the store has {len(dates)}")
    test = set(dates[-test_dates:])
    train = tuple(i for i, st in enumerate(fs.stats) if st.date not in test)
    unseen = tuple(i for i, st in enumerate(fs.stats) if st.date in test)
    trained = {fs.stats[i].config_id for i in train}
    new_configs = frozenset(fs.stats[i].config_id for i in unseen) - trained
    return [Fold("temporal", f"{min(test)}..{max(test)}", train, train, unseen, new_configs, frozenset(test))]


def config_kfold(fs: FeatureSet, n_folds: int | None = None, seed: int = 0) -> list[Fold]:
    """Grouped CV over configurations: ``n_folds`` random groups, or one per configuration (None)."""
    ids = fs.config_ids
    if len(ids) < 2:
        raise EvaluationError("cross-validation over configurations needs at least 2 configurations")
    if n_folds is None or n_folds >= len(ids):
        return [dataclasses.replace(f, protocol="cv") for f in group_folds(fs, "loco")]
    if n_folds < 2:
        raise EvaluationError("--folds must be at least 2")
    order = np.random.default_rng(seed).permutation(len(ids))
    folds = []
    for k in range(n_folds):
        out = {ids[i] for i in order[k::n_folds]}
        train = tuple(fs.shards_of(set(ids) - out))
        folds.append(Fold("cv", f"fold {k + 1}/{n_folds}", train, train, tuple(fs.shards_of(out)), frozenset(out)))
    return folds


def protocol_folds(fs: FeatureSet, protocol: str) -> list[Fold]:
    if protocol == "temporal":
        return temporal_folds(fs)
    if protocol in GROUP_OF:
        return group_folds(fs, protocol)
    raise EvaluationError(f"unknown protocol {protocol!r}; use one of {', '.join(PROTOCOLS)} or all")


# --- fitting, once per distinct (shards, kind, K) ------------------------------------------------

@dataclass(frozen=True)
class FitRequest:
    train: tuple[int, ...]
    kind: str                    # "rece" (clustered), "global" (one group), "per_config" (one group each)
    specialists: int | None = None  # K for "rece"; None: the settings' K
    borrow: float | None = None     # for "rece"; None: the settings' borrow


def fit_labels(kind: str, config_ids: Iterable[str]) -> dict[str, int] | None:
    """Forced specialists for a baseline (None: let RECE cluster)."""
    ids = sorted(config_ids)
    if kind == "rece":
        return None
    if kind == "global":
        return {c: 0 for c in ids}
    if kind == "per_config":
        return {c: i for i, c in enumerate(ids)}
    raise ValueError(f"unknown fit kind {kind!r}")


class Fitter:
    """Runs ``fit_ensemble`` for fit requests, each distinct one once.

    Folds, baselines and sweeps ask for overlapping fits (LOCO's RECE fit is also the sweep's
    fit at the default K); caching them halves a full evaluation. Distinct fits run a few at a
    time from driver threads so a cluster is not idle between one fit's LPs and the next.
    """

    def __init__(self, fs: FeatureSet, settings: TrainSettings, parallel: int = 3):
        self.fs = fs
        self.settings = settings
        self.parallel = parallel
        self.docs: dict[FitRequest, dict[str, Any]] = {}
        self._lock = threading.Lock()

    def _key(self, req: FitRequest) -> FitRequest:
        """Canonical form: sorted shards; K and borrow only matter (and default to the settings')
        for RECE, and borrow not with one specialist. Baselines are what they say: the global and
        the per-configuration fits borrow nothing."""
        if req.kind != "rece":
            return FitRequest(tuple(sorted(req.train)), req.kind, None, 0.0)
        k = req.specialists or self.settings.specialists
        borrow = self.settings.borrow if req.borrow is None else req.borrow
        return FitRequest(tuple(sorted(req.train)), req.kind, k, borrow if k > 1 else 0.0)

    def _fit(self, req: FitRequest) -> dict[str, Any]:
        settings = dataclasses.replace(self.settings, specialists=req.specialists or self.settings.specialists,
                                       borrow=req.borrow)
        ids = {self.fs.stats[i].config_id for i in req.train}
        return fit_ensemble(self.fs, settings, list(req.train), fit_labels(req.kind, ids))

    def fit_many(self, requests: Sequence[FitRequest], label: str = "fits") -> list[dict[str, Any]]:
        keys = [self._key(r) for r in requests]
        todo = list(dict.fromkeys(k for k in keys if k not in self.docs))
        if todo:
            log(f"[evaluate] {label}: {len(todo)} fit(s) ({len(keys) - len(todo)} reused)")
            t0, done = time.monotonic(), 0
            pool = ThreadPoolExecutor(max_workers=self.parallel)
            try:
                for key, doc in zip(todo, pool.map(self._fit, todo)):
                    with self._lock:
                        self.docs[key] = doc
                    done += 1
                    log(f"[evaluate] {label}: fit {done}/{len(todo)} done ({time.monotonic() - t0:.0f} s)")
            finally:  # on Ctrl-C or an error, drop the fits not yet started instead of running them all
                pool.shutdown(wait=False, cancel_futures=True)
        return [self.docs[k] for k in keys]


# --- predictions and scored cells ------------------------------------------------------------

@dataclass(frozen=True)
class Cell:
    """One method's predictions for one configuration's rows of one target, fold and split."""

    protocol: str
    fold: str
    method: str
    split: str
    config_id: str
    target: str
    y: np.ndarray
    values: np.ndarray  # (rows, quantiles)


@dataclass(frozen=True)
class PredictJob:
    """Score ``shards`` with ``doc``; ``top_k`` None means dense (every specialist)."""

    doc: dict[str, Any]
    shards: tuple[int, ...]
    all_rows: bool
    top_k: int | None
    temperature: float
    tag: tuple[str, str, str, str]  # protocol, fold, method, split


def own_mixing_job(doc: dict[str, Any], shards: tuple[int, ...], tag: tuple[str, str, str, str]) -> PredictJob:
    """Score the held-out slice of ``shards`` exactly as the artifact says it mixes."""
    mix = doc["mixing"]
    return PredictJob(doc, shards, False, mix.get("top_k"), float(mix["temperature"]), tag)


def predict_cells(fs: FeatureSet, jobs: Sequence[PredictJob], label: str = "predictions") -> list[Cell]:
    """Run every job's shard predictions as Ray tasks, gathered once; one Cell per (job, shard, target)."""
    doc_refs: dict[int, ray.ObjectRef] = {}
    refs, owners = [], []
    for job in jobs:
        ref = doc_refs.setdefault(id(job.doc), ray.put(job.doc))
        k = len(job.doc["specialists"]) if job.top_k is None else job.top_k
        for i in job.shards:
            cid = fs.stats[i].config_id
            refs.append(evaluate_shard.remote(ref, fs.shard_refs[i], fs.configs[cid], job.all_rows, k, job.temperature))
            owners.append((job, cid))
    cells = []
    for (job, cid), out in zip(owners, gather(refs, label) if refs else []):
        for t in TARGETS:
            y, values, _ = out[t]
            if len(y):
                cells.append(Cell(*job.tag, cid, t, y, values))
    return cells


# --- aggregation --------------------------------------------------------------------------------

def relative_pinball(y: np.ndarray, values: np.ndarray, quantiles: Sequence[float]) -> float:
    """Mean pinball loss over the quantiles divided by mean |y|: comparable across configurations."""
    if not len(y):
        return float("nan")
    loss = np.mean([pinball(y, values[:, j], tau) for j, tau in enumerate(quantiles)])
    return float(loss / np.mean(np.abs(y)))


def aggregate(cells: Iterable[Cell], quantiles: Sequence[float], by: Sequence[str],
              attrs: Mapping[str, Mapping[str, str]] | None = None) -> pl.DataFrame:
    """Metrics per group of cells (``by``: Cell fields, or keys of ``attrs[config_id]`` like gpu).

    Rows are pooled within a group for ``metrics.quantile_metrics`` and ``rel_pinball``;
    ``rel_pinball_macro`` is the mean over the group's configurations of each one's own
    relative pinball, so every configuration counts equally.
    """
    qs = tuple(quantiles)
    groups: dict[tuple[str, ...], list[Cell]] = {}
    for c in cells:
        key = tuple(str(getattr(c, f)) if f in Cell.__dataclass_fields__ else attrs[c.config_id][f] for f in by)
        groups.setdefault(key, []).append(c)
    rows = []
    for key, cs in sorted(groups.items()):
        y = np.concatenate([c.y for c in cs])
        vals = np.vstack([c.values for c in cs])
        per_config: dict[str, list[Cell]] = {}
        for c in cs:
            per_config.setdefault(c.config_id, []).append(c)
        macro = np.mean([relative_pinball(np.concatenate([c.y for c in v]), np.vstack([c.values for c in v]), qs)
                         for v in per_config.values()])
        rows.append({**dict(zip(by, key)), **quantile_metrics(y, vals, qs), "rel_pinball": relative_pinball(y, vals, qs),
                     "rel_pinball_macro": float(macro), "configs": len(per_config)})
    return pl.DataFrame(rows)


# --- methods and protocols ----------------------------------------------------------------------

@dataclass(frozen=True)
class Method:
    """A way to predict a fold's rows: which fit, how it mixes, which rows it is defined for.

    ``scope`` "own": only configurations with training data in the fold (per-configuration
    models); "other": only configurations without (a donor for a configuration that has data
    is just its own model); "all": every row.
    """

    key: str
    title: str
    fit: str
    top_k: int | None   # None: dense
    scope: str
    not_defined: str = ""  # why a split has no numbers, for the table


def methods(sparse_top_k: int = 2) -> tuple[Method, ...]:
    return (
        Method("global", "global model (1 specialist)", "global", None, "all"),
        Method("per_config", "per-configuration models", "per_config", 1, "own",
               "needs the configuration's own data"),
        Method("donor", "nearest configuration as donor", "per_config", 1, "other",
               "defined only for configurations without data"),
        Method("rece_dense", "RECE, dense mixing", "rece", None, "all"),
        Method(f"rece_top{sparse_top_k}", f"RECE, top-{sparse_top_k} mixing", "rece", sparse_top_k, "all"),
    )


def _scoped(fs: FeatureSet, shards: Sequence[int], fold: Fold, scope: str) -> tuple[int, ...]:
    trained = {fs.stats[i].config_id for i in fold.train}
    if scope == "own":
        return tuple(i for i in shards if fs.stats[i].config_id in trained)
    if scope == "other":
        return tuple(i for i in shards if fs.stats[i].config_id not in trained)
    return tuple(shards)


def check_fold_docs(fs: FeatureSet, fold: Fold, docs: Mapping[str, dict[str, Any]]) -> None:
    """Refuse to score a fold whose fits saw a held-out configuration or date (a bug, not bad input)."""
    for kind, doc in docs.items():
        leaked = set(doc["configurations"]) & fold.held_out_configs
        first, last = doc["training"]["date_window"]
        if leaked or any(first <= d <= last for d in fold.held_out_dates):
            raise AssertionError(f"{fold.protocol} fold {fold.name}: the {kind} fit saw held-out data "
                                 f"(configurations {sorted(leaked)}, window {first}..{last})")


@dataclass
class ProtocolRun:
    """A protocol's cells plus the documents fitted per fold (kept so tests and reports can audit them)."""

    protocol: str
    folds: list[Fold]
    docs: list[dict[str, dict[str, Any]]]  # per fold: fit kind -> artifact document
    cells: list[Cell]


def run_protocol(fitter: Fitter, folds: Sequence[Fold], meths: Sequence[Method], temperature: float) -> ProtocolRun:
    """Fit every method's model on each fold's training shards, then score seen and unseen rows."""
    fs = fitter.fs
    protocol = folds[0].protocol
    kinds = sorted({m.fit for m in meths})
    docs_flat = fitter.fit_many([FitRequest(f.train, k) for f in folds for k in kinds], f"{protocol} fits")
    docs = [dict(zip(kinds, docs_flat[i * len(kinds):(i + 1) * len(kinds)])) for i in range(len(folds))]
    jobs = []
    for fold, fd in zip(folds, docs):
        check_fold_docs(fs, fold, fd)
        for m in meths:
            for split, shards, all_rows in (("seen", fold.seen, False), ("unseen", fold.unseen, True)):
                scoped = _scoped(fs, shards, fold, m.scope)
                if scoped:
                    jobs.append(PredictJob(fd[m.fit], scoped, all_rows, m.top_k, temperature,
                                           (protocol, fold.name, m.key, split)))
    return ProtocolRun(protocol, list(folds), docs, predict_cells(fs, jobs, f"{protocol} predictions"))


# --- embedding validation -----------------------------------------------------------------------

# Probe inputs recovered exactly from a configuration's features: (feature, divisor, squared),
# raw = (sqrt(feature) if squared else feature) * divisor(cfg).
PROBE_INPUTS: dict[str, dict[str, tuple[str, Callable[[DeploymentConfig], float], bool]]] = {
    "beta": {"prefill_tokens": ("prefill_tokens", lambda c: 1.0, False),
             "decode_tokens": ("decode_tokens", lambda c: 1.0, False),
             "kv_usage_gpu_ratio": ("kv_read_us", lambda c: 1.0 / kv_read_us_per_usage(c), False)},
    "alpha": {"prompt_tokens": ("prompt_frac", lambda c: c.serving.max_model_len, False),
              "waiting_depth": ("queue_fill", lambda c: c.serving.max_num_seqs, False),
              "running_depth": ("running_fill", lambda c: c.serving.max_num_seqs, False),
              "kv_usage_gpu_ratio": ("kv_usage", lambda c: 1.0, False)},
}


@ray.remote
def input_ranges(cfg: DeploymentConfig, *shards: Any) -> dict[str, dict[str, tuple[float, float, float]]]:
    """10th, 50th and 90th percentile of each probe input over one configuration's rows."""
    out: dict[str, dict[str, tuple[float, float, float]]] = {}
    for t, inputs in PROBE_INPUTS.items():
        names = [f.name for f in FEATURES[t]]
        X = np.vstack([sh.X[t] for sh in shards])
        out[t] = {}
        for var, (feat, divisor, squared) in inputs.items():
            col = X[:, names.index(feat)]
            raw = (np.sqrt(np.clip(col, 0, None)) if squared else col) * divisor(cfg)
            out[t][var] = tuple(float(v) for v in np.percentile(raw, [10, 50, 90])) if len(raw) else (0.0,) * 3
    return out


def common_grid(ranges: Sequence[Mapping[str, tuple[float, float, float]]]
                ) -> tuple[dict[str, list[float]], dict[str, int]]:
    """Per input: low, middle and high of the intersection of every configuration's 10-90% range.

    Each configuration's own model is then evaluated only where all of them have data, so
    behaviour distance is not an artefact of extrapolation. An input without a common range is
    pinned at the value inside the most configurations' ranges (ties: the smallest); those
    inputs are returned with that count.
    """
    grid, pinned = {}, {}
    for var in ranges[0]:
        lo = max(r[var][0] for r in ranges)
        hi = min(r[var][2] for r in ranges)
        if lo <= hi:
            grid[var] = sorted({lo, (lo + hi) / 2, hi})
            continue
        ends = sorted({e for r in ranges for e in (r[var][0], r[var][2])})
        inside = [sum(r[var][0] <= x <= r[var][2] for r in ranges) for x in ends]
        best = int(np.argmax(inside))
        grid[var], pinned[var] = [ends[best]], inside[best]
    return grid, pinned


def probe_rows(grids: Mapping[str, Mapping[str, Sequence[float]]]) -> dict[str, pl.DataFrame]:
    """Trace-like rows for every combination of the grid values (the columns ``feature_matrix`` reads).

    Beta probes are batches of P prefill and D decode tokens with D + (P > 0) running requests;
    every other column takes the prediction input's documented default (``rows_frame``: no KV
    offload traffic, P + D scheduled tokens, one prefilling request).
    """
    out = {}
    for t, grid in grids.items():
        rows = [{k: float(v) for k, v in zip(grid, combo)} for combo in itertools.product(*grid.values())]
        if t == "beta":
            for r in rows:
                r["running_depth"] = r["decode_tokens"] + float(r["prefill_tokens"] > 0)
        out[t] = rows_frame(t, rows, "probe grid")
    return out


def behaviour_vectors(per_config_doc: Mapping[str, Any], configs: Mapping[str, DeploymentConfig],
                      probes: Mapping[str, pl.DataFrame]) -> dict[str, np.ndarray]:
    """Per target: (configs x probes) log P50 of each configuration's own model on the probe grid.

    Logs, so behaviour distance is a typical latency *ratio*; predictions below 1 us (linear
    models extrapolating) are clipped there.
    """
    model = RECEModel(per_config_doc)
    ids = sorted(configs)
    j50 = model.quantiles.index(0.5) if 0.5 in model.quantiles else len(model.quantiles) // 2
    out = {}
    for t in TARGETS:
        rows = []
        for c in ids:
            w = np.zeros(len(model.centroids))
            w[model.members[c]] = 1.0
            pred = model.predict_matrix(t, feature_matrix(probes[t], configs[c], t), w)
            rows.append(np.log(np.clip(pred.values[:, j50], 1.0, None)))
        out[t] = np.vstack(rows)
    return out


def pair_distances(M: np.ndarray, metric: str) -> np.ndarray:
    """Condensed (i < j) distances between rows: "cosine" (1 - cos), "euclidean" or "rms"."""
    n = len(M)
    iu = np.triu_indices(n, 1)
    if metric == "cosine":
        norms = np.linalg.norm(M, axis=1)
        U = M / np.where(norms > 1e-12, norms, 1.0)[:, None]
        return (1.0 - U @ U.T)[iu]
    diff = M[:, None, :] - M[None, :, :]
    if metric == "euclidean":
        return np.sqrt((diff ** 2).sum(axis=2))[iu]
    if metric == "rms":
        return np.sqrt((diff ** 2).mean(axis=2))[iu]
    raise ValueError(f"unknown metric {metric!r}")


def mantel(d_a: np.ndarray, d_b: np.ndarray, n: int, permutations: int = 999, seed: int = 0) -> tuple[float, float]:
    """Spearman rho between two condensed distance vectors and its one-sided Mantel p-value.

    Pairs share configurations, so they are not independent and scipy's p-value would be too
    small; permuting the configurations of one matrix keeps that dependence.
    """
    rho = float(spearmanr(d_a, d_b).statistic)
    if not np.isfinite(rho):
        return float("nan"), float("nan")
    iu = np.triu_indices(n, 1)
    B = np.zeros((n, n))
    B[iu] = d_b
    B = B + B.T
    rng = np.random.default_rng(seed)
    hits = 0
    for _ in range(permutations):
        p = rng.permutation(n)
        hits += spearmanr(d_a, B[np.ix_(p, p)][iu]).statistic >= rho - 1e-12
    return rho, (1 + hits) / (1 + permutations)


@dataclass
class EmbeddingCheck:
    config_ids: list[str]
    embedded: np.ndarray                 # (configs, d), standardised on these configurations
    emb_distance: np.ndarray             # condensed cosine distance (what mixing uses)
    behaviour_distance: dict[str, np.ndarray]  # per target, condensed RMS log-latency difference
    spearman: dict[str, dict[str, float]]      # target -> {"cosine", "euclidean", "p_cosine"}
    clusters: pl.DataFrame               # per K: silhouette, sizes, behaviour silhouette
    probe_grid: dict[str, dict[str, list[float]]]  # per target: the probe values of each input
    pinned: dict[str, dict[str, int]]    # per target: inputs without a common range -> configurations covering the pin
    clipped: dict[str, list[str]]        # per target: configurations whose own P50 fell below 1 us on the grid


def embedding_check(fs: FeatureSet, per_config_doc: Mapping[str, Any], settings: TrainSettings,
                    k_grid: Sequence[int]) -> EmbeddingCheck:
    """Does distance in the configuration embedding track distance in latency behaviour?"""
    ids = sorted(per_config_doc["configurations"])
    configs = {c: fs.configs[c] for c in ids}
    V = np.vstack([config_vector(configs[c]) for c in ids])
    E = Embedding.fit(V)(V)
    ranges = gather([input_ranges.remote(configs[c], *[fs.shard_refs[i] for i in fs.shards_of([c])]) for c in ids],
                    "probe ranges")
    grids, pinned = {}, {}
    for t in TARGETS:
        grids[t], pinned[t] = common_grid([r[t] for r in ranges])
    B = behaviour_vectors(per_config_doc, configs, probe_rows(grids))
    d_cos, d_euc = pair_distances(E, "cosine"), pair_distances(E, "euclidean")
    d_beh = {t: pair_distances(B[t], "rms") for t in TARGETS}
    spear = {}
    for t in TARGETS:
        rho, p = mantel(d_cos, d_beh[t], len(ids), seed=settings.seed) if len(ids) >= 3 else (float("nan"),) * 2
        spear[t] = {"cosine": rho, "p_cosine": p, "euclidean": float(spearmanr(d_euc, d_beh[t]).statistic)
                    if len(ids) >= 3 else float("nan")}
    rows = []
    for k in k_grid:
        cl = cluster(E, k, settings.clustering, settings.seed)
        ok = 2 <= cl.k < len(ids)
        rows.append({"K": k, "K_effective": cl.k, "silhouette": cl.silhouette,
                     "sizes": " ".join(str(int(s)) for s in np.bincount(cl.labels)),
                     **{f"behaviour_silhouette_{t}": float(silhouette_score(B[t], cl.labels)) if ok else None
                        for t in TARGETS}})
    clipped = {t: [ids[i] for i in np.flatnonzero((B[t] <= 0).any(axis=1))] for t in TARGETS}
    return EmbeddingCheck(ids, E, d_cos, d_beh, spear, pl.DataFrame(rows), grids, pinned, clipped)


# --- sensitivity and tuning ---------------------------------------------------------------------

@dataclass
class Sweep:
    """Unseen metrics over a grid of (K, borrow, temperature, top-k) from grouped CV over configurations."""

    grid: pl.DataFrame      # one row per (K, borrow, T, top_k, target): that target's metrics and the shared criterion
    chosen: dict[str, Any]  # K, borrow, temperature, top_k (None: dense), criterion
    folds: int


def _grid_key(K: int, borrow: float, T: float, top_k: int | None) -> str:
    return f"K={K} borrow={borrow:g} T={T:g} top_k={'dense' if top_k is None else top_k}"


def sweep(fitter: Fitter, folds: Sequence[Fold], k_grid: Sequence[int], temperatures: Sequence[float],
          top_ks: Sequence[int | None], borrows: Sequence[float] | None = None) -> Sweep:
    """Fit RECE per fold, K and borrow, score held-out configurations for every temperature and top-k.

    The criterion is relative pinball loss averaged over held-out configurations, then over
    targets: one number per grid point, since the mixing settings are shared by both targets.
    Top-k values at or above K equal dense mixing and are skipped, and so is borrowing with one
    specialist; a fold whose clustering found fewer than top-k specialists mixes all of them, so
    every grid point covers every fold. ``borrows`` None: the settings' borrow only.
    """
    borrows = (fitter.settings.borrow,) if borrows is None else tuple(borrows)
    if not borrows or any(not 0 <= b <= 1 for b in borrows):
        raise EvaluationError(f"--borrow-grid values must be in [0, 1], got {list(borrows)}")
    points = [(K, b) for K in k_grid for b in (borrows if K > 1 else borrows[:1])]
    reqs = [FitRequest(f.train, "rece", K, b) for f in folds for K, b in points]
    docs = fitter.fit_many(reqs, "sweep fits")
    jobs, params = [], {}
    for (fold, K, b), doc in zip(((f, K, b) for f in folds for K, b in points), docs):
        b = b if K > 1 else 0.0
        for T in temperatures:
            for top_k in top_ks:
                if top_k is not None and top_k >= K:
                    continue
                key = _grid_key(K, b, T, top_k)
                params[key] = {"K": K, "borrow": float(b), "temperature": float(T), "top_k": top_k}
                jobs.append(PredictJob(doc, fold.unseen, True, top_k, T, ("cv", fold.name, key, "unseen")))
    cells = predict_cells(fitter.fs, jobs, "sweep predictions")
    qs = fitter.settings.quantiles
    per_target = aggregate(cells, qs, ("method", "target"))
    crit = per_target.group_by("method").agg(pl.col("rel_pinball_macro").mean().alias("criterion"))
    grid = per_target.join(crit, on="method")
    meta = pl.DataFrame([{"method": k, "K": v["K"], "borrow": v["borrow"], "temperature": v["temperature"],
                          "top_k": "dense" if v["top_k"] is None else str(v["top_k"])} for k, v in params.items()])
    grid = meta.join(grid, on="method").sort(["K", "borrow", "temperature", "top_k", "target"])
    best = choose(crit)
    return Sweep(grid, {**params[best["method"]], "criterion": best["criterion"]}, len(folds))


def choose(criteria: pl.DataFrame) -> dict[str, Any]:
    """The grid point with the lowest criterion (ties: first in name order)."""
    return criteria.sort(["criterion", "method"]).row(0, named=True)


# --- the whole evaluation -----------------------------------------------------------------------

@dataclass(frozen=True)
class EvalOptions:
    protocols: tuple[str, ...] = PROTOCOLS
    sparse_top_k: int = 2
    cv_folds: int | None = None            # sensitivity folds over configurations (None: one per config)
    k_grid: tuple[int, ...] = (1, 2, 4, 6)
    temperatures: tuple[float, ...] = (0.05, 0.1, 0.3, 1.0)
    top_ks: tuple[int | None, ...] = (1, 2, None)
    borrows: tuple[float, ...] | None = None  # None: the artifact's borrow only
    donor_experiment: bool = True
    sample_rows: int = 150
    parallel_fits: int = 3

    def __post_init__(self) -> None:
        bad = [p for p in self.protocols if p not in PROTOCOLS]
        if bad:
            raise EvaluationError(f"unknown protocol(s) {', '.join(bad)}; use {', '.join(PROTOCOLS)} or all")
        if self.sparse_top_k < 1:
            raise EvaluationError("--sparse-top-k must be at least 1")


@dataclass
class Sample:
    """A few unseen rows of one configuration with each method's predicted quantiles (for plots)."""

    protocol: str
    config_id: str
    target: str
    y: np.ndarray
    values: dict[str, np.ndarray]  # method -> (rows, quantiles)


@dataclass
class Evaluation:
    store_uri: str
    artifact: dict[str, Any]
    settings: TrainSettings
    options: EvalOptions
    methods: tuple[Method, ...]
    configs: dict[str, DeploymentConfig]
    runs: dict[str, ProtocolRun]
    scores: pl.DataFrame           # protocol, method, split, target
    by_config: pl.DataFrame        # ... + config_id
    by_gpu: pl.DataFrame           # ... + gpu
    by_model: pl.DataFrame         # ... + model
    published: pl.DataFrame        # the artifact itself on the store's held-out slice, per split and target
    samples: list[Sample]
    embedding: EmbeddingCheck | None
    sweep: Sweep | None
    donors: DonorExperiment | None = None
    drift: DriftReport | None = None
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


def config_attrs(configs: Mapping[str, DeploymentConfig]) -> dict[str, dict[str, str]]:
    """What ``aggregate`` can group by besides Cell fields."""
    return {c: {"gpu": cfg.gpu.name, "model": cfg.model.name} for c, cfg in configs.items()}


def _samples(cells: Sequence[Cell], protocol: str, rows: int, seed: int) -> list[Sample]:
    """Up to ``rows`` unseen rows per (configuration, target), the same rows for every method."""
    by: dict[tuple[str, str], dict[str, Cell]] = {}
    for c in cells:
        if c.protocol == protocol and c.split == "unseen":
            by.setdefault((c.config_id, c.target), {})[c.method] = c
    out = []
    for (cid, t), per_method in sorted(by.items()):
        first = next(iter(per_method.values()))
        n = len(first.y)
        idx = np.sort(np.random.default_rng(seed).choice(n, size=min(rows, n), replace=False))
        out.append(Sample(protocol, cid, t, first.y[idx], {m: c.values[idx] for m, c in per_method.items()}))
    return out


def artifact_splits(fs: FeatureSet, doc: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Shards whose configuration and date the artifact trained on ("seen"), and the rest ("unseen")."""
    first, last = doc["training"]["date_window"]
    trained = [st.config_id in doc["configurations"] and first <= st.date <= last for st in fs.stats]
    return {"seen": tuple(i for i, t in enumerate(trained) if t), "unseen": tuple(i for i, t in enumerate(trained) if not t)}


def evaluate(fs: FeatureSet, settings: TrainSettings, artifact_doc: dict[str, Any],
             options: EvalOptions = EvalOptions()) -> Evaluation:
    """Run the protocols, baselines, embedding validation, sensitivity sweep and donor experiment.

    ``settings`` are the artifact's training settings: every fold re-fits with them, so the
    numbers describe the recipe that produced the artifact, on this store.
    """
    t0 = time.monotonic()
    fitter = Fitter(fs, settings, options.parallel_fits)
    meths = methods(options.sparse_top_k)
    notes: list[str] = []
    runs: dict[str, ProtocolRun] = {}
    for p in options.protocols:
        try:
            folds = protocol_folds(fs, p)
        except EvaluationError as exc:
            if len(options.protocols) == 1:
                raise
            notes.append(f"skipped {p}: {exc}")
            log(f"[evaluate] skipped {p}: {exc}")
            continue
        log(f"[evaluate] {p} ({PROTOCOL_TITLES[p]}): {len(folds)} fold(s)")
        runs[p] = run_protocol(fitter, folds, meths, settings.temperature)
    if not runs:
        raise EvaluationError("no protocol could run on this store: " + "; ".join(notes))
    cells = [c for r in runs.values() for c in r.cells]
    qs = settings.quantiles
    attrs = config_attrs(fs.configs)
    base = ("protocol", "method", "split", "target")
    published = aggregate(predict_cells(fs, [own_mixing_job(artifact_doc, shards, ("published", "-", "published", split))
                                             for split, shards in artifact_splits(fs, artifact_doc).items() if shards],
                                        "published artifact"), qs, ("split", "target"))
    main = "loco" if "loco" in runs else next(iter(runs))

    per_config_doc = fitter.fit_many([FitRequest(tuple(range(len(fs.stats))), "per_config")], "embedding fit")[0]
    emb = embedding_check(fs, per_config_doc, settings, options.k_grid) if len(fs.config_ids) >= 3 else None
    if emb is None:
        notes.append("embedding validation needs at least 3 configurations")
    sw = None
    if len(fs.config_ids) >= 3:
        sw = sweep(fitter, config_kfold(fs, options.cv_folds, settings.seed), options.k_grid, options.temperatures,
                   options.top_ks, options.borrows)
    else:
        notes.append("the sensitivity sweep needs at least 3 configurations")
    donors = None
    if options.donor_experiment:
        from .donors import donor_experiment

        try:
            donors = donor_experiment(fitter, seed=settings.seed)
        except EvaluationError as exc:
            notes.append(f"skipped the donor experiment: {exc}")
    return Evaluation(
        store_uri=fs.store_uri, artifact=artifact_doc, settings=settings, options=options, methods=meths,
        configs=dict(fs.configs), runs=runs,
        scores=aggregate(cells, qs, base),
        by_config=aggregate(cells, qs, base + ("config_id",)),
        by_gpu=aggregate(cells, qs, base + ("gpu",), attrs),
        by_model=aggregate(cells, qs, base + ("model",), attrs),
        published=published, samples=_samples(cells, main, options.sample_rows, settings.seed),
        embedding=emb, sweep=sw, donors=donors, notes=notes, seconds=time.monotonic() - t0,
    )


# --- text tables --------------------------------------------------------------------------------

TABLE_METRICS = (("interval_coverage", "cov P10-P90", "pct"), ("mape_p50", "MAPE P50", "pct"),
                 ("rel_pinball_macro", "rel pinball", "num"), ("interval_width", "width us", "num"))


def fmt(v: Any, kind: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{100 * v:.1f}%" if kind == "pct" else f"{v:.4g}"


def baseline_rows(scores: pl.DataFrame, meths: Sequence[Method], protocol: str, target: str) -> list[list[str]]:
    """The side-by-side table of one protocol and target: a header row then one row per method."""
    head = ["method"] + [f"{split}: {title}" for split in SPLITS for _, title, _ in TABLE_METRICS]
    rows = [head]
    sub = scores.filter((pl.col("protocol") == protocol) & (pl.col("target") == target))
    for m in meths:
        row = [m.title]
        for split in SPLITS:
            r = sub.filter((pl.col("method") == m.key) & (pl.col("split") == split))
            if r.height:
                row += [fmt(r[col][0], kind) for col, _, kind in TABLE_METRICS]
            else:
                row += ["n/a"] * len(TABLE_METRICS)
        rows.append(row)
    return rows


def table_footnotes(scores: pl.DataFrame, meths: Sequence[Method], protocol: str) -> list[str]:
    """Why a method has no numbers for a split in this protocol."""
    sub = scores.filter(pl.col("protocol") == protocol)
    out = []
    for m in meths:
        missing = [s for s in SPLITS if not sub.filter((pl.col("method") == m.key) & (pl.col("split") == s)).height]
        if missing:
            out.append(f"n/a: {m.title}, {' and '.join(missing)}: {m.not_defined or 'no rows'}")
    return out


def _folds(n: int) -> str:
    return f"{n} fold" + ("s" if n != 1 else "")


def text_table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def baseline_text(ev: Evaluation) -> str:
    """Every protocol's baseline table, as printed by ``rece evaluate``."""
    out = []
    for p in ev.runs:
        for t in TARGETS:
            out.append(f"== {p} ({PROTOCOL_TITLES[p]}), {t}, {_folds(len(ev.runs[p].folds))} ==")
            out.append(text_table(baseline_rows(ev.scores, ev.methods, p, t)))
        out += table_footnotes(ev.scores, ev.methods, p)
    return "\n".join(out)


def sweep_text(sw: Sweep) -> str:
    both = sw.grid.filter(pl.col("target") == TARGETS[0]).select(["K", "borrow", "temperature", "top_k", "criterion"])
    rows = [["K", "borrow", "temperature", "top_k", "criterion (rel pinball, unseen)"]]
    rows += [[str(r["K"]), f"{r['borrow']:g}", f"{r['temperature']:g}", r["top_k"], f"{r['criterion']:.5f}"]
             for r in both.sort("criterion").iter_rows(named=True)]
    c = sw.chosen
    chosen = (f"chosen: K={c['K']} borrow={c['borrow']:g} temperature={c['temperature']:g} "
              f"top_k={'dense' if c['top_k'] is None else c['top_k']}"
              f" (criterion {c['criterion']:.5f}, {sw.folds} folds over configurations)")
    if c["K"] == 1:
        chosen += ("\nwith one specialist, borrow, temperature and top-k have no effect "
                   "(the values above only break the tie)")
    return text_table(rows) + "\n" + chosen


# --- entry points for the CLI -------------------------------------------------------------------

def load_artifact_ref(ref: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The artifact a user named (see ``publish.load_artifact``) and, for a published version,
    the version it replaced (for drift); None for a bare artifact.json."""
    from .publish import load_artifact, resolve

    doc, manifest = load_artifact(ref)
    previous = (manifest or {}).get("previous")
    if not previous:
        return doc, None
    root = ref.partition("@")[0]
    if not root.startswith("s3://") and os.path.isfile(os.path.join(root, "manifest.json")):  # ROOT/artifacts/v-...
        root = os.path.dirname(os.path.dirname(os.path.normpath(root)))
    return doc, resolve(root, previous)[0]


def settings_of(doc: Mapping[str, Any]) -> TrainSettings:
    """The training settings recorded in an artifact (folds re-fit with exactly these)."""
    try:
        return TrainSettings(**doc["training"]["settings"])
    except (KeyError, TypeError) as exc:
        raise ArtifactError(f"artifact has no usable training settings ({type(exc).__name__}: {exc})") from None


def evaluate_artifact(artifact_ref: str, store_uri: str, options: EvalOptions = EvalOptions(),
                      max_regression: float = 0.05) -> Evaluation:
    """``rece evaluate``: featurize the store once, run everything, compare with the previous version."""
    from .drift import compare
    from .pipeline import featurize_store

    doc, previous = load_artifact_ref(artifact_ref)
    settings = settings_of(doc)
    fs = featurize_store(store_uri, settings)
    ev = evaluate(fs, settings, doc, options)
    if previous is not None:
        ev.drift = compare(doc, previous, fs, max_regression)
    return ev


def tune(store_uri: str, settings: TrainSettings, folds: int | None, k_grid: Sequence[int],
         temperatures: Sequence[float], top_ks: Sequence[int | None], borrows: Sequence[float] | None = None) -> Sweep:
    """``rece tune``: pick K, borrow, temperature and top-k by grouped CV over the store's configurations."""
    from .pipeline import featurize_store

    fs = featurize_store(store_uri, settings)
    if len(fs.config_ids) < 3:
        raise EvaluationError("tuning needs at least 3 configurations")
    return sweep(Fitter(fs, settings), config_kfold(fs, folds, settings.seed), k_grid, temperatures, top_ks, borrows)
