"""What BLIS consumes beside the artifact: golden test vectors and exports in today's shapes.

- **Golden vectors**: for every training configuration plus a few unseen probes, the features
  of the embedding's probe batches, the embedding, similarities, mixing weights, and fixed input
  rows with their feature vectors and expected quantiles, so BLIS's Go evaluator can test each
  stage of ``docs/artifact.md`` separately.
- **Collapsed coefficients**: the seed's "pre-compute weights for known configurations":
  for a configuration, sum_s w_s * beta_s per target and quantile. A single linear model per
  configuration, exactly equal to the ensemble before rearrangement.
- **CoefficientSet YAML** (blis-registry ``kind: CoefficientSet``): one document per known
  configuration with the collapsed P50 coefficients, scoped by hardware / model / TP.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import yaml

from .artifact import digest
from .config import Catalog, DeploymentConfig
from .ensemble import RECEModel, _qkey
from .features import FEATURES, feature_matrix, rows_frame

GOLDEN_VERSION = "rece-golden/2"

# Probe inputs spanning idle to saturated steps and short to long prompts (raw fields).
BETA_PROBES: list[dict[str, float]] = [
    {"prefill_tokens": p, "decode_tokens": d, "running_depth": r, "kv_usage_gpu_ratio": kv,
     "kv_blocks_offloaded": off, "kv_blocks_restored": res}
    for p, d, r, kv, off, res in [
        (0, 1, 1, 0.01, 0, 0), (0, 32, 32, 0.2, 0, 0), (0, 128, 128, 0.7, 0, 0), (512, 0, 1, 0.05, 0, 0),
        (2048, 0, 4, 0.1, 0, 0), (1500, 60, 64, 0.5, 0, 0), (256, 200, 200, 0.95, 8, 2), (4000, 96, 96, 0.8, 0, 16),
    ]
]
ALPHA_PROBES: list[dict[str, float]] = [
    {"prompt_tokens": L, "waiting_depth": q, "running_depth": r, "kv_usage_gpu_ratio": kv}
    for L, q, r, kv in [(16, 0, 0, 0.0), (512, 0, 8, 0.1), (2000, 4, 64, 0.5), (3500, 40, 128, 0.9), (1024, 200, 256, 1.0)]
]


def collapsed(model: RECEModel, cfg: DeploymentConfig) -> dict[str, dict[str, list[float]]]:
    """Per target and quantile, the single coefficient vector the ensemble reduces to for ``cfg``."""
    w = model.weights(cfg)
    return {t: {_qkey(q): np.einsum("s,sf->f", w, model.coef[t][:, k]).tolist()
                for k, q in enumerate(model.quantiles)} for t in model.coef}


def golden_vectors(doc: Mapping[str, Any], probes: list[DeploymentConfig] | None = None) -> dict[str, Any]:
    """Inputs -> expected features, weights and quantiles for every known configuration and ``probes``."""
    model = RECEModel(doc)
    catalog = Catalog.default()
    cases = [(cid, catalog.resolve(entry_doc(entry), f"artifact configuration {cid}"), True)
             for cid, entry in sorted(doc["configurations"].items())]
    cases += [(p.config_id, p, False) for p in probes or []]
    out = []
    for cid, cfg, seen in cases:
        case: dict[str, Any] = {"config_id": cid, "seen_in_training": seen, "configuration": cfg.to_dict(),
                                "embedding_features": feature_matrix(model.profile.probes, cfg, "beta").tolist(),
                                "embedding": model.embed(cfg).tolist(), "similarity": model.similarity(cfg).tolist(),
                                "weights": model.weights(cfg).tolist()}
        for target, probes_rows in (("beta", BETA_PROBES), ("alpha", ALPHA_PROBES)):
            X = feature_matrix(rows_frame(target, probes_rows, "golden probes"), cfg, target)
            pred = model.predict_matrix(target, X, model.weights(cfg), model.unseen(cfg))
            case[target] = [{"input": row, "features": x.tolist(),
                             "quantiles": {_qkey(q): float(v) for q, v in zip(pred.quantiles, vals)}}
                            for row, x, vals in zip(probes_rows, X, pred.values)]
        out.append(case)
    return {"golden_version": GOLDEN_VERSION, "artifact_sha256": digest(doc), "tolerance": {"rel": 1e-9, "abs": 1e-9},
            "cases": out}


def entry_doc(entry: Mapping[str, Any]) -> dict[str, Any]:
    """A configuration document from an artifact's ``configurations`` entry."""
    return {k: entry[k] for k in ("model", "gpu", "serving")}


def coefficient_unit(feature_units: str) -> str:
    """Units of a coefficient of a feature in ``feature_units`` (both targets are in us)."""
    if feature_units == "1":
        return "us"
    if feature_units == "us":
        return "dimensionless"
    return f"us/{feature_units}"


def coefficient_sets(doc: Mapping[str, Any], version: str) -> dict[str, str]:
    """blis-registry ``CoefficientSet`` YAML per known configuration (collapsed P50 + P10/P90 in rationale)."""
    model = RECEModel(doc)
    catalog = Catalog.default()
    out: dict[str, str] = {}
    qs = model.quantiles
    mid = qs[len(qs) // 2]
    for cid, entry in sorted(doc["configurations"].items()):
        cfg = catalog.resolve(entry_doc(entry), f"artifact configuration {cid}")
        coll = collapsed(model, cfg)
        coefficients = []
        for target in ("alpha", "beta"):
            for k, feat in enumerate(FEATURES[target]):
                value = coll[target][_qkey(mid)][k]
                band = ", ".join(f"P{q * 100:g} {coll[target][_qkey(q)][k]:.6g}" for q in qs)
                unit = coefficient_unit(feat.units)
                entry_out: dict[str, Any] = {
                    "value": float(value), "units": unit, "fitted": True,
                    "scope": {"hardware": [cfg.gpu.name], "model": [cfg.model.name], "tp": [cfg.serving.tp]},
                    "sources": [{"kind": "model", "cite": f"rece-dist artifact {version}", "role": "primary"}],
                    "ci95": None,
                }
                if value == 0.0:
                    entry_out.update(method="not_charged", rationale=(
                        f"RECE {target} feature {feat.name} ({feat.formula}) has no effect for this configuration "
                        "(constant or collinear inside its specialist)."))
                else:
                    entry_out.update(method="measured", rationale=(
                        f"RECE {target} coefficient of {feat.name} = {feat.formula}; P{mid * 100:g} quantile "
                        f"regression mixed over specialists for this configuration ({band})."))
                coefficients.append({f"rece_{target}_{feat.name}": entry_out})
        body = {"kind": "CoefficientSet", "name": f"rece-{version}-{cid}", "coefficients": coefficients}
        out[cid] = yaml.safe_dump(body, sort_keys=False, width=120)
    return out


def probe_configs(catalog: Catalog | None = None) -> list[DeploymentConfig]:
    """A few plausible deployments for golden vectors of configurations BLIS may meet unseen."""
    from .config import ServingSettings

    cat = catalog or Catalog.default()
    return [DeploymentConfig(cat.model("Llama-3.1-8B"), cat.gpu("H100-SXM"), ServingSettings(tp=1)),
            DeploymentConfig(cat.model("Llama-3.1-70B"), cat.gpu("A100-SXM-80GB"), ServingSettings(tp=4)),
            DeploymentConfig(cat.model("Qwen2.5-7B"), cat.gpu("L40S"), ServingSettings(tp=1))]

