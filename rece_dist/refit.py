"""Re-fits on subsets of one featurized store, the predictions they make, and their aggregation.

What the evaluation protocols, the donor experiment and the drift gate share, so that none of
them imports another: a `FitRequest` names training shards and a kind of fit ("rece",
"global", "per_config"); a `Fitter` runs each distinct request once (``recipe.fit_recipe``,
``pipeline.fit_ensemble``); a `PredictJob` scores shards with a fitted document in Ray tasks,
one `Cell` per configuration and target; `aggregate` turns cells into metric tables.
"""

from __future__ import annotations

import dataclasses
import time
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import polars as pl
import ray

from .ensemble import RECEModel
from .errors import ReceError
from .fitcache import FitCache
from .metrics import quantile_metrics, relative_pinball
from .pipeline import TARGETS, FeatureSet, TrainSettings, fit_ensemble, predict_with
from .progress import RETRIES, gather, log
from .recipe import fit_recipe, unseen_calibration


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

    Folds, baselines and sweeps ask for overlapping fits (every protocol wants the
    per-configuration fits on all shards; a leave-one-out sweep's fits at the artifact's K are
    LOCO's); each is run once. Below that, distinct fits
    share their unchanged specialists (``fitcache.FitCache``: a configuration's own model is
    solved once for every fold that trains on all its shards). Distinct fits run a few at a
    time from driver threads so a cluster is not idle between one fit's LPs and the next.

    ``fit_rows`` caps every refit's training rows per configuration and target (a fixed random
    sample, ``TrainSettings.rows_per_config``), so that validation costs scale with the number
    of configurations and folds, not with the store's rows.

    A "rece" request is the recipe (``recipe.fit_recipe``): its interval calibration is nested
    in each fold. Its per-target model choice is not (``select_folds`` 0): a fold's "rece" fit
    keeps the specialists for both targets and its "global" fit is the pooled alternative, so
    every evaluation reports both candidates the choice is between. Under an artifact trained
    with ``calibrate_folds``, the "global" fit carries the same nested widening, since it is
    then what the artifact ships for a pooled target (``evaluate.targets`` judges it so).
    """

    def __init__(self, fs: FeatureSet, settings: TrainSettings, parallel: int = 3, fit_rows: int | None = None):
        self.fs = fs
        settings = dataclasses.replace(settings, select_folds=0)
        if fit_rows is not None:
            settings = dataclasses.replace(settings, rows_per_config=min(settings.rows_per_config or fit_rows, fit_rows))
        self.settings = settings
        self.parallel = parallel
        self.cache = FitCache()
        self._futures: dict[FitRequest, Future] = {}
        self._deferred: list[FitRequest] = []
        self._pools: list[ThreadPoolExecutor] = []

    @property
    def docs(self) -> dict[FitRequest, dict[str, Any]]:
        """The fits finished so far, by canonical request."""
        return {k: f.result() for k, f in self._futures.items() if f.done() and not f.cancelled() and f.exception() is None}

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
        doc = fit_ensemble(self.fs, settings, list(req.train), fit_labels(req.kind, ids), cache=self.cache)
        if req.kind == "global" and settings.calibrate_folds:  # what an artifact pooling every target ships
            doc["unseen_calibration"] = unseen_calibration(self.fs, settings, list(req.train), TARGETS, self.cache)
        return doc

    def defer(self, requests: Sequence[FitRequest]) -> None:
        """Queue fits behind the next ``fit_many`` call's own, which does not wait for them.

        Why: a phase's fits saturate the cluster, but its scoring and aggregation afterwards
        do not; a later phase's fits (the donor experiment's) deferred into the same pool run
        in that gap, and the later ``fit_many`` asking for them only waits for what is left."""
        self._deferred += [self._key(r) for r in requests]

    def fit_many(self, requests: Sequence[FitRequest], label: str = "fits") -> list[dict[str, Any]]:
        keys = [self._key(r) for r in requests]
        todo = [k for k in dict.fromkeys(keys) if k not in self._futures]
        if todo or self._deferred:
            pool = ThreadPoolExecutor(max_workers=self.parallel)
            self._pools.append(pool)
            for k in dict.fromkeys(todo + self._deferred):  # this call's own first
                if k not in self._futures:
                    self._futures[k] = pool.submit(self._fit, k)
            self._deferred = []
            pool.shutdown(wait=False)  # its threads work through the queue, deferred fits included
        pending = [f for f in dict.fromkeys(self._futures[k] for k in keys) if not f.done()]
        if not pending:
            return [self._futures[k].result() for k in keys]
        early = len(pending) - len(todo)
        log(f"[evaluate] {label}: {len(pending)} fit(s)" + (f", {early} queued earlier" if early > 0 else "")
            + f" ({len(keys) - len(pending)} reused)")
        t0 = time.monotonic()
        try:
            for done, fut in enumerate(as_completed(pending), 1):
                fut.result()
                log(f"[evaluate] {label}: fit {done}/{len(pending)} done ({time.monotonic() - t0:.0f} s)")
        except BaseException:  # on Ctrl-C or an error, drop the fits not yet started instead of running them all
            self.close()
            raise
        log(f"[evaluate] {label}: specialist fits so far: {self.cache.solved} solved, {self.cache.hits} reused")
        return [self._futures[k].result() for k in keys]

    def close(self) -> None:
        """Cancel the fits not started yet (deferred ones nobody asked for, or after an error)."""
        self._deferred = []
        for pool in self._pools:
            pool.shutdown(wait=False, cancel_futures=True)
        self._futures = {k: f for k, f in self._futures.items() if not f.cancelled()}

    def __enter__(self) -> "Fitter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


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


_MODELS: dict[str, RECEModel] = {}  # per worker process: models of the documents it scored lately, by object id


def _model(doc_ref: ray.ObjectRef) -> RECEModel:
    """The document's model, parsed once per worker process however many shards it scores."""
    key = doc_ref.hex()
    if key not in _MODELS:
        if len(_MODELS) >= 64:
            _MODELS.pop(next(iter(_MODELS)))
        _MODELS[key] = RECEModel(ray.get(doc_ref))
    return _MODELS[key]


