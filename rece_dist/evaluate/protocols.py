"""Validation protocols: which shards a fold trains on, which it scores, and the scoring of a protocol.

``loco`` holds out one configuration, ``logo`` one GPU type, ``lomo`` one model, ``temporal``
the newest date, ``cv`` random groups of configurations (the sweep). *Seen* rows are the
held-out slice (``features.holdout_mask``) of the training shards; *unseen* rows are every row
of the held-out configurations or dates.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ..config import DeploymentConfig
from ..pipeline import FeatureSet
from ..refit import CellRef, EvaluationError, FitRequest, Fitter, PredictJob, predict_cells
from .baselines import Method

PROTOCOLS = ("loco", "logo", "lomo", "temporal")
PROTOCOL_TITLES = {
    "loco": "leave one configuration out",
    "logo": "leave one GPU out",
    "lomo": "leave one model out",
    "temporal": "train on older dates, test on the newest",
    "cv": "grouped cross-validation over configurations",
}


# --- folds ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Fold:
    """One train/test split of a FeatureSet's shards (indices into ``fs.stats``)."""

    protocol: str
    name: str
    train: tuple[int, ...]        # shards the fits see (their training rows)
    seen: tuple[int, ...]         # shards scored on their held-out slice
    unseen: tuple[int, ...]       # shards scored on every row
    held_out_configs: frozenset[str] = frozenset()
    held_out_dates: frozenset[str] = frozenset()


GROUP_OF: dict[str, Callable[[DeploymentConfig], str]] = {
    "loco": lambda c: c.config_id,
    "logo": lambda c: c.gpu.name,
    "lomo": lambda c: c.model.name,
}


def short_label(cfg: DeploymentConfig) -> str:
    """Model, GPU and TP: short enough for a plot axis, and what tells most configurations apart."""
    return f"{cfg.model.name}/{cfg.gpu.name}/tp{cfg.serving.tp}"


def group_folds(fs: FeatureSet, protocol: str) -> list[Fold]:
    """Hold out every configuration of one group (configuration, GPU or model) per fold."""
    key = GROUP_OF[protocol]
    ids = fs.config_ids
    groups: dict[str, set[str]] = {}
    for c in ids:
        groups.setdefault(key(fs.configs[c]), set()).add(c)
    if len(groups) < 2:
        raise EvaluationError(f"{protocol} ({PROTOCOL_TITLES[protocol]}) needs at least 2 distinct groups; "
                              f"the store has {len(groups)}")
    folds = []
    for g, out in sorted(groups.items()):
        train = tuple(fs.shards_of(set(ids) - out))
        name = fs.configs[g].label if protocol == "loco" else g
        folds.append(Fold(protocol, name, train, train, tuple(fs.shards_of(out)), frozenset(out)))
    return folds


def temporal_folds(fs: FeatureSet, test_dates: int = 1) -> list[Fold]:
    """One fold: train on every date but the newest ``test_dates``, test on those."""
    dates = fs.dates
    if len(dates) <= test_dates:
        raise EvaluationError(f"temporal validation needs more than {test_dates} date(s); the store has {len(dates)}")
    test = set(dates[-test_dates:])
    train = tuple(i for i, st in enumerate(fs.stats) if st.date not in test)
    unseen = tuple(i for i, st in enumerate(fs.stats) if st.date in test)
    trained = {fs.stats[i].config_id for i in train}
    new_configs = frozenset(fs.stats[i].config_id for i in unseen) - trained
    return [Fold("temporal", f"{min(test)}..{max(test)}", train, train, unseen, new_configs, frozenset(test))]


def config_kfold(fs: FeatureSet, n_folds: int | None = None, seed: int = 0) -> list[Fold]:
    """Grouped CV over configurations: ``n_folds`` random groups, or one per configuration (None)."""
    ids = fs.config_ids
    if len(ids) < 2:
        raise EvaluationError("cross-validation over configurations needs at least 2 configurations")
    if n_folds is None or n_folds >= len(ids):
        return [dataclasses.replace(f, protocol="cv") for f in group_folds(fs, "loco")]
    if n_folds < 2:
        raise EvaluationError("--folds must be at least 2")
    order = np.random.default_rng(seed).permutation(len(ids))
    folds = []
    for k in range(n_folds):
        out = {ids[i] for i in order[k::n_folds]}
        train = tuple(fs.shards_of(set(ids) - out))
        folds.append(Fold("cv", f"fold {k + 1}/{n_folds}", train, train, tuple(fs.shards_of(out)), frozenset(out)))
    return folds


def protocol_folds(fs: FeatureSet, protocol: str) -> list[Fold]:
    if protocol == "temporal":
        return temporal_folds(fs)
    if protocol in GROUP_OF:
        return group_folds(fs, protocol)
    raise EvaluationError(f"unknown protocol {protocol!r}; use one of {', '.join(PROTOCOLS)} or all")


def _scoped(fs: FeatureSet, shards: Sequence[int], fold: Fold, scope: str) -> tuple[int, ...]:
    trained = {fs.stats[i].config_id for i in fold.train}
    if scope == "own":
        return tuple(i for i in shards if fs.stats[i].config_id in trained)
    if scope == "other":
        return tuple(i for i in shards if fs.stats[i].config_id not in trained)
    return tuple(shards)


def check_fold_docs(fs: FeatureSet, fold: Fold, docs: Mapping[str, dict[str, Any]]) -> None:
    """Refuse to score a fold whose fits saw a held-out configuration or date (a bug, not bad input)."""
    for kind, doc in docs.items():
        leaked = set(doc["configurations"]) & fold.held_out_configs
        first, last = doc["training"]["date_window"]
        if leaked or any(first <= d <= last for d in fold.held_out_dates):
            raise AssertionError(f"{fold.protocol} fold {fold.name}: the {kind} fit saw held-out data "
                                 f"(configurations {sorted(leaked)}, window {first}..{last})")


@dataclass
class ProtocolRun:
    """A protocol's cells plus the documents fitted per fold (kept so tests and reports can audit them)."""

    protocol: str
    folds: list[Fold]
    docs: list[dict[str, dict[str, Any]]]  # per fold: fit kind -> artifact document
    cells: list[CellRef]


def fold_requests(folds: Sequence[Fold], meths: Sequence[Method]) -> list[FitRequest]:
    """The fits a protocol's folds need: one per fold and kind of fit the methods use."""
    kinds = sorted({m.fit for m in meths})
    return [FitRequest(f.train, k) for f in folds for k in kinds]


def run_protocol(fitter: Fitter, folds: Sequence[Fold], meths: Sequence[Method], temperature: float) -> ProtocolRun:
    """Fit every method's model on each fold's training shards, then score seen and unseen rows."""
    fs = fitter.fs
    protocol = folds[0].protocol
    kinds = sorted({m.fit for m in meths})
    docs_flat = fitter.fit_many(fold_requests(folds, meths), f"{protocol} fits")
    docs = [dict(zip(kinds, docs_flat[i * len(kinds):(i + 1) * len(kinds)])) for i in range(len(folds))]
    jobs = []
    for fold, fd in zip(folds, docs):
        check_fold_docs(fs, fold, fd)
        for m in meths:
            for split, shards, all_rows in (("seen", fold.seen, False), ("unseen", fold.unseen, True)):
                scoped = _scoped(fs, shards, fold, m.scope)
                if scoped:
                    jobs.append(PredictJob(fd[m.fit], scoped, all_rows, m.top_k, temperature,
                                           (protocol, fold.name, m.key, split)))
    return ProtocolRun(protocol, list(folds), docs, predict_cells(fs, jobs, f"{protocol} predictions"))
