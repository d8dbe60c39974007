"""Re-fits on subsets of one featurized store, the predictions they make, and their aggregation.

What the evaluation protocols, the donor experiment and the drift gate share, so that none of
them imports another: a `FitRequest` names training shards and a kind of fit ("rece",
"global", "per_config"); a `Fitter` runs each distinct request once (``recipe.fit_recipe``,
``pipeline.fit_ensemble``); a `PredictJob` scores shards with a fitted document in Ray tasks,
one `Cell` per configuration and target; `aggregate` turns cells into metric tables.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import polars as pl
import ray

from .errors import ReceError
from .fitcache import FitCache
from .metrics import quantile_metrics, relative_pinball
from .pipeline import TARGETS, FeatureSet, TrainSettings, fit_ensemble, score_shard
from .recipe import fit_recipe
from .progress import RETRIES, gather, log


class EvaluationError(ReceError):
    """A protocol cannot run on this store (too few configurations, GPUs, models or dates)."""


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
    fit at the default K); caching them halves a full evaluation. Below that, distinct fits
    share their unchanged specialists (``fitcache.FitCache``: a configuration's own model is
    solved once for every fold that trains on all its shards). Distinct fits run a few at a
    time from driver threads so a cluster is not idle between one fit's LPs and the next.

    ``fit_rows`` caps every refit's training rows per configuration and target (a fixed random
    sample, ``TrainSettings.rows_per_config``), so that validation costs scale with the number
    of configurations and folds, not with the store's rows.

    A "rece" request is the recipe (``recipe.fit_recipe``): its interval calibration is nested
    in each fold. Its per-target model choice is not (``select_folds`` 0): a fold's "rece" fit
    keeps the specialists for both targets and its "global" fit is the pooled alternative, so
    every evaluation reports both candidates the choice is between.
    """

    def __init__(self, fs: FeatureSet, settings: TrainSettings, parallel: int = 3, fit_rows: int | None = None):
        self.fs = fs
        settings = dataclasses.replace(settings, select_folds=0)
        if fit_rows is not None:
            settings = dataclasses.replace(settings, rows_per_config=min(settings.rows_per_config or fit_rows, fit_rows))
        self.settings = settings
        self.parallel = parallel
        self.docs: dict[FitRequest, dict[str, Any]] = {}
        self.cache = FitCache()
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
        if req.kind == "rece":
            return fit_recipe(self.fs, settings, list(req.train), cache=self.cache)
        ids = {self.fs.stats[i].config_id for i in req.train}
        return fit_ensemble(self.fs, settings, list(req.train), fit_labels(req.kind, ids), cache=self.cache)

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
            log(f"[evaluate] {label}: specialist fits so far: {self.cache.solved} solved, {self.cache.hits} reused")
        return [self.docs[k] for k in keys]


# --- predictions and scored cells ------------------------------------------------------------

@dataclass(frozen=True)
class CellTag:
    """Which predictions a cell holds: one method's, for one configuration's rows of one target, fold and split."""

    protocol: str
    fold: str
    method: str
    split: str
    config_id: str
    target: str


CELL_FIELDS = tuple(CellTag.__dataclass_fields__)


@dataclass(frozen=True)
class Cell(CellTag):
    """A cell's rows in memory."""

    y: np.ndarray
    values: np.ndarray  # (rows, quantiles)


@dataclass(frozen=True)
class CellRef(CellTag):
    """A Cell whose rows stay in Ray's object store: ``out`` is the shard's ``score_shard`` result
    (both targets). ``aggregate`` and ``sample_cells`` read them inside tasks, so the driver
    holds only metric rows and samples, whatever the number of rows scored."""

    out: ray.ObjectRef
    rows: int

    def fetch(self) -> Cell:
        return _cell(self, ray.get(self.out))


def _cell(c: Cell | CellRef, out: Mapping[str, Any] | None = None) -> Cell:
    if isinstance(c, Cell):
        return c
    y, values, _ = out[c.target]  # type: ignore[index]
    return Cell(*(getattr(c, f) for f in CELL_FIELDS), y, values)


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


@ray.remote(max_retries=RETRIES, num_returns=2)
def _score(doc: dict[str, Any], shard: Any, cfg: Any, all_rows: bool, top_k: int | None,
           temperature: float) -> tuple[dict[str, Any], dict[str, int]]:
    """A shard's predictions (kept in the object store) and, for the driver, their row counts."""
    out = score_shard(doc, shard, cfg, all_rows, top_k, temperature)
    return out, {t: len(out[t][0]) for t in TARGETS}


