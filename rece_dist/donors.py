"""Which configuration to measure next: greedy coverage of the embedding space (seed Phase 5).

A candidate's coverage score is its distance to the nearest configuration already covered
(the store's, then the ones picked before it): the greedy max-min rule, which spreads new
measurements where the specialists have least data. Distances are Euclidean in the store's
standardised configuration vector (``embedding.Embedding``), not cosine: cosine ignores how far from
the centre a configuration lies, so a candidate twice as extreme as a stored one along the
same direction would count as covered.

``donor_experiment`` checks the rule pays off: with some configurations held out as targets,
adding the top-ranked candidate's data to a base set should cut transfer error more than
adding a random candidate from the pool (every candidate is tried, so "random" is the exact
mean over the pool, not a draw).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import polars as pl

from .config import Catalog, DeploymentConfig, config_vector, read_document
from .errors import ConfigError
from .refit import EvaluationError, Fitter, FitRequest, PredictJob, aggregate, predict_cells
from .pipeline import TARGETS, FeatureSet
from .progress import log
from .embedding import Embedding


def greedy_max_min(existing: np.ndarray, candidates: np.ndarray, n: int) -> list[tuple[int, float]]:
    """Pick ``n`` candidate rows, each the farthest from everything covered so far.

    Returns (candidate index, distance to the nearest covered point when picked); ties go to
    the lower index. ``existing`` may be empty (then the first pick is candidate 0, score inf).
    """
    if len(candidates) == 0:
        return []
    if len(existing):
        dmin = np.linalg.norm(candidates[:, None, :] - existing[None, :, :], axis=2).min(axis=1)
    else:
        dmin = np.full(len(candidates), np.inf)
    picked: list[tuple[int, float]] = []
    free = np.ones(len(candidates), dtype=bool)
    for _ in range(min(n, len(candidates))):
        i = int(np.argmax(np.where(free, dmin, -np.inf)))
        picked.append((i, float(dmin[i])))
        free[i] = False
        dmin = np.minimum(dmin, np.linalg.norm(candidates - candidates[i], axis=1))
    return picked


@dataclass(frozen=True)
class DonorPick:
    rank: int
    config: DeploymentConfig
    score: float          # distance to the nearest covered configuration when picked
    nearest_stored: str   # label of the nearest store configuration
    nearest_distance: float


def rank_donors(stored: Sequence[DeploymentConfig], candidates: Sequence[DeploymentConfig], n: int) -> list[DonorPick]:
    """Greedy coverage ranking of ``candidates`` against the embedding fitted on ``stored``."""
    if not stored:
        raise ConfigError("ranking donors needs at least one configuration in the store")
    V = np.vstack([config_vector(c) for c in stored])
    emb = Embedding.fit(V)
    E = emb(V)
    C = emb(np.vstack([config_vector(c) for c in candidates])) if candidates else np.zeros((0, V.shape[1]))
    out = []
    for rank, (i, score) in enumerate(greedy_max_min(E, C, n), start=1):
        d = np.linalg.norm(E - C[i], axis=1)
        out.append(DonorPick(rank, candidates[i], score, stored[int(np.argmin(d))].label, float(d.min())))
    return out


def load_candidates(path: str, catalog: Catalog | None = None) -> list[DeploymentConfig]:
    """A YAML/JSON list of configuration documents, each resolved against the catalog."""
    doc = read_document(path, "candidates file")
    if not isinstance(doc, list) or not doc:
        raise ConfigError(f"{path}: expected a non-empty list of configuration documents")
    catalog = catalog or Catalog.default()
    return [catalog.resolve(d, f"{path}[{i}]") for i, d in enumerate(doc)]


def new_candidates(stored: Mapping[str, DeploymentConfig],
                   candidates: Sequence[DeploymentConfig]) -> tuple[list[DeploymentConfig], list[str]]:
    """Drop candidates already in the store or listed twice; say which were dropped."""
    keep: dict[str, DeploymentConfig] = {}
    dropped = []
    for c in candidates:
        if c.config_id in stored:
            dropped.append(f"{c.label} is already in the store")
        elif c.config_id in keep:
            dropped.append(f"{c.label} is listed twice")
        else:
            keep[c.config_id] = c
    return list(keep.values()), dropped


# --- does it pay off? --------------------------------------------------------------------------

@dataclass
class DonorTrial:
    """One random split of the store's configurations into targets, a base set and a pool."""

    targets: list[str]
    base: list[str]
    pool: list[str]           # in greedy ranking order: pool[0] is the top donor
    scores: pl.DataFrame      # candidate ("base" or a pool config_id), criterion, mape_p50, interval_coverage

    def score(self, candidate: str, column: str = "criterion") -> float:
        """One of the candidate's unseen metrics on the targets (``scores`` column)."""
        return float(self.scores.filter(pl.col("candidate") == candidate)[column][0])

    @property
    def top(self) -> str:
        return self.pool[0]

    def random_mean(self, column: str = "criterion") -> float:
        """Expected value for a uniformly random pool candidate (exact: every one was fitted)."""
        return float(np.mean([self.score(c, column) for c in self.pool]))

    @property
    def top_beats(self) -> float:
        """Share of the other pool candidates the top donor beats (1: it was the best pick)."""
        others = [self.score(c) for c in self.pool[1:]]
        return float(np.mean([self.score(self.top) < o for o in others])) if others else float("nan")


