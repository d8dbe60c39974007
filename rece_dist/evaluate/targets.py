"""Does RECE meet its transfer targets? One row per (protocol, target), read off an evaluation.

RECE is for deployments nobody profiled, so its numbers are judged against what the same
features achieve with a configuration's own data, and against the baselines on the same folds:

- **P50 transfer ratio**: MAPE of RECE's P50 on unseen configurations over the MAPE of the
  per-configuration (own-data) models on the held-out slice of seen ones; pooled over the
  protocol's rows, and the worst configuration's own ratio beside it, so a mean cannot hide a
  configuration that transfers badly. Targets: <= 2 leaving one configuration out, <= 3 leaving
  a GPU or a model out.
- **Interval coverage**: share of unseen rows inside RECE's P10-P90 (the artifact's calibration
  was fitted inside each fold, on the fold's training configurations only), with its width;
  target 80% +- 5 pp, and +- 3 pp on the held-out slice of seen configurations.
- **Pinball gain**: 1 - relative pinball of RECE / that of the global model (and of the nearest
  donor), on unseen rows; target >= 20%.
- **Embedding**: Spearman rank correlation between the distance mixing uses and behaviour
  distance (``embedding_check``); target >= 0.6 for beta.

The worst configuration is shown with the features its rows have and its fold's RECE fit never
observed (``RECEModel.unobserved``: a MoE term when the fold held out every MoE configuration),
because no mixing can transfer a cost no training row carried.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import polars as pl

from ..config import DeploymentConfig
from ..ensemble import RECEModel
from ..shards import TARGETS, FeatureSet
from .baselines import Method, fmt, text_table
from .embedding_check import EmbeddingCheck
from .protocols import ProtocolRun

RATIO_TARGET = {"loco": 2.0, "logo": 3.0, "lomo": 3.0}
COVERAGE_TARGET, COVERAGE_TOL, SEEN_TOL = 0.8, 0.05, 0.03
GAIN_TARGET, SPEARMAN_TARGET = 0.2, 0.6


def rece_method(artifact: Mapping[str, Any], meths: Sequence[Method], target: str | None = None) -> str:
    """The evaluated method that predicts as the artifact does: for a target the artifact pools
    (``targets.<t>.model``, chosen by ``recipe.select_models``) the global model, else RECE
    mixed as the artifact mixes."""
    if target is not None and artifact["targets"][target].get("model") == "pooled":
        return "global"
    top_k = artifact["mixing"].get("top_k")
    key = "rece_dense" if top_k is None else f"rece_top{top_k}"
    return key if key in {m.key for m in meths} else "rece_dense"


def _metric(df: pl.DataFrame, metric: str, **where: str) -> float | None:
    for k, v in where.items():
        df = df.filter(pl.col(k) == v)
    return float(df[metric][0]) if len(df) and df[metric][0] is not None else None


def unobserved_in_folds(fs: FeatureSet, runs: Mapping[str, ProtocolRun]) -> dict[tuple[str, str, str], list[str]]:
    """Per (protocol, target, unseen configuration): features non-zero in the configuration's
    rows that its fold's RECE fit never observed."""
    out: dict[tuple[str, str, str], list[str]] = {}
    for p, run in runs.items():
        for fold, docs in zip(run.folds, run.docs):
            if "rece" not in docs:
                continue
            model = RECEModel(docs["rece"])
            for cid in sorted({fs.stats[i].config_id for i in fold.unseen}):
                w = model.weights(fs.configs[cid])
                shards = fs.shards_of([cid])
                for t in TARGETS:
                    used = np.vstack([fs.stats[i].col_max[t] for i in shards]).max(axis=0, keepdims=True)
                    out[(p, t, cid)] = model.unobserved(t, used, w)
    return out


