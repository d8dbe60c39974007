"""The training recipe: the fits of ``pipeline.fit_ensemble`` plus the validation refits that
decide and calibrate them, and ``train``, the job from a store to an artifact document.

Two questions are answered by refitting on groups of training configurations and scoring the
configurations each refit left out (grouped cross-validation: the held-out group never
reaches its fold's fit):

- **Specialists or one pooled model, per target** (``select_models``, ``--select-folds``).
  RECE's specialists exist to transfer better than one model of every configuration; where
  they do not (alpha on the generator's stores: one law everywhere), the artifact should not
  pay for them with variance. For each target the criterion is the relative pinball loss on
  held-out configurations (``metrics.relative_pinball``, each configuration counting once);
  the specialists are kept only if theirs is lower than the pooled model's by more than
  ``SELECT_MARGIN`` and they predict most held-out configurations better, otherwise every
  specialist carries the pooled fit for that target
  (``targets.<t>.model`` says which), so the evaluation rule does not change. Refits use at
  most ``VALIDATION_ROWS_PER_CONFIG`` rows per configuration and score at most
  ``SCORED_ROWS_PER_CONFIG`` of each held-out one, so its LPs and scores do not grow with the
  store (drawing the samples still reads every shard: docs/scaling.md).
- **How far intervals must widen on a configuration never seen** (``unseen_calibration``,
  ``--calibrate-folds``), split-conformal over the same kind of groups.

``fit_recipe`` applies both, so that anything re-fitting the recipe on a subset (``rece
evaluate``'s folds) nests them inside its own folds.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import ray

from .config import DeploymentConfig
from .ensemble import RECEModel, _qkey
from .errors import ReceError
from .fitcache import FitCache
from .metrics import pinball
from .pipeline import TARGETS, FeatureSet, held_out_metrics, fit_ensemble, predict_with, shard_rng
from .progress import RETRIES, gather, log
from .settings import SCORED_ROWS_PER_CONFIG, VALIDATION_ROWS_PER_CONFIG, TrainSettings
from .shards import Shard, featurize_store
from .store import Partition, S3Options

# Relative margin by which the specialists' held-out criterion must beat the pooled model's for
# a target to keep them: a tie goes to the model with fewer parameters. Measured on a
# 12-configuration store, refitting with four seeds moved the specialists' criterion against
# the pooled model's by -4.5% to +3.3% (docs/transfer.md): a smaller gain is not a decision.
SELECT_MARGIN = 0.02


@dataclass
class TrainResult:
    artifact: dict[str, Any]
    partitions: list[Partition]  # every input partition (for the manifest's data fingerprint)
    seconds: float
    features: FeatureSet  # still in the object store: drift checks score on the same rows


def train(store_uri: str, settings: TrainSettings, s3: S3Options | None = None,
          timings: dict[str, Any] | None = None, feature_cache: str | None = None) -> TrainResult:
    """Train a RECE artifact from a store. Raises ``ReceError`` with a clear message on bad input.

    ``timings``, if given, receives each phase's wall seconds (``featurize_s``, ``fit_s``,
    ``held_out_s``) and ``fit_ensemble``'s own (for ``bench/bench_scale.py``); ``feature_cache``
    is the artifact root whose feature cache ``featurize_store`` goes through."""
    t0 = time.monotonic()
    fs = featurize_store(store_uri, settings, s3, feature_cache)
    t1 = time.monotonic()
    doc = fit_recipe(fs, settings, timings=timings)
    t2 = time.monotonic()
    doc["metrics"] = held_out_metrics(doc, fs, settings)
    t3 = time.monotonic()
    if timings is not None:
        timings.update(featurize_s=t1 - t0, fit_s=t2 - t1, held_out_s=t3 - t2)
    return TrainResult(doc, fs.partitions, t3 - t0, fs)


def fit_recipe(fs: FeatureSet, settings: TrainSettings, shards: list[int] | None = None,
               timings: dict[str, Any] | None = None, cache: FitCache | None = None) -> dict[str, Any]:
    """The artifact document the recipe makes of ``shards`` (default: all): the per-target model
    choice (``settings.select_folds``), the fits, and the unseen-configuration widening
    (``settings.calibrate_folds``), the validation refits seeing only these shards.

    Without a ``cache`` the recipe keeps its own: a selection fold's two refits then share one
    embedding fit (equal training shards), and calibration folds equal to the selection's can
    reuse its refits."""
    shards = list(range(len(fs.stats))) if shards is None else list(shards)
    cache = FitCache() if cache is None else cache
    ids = sorted({fs.stats[i].config_id for i in shards})
    selection = None
    if settings.select_folds and settings.specialists > 1:
        if len(ids) < 3:
            log(f"[rece] model selection skipped: it needs at least 3 configurations to hold some out, got {len(ids)}")
        else:
            selection = select_models(fs, settings, shards, cache)
    pooled = tuple(selection["pooled"]) if selection else ()
    doc = _fit(fs, settings, shards, pooled, timings, cache)
    if selection:
        doc["training"]["selection"] = selection
    if settings.calibrate_folds:
        doc["unseen_calibration"] = unseen_calibration(fs, settings, shards, pooled, cache)
    return doc


def _fit(fs: FeatureSet, settings: TrainSettings, shards: list[int], pooled: Sequence[str],
         timings: dict[str, Any] | None = None, cache: FitCache | None = None) -> dict[str, Any]:
    """``fit_ensemble`` with ``pooled`` targets; with every target pooled, one global specialist."""
    labels = {fs.stats[i].config_id: 0 for i in shards} if len(pooled) == len(TARGETS) else None
    return fit_ensemble(fs, settings, shards, labels, timings, cache, pooled)


def _folds(ids: Sequence[str], n: int, seed: int) -> list[set[str]]:
    """``n`` groups of configurations for grouped cross-validation (a fixed permutation by seed)."""
    order = np.random.default_rng(seed).permutation(len(ids))
    return [{ids[i] for i in order[k::n]} for k in range(n)]


def _config_rows(fs: FeatureSet, shards: Sequence[int]) -> dict[tuple[str, str], int]:
    """Training rows per (configuration, target) over ``shards``: the denominator of a sampled share."""
    rows: dict[tuple[str, str], int] = {}
    for i in shards:
        for t in TARGETS:
            key = (fs.stats[i].config_id, t)
            rows[key] = rows.get(key, 0) + fs.stats[i].train_rows[t]
    return rows


def _share(rows: dict[tuple[str, str], int], config_id: str, cap: int) -> dict[str, float]:
    """Per target, the share of a configuration's rows that makes about ``cap`` of them."""
    return {t: min(1.0, cap / max(rows.get((config_id, t), 0), 1)) for t in TARGETS}


