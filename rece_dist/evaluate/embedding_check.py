"""Embedding validation: does distance in the embedding mixing uses track latency behaviour?

Spearman over configuration pairs between embedding distance and behaviour distance (each
configuration's own P50 model on a shared probe grid), with a Mantel permutation p-value
because pairs share configurations, and the quality of the clusters per K. Measured for the
latency profile that mixing uses (``embedding.LatencyProfile``, RMS distance), beside the
seed's standardised configuration vector (cosine and Euclidean) that mixing used before, and
beside model-based coordinates from a global model that never saw the configuration (what the
profile of a deployment nobody profiled looks like).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import polars as pl
from scipy.stats import rankdata, spearmanr
from sklearn.metrics import silhouette_score

from ..config import DeploymentConfig, config_vector
from ..embedding import Embedding, probe_rows, typical_grid
from ..ensemble import RECEModel
from ..features import feature_matrix
from ..pipeline import TARGETS, FeatureSet, TrainSettings
from ..shards import probe_ranges
from ..specialists import cluster


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

    What the embedding of a deployment nobody profiled amounts to (the latency profile is the
    beta row of this, from the pooled model the configuration's fold trained); the check
    measures how well its distances rank behaviour when the model never saw the configuration."""
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
    # Spearman's rho is Pearson's r of ranks, and permuting configurations permutes d_b's ranks:
    # every permutation's statistic is one row of a matrix product (a scipy call per permutation
    # was 1.5 s of an evaluation's driver time).
    iu = np.triu_indices(n, 1)
    rb = rankdata(d_b)
    R = np.zeros((n, n))
    R[iu] = rb
    R = R + R.T
    ra = rankdata(d_a)
    ra = (ra - ra.mean()) / np.linalg.norm(ra - ra.mean())
    rb = rb - rb.mean()
    observed = float(ra @ rb / np.linalg.norm(rb))
    rng = np.random.default_rng(seed)
    P = np.array([rng.permutation(n) for _ in range(permutations)]).reshape(permutations, n)
    permuted = R[P[:, iu[0]], P[:, iu[1]]]
    permuted -= permuted.mean(axis=1, keepdims=True)
    stats = (permuted @ ra) / np.linalg.norm(permuted, axis=1)
    hits = int(np.count_nonzero(stats >= observed - 1e-12))
    return rho, (1 + hits) / (1 + permutations)


@dataclass
class EmbeddingCheck:
    config_ids: list[str]
    embedded: np.ndarray                 # (configs, probes): the latency profiles mixing uses
    emb_distance: np.ndarray             # condensed RMS distance between profiles (what mixing uses)
    behaviour_distance: dict[str, np.ndarray]  # per target, condensed RMS log-latency difference
    spearman: dict[str, dict[str, float]]      # target -> {"mixing", "p_mixing", "config_cosine", "config_euclidean", "model_rms"?}
    clusters: pl.DataFrame               # per K: silhouette, sizes, behaviour silhouette
    probe_grid: dict[str, dict[str, list[float]]]  # per target: the probe values of each input
    clipped: dict[str, list[str]]        # per target: configurations whose own P50 fell below 1 us on the grid
    behaviour: dict[str, np.ndarray] = field(default_factory=dict)    # per target: behaviour_vectors
    model_based: dict[str, np.ndarray] | None = None                  # per target: model_coordinates, if asked


def embedding_check(fs: FeatureSet, per_config_doc: Mapping[str, Any], settings: TrainSettings,
                    k_grid: Sequence[int], held_out_docs: Mapping[str, Mapping[str, Any]] | None = None
                    ) -> EmbeddingCheck:
    """Does distance in the embedding mixing uses track distance in latency behaviour?

    ``per_config_doc`` is a per-configuration fit of every configuration: its own models give
    the behaviour, its latency profile the embedding (the same recipe as the artifact's). With
    ``held_out_docs`` (a global fit per configuration that did not see it), also how the
    coordinates of ``model_coordinates`` rank it (``spearman[t]["model_rms"]``)."""
    ids = sorted(per_config_doc["configurations"])
    configs = {c: fs.configs[c] for c in ids}
    model = RECEModel(per_config_doc)
    E = np.vstack([model.embed(configs[c]) for c in ids])
    V = np.vstack([config_vector(configs[c]) for c in ids])
    S = Embedding.fit(V)(V)
    ranges = probe_ranges(fs, ids)
    grids = {t: typical_grid([ranges[c][t] for c in ids]) for t in TARGETS}
    B = behaviour_vectors(per_config_doc, configs, probe_rows(grids))
    d_mix = pair_distances(E, "rms")
    d_cos, d_euc = pair_distances(S, "cosine"), pair_distances(S, "euclidean")
    d_beh = {t: pair_distances(B[t], "rms") for t in TARGETS}
    spear = {}
    for t in TARGETS:
        enough = len(ids) >= 3
        rho, p = mantel(d_mix, d_beh[t], len(ids), seed=settings.seed) if enough else (float("nan"),) * 2
        spear[t] = {"mixing": rho, "p_mixing": p,
                    "config_cosine": float(spearmanr(d_cos, d_beh[t]).statistic) if enough else float("nan"),
                    "config_euclidean": float(spearmanr(d_euc, d_beh[t]).statistic) if enough else float("nan")}
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
    return EmbeddingCheck(ids, E, d_mix, d_beh, spear, pl.DataFrame(rows), grids, clipped, B, M)
