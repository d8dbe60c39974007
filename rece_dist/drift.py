"""Drift between artifact versions, and the gate that keeps a worse model from being promoted.

The nightly job retrains on a moving window; a new version should not be published as
``latest`` if it predicts the same held-out rows worse than the version it replaces. Both
artifacts score the same held-out slice of one FeatureSet with their own mixing rule, and the
report also says what moved inside the model:

- metric deltas per target (pinball per quantile, coverage, MAPE, width);
- coefficient changes per specialist: specialists carry arbitrary ids, so new and old ones are
  matched by the overlap (Jaccard) of their member configurations (Hungarian assignment);
  a specialist with no overlapping predecessor is new;
- configurations whose specialist changed (relative to that matching).

The gate: for each target, regression = mean pinball (over quantiles) new / old - 1; the new
version is refused when any target regresses by more than ``max_regression``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import polars as pl
from scipy.optimize import linear_sum_assignment

from .ensemble import _qkey
from .errors import ArtifactError, ReceError
from .refit import aggregate, own_mixing_job, predict_cells
from .objstore import ObjectRoot, S3Options
from .pipeline import TARGETS, FeatureSet

COMPARED = ("interval_coverage", "mape_p50", "interval_width")


class RegressionError(ReceError):
    """The new artifact is worse than the published one by more than the allowed margin."""


@dataclass
class DriftReport:
    ok: bool
    reason: str
    max_regression: float
    regression: dict[str, float]      # per target: mean pinball new / old - 1
    metrics: pl.DataFrame             # target, metric, old, new, delta
    matching: dict[int, int | None]   # new specialist -> matched old specialist (None: new)
    coefficients: pl.DataFrame        # new/old specialist, target, quantile, relative change, largest mover
    moved: list[dict[str, Any]]       # configurations whose specialist changed

    def raise_if_worse(self) -> None:
        if not self.ok:
            raise RegressionError(self.reason)


def match_specialists(new_doc: Mapping[str, Any], old_doc: Mapping[str, Any]) -> dict[int, int | None]:
    """Pair each new specialist with the old one sharing the most members (Jaccard, one-to-one)."""
    new = [set(s["members"]) for s in new_doc["specialists"]]
    old = [set(s["members"]) for s in old_doc["specialists"]]
    J = np.array([[len(a & b) / len(a | b) if a | b else 0.0 for b in old] for a in new]).reshape(len(new), len(old))
    out: dict[int, int | None] = {int(s["id"]): None for s in new_doc["specialists"]}
    if J.size:
        rows, cols = linear_sum_assignment(-J)
        for i, j in zip(rows, cols):
            if J[i, j] > 0:
                out[int(new_doc["specialists"][i]["id"])] = int(old_doc["specialists"][j]["id"])
    return out


def coefficient_changes(new_doc: Mapping[str, Any], old_doc: Mapping[str, Any],
                        matching: Mapping[int, int | None]) -> pl.DataFrame:
    """Per matched specialist, target and quantile: ||new - old|| / ||old|| and the feature that moved most."""
    old_by_id = {int(s["id"]): s for s in old_doc["specialists"]}
    names = {t: [f["name"] for f in new_doc["targets"][t]["features"]] for t in TARGETS}
    rows = []
    for s in new_doc["specialists"]:
        j = matching.get(int(s["id"]))
        if j is None:
            continue
        for t in TARGETS:
            for q in new_doc["quantiles"]:
                a = np.asarray(s["coefficients"][t][_qkey(q)])
                b = np.asarray(old_by_id[j]["coefficients"][t].get(_qkey(q), np.full_like(a, np.nan)))
                diff = a - b
                k = int(np.nanargmax(np.abs(diff))) if np.isfinite(diff).any() else 0
                norm = np.linalg.norm(b)
                rows.append({"new_specialist": int(s["id"]), "old_specialist": j, "target": t, "quantile": float(q),
                             "relative_change": float(np.linalg.norm(diff) / norm) if norm > 0 else float("nan"),
                             "largest_change": names[t][k], "old_value": float(b[k]), "new_value": float(a[k])})
    return pl.DataFrame(rows)


def moved_configurations(new_doc: Mapping[str, Any], old_doc: Mapping[str, Any],
                         matching: Mapping[int, int | None]) -> list[dict[str, Any]]:
    """Configurations in both versions whose new specialist is not the match of their old one."""
    out = []
    for cid in sorted(set(new_doc["configurations"]) & set(old_doc["configurations"])):
        new_s = int(new_doc["configurations"][cid]["specialist"])
        old_s = int(old_doc["configurations"][cid]["specialist"])
        if matching.get(new_s) != old_s:
            out.append({"config_id": cid, "label": new_doc["configurations"][cid].get("label", cid),
                        "old_specialist": old_s, "new_specialist": new_s})
    return out


def verdict(old: Mapping[str, Mapping[str, float]], new: Mapping[str, Mapping[str, float]],
            quantiles: list[float], max_regression: float) -> tuple[bool, str, dict[str, float]]:
    """Compare per-target held-out metrics (``metrics.quantile_metrics`` dicts) under the threshold."""
    regression, worse = {}, []
    for t in TARGETS:
        lo = np.mean([old[t][f"pinball_{q:g}"] for q in quantiles])
        hi = np.mean([new[t][f"pinball_{q:g}"] for q in quantiles])
        regression[t] = float(hi / lo - 1.0) if lo > 0 else (0.0 if hi == lo else float("inf"))
        if regression[t] > max_regression:
            worse.append(f"{t} pinball {100 * regression[t]:+.1f}%")
    limit = f"max regression {100 * max_regression:.1f}%"
    if worse:
        return False, f"refused: {', '.join(worse)} exceeds {limit} on the same held-out rows", regression
    change = ", ".join(f"{t} {100 * r:+.1f}%" for t, r in regression.items())
    return True, f"ok: pinball {change} (within {limit})", regression


def compare(new_doc: dict[str, Any], old_doc: dict[str, Any], fs: FeatureSet, max_regression: float = 0.05,
            shards: list[int] | None = None) -> DriftReport:
    """Score both artifacts on the held-out slice of ``shards`` (default all) and compare them."""
    if list(new_doc["quantiles"]) != list(old_doc["quantiles"]):
        raise ArtifactError(f"cannot compare artifacts with different quantiles "
                            f"({new_doc['quantiles']} vs {old_doc['quantiles']})")
    idx = tuple(range(len(fs.stats))) if shards is None else tuple(shards)
    qs = tuple(float(q) for q in new_doc["quantiles"])
    cells = predict_cells(fs, [own_mixing_job(new_doc, idx, ("drift", "-", "new", "seen")),
                               own_mixing_job(old_doc, idx, ("drift", "-", "old", "seen"))], "drift predictions")
    agg = aggregate(cells, qs, ("method", "target"))
    m = {v: {r["target"]: r for r in agg.filter(pl.col("method") == v).iter_rows(named=True)} for v in ("new", "old")}
    ok, reason, regression = verdict(m["old"], m["new"], list(qs), max_regression)
    names = [f"pinball_{q:g}" for q in qs] + [f"coverage_{q:g}" for q in qs] + list(COMPARED)
    metrics = pl.DataFrame([{"target": t, "metric": k, "old": m["old"][t][k], "new": m["new"][t][k],
                             "delta": m["new"][t][k] - m["old"][t][k]} for t in TARGETS for k in names])
    matching = match_specialists(new_doc, old_doc)
    return DriftReport(ok, reason, max_regression, regression, metrics, matching,
                       coefficient_changes(new_doc, old_doc, matching), moved_configurations(new_doc, old_doc, matching))


def gate(new_doc: dict[str, Any], fs: FeatureSet, root: str, max_regression: float,
         s3: S3Options | None = None) -> DriftReport | None:
    """For the publish path: compare with ``latest`` under ``root``; None when nothing is published yet.

    Callers refuse to publish with ``report.raise_if_worse()``.
    """
    from .publish import LATEST, resolve

    if max_regression < 0:
        raise ReceError("--max-regression must be a non-negative fraction (0.05 = 5%)")
    if not ObjectRoot(root, s3).exists(LATEST):
        return None
    old_doc, _ = resolve(root, LATEST, s3=s3)
    old_schema, new_schema = old_doc.get("schema_version"), new_doc["schema_version"]
    if old_schema != new_schema:
        raise RegressionError(
            f"{root}: latest is a {old_schema} artifact and this rece-dist writes {new_schema}, which this version "
            "cannot score side by side; publish the first version of the new schema with --force (api: "
            "max_regression=None)")
    for t in TARGETS:
        old, new = ([f["name"] for f in d["targets"][t]["features"]] for d in (old_doc, new_doc))
        if old != new:
            diff = ", ".join([f"+{n}" for n in new if n not in old] + [f"-{n}" for n in old if n not in new]) or "reordered"
            raise RegressionError(
                f"{root}: latest was trained on another {t} feature set ({len(old)} features, this rece-dist "
                f"computes {len(new)}: {diff}), so the regression gate cannot score it on the same rows; "
                "publish the first version of this feature set with --force (api: max_regression=None)")
    return compare(new_doc, old_doc, fs, max_regression)