@ray.remote(max_retries=RETRIES)
def _score_shard_jobs(shard: Any, cfg: Any, jobs: list[tuple[ray.ObjectRef, bool, int | None, float]]) -> tuple:
    """One shard scored by every job that wants it: each job's predictions (kept in the object
    store, one return each) and, last, their row counts for the driver. One task per shard
    rather than per (job, shard): a fold's methods and a sweep's temperatures share the shard's
    transfer and the parse of each document."""
    outs = [predict_with(_model(ref), shard, cfg, all_rows, top_k, temperature) for ref, all_rows, top_k, temperature in jobs]
    return (*outs, [{t: len(o[t][0]) for t in TARGETS} for o in outs])


def predict_cells(fs: FeatureSet, jobs: Sequence[PredictJob], label: str = "predictions") -> list[CellRef]:
    """Run every job's shard predictions as Ray tasks, one per shard; one CellRef per (job, shard,
    target) with rows. Only row counts come back to the driver; the predictions stay in the object store."""
    doc_refs: dict[int, ray.ObjectRef] = {}
    by_shard: dict[int, list[PredictJob]] = {}
    for job in jobs:
        doc_refs.setdefault(id(job.doc), ray.put(job.doc))
        for i in job.shards:
            by_shard.setdefault(i, []).append(job)
    outs, counts, owners = [], [], []
    for i, mine in by_shard.items():
        specs = [(doc_refs[id(j.doc)], j.all_rows, len(j.doc["specialists"]) if j.top_k is None else j.top_k,
                  j.temperature) for j in mine]
        cid = fs.stats[i].config_id
        *got, n = _score_shard_jobs.options(num_returns=len(specs) + 1).remote(fs.shard_refs[i], fs.configs[cid], specs)
        outs += got
        counts.append(n)
        owners += [(j, cid) for j in mine]
    done = [c for per_shard in (gather(counts, label) if counts else []) for c in per_shard]
    return [CellRef(*job.tag, cid, t, out, n[t]) for (job, cid), out, n in zip(owners, outs, done) for t in TARGETS
            if n[t]]


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


def _split_metrics(cs: Sequence[Cell], qs: tuple[float, ...], sub: Sequence[Sequence[str]]
                   ) -> tuple[dict[str, Any], list[dict[str, dict[str, Any]]]]:
    """``group_metrics`` of the whole group and, per refinement r, of its subgroups by ``sub[i][r]``
    (the key of cell i under refinement r)."""
    parts = []
    for r in range(len(sub[0]) if sub else 0):
        by: dict[str, list[Cell]] = {}
        for c, keys in zip(cs, sub):
            by.setdefault(keys[r], []).append(c)
        parts.append({k: group_metrics(v, qs) for k, v in by.items()})
    return group_metrics(cs, qs), parts


@ray.remote(max_retries=RETRIES)
def _group_metrics(cells: list[CellRef], qs: tuple[float, ...], sub: list[list[str]], *outs: Any
                   ) -> tuple[dict[str, Any], list[dict[str, dict[str, Any]]]]:
    """``_split_metrics`` in a task: ``outs`` are the cells' shard results, fetched here, not on the driver."""
    by_ref = dict(zip([c.out.hex() for c in cells], outs))
    return _split_metrics([_cell(c, by_ref[c.out.hex()]) for c in cells], qs, sub)


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
    return aggregate_refined(cells, quantiles, by, (), attrs)[0]


def aggregate_refined(cells: Iterable[Cell | CellRef], quantiles: Sequence[float], by: Sequence[str],
                      refine: Sequence[str], attrs: Mapping[str, Mapping[str, str]] | None = None) -> list[pl.DataFrame]:
    """``aggregate`` by ``by``, then by ``by`` plus each key of ``refine`` (e.g. config_id, gpu),
    all in one task per ``by`` group: a refinement's subgroups partition the group, so its rows
    are fetched once instead of once per subgroup."""
    qs = tuple(quantiles)

    def key_of(c: Cell | CellRef, f: str) -> str:
        return str(getattr(c, f)) if f in CELL_FIELDS else attrs[c.config_id][f]  # type: ignore[index]

    groups: dict[tuple[str, ...], list[Cell | CellRef]] = {}
    for c in cells:
        groups.setdefault(tuple(key_of(c, f) for f in by), []).append(c)
    keys = sorted(groups)
    sub = {k: [[key_of(c, f) for f in refine] for c in groups[k]] for k in keys}
    remote = {k: _group_metrics.remote(groups[k], qs, sub[k], *_outs(groups[k])) for k in keys
              if isinstance(groups[k][0], CellRef)}
    done = dict(zip(remote, ray.get(list(remote.values())))) if remote else {}
    got = {k: done[k] if k in done else _split_metrics(groups[k], qs, sub[k]) for k in keys}  # type: ignore[arg-type]
    frames = [pl.DataFrame([{**dict(zip(by, k)), **got[k][0]} for k in keys])]
    for r, f in enumerate(refine):
        frames.append(pl.DataFrame([{**dict(zip(by, k)), f: v, **m} for k in keys for v, m in sorted(got[k][1][r].items())]))
    return frames


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
