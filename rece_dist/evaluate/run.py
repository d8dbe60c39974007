"""The whole evaluation of an artifact's recipe on one store: every protocol, baseline, the
embedding check and the sensitivity sweep, aggregated into the tables the report shows.

The donor experiment and drift against a previous version are composed on top of this by
``review.py``; they need only ``refit``, so nothing here imports them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import polars as pl

from ..config import DeploymentConfig
from ..pipeline import TARGETS, FeatureSet, TrainSettings
from ..settings import EVALUATION_ROWS_PER_CONFIG, SWEEP_FOLDS
from ..progress import log
from ..refit import (CellRef, EvaluationError, FitRequest, Fitter, aggregate, aggregate_refined, own_mixing_job,
                     predict_cells, sample_cells)
from .baselines import Method, _folds, baseline_rows, methods, table_footnotes, text_table
from .embedding_check import EmbeddingCheck, embedding_check
from .targets import rece_method, targets_text, transfer_targets, unobserved_in_folds
from .protocols import (PROTOCOL_TITLES, PROTOCOLS, Fold, ProtocolRun, config_kfold, fold_requests, protocol_folds,
                        run_protocol)
from .tune import Sweep, sweep, sweep_requests

@dataclass(frozen=True)
class EvalOptions:
    protocols: tuple[str, ...] = PROTOCOLS
    sparse_top_k: int = 2
    cv_folds: int | None = SWEEP_FOLDS     # sensitivity folds over configurations (None: one per config)
    k_grid: tuple[int, ...] = (1, 2, 4, 6)
    temperatures: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3)
    top_ks: tuple[int | None, ...] = (1, 2, None)
    borrows: tuple[float, ...] | None = None  # None: the artifact's borrow only
    sample_rows: int = 150
    parallel_fits: int = 3
    fit_rows: int | None = EVALUATION_ROWS_PER_CONFIG  # rows per configuration and target in a refit (None: all)

    def __post_init__(self) -> None:
        bad = [p for p in self.protocols if p not in PROTOCOLS]
        if bad:
            raise EvaluationError(f"unknown protocol(s) {', '.join(bad)}; use {', '.join(PROTOCOLS)} or all")
        if self.sparse_top_k < 1:
            raise EvaluationError("--sparse-top-k must be at least 1")
        if self.fit_rows is not None and self.fit_rows < 1:
            raise EvaluationError(f"--fit-rows must be positive (or 0 for every row), got {self.fit_rows}")


@dataclass
class Sample:
    """A few unseen rows of one configuration with each method's predicted quantiles (for plots)."""

    protocol: str
    config_id: str
    target: str
    y: np.ndarray
    values: dict[str, np.ndarray]  # method -> (rows, quantiles)


@dataclass
class Evaluation:
    store_uri: str
    artifact: dict[str, Any]
    settings: TrainSettings
    options: EvalOptions
    methods: tuple[Method, ...]
    configs: dict[str, DeploymentConfig]
    runs: dict[str, ProtocolRun]
    scores: pl.DataFrame           # protocol, method, split, target
    by_config: pl.DataFrame        # ... + config_id
    by_gpu: pl.DataFrame           # ... + gpu
    by_model: pl.DataFrame         # ... + model
    published: pl.DataFrame        # the artifact itself on the store's held-out slice, per split and target
    samples: list[Sample]
    embedding: EmbeddingCheck | None
    sweep: Sweep | None
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    unobserved: dict[tuple[str, str, str], list[str]] = field(default_factory=dict)  # targets.unobserved_in_folds


def config_attrs(configs: Mapping[str, DeploymentConfig]) -> dict[str, dict[str, str]]:
    """What ``aggregate`` can group by besides Cell fields."""
    return {c: {"gpu": cfg.gpu.name, "model": cfg.model.name} for c, cfg in configs.items()}


def _samples(cells: Sequence[CellRef], protocol: str, rows: int, seed: int) -> list[Sample]:
    """Up to ``rows`` unseen rows per (configuration, target), the same rows for every method."""
    by: dict[tuple[str, str], dict[str, CellRef]] = {}
    for c in cells:
        if c.protocol == protocol and c.split == "unseen":
            by.setdefault((c.config_id, c.target), {})[c.method] = c
    keys = sorted(by)
    drawn = sample_cells([list(by[k].values()) for k in keys], rows, seed)
    return [Sample(protocol, cid, t, y, values) for (cid, t), (y, values) in zip(keys, drawn)]


