"""The configuration embedding that mixing and clustering use.

Mixing must rank configurations by how alike their latencies are. The seed's configuration
vector does not (Spearman 0.16-0.25 against behaviour distance, docs/transfer.md): it counts
a GPU, a TP degree and a model flag as equal steps whatever they do to a step's time. So the
embedding is a **latency profile**: a configuration's predicted log step time on a fixed set
of probe batches, under one pooled P50 beta model ``b`` fitted on every training configuration,

    e_g(c)   = ln max(x_g(c) . b, floor)            g = 1..G probe batches
    d(c, m)  = sqrt( (1/G) sum_g (e_g(c) - m_g)^2 )  an RMS log ratio: 0.1 ~ 10% apart

where ``x_g(c)`` are the beta features of probe batch g on configuration c. It needs nothing
but the configuration and ``b``, so it exists for a deployment nobody profiled, and because
the beta features are a roofline basis whose coefficients transfer (one efficiency each), two
configurations close in ``e`` have close step times across the probe batches. Specialists
(``specialists.py``) are clusters of ``e``; a specialist's centroid is its members' mean profile.

Probe batches: every combination of a typical low, middle and high of each probe input
(prefill tokens, decode tokens, KV usage) over the training configurations (``typical_grid``;
the ranges come from ``shards.probe_ranges``), so the profile covers decode-only and
prefilling steps, small and large batches.

The standardised configuration vector (``Embedding``) stays for what must work without a
model: donor selection (``donors``) and the comparison in ``evaluate.embedding_check``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import polars as pl

from .config import DeploymentConfig
from .features import FEATURES, feature_matrix, kv_read_us_per_usage, rows_frame

# Profile predictions below this many microseconds (a linear model extrapolating) are clipped to it.
PROFILE_FLOOR_US = 1.0


# --- the configuration vector (no model needed) ---------------------------------------------------

@dataclass(frozen=True)
class Embedding:
    """The seed's configuration vector standardised by the configurations it was fitted on:
    e(c) = (v(c) - mean) / std, coordinates that do not vary getting scale 1."""

    center: np.ndarray
    scale: np.ndarray

    @classmethod
    def fit(cls, vectors: np.ndarray) -> "Embedding":
        center = vectors.mean(axis=0)
        std = vectors.std(axis=0)
        return cls(center=center, scale=np.where(std > 1e-12, std, 1.0))

    def __call__(self, vectors: np.ndarray) -> np.ndarray:
        return (np.atleast_2d(vectors) - self.center) / self.scale


# --- probe batches ----------------------------------------------------------------------------

# Probe inputs recovered exactly from a configuration's features: (feature, divisor), raw = feature * divisor(cfg).
PROBE_INPUTS: dict[str, dict[str, tuple[str, Callable[[DeploymentConfig], float]]]] = {
    "beta": {"prefill_tokens": ("prefill_tokens", lambda c: 1.0),
             "decode_tokens": ("decode_tokens", lambda c: 1.0),
             "kv_usage_gpu_ratio": ("kv_read_us", lambda c: 1.0 / kv_read_us_per_usage(c))},
    "alpha": {"prompt_tokens": ("prompt_frac", lambda c: c.serving.max_model_len),
              "waiting_depth": ("queue_fill", lambda c: c.serving.max_num_seqs),
              "running_depth": ("running_fill", lambda c: c.serving.max_num_seqs),
              "kv_usage_gpu_ratio": ("kv_usage", lambda c: 1.0)},
}

def typical_grid(ranges: Sequence[Mapping[str, tuple[float, float, float]]]) -> dict[str, list[float]]:
    """Per input: its typical low, middle and high over the configurations, i.e. the mean over
    configurations of each one's 10th, 50th and 90th percentile (each configuration counts
    once, whatever its rows), duplicates dropped.

    Typical values rather than the intersection of every configuration's range: deployments
    that batch differently share almost no range (measured on generated stores: prefill only at
    0 and 27-30 decode tokens in common), and a profile confined there cannot tell apart how
    configurations prefill. The pooled model of the profile extrapolates by its roofline
    features; an own-data model evaluated off its range (``evaluate.embedding_check``) may
    not, which the check reports as clipped predictions.
    """
    return {var: sorted({float(np.mean([r[var][k] for r in ranges])) for k in range(3)}) for var in ranges[0]}


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


# --- the latency profile ----------------------------------------------------------------------

@dataclass(frozen=True)
class LatencyProfile:
    """e(c) = ln max(x_g(c) . b, floor) over the probe batches: the embedding mixing uses."""

    probes: pl.DataFrame   # beta input rows, every column of features.INPUT_COLUMNS["beta"]
    coef: np.ndarray       # the pooled P50 beta model, natural units, aligned with FEATURES["beta"]
    floor_us: float = PROFILE_FLOOR_US

    def __call__(self, cfg: DeploymentConfig) -> np.ndarray:
        return np.log(np.clip(feature_matrix(self.probes, cfg, "beta") @ self.coef, self.floor_us, None))

    def to_doc(self) -> dict[str, Any]:
        return {"kind": "latency-profile", "target": "beta", "quantile": 0.5, "floor_us": self.floor_us,
                "probes": self.probes.to_dicts(), "coefficients": self.coef.tolist()}

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> "LatencyProfile":
        probes = rows_frame("beta", list(doc["probes"]), "artifact embedding probes")
        coef = np.asarray(doc["coefficients"], dtype=np.float64)
        if coef.shape != (len(FEATURES["beta"]),) or not len(probes):
            raise ValueError(f"embedding needs probes and {len(FEATURES['beta'])} beta coefficients")
        return cls(probes, coef, float(doc["floor_us"]))


def rms_distance(e: np.ndarray, M: np.ndarray) -> np.ndarray:
    """d(e, m_k) = sqrt(mean_g (e_g - m_kg)^2) for each row m_k of M."""
    return np.sqrt(np.mean((np.atleast_2d(M) - e) ** 2, axis=1))


