"""Embedding validation: does distance in the configuration embedding track latency behaviour?

Spearman over configuration pairs between embedding distance and behaviour distance (each
configuration's own P50 model on a shared probe grid), with a Mantel permutation p-value
because pairs share configurations, and the quality of the clusters per K.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import polars as pl
import ray
from scipy.stats import spearmanr
from sklearn.metrics import silhouette_score

from ..config import DeploymentConfig, config_vector
from ..ensemble import RECEModel, rows_frame
from ..features import FEATURES, feature_matrix, kv_read_us_per_usage
from ..pipeline import TARGETS, FeatureSet, TrainSettings
from ..progress import RETRIES, gather
from ..specialists import Embedding, cluster

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


@ray.remote(max_retries=RETRIES)
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


def _log_p50(model: RECEModel, target: str, cfg: DeploymentConfig, probes: pl.DataFrame,
             w: np.ndarray) -> np.ndarray:
    """log P50 of ``model`` mixed by ``w`` for ``cfg`` on the probe rows, clipped at 1 us."""
    j50 = model.quantiles.index(0.5) if 0.5 in model.quantiles else len(model.quantiles) // 2
    pred = model.predict_matrix(target, feature_matrix(probes, cfg, target), w)
    return np.log(np.clip(pred.values[:, j50], 1.0, None))


def behaviour_vectors(per_config_doc: Mapping[str, Any], configs: Mapping[str, DeploymentConfig],
                      probes: Mapping[str, pl.DataFrame]) -> dict[str, np.ndarray]:
    """Per target: (configs x probes) log P50 of each configuration's own model on the probe grid.

    Logs, so behaviour distance is a typical latency *ratio*; predictions below 1 us (linear
    models extrapolating) are clipped there.
    """
    model = RECEModel(per_config_doc)
    out = {}
    for t in TARGETS:
        rows = []
        for c in sorted(configs):
            w = np.zeros(len(model.centroids))
            w[model.members[c]] = 1.0
            rows.append(_log_p50(model, t, configs[c], probes[t], w))
        out[t] = np.vstack(rows)
    return out


def model_coordinates(held_out_docs: Mapping[str, Mapping[str, Any]], configs: Mapping[str, DeploymentConfig],
                      probes: Mapping[str, pl.DataFrame]) -> dict[str, np.ndarray]:
    """Per target: (configs x probes) log P50 on the probe grid of a global model that never saw
    the configuration (``held_out_docs[c]``: LOCO's global fit of the fold holding c out).

    A candidate embedding that needs only the configuration (its features on the grid) and a
    fitted model, so it exists for a deployment nobody has profiled; the check measures how
    well its distances would rank behaviour, next to the configuration vector's."""
    out = {}
    for t in TARGETS:
        rows = []
        for c in sorted(configs):
            model = RECEModel(held_out_docs[c])
            rows.append(_log_p50(model, t, configs[c], probes[t], np.ones(len(model.centroids))))
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
    spearman: dict[str, dict[str, float]]      # target -> {"cosine", "euclidean", "p_cosine", "model_rms"?}
    clusters: pl.DataFrame               # per K: silhouette, sizes, behaviour silhouette
    probe_grid: dict[str, dict[str, list[float]]]  # per target: the probe values of each input
    pinned: dict[str, dict[str, int]]    # per target: inputs without a common range -> configurations covering the pin
    clipped: dict[str, list[str]]        # per target: configurations whose own P50 fell below 1 us on the grid
    behaviour: dict[str, np.ndarray] = field(default_factory=dict)    # per target: behaviour_vectors
    model_based: dict[str, np.ndarray] | None = None                  # per target: model_coordinates, if asked


def embedding_check(fs: FeatureSet, per_config_doc: Mapping[str, Any], settings: TrainSettings,
                    k_grid: Sequence[int], held_out_docs: Mapping[str, Mapping[str, Any]] | None = None
                    ) -> EmbeddingCheck:
    """Does distance in the configuration embedding track distance in latency behaviour?

    With ``held_out_docs`` (a global fit per configuration that did not see it), also how the
    model-based coordinates of ``model_coordinates`` would rank it (``spearman[t]["model_rms"]``)."""
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
    M = None
    if held_out_docs is not None and len(ids) >= 3 and set(ids) <= set(held_out_docs):
        M = model_coordinates(held_out_docs, configs, probe_rows(grids))
        for t in TARGETS:
            spear[t]["model_rms"] = float(spearmanr(pair_distances(M[t], "rms"), d_beh[t]).statistic)
    rows = []
    for k in k_grid:
        cl = cluster(E, k, settings.clustering, settings.seed)
        ok = 2 <= cl.k < len(ids)
        rows.append({"K": k, "K_effective": cl.k, "silhouette": cl.silhouette,
                     "sizes": " ".join(str(int(s)) for s in np.bincount(cl.labels)),
                     **{f"behaviour_silhouette_{t}": float(silhouette_score(B[t], cl.labels)) if ok else None
                        for t in TARGETS}})
    clipped = {t: [ids[i] for i in np.flatnonzero((B[t] <= 0).any(axis=1))] for t in TARGETS}
    return EmbeddingCheck(ids, E, d_cos, d_beh, spear, pl.DataFrame(rows), grids, pinned, clipped, B, M)