def artifact_splits(fs: FeatureSet, doc: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Shards whose configuration and date the artifact trained on ("seen"), and the rest ("unseen")."""
    first, last = doc["training"]["date_window"]
    trained = [st.config_id in doc["configurations"] and first <= st.date <= last for st in fs.stats]
    return {"seen": tuple(i for i, t in enumerate(trained) if t), "unseen": tuple(i for i, t in enumerate(trained) if not t)}


def evaluate(fs: FeatureSet, settings: TrainSettings, artifact_doc: dict[str, Any],
             options: EvalOptions = EvalOptions(), fitter: Fitter | None = None) -> Evaluation:
    """Run the protocols, baselines, embedding validation and sensitivity sweep.

    ``settings`` are the artifact's training settings: every fold re-fits with them, so the
    numbers describe the recipe that produced the artifact, on this store. ``fitter``: pass one
    to share its fits with later work on the same store (the donor experiment).
    """
    t0 = time.monotonic()
    fitter = fitter or Fitter(fs, settings, options.parallel_fits, options.fit_rows)
    meths = methods(options.sparse_top_k)
    notes: list[str] = []
    folds: dict[str, list[Fold]] = {}
    for p in options.protocols:
        try:
            folds[p] = protocol_folds(fs, p)
        except EvaluationError as exc:
            if len(options.protocols) == 1:
                raise
            notes.append(f"skipped {p}: {exc}")
            log(f"[evaluate] skipped {p}: {exc}")
    if not folds:
        raise EvaluationError("no protocol could run on this store: " + "; ".join(notes))
    cv = config_kfold(fs, options.cv_folds, settings.seed) if len(fs.config_ids) >= 3 else None
    everything = tuple(range(len(fs.stats)))
    # every fit of the evaluation in one pool, largest training sets first: phase by phase, each
    # phase's last fits ran alone on an otherwise idle machine
    requests = [r for p in folds for r in fold_requests(folds[p], meths)] + [FitRequest(everything, "per_config")]
    if cv is not None:
        requests += sweep_requests(fitter.settings, cv, options.k_grid, options.borrows)
    fitter.fit_many(sorted(requests, key=lambda r: -len(r.train)), "evaluation fits")
    runs: dict[str, ProtocolRun] = {}
    for p, fp in folds.items():
        log(f"[evaluate] {p} ({PROTOCOL_TITLES[p]}): {len(fp)} fold(s)")
        runs[p] = run_protocol(fitter, fp, meths, settings.temperature)
    cells = [c for r in runs.values() for c in r.cells]
    qs = settings.quantiles
    attrs = config_attrs(fs.configs)
    base = ("protocol", "method", "split", "target")
    published = aggregate(predict_cells(fs, [own_mixing_job(artifact_doc, shards, ("published", "-", "published", split))
                                             for split, shards in artifact_splits(fs, artifact_doc).items() if shards],
                                        "published artifact"), qs, ("split", "target"))
    main = "loco" if "loco" in runs else next(iter(runs))

    per_config_doc = fitter.fit_many([FitRequest(everything, "per_config")], "embedding fit")[0]
    held_out = ({next(iter(f.held_out_configs)): d["global"] for f, d in zip(runs["loco"].folds, runs["loco"].docs)}
                if "loco" in runs else None)
    emb = (embedding_check(fs, per_config_doc, settings, options.k_grid, held_out) if len(fs.config_ids) >= 3
           else None)
    if emb is None:
        notes.append("embedding validation needs at least 3 configurations")
    sw = None
    if cv is not None:
        sw = sweep(fitter, cv, options.k_grid, options.temperatures, options.top_ks, options.borrows)
    else:
        notes.append("the sensitivity sweep needs at least 3 configurations")
    scores, by_config, by_gpu, by_model = aggregate_refined(cells, qs, base, ("config_id", "gpu", "model"), attrs)
    return Evaluation(
        store_uri=fs.store_uri, artifact=artifact_doc, settings=settings, options=options, methods=meths,
        configs=dict(fs.configs), runs=runs,
        scores=scores, by_config=by_config, by_gpu=by_gpu, by_model=by_model,
        published=published, samples=_samples(cells, main, options.sample_rows, settings.seed),
        embedding=emb, sweep=sw, notes=notes, seconds=time.monotonic() - t0, unobserved=unobserved_in_folds(fs, runs),
    )


def ev_targets(ev: Evaluation) -> pl.DataFrame:
    """The transfer targets of an evaluation (``targets.transfer_targets``)."""
    judged = {t: rece_method(ev.artifact, ev.methods, t) for t in TARGETS}
    return transfer_targets(ev.scores, ev.by_config, judged, ev.configs, ev.embedding,
                            ev.unobserved)


def baseline_text(ev: Evaluation) -> str:
    """Every protocol's baseline table, as printed by ``rece evaluate``."""
    out = []
    for p in ev.runs:
        for t in TARGETS:
            out.append(f"== {p} ({PROTOCOL_TITLES[p]}), {t}, {_folds(len(ev.runs[p].folds))} ==")
            out.append(text_table(baseline_rows(ev.scores, ev.methods, p, t)))
        out += table_footnotes(ev.scores, ev.methods, p)
    targets = targets_text(ev_targets(ev))
    sp = ev.embedding.spearman if ev.embedding is not None else {}
    if sp:
        targets += ("\nSpearman of behaviour distance with the mixing embedding (latency profile, RMS): "
                    + ", ".join(f"{t} {sp[t]['mixing']:.3f}" for t in TARGETS)
                    + "; with the seed's configuration vector (cosine, what mixing used before): "
                    + ", ".join(f"{t} {sp[t]['config_cosine']:.3f}" for t in TARGETS))
        if all("model_rms" in sp[t] for t in TARGETS):
            targets += ("; with model-based coordinates from the global model that never saw the configuration: "
                        + ", ".join(f"{t} {sp[t]['model_rms']:.3f}" for t in TARGETS))
    return "\n".join(out + ([targets] if targets else []))
