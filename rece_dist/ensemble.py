"""Evaluating a RECE artifact: similarity-weighted mixing of specialist quantile models.

For a configuration c with latency profile e(c) (``embedding.LatencyProfile``: its log P50
step time on the artifact's probe batches), specialist centroids m_s, temperature T and
optional top-k, and feature row x (natural units) of target t:

    sim_s   = -d(e(c), m_s) = -sqrt(mean_g (e_g(c) - m_sg)^2)
    S       = all s, or the k specialists with the largest sim_s (ties: lower index first)
    w_s     = exp(sim_s / T) / sum_{r in S} exp(sim_r / T)   for s in S, else 0
    q_tau   = sum_s w_s * (x . beta[s, t, tau])

The quantile predictions of one row are then put in non-decreasing order (monotone
rearrangement) if they cross; how many rows needed it is returned, since it should be rare
once the fits use the non-crossing option.

For a configuration the artifact was not trained on, an artifact with ``unseen_calibration``
widens every quantile's distance from the median by that quantile's factor c (measured by
grouped cross-validation over configurations at training time), then rearranges again:

    q_tau' = q_mid + c_tau * (q_tau - q_mid)

A feature the fits never saw (a MoE term when every training configuration was dense, CPU
offload traffic when none offloaded) has coefficient 0: its cost is left out of the
prediction. ``unobserved`` names such features, non-zero in the rows being predicted and zero
on every training row of the specialists holding at least half the mixing weight
(``specialists[s].unobserved_columns``); ``predict`` warns (``UnobservedFeatureWarning``) and
``rece predict`` says so in its output, since the number alone looks like any other. (A column
dropped as collinear is not such a case: the columns it depends on carry its effect.)

This module reads only the artifact document, so a model loaded from JSON and the model the
training job built in memory are the same object and predict the same floats.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import polars as pl

from . import artifact as artifact_mod
from .config import DeploymentConfig, as_config
from .embedding import LatencyProfile, rms_distance
from .errors import ArtifactError
from .features import FEATURES, feature_matrix, rows_frame


class UnobservedFeatureWarning(UserWarning):
    """A prediction's rows carry a cost (a feature) the artifact's training rows never had."""


@dataclass(frozen=True)
class Prediction:
    quantiles: tuple[float, ...]
    values: np.ndarray      # (rows, len(quantiles)), non-decreasing along axis 1
    weights: np.ndarray     # (specialists,) mixing weights used
    rows_sorted: int        # rows whose quantiles crossed before rearrangement


def mixing_weights(similarity: np.ndarray, temperature: float, top_k: int | None) -> np.ndarray:
    """Softmax of similarity / T, restricted to the top-k most similar specialists."""
    if temperature <= 0:
        raise ValueError("temperature must be positive")
    keep = np.ones(len(similarity), dtype=bool)
    if top_k is not None and top_k < len(similarity):
        order = np.argsort(-similarity, kind="stable")
        keep[:] = False
        keep[order[:top_k]] = True
    z = np.where(keep, similarity / temperature, -np.inf)
    z = z - z[keep].max()
    w = np.exp(z)
    return w / w.sum()


def rearrange(values: np.ndarray) -> tuple[np.ndarray, int]:
    """Sort each row's quantiles (Chernozhukov et al.'s rearrangement); count rows that crossed."""
    crossed = int((np.diff(values, axis=1) < 0).any(axis=1).sum()) if values.shape[1] > 1 else 0
    return (np.sort(values, axis=1) if crossed else values), crossed


class RECEModel:
    """A RECE ensemble read from an artifact document (see ``artifact.py`` for the format).

    ``document`` is that document; ``manifest`` the published version's provenance (None for a
    model that was not published or was read from a bare artifact.json)."""

    def __init__(self, doc: Mapping[str, Any], manifest: Mapping[str, Any] | None = None):
        self.document = doc
        self.manifest = manifest
        version = doc.get("schema_version")
        if version != artifact_mod.SCHEMA_VERSION:
            raise ArtifactError(f"artifact schema {version!r} is not {artifact_mod.SCHEMA_VERSION}; evaluate it with "
                                "the rece-dist version that wrote it, or retrain")
        try:
            self.quantiles = tuple(float(q) for q in doc["quantiles"])
            self.profile = LatencyProfile.from_doc(doc["embedding"])
            mix = doc["mixing"]
            self.temperature = float(mix["temperature"])
            self.top_k = None if mix.get("top_k") is None else int(mix["top_k"])
            specs = doc["specialists"]
            self.centroids = np.asarray([s["centroid"] for s in specs], dtype=np.float64)
            self.coef: dict[str, np.ndarray] = {}
            self.zero: dict[str, np.ndarray] = {}  # (specialists, features): zero on every training row
            for target, feats in FEATURES.items():
                names = [f["name"] for f in doc["targets"][target]["features"]]
                if names != [f.name for f in feats]:
                    raise ArtifactError(f"artifact's {target} features {names} differ from this version's; "
                                        "evaluate it with the rece-dist version that wrote it")
                self.coef[target] = np.asarray(
                    [[s["coefficients"][target][_qkey(q)] for q in self.quantiles] for s in specs],
                    dtype=np.float64)  # (specialists, quantiles, features)
                # informational in the contract (older documents lack it: then nothing is flagged)
                self.zero[target] = np.asarray([s.get("unobserved_columns", {}).get(target, [False] * len(feats))
                                                for s in specs], dtype=bool)
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"artifact is malformed ({type(exc).__name__}: {exc})") from None
        self.members = {cid: i for i, s in enumerate(doc["specialists"]) for cid in s["members"]}
        self._embedded: dict[str, np.ndarray] = {}
        try:
            cal = doc.get("unseen_calibration")
            self.widen = None if cal is None else {
                t: np.asarray([cal["factors"][t][_qkey(q)] for q in self.quantiles], dtype=np.float64) for t in FEATURES}
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"artifact's unseen_calibration is malformed ({type(exc).__name__}: {exc})") from None

    def unseen(self, cfg: DeploymentConfig) -> bool:
        """True for a configuration the artifact was not trained on (its intervals get widened)."""
        return cfg.config_id not in self.members  # the specialists' members are the artifact's configurations

    def embed(self, cfg: DeploymentConfig) -> np.ndarray:
        """The configuration's profile, computed once per model: an evaluation mixes one
        configuration under several temperatures and top-k (``feature_matrix`` each time was
        most of its scoring tasks' time)."""
        e = self._embedded.get(cfg.config_id)
        if e is None:
            e = self._embedded[cfg.config_id] = self.profile(cfg)
        return e

    def similarity(self, cfg: DeploymentConfig) -> np.ndarray:
        """Minus the RMS log-latency distance of ``cfg``'s profile to each specialist's centroid."""
        return -rms_distance(self.embed(cfg), self.centroids)

    def weights(self, cfg: DeploymentConfig, top_k: int | None = None, temperature: float | None = None) -> np.ndarray:
        return mixing_weights(self.similarity(cfg), temperature or self.temperature,
                              self.top_k if top_k is None else top_k)

    def predict_matrix(self, target: str, X: np.ndarray, weights: np.ndarray, unseen: bool = False) -> Prediction:
        """Mix specialists' quantile predictions for feature rows X (natural units); ``unseen``
        applies the artifact's widening for configurations it was not trained on."""
        coef = np.einsum("s,sqf->qf", weights, self.coef[target])
        values, crossed = rearrange(X @ coef.T)
        if unseen and self.widen is not None:
            mid = values[:, [len(self.quantiles) // 2]]
            values, _ = rearrange(mid + self.widen[target] * (values - mid))
        return Prediction(self.quantiles, values, weights, crossed)

    def unobserved(self, target: str, X: np.ndarray, weights: np.ndarray) -> list[str]:
        """Features non-zero in some row of X and zero on every training row of specialists
        holding at least half of ``weights``: the prediction leaves their cost out."""
        share = weights @ self.zero[target]
        used = np.any(X != 0, axis=0)
        return [f.name for f, u, sh in zip(FEATURES[target], used, share) if u and sh >= 0.5]

    @property
    def version(self) -> str | None:
        """The published version (``v-...``), if the model came from one."""
        return None if self.manifest is None else self.manifest.get("version")

    def predict(self, config: DeploymentConfig | Mapping[str, Any] | str | Path,
                rows: pl.DataFrame | Sequence[Mapping[str, Any]], target: str = "beta", *,
                top_k: int | None = None, temperature: float | None = None) -> np.ndarray:
        """Quantiles of ``target`` (rows x ``self.quantiles``, microseconds) for input rows of a configuration.

        ``config``: a ``DeploymentConfig``, a configuration document (dict) or a JSON/YAML file.
        ``rows``: the columns of ``INPUT_COLUMNS[target]`` (a Polars frame or a list of dicts;
        documented defaults fill optional ones), e.g. beta: prefill_tokens, decode_tokens,
        running_depth, kv_usage_gpu_ratio. Mixing and unseen-configuration widening are the
        artifact's own, exactly as BLIS evaluates them (``docs/artifact.md``)."""
        if target not in self.coef:
            raise ArtifactError(f"unknown target {target!r}; use alpha or beta")
        cfg = as_config(config)
        data = rows.to_dicts() if isinstance(rows, pl.DataFrame) else list(rows)
        X = feature_matrix(rows_frame(target, data, "predict rows"), cfg, target)
        w = self.weights(cfg, top_k, temperature)
        missing = self.unobserved(target, X, w)
        if missing:
            warnings.warn(UnobservedFeatureWarning(_unobserved_message(cfg, target, missing)), stacklevel=2)
        return self.predict_matrix(target, X, w, self.unseen(cfg)).values


def _unobserved_message(cfg: DeploymentConfig, target: str, names: Sequence[str]) -> str:
    return (f"{cfg.label}: {target} features {', '.join(names)} are non-zero in these rows but were zero on every "
            "training row of the specialists this configuration mixes: that cost is left out of the prediction; train on a store "
            "with a configuration that has it")


def _qkey(q: float) -> str:
    """Quantile as a JSON object key: '0.1', '0.5', '0.9'."""
    return repr(float(q))


def predict_payload(model: RECEModel, cfg: DeploymentConfig, payload: Mapping[str, Any], where: str) -> dict[str, Any]:
    """``rece predict``: {"alpha": [rows], "beta": [rows]} -> quantiles per row, with the weights."""
    if not isinstance(payload, Mapping) or not set(payload) & {"alpha", "beta"}:
        raise ArtifactError(f"{where}: input must be an object with 'alpha' and/or 'beta' lists of rows")
    weights = model.weights(cfg)
    out: dict[str, Any] = {
        "config_id": cfg.config_id,
        "seen_in_training": not model.unseen(cfg),
        "weights": weights.tolist(),
    }
    for target in ("alpha", "beta"):
        if target in payload:
            X = feature_matrix(rows_frame(target, payload[target], where), cfg, target)
            pred = model.predict_matrix(target, X, weights, model.unseen(cfg))
            out[target] = [{_qkey(q): float(v) for q, v in zip(pred.quantiles, row)} for row in pred.values]
            out[f"{target}_rows_rearranged"] = pred.rows_sorted
            missing = model.unobserved(target, X, weights)
            if missing:
                out[f"{target}_unobserved_features"] = missing
                out.setdefault("warnings", []).append(_unobserved_message(cfg, target, missing))
    return out