def predict_cells(fs: FeatureSet, jobs: Sequence[PredictJob], label: str = "predictions") -> list[CellRef]:
    """Run every job's shard predictions as Ray tasks; one CellRef per (job, shard, target) with rows.

    Only row counts come back to the driver; the predictions stay in the object store."""
    doc_refs: dict[int, ray.ObjectRef] = {}
    outs, counts, owners = [], [], []
    for job in jobs:
        ref = doc_refs.setdefault(id(job.doc), ray.put(job.doc))
        k = len(job.doc["specialists"]) if job.top_k is None else job.top_k
        for i in job.shards:
            cid = fs.stats[i].config_id
            out, n = _score.remote(ref, fs.shard_refs[i], fs.configs[cid], job.all_rows, k, job.temperature)
            outs.append(out)
            counts.append(n)
            owners.append((job, cid))
    cells = []
    for (job, cid), out, n in zip(owners, outs, gather(counts, label) if counts else []):
        cells += [CellRef(*job.tag, cid, t, out, n[t]) for t in TARGETS if n[t]]
    return cells


# --- aggregation --------------------------------------------------------------------------------

def group_metrics(cs: Sequence[Cell], qs: tuple[float, ...]) -> dict[str, Any]:
    """``quantile_metrics`` and relative pinball over one group's pooled rows, and the macro mean."""
    y = np.concatenate([c.y for c in cs])
    vals = np.vstack([c.values for c in cs])
    per_config: dict[str, list[Cell]] = {}
    for c in cs:
        per_config.setdefault(c.config_id, []).append(c)
    macro = np.mean([relative_pinball(np.concatenate([c.y for c in v]), np.vstack([c.values for c in v]), qs)
                     for v in per_config.values()])
    return {**quantile_metrics(y, vals, qs), "rel_pinball": relative_pinball(y, vals, qs),
            "rel_pinball_macro": float(macro), "configs": len(per_config)}


@ray.remote(max_retries=RETRIES)
def _group_metrics(cells: list[CellRef], qs: tuple[float, ...], *outs: Any) -> dict[str, Any]:
    """``group_metrics`` in a task: ``outs`` are the cells' shard results, fetched here, not on the driver."""
    by_ref = dict(zip([c.out.hex() for c in cells], outs))
    return group_metrics([_cell(c, by_ref[c.out.hex()]) for c in cells], qs)


def _outs(cells: Sequence[CellRef]) -> list[ray.ObjectRef]:
    """The distinct shard results behind ``cells``, each passed to a task once."""
    return list({c.out.hex(): c.out for c in cells}.values())


def aggregate(cells: Iterable[Cell | CellRef], quantiles: Sequence[float], by: Sequence[str],
              attrs: Mapping[str, Mapping[str, str]] | None = None) -> pl.DataFrame:
    """Metrics per group of cells (``by``: Cell fields, or keys of ``attrs[config_id]`` like gpu).

    Rows are pooled within a group for ``metrics.quantile_metrics`` and ``rel_pinball``;
    ``rel_pinball_macro`` is the mean over the group's configurations of each one's own
    relative pinball, so every configuration counts equally. Groups of ``CellRef`` are
    computed in Ray tasks (one per group); in-memory ``Cell`` groups here.
    """
    qs = tuple(quantiles)
    groups: dict[tuple[str, ...], list[Cell | CellRef]] = {}
    for c in cells:
        key = tuple(str(getattr(c, f)) if f in CELL_FIELDS else attrs[c.config_id][f] for f in by)  # type: ignore[index]
        groups.setdefault(key, []).append(c)
    keys = sorted(groups)
    remote = {k: _group_metrics.remote(groups[k], qs, *_outs(groups[k])) for k in keys
              if isinstance(groups[k][0], CellRef)}
    done = dict(zip(remote, ray.get(list(remote.values())))) if remote else {}
    rows = [{**dict(zip(by, k)), **(done[k] if k in done else group_metrics(groups[k], qs))} for k in keys]  # type: ignore[arg-type]
    return pl.DataFrame(rows)


@ray.remote(max_retries=RETRIES)
def _sample_group(cells: list[CellRef], rows: int, seed: int, *outs: Any) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    by_ref = dict(zip([c.out.hex() for c in cells], outs))
    got = [_cell(c, by_ref[c.out.hex()]) for c in cells]
    n = len(got[0].y)
    idx = np.sort(np.random.default_rng(seed).choice(n, size=min(rows, n), replace=False))
    return got[0].y[idx], {c.method: c.values[idx] for c in got}


def sample_cells(groups: Sequence[Sequence[CellRef]], rows: int, seed: int) -> list[tuple[np.ndarray, dict[str, np.ndarray]]]:
    """Per group (one configuration and target, a cell per method, the same rows each): up to
    ``rows`` random rows, the same for every method, as (y, method -> values); drawn in tasks."""
    return ray.get([_sample_group.remote(list(g), rows, seed, *_outs(g)) for g in groups]) if groups else []