def _sampled_predictions(doc: dict[str, Any], shard: Shard, cfg: DeploymentConfig, seed: int,
                         share: dict[str, float]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per target, (y, predicted quantiles) of a fixed random ``share`` of one shard's rows, all
    of them (the fold held the configuration out); only the sampled rows are predicted."""
    rng = shard_rng(shard, seed, 11)
    masks = {t: rng.random(len(shard.y[t])) < share[t] for t in TARGETS}
    out = predict_with(RECEModel(doc), shard, cfg, True, None, None, masks)
    return {t: (y, values) for t, (y, values, _) in out.items()}


_scored_sample = ray.remote(max_retries=RETRIES)(_sampled_predictions)


@ray.remote(max_retries=RETRIES)
def _loss_sums(doc: dict[str, Any], shard: Shard, cfg: DeploymentConfig, seed: int,
               share: dict[str, float]) -> dict[str, tuple[float, float]]:
    """Per target, over a fixed random ``share`` of one shard's rows: (sum over rows of the mean
    pinball loss across quantiles, sum of |y|). Summed over a configuration's shards, their
    ratio is its relative pinball loss (``metrics.relative_pinball``); only two numbers per
    shard leave the task."""
    qs = [float(q) for q in doc["quantiles"]]
    sums = {}
    for t, (y, values) in _sampled_predictions(doc, shard, cfg, seed, share).items():
        sums[t] = (len(y) * float(np.mean([pinball(y, values[:, j], q) for j, q in enumerate(qs)])) if len(y) else 0.0,
                   float(np.abs(y).sum()))
    return sums


def select_models(fs: FeatureSet, settings: TrainSettings, shards: list[int],
                  cache: FitCache | None = None) -> dict[str, Any]:
    """Per target, whether the specialists or one pooled model predict held-out configurations better.

    ``settings.select_folds`` groups of configurations; each fold fits the specialists and the
    pooled model on the other groups (at most ``VALIDATION_ROWS_PER_CONFIG`` rows per
    configuration) and scores its own (at most ``SCORED_ROWS_PER_CONFIG`` rows of each, the same
    rows for both). Returns the audit record kept in the
    artifact's ``training.selection``: criteria, the pooled targets, the groups."""
    ids = sorted({fs.stats[i].config_id for i in shards})
    n = min(settings.select_folds, len(ids))
    cap = min(settings.rows_per_config or VALIDATION_ROWS_PER_CONFIG, VALIDATION_ROWS_PER_CONFIG)
    inner = dataclasses.replace(settings, select_folds=0, calibrate_folds=0, rows_per_config=cap)
    cache = FitCache() if cache is None else cache  # a fold's two refits share their embedding fit
    rows = _config_rows(fs, shards)
    scored: list[tuple[tuple[str, str], ray.ObjectRef]] = []  # ((kind, held-out configuration), its shard's sums)
    groups = []
    for k, out in enumerate(_folds(ids, n, settings.seed)):
        log(f"[rece] model selection: fold {k + 1}/{n}, holding out {len(out)} configuration(s)")
        train = [i for i in shards if fs.stats[i].config_id not in out]
        trained = sorted({fs.stats[i].config_id for i in train})
        groups.append({"held_out": sorted(out), "trained_on": trained})
        for kind, labels in (("specialists", None), ("pooled", {c: 0 for c in trained})):
            doc_ref = ray.put(fit_ensemble(fs, inner, train, labels, cache=cache))
            for i in shards:
                c = fs.stats[i].config_id
                if c in out:
                    scored.append(((kind, c), _loss_sums.remote(doc_ref, fs.shard_refs[i], fs.configs[c], settings.seed,
                                                                _share(rows, c, SCORED_ROWS_PER_CONFIG))))
    sums: dict[tuple[str, str, str], np.ndarray] = {}  # (kind, config, target) -> (pinball sum, |y| sum)
    for ((kind, c), _), got in zip(scored, gather([r for _, r in scored], "model selection scores")):
        for t in TARGETS:
            sums[(kind, c, t)] = sums.get((kind, c, t), np.zeros(2)) + got[t]
    per_config = {key: v[0] / v[1] if v[1] > 0 else np.nan for key, v in sums.items()}  # relative pinball
    criterion = {kind: {t: float(np.nanmean([v for (k, _, tt), v in per_config.items() if k == kind and tt == t]))
                        for t in TARGETS} for kind in ("specialists", "pooled")}
    held = sorted({c for _, c, _ in per_config})
    improved = {t: float(np.mean([per_config[("specialists", c, t)] < per_config[("pooled", c, t)] for c in held]))
                for t in TARGETS}
    pooled = pooled_targets(criterion, improved)
    log("[rece] model selection (relative pinball on held-out configurations): " + "; ".join(
        f"{t} specialists {criterion['specialists'][t]:.5f} vs pooled {criterion['pooled'][t]:.5f}, better on "
        f"{improved[t]:.0%} of configurations -> {'pooled' if t in pooled else 'specialists'}" for t in TARGETS))
    return {"method": "grouped cross-validation over configurations", "folds": n, "rows_per_config": cap,
            "scored_rows_per_config": SCORED_ROWS_PER_CONFIG, "margin": SELECT_MARGIN, "criterion": criterion,
            "specialists_better_on": improved, "pooled": pooled, "groups": groups}