@dataclass
class DonorExperiment:
    trials: list[DonorTrial]

    def summary(self) -> pl.DataFrame:
        mape = "mape_p50_beta"
        return pl.DataFrame([{
            "trial": i + 1, "targets": len(t.targets), "base": len(t.base), "pool": len(t.pool),
            "base_only": t.score("base"), "top_donor": t.score(t.top), "random_candidate": t.random_mean(),
            "best_candidate": min(t.score(c) for c in t.pool), "top_beats_share": t.top_beats,
            "base_only_mape_beta": t.score("base", mape), "top_donor_mape_beta": t.score(t.top, mape),
            "random_mape_beta": t.random_mean(mape),
        } for i, t in enumerate(self.trials)])

    def verdict(self) -> str:
        s = self.summary()
        wins = int((s["top_donor"] < s["random_candidate"]).sum())
        gain = float(((s["random_candidate"] - s["top_donor"]) / s["random_candidate"]).mean())
        return (f"top-ranked donor beat the random-candidate expectation in {wins}/{s.height} trial(s); "
                f"mean change in unseen relative pinball vs random: {-100 * gain:+.1f}%")


def split_sizes(n: int) -> tuple[int, int, int]:
    """(targets, base, pool) for ``n`` configurations; the pool needs two candidates to compare."""
    targets, base = max(1, n // 4), max(2, n // 3)
    pool = n - targets - base
    if pool < 2:
        raise EvaluationError(f"the donor experiment needs at least 5 configurations (has {n})")
    return targets, base, pool


def distinct_splits(ids: Sequence[str], trials: int, seed: int) -> list[tuple[list[str], list[str], list[str]]]:
    """``trials`` random (targets, base, pool) splits, no two with the same targets and base.

    Repeating a split would count one outcome twice; with few configurations there may be
    fewer distinct splits than asked for, and then fewer are returned.
    """
    n_t, n_b, _ = split_sizes(len(ids))
    rng = np.random.default_rng(seed)
    out, seen = [], set()
    for _ in range(50 * trials):
        if len(out) == trials:
            break
        order = [ids[i] for i in rng.permutation(len(ids))]
        targets, base = sorted(order[:n_t]), sorted(order[n_t:n_t + n_b])
        if (tuple(targets), tuple(base)) not in seen:
            seen.add((tuple(targets), tuple(base)))
            out.append((targets, base, sorted(order[n_t + n_b:])))
    return out


def plan_trials(fs: FeatureSet, trials: int = 3, seed: int = 0) -> list[tuple[list[str], list[str], list[str], dict[str, list[str]]]]:
    """Per trial: targets, base, the pool in ranked order, and the configuration sets to fit
    (the base alone and base + each candidate). Deterministic, so a caller can queue the fits
    early (``Fitter.defer``) and ``donor_experiment`` finds them."""
    plans = []
    for targets, base, pool in distinct_splits(fs.config_ids, trials, seed):
        picks = rank_donors([fs.configs[c] for c in base], [fs.configs[c] for c in pool], len(pool))
        pool = [p.config.config_id for p in picks]
        plans.append((targets, base, pool, {"base": base, **{c: base + [c] for c in pool}}))
    return plans


def _requests(fs: FeatureSet, plans: Sequence[tuple[Any, ...]]) -> list[FitRequest]:
    return [FitRequest(tuple(fs.shards_of(s)), "rece") for *_, sets in plans for s in sets.values()]


def donor_requests(fs: FeatureSet, trials: int = 3, seed: int = 0) -> list[FitRequest]:
    """The RECE fits of every trial's configuration sets (what ``donor_experiment`` will ask for)."""
    return _requests(fs, plan_trials(fs, trials, seed))


def donor_experiment(fitter: Fitter, trials: int = 3, seed: int = 0) -> DonorExperiment:
    """Targets held out; fit RECE on base + each pool candidate; compare the top donor with the rest.

    Every fit uses the fitter's settings (the artifact's recipe); the criterion is the unseen
    relative pinball loss on the targets, averaged over targets and both latency targets.
    """
    fs = fitter.fs
    plans = plan_trials(fs, trials, seed)
    for trial, (targets, base, pool, _) in enumerate(plans):
        log(f"[donors] trial {trial + 1}: {len(targets)} targets, base {len(base)}, pool {len(pool)}")
    # every trial's fits in one pool: trial by trial, each one's last fit ran alone
    fitted = iter(fitter.fit_many(_requests(fs, plans), "donor fits"))
    out = []
    for trial, (targets, base, pool, sets) in enumerate(plans):
        docs = [next(fitted) for _ in sets]
        unseen = tuple(fs.shards_of(targets))
        jobs = [PredictJob(doc, unseen, True, fitter.settings.top_k, fitter.settings.temperature,
                           ("donors", str(trial), name, "unseen")) for name, doc in zip(sets, docs)]
        agg = aggregate(predict_cells(fs, jobs, f"donor trial {trial + 1} predictions"), fitter.settings.quantiles,
                        ("method", "target"))
        scores = agg.group_by("method").agg(
            pl.col("rel_pinball_macro").mean().alias("criterion"),
            *[pl.col(m).filter(pl.col("target") == t).first().alias(f"{m}_{t}")
              for m in ("mape_p50", "interval_coverage") for t in TARGETS],
        ).rename({"method": "candidate"})
        out.append(DonorTrial(targets, base, pool, scores))
    return DonorExperiment(out)


def picks_table(picks: Sequence[DonorPick]) -> list[list[str]]:
    rows = [["rank", "candidate", "config_id", "coverage score", "nearest stored configuration", "distance"]]
    rows += [[str(p.rank), p.config.label, p.config.config_id, f"{p.score:.3f}", p.nearest_stored,
              f"{p.nearest_distance:.3f}"] for p in picks]
    return rows


def describe(exp: DonorExperiment, labels: Mapping[str, str]) -> list[dict[str, Any]]:
    """Per trial, what was held out and picked, in words (for the report)."""
    return [{"trial": i + 1, "targets": [labels[c] for c in t.targets], "base": [labels[c] for c in t.base],
             "ranking": [labels[c] for c in t.pool]} for i, t in enumerate(exp.trials)]