def transfer_targets(scores: pl.DataFrame, by_config: pl.DataFrame, judged: Mapping[str, str],
                     configs: Mapping[str, DeploymentConfig], embedding: EmbeddingCheck | None,
                     unobserved: Mapping[tuple[str, str, str], Sequence[str]] | None = None) -> pl.DataFrame:
    """One row per (protocol, target) with the four targets' figures and whether each is met.

    ``scores`` and ``by_config`` are an evaluation's aggregates; ``judged`` the method judged per
    target (``rece_method``); ``unobserved`` (``unobserved_in_folds``) names what the worst
    configuration's fold never saw.
    """
    rows: list[dict[str, Any]] = []
    protocols = set(scores["protocol"].to_list()) if len(scores) else set()
    for p in (p for p in RATIO_TARGET if p in protocols):
        for t in ("beta", "alpha"):
            rece = judged[t]
            s = scores.filter((pl.col("protocol") == p) & (pl.col("target") == t))
            own = _metric(s, "mape_p50", method="per_config", split="seen")
            mape = _metric(s, "mape_p50", method=rece, split="unseen")
            bc = by_config.filter((pl.col("protocol") == p) & (pl.col("target") == t))
            own_c = bc.filter((pl.col("method") == "per_config") & (pl.col("split") == "seen")).select(
                "config_id", own=pl.col("mape_p50"))
            per = bc.filter((pl.col("method") == rece) & (pl.col("split") == "unseen")).select(
                "config_id", pl.col("mape_p50")).join(own_c, on="config_id").with_columns(
                ratio=pl.col("mape_p50") / pl.col("own")).sort("ratio", descending=True)
            worst = per.row(0, named=True) if len(per) else None
            pin = _metric(s, "rel_pinball_macro", method=rece, split="unseen")
            gains = {}
            for base in ("global", "donor"):
                b = _metric(s, "rel_pinball_macro", method=base, split="unseen")
                gains[base] = None if pin is None or not b else 1.0 - pin / b
            cov = _metric(s, "interval_coverage", method=rece, split="unseen")
            seen = _metric(s, "interval_coverage", method=rece, split="seen")
            rho = embedding.spearman[t]["mixing"] if embedding is not None else None
            ratio = mape / own if mape is not None and own else None
            rows.append({
                "protocol": p, "target": t, "method": rece, "rece_mape": mape, "own_mape": own, "ratio": ratio,
                "ratio_target": RATIO_TARGET[p],
                "worst_ratio": worst["ratio"] if worst else None,
                "worst_config": _worst_label(configs, worst["config_id"], (unobserved or {}).get((p, t, worst["config_id"])))
                if worst else None,
                "coverage": cov, "width": _metric(s, "interval_width", method=rece, split="unseen"),
                "seen_coverage": seen, "gain_vs_global": gains["global"], "gain_vs_donor": gains["donor"],
                "spearman": rho,
                "ratio_met": ratio is not None and ratio <= RATIO_TARGET[p],
                "coverage_met": cov is not None and abs(cov - COVERAGE_TARGET) <= COVERAGE_TOL,
                "seen_met": seen is not None and abs(seen - COVERAGE_TARGET) <= SEEN_TOL,
                "gain_met": all(g is not None and g >= GAIN_TARGET for g in gains.values()),
                "spearman_met": t != "beta" or (rho is not None and rho >= SPEARMAN_TARGET),
            })
    return pl.DataFrame(rows)


def _worst_label(configs: Mapping[str, DeploymentConfig], cid: str, unseen_terms: Sequence[str] | None) -> str:
    label = configs[cid].label
    return f"{label} (never observed: {', '.join(unseen_terms)})" if unseen_terms else label


def _mark(v: str, ok: bool) -> str:
    return f"{v} {'ok' if ok else 'MISS'}"


def targets_rows(df: pl.DataFrame) -> list[list[str]]:
    """The targets as table rows (header first), each figure marked ok or MISS."""
    rows = [["protocol", "target", "method", "P50 MAPE / own", "worst config", "cov P10-P90", "width us", "seen cov",
             "gain vs global", "gain vs donor", "Spearman"]]
    for r in df.iter_rows(named=True):
        ratio = "n/a" if r["ratio"] is None else f"{r['ratio']:.2f}x (<= {r['ratio_target']:g}x)"
        worst = "n/a" if r["worst_ratio"] is None else f"{r['worst_ratio']:.2f}x {r['worst_config']}"
        rows.append([r["protocol"], r["target"], r["method"], _mark(ratio, r["ratio_met"]), worst,
                     _mark(fmt(r["coverage"], "pct"), r["coverage_met"]), fmt(r["width"], "num"),
                     _mark(fmt(r["seen_coverage"], "pct"), r["seen_met"]),
                     _mark(fmt(r["gain_vs_global"], "pct"), r["gain_met"]), fmt(r["gain_vs_donor"], "pct"),
                     _mark(fmt(r["spearman"], "num"), r["spearman_met"]) if r["target"] == "beta"
                     else fmt(r["spearman"], "num")])
    return rows


def targets_text(df: pl.DataFrame) -> str:
    if not len(df):
        return ""
    return ("Transfer targets (the artifact's model per target vs own-data, global and donor models, unseen "
            "configurations)\n" + text_table(targets_rows(df)))