def pooled_targets(criterion: dict[str, dict[str, float]], improved: dict[str, float],
                   margin: float = SELECT_MARGIN) -> list[str]:
    """Targets to pool: unless the specialists' held-out criterion beats the pooled model's by
    more than ``margin`` (relative) *and* they predict most held-out configurations better
    (``improved``: the share where they do). A tie, a gain carried by one configuration, or a
    criterion that could not be measured (NaN) pools."""
    return [t for t in TARGETS
            if not (criterion["specialists"][t] < (1 - margin) * criterion["pooled"][t] and improved[t] > 0.5)]


def widening_factor(ratio: np.ndarray, weight: np.ndarray, level: float) -> float:
    """Smallest c >= 0 with weighted P(ratio <= c) >= level (inverted CDF, so it is attained)."""
    ok = np.isfinite(ratio)
    if not ok.any():
        return 1.0
    return max(0.0, float(np.quantile(ratio[ok], level, weights=weight[ok], method="inverted_cdf")))


def unseen_calibration(fs: FeatureSet, settings: TrainSettings, shards: list[int],
                       pooled: Sequence[str] = (), cache: FitCache | None = None) -> dict[str, Any]:
    """Per target and quantile, how far from the median a quantile must move to hold its level
    on configurations the fit never saw (split-conformal over groups of configurations).

    Held-out intervals of seen configurations only carry within-configuration noise; on a new
    configuration the model's own transfer error adds to it. Fold k refits on every group but
    k (with the same ``pooled`` targets as the artifact, at most ``VALIDATION_ROWS_PER_CONFIG``
    training rows per configuration) and predicts a fixed random sample of about as many of each
    of group k's configurations' rows (so the driver holds a bounded number per configuration,
    whatever the store's size); for tau
    below the median the factor is the (1 - tau) quantile of (q_mid - y) / (q_mid - q_tau),
    above it the tau quantile of (y - q_mid) / (q_tau - q_mid), every configuration weighing
    the same.
    """
    ids = sorted({fs.stats[i].config_id for i in shards})
    if len(ids) < 3:
        raise ReceError(f"--calibrate-folds needs at least 3 configurations to hold some out; got {len(ids)}")
    n = min(settings.calibrate_folds, len(ids))
    cap = min(settings.rows_per_config or VALIDATION_ROWS_PER_CONFIG, VALIDATION_ROWS_PER_CONFIG)
    inner = dataclasses.replace(settings, calibrate_folds=0, select_folds=0, rows_per_config=cap)
    qs = settings.quantiles
    mid = len(qs) // 2
    rows = _config_rows(fs, shards)
    held: dict[tuple[str, str], list[tuple[np.ndarray, np.ndarray]]] = {}  # (target, config) -> (y, quantiles)
    groups = []  # per fold: what it held out and what its fit says it trained on (auditable nesting)
    for k, out in enumerate(_folds(ids, n, settings.seed)):
        log(f"[rece] unseen calibration: fold {k + 1}/{n}, holding out {len(out)} configuration(s)")
        doc_ref = ray.put(_fit(fs, inner, [i for i in shards if fs.stats[i].config_id not in out], pooled, cache=cache))
        groups.append({"held_out": sorted(out), "trained_on": sorted(ray.get(doc_ref)["configurations"])})
        test = [i for i in shards if fs.stats[i].config_id in out]
        refs = [_scored_sample.remote(doc_ref, fs.shard_refs[i], fs.configs[fs.stats[i].config_id], settings.seed,
                                      _share(rows, fs.stats[i].config_id, cap)) for i in test]
        for i, res in zip(test, gather(refs, "unseen calibration scores")):
            for t in TARGETS:
                held.setdefault((t, fs.stats[i].config_id), []).append(res[t])
    factors: dict[str, dict[str, float]] = {}
    for t in TARGETS:
        per_config = [(np.concatenate([p[0] for p in v]), np.vstack([p[1] for p in v]))
                      for (tt, _), v in sorted(held.items()) if tt == t]
        y = np.concatenate([p[0] for p in per_config])
        V = np.vstack([p[1] for p in per_config])
        w = np.concatenate([np.full(len(p[0]), 1.0 / max(len(p[0]), 1)) for p in per_config])
        factors[t] = {}
        for j, q in enumerate(qs):
            d = V[:, j] - V[:, mid]
            with np.errstate(divide="ignore", invalid="ignore"):
                ratio = (y - V[:, mid]) / d
            level = q if j > mid else 1 - q
            factors[t][_qkey(q)] = 1.0 if j == mid else widening_factor(np.where(d != 0, ratio, np.nan), w, level)
    return {"method": "grouped cross-validation over configurations", "folds": n, "factors": factors, "groups": groups}
