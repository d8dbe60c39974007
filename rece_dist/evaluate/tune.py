"""Sensitivity and tuning: K, borrow, temperature and top-k by grouped cross-validation over configurations."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import polars as pl

from ..pipeline import TARGETS, TrainSettings, featurize_store
from ..refit import EvaluationError, FitRequest, Fitter, PredictJob, aggregate, predict_cells
from .baselines import text_table
from .protocols import Fold, config_kfold

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
    points = _points(fitter.settings, k_grid, borrows)
    docs = fitter.fit_many(sweep_requests(fitter.settings, folds, k_grid, borrows), "sweep fits")
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


def _points(settings: TrainSettings, k_grid: Sequence[int], borrows: Sequence[float] | None) -> list[tuple[int, float]]:
    """The (K, borrow) pairs the sweep fits (borrow only matters with more than one specialist)."""
    borrows = (settings.borrow,) if borrows is None else tuple(borrows)
    if not borrows or any(not 0 <= b <= 1 for b in borrows):
        raise EvaluationError(f"--borrow-grid values must be in [0, 1], got {list(borrows)}")
    return [(K, b) for K in k_grid for b in (borrows if K > 1 else borrows[:1])]


def sweep_requests(settings: TrainSettings, folds: Sequence[Fold], k_grid: Sequence[int],
                   borrows: Sequence[float] | None = None) -> list[FitRequest]:
    """The fits ``sweep`` needs: one per fold and (K, borrow)."""
    return [FitRequest(f.train, "rece", K, b) for f in folds for K, b in _points(settings, k_grid, borrows)]


def choose(criteria: pl.DataFrame) -> dict[str, Any]:
    """The grid point with the lowest criterion (ties: first in name order)."""
    return criteria.sort(["criterion", "method"]).row(0, named=True)


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


def tune(store_uri: str, settings: TrainSettings, folds: int | None, k_grid: Sequence[int],
         temperatures: Sequence[float], top_ks: Sequence[int | None], borrows: Sequence[float] | None = None) -> Sweep:
    """``rece tune``: pick K, borrow, temperature and top-k by grouped CV over the store's configurations."""
    fs = featurize_store(store_uri, settings)
    if len(fs.config_ids) < 3:
        raise EvaluationError("tuning needs at least 3 configurations")
    return sweep(Fitter(fs, settings), config_kfold(fs, folds, settings.seed), k_grid, temperatures, top_ks, borrows)
