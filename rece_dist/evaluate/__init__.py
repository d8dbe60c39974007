"""Does RECE transfer? Validation protocols, baselines, metric tables, embedding validation, tuning.

RECE's claim is that specialists mixed by configuration similarity predict quantiles for a
configuration the fit never saw, better than the alternatives. Everything here re-fits on
subsets of one featurized store (``pipeline.fit_ensemble``, Ray tasks) and scores the rows
the fit did not see:

- **Protocols** hold out one configuration (``loco``), one GPU type (``logo``), one model
  (``lomo``) or the newest date (``temporal``). *Seen* rows are the held-out slice
  (``features.holdout_mask``) of the training shards; *unseen* rows are every row of the
  held-out configurations or dates.
- **Methods**, fitted on exactly the same training shards of each fold: one global quantile
  model, per-configuration models (scored only where the configuration has its own training
  data), the nearest configuration as a donor (per-configuration models mixed with top-1 by
  embedding similarity, scored only where the configuration has no data), and RECE mixed
  densely and sparsely (top-k).
- **Metrics** are ``metrics.quantile_metrics`` over pooled rows, plus a scale-free relative
  pinball loss (pinball / mean |y|) averaged per configuration, which is what tuning
  minimises: latencies differ tenfold between deployments, and a pooled loss in microseconds
  would let the slowest configuration decide.
- **Embedding validation** asks whether embedding distance tracks latency behaviour (Spearman
  over configuration pairs, with a Mantel permutation p-value because pairs share
  configurations), and how good the clusters are.
- **Tuning** picks K, temperature and top-k by grouped cross-validation over configurations.

One concept a module: ``protocols`` (folds and their scoring), ``baselines`` (the compared
methods and their tables), ``embedding_check``, ``tune`` (the sweep) and ``run`` (the whole
evaluation). What they share with the donor experiment and the drift gate (fit requests,
prediction cells, aggregation) is one level down, in ``rece_dist.refit``.
"""

from __future__ import annotations

from ..refit import EvaluationError
from .baselines import SPLITS, TABLE_METRICS, Method, baseline_rows, fmt, methods, table_footnotes, text_table
from .embedding_check import EmbeddingCheck, behaviour_vectors, embedding_check, mantel, pair_distances
from .protocols import (PROTOCOL_TITLES, PROTOCOLS, Fold, ProtocolRun, check_fold_docs, config_kfold, group_folds,
                        protocol_folds, run_protocol, short_label, temporal_folds)
from .run import EvalOptions, Evaluation, Sample, artifact_splits, baseline_text, config_attrs, evaluate
from .tune import Sweep, choose, sweep, sweep_text, tune

__all__ = [
    "EvaluationError", "SPLITS", "TABLE_METRICS", "Method", "baseline_rows", "fmt", "methods", "table_footnotes",
    "text_table", "EmbeddingCheck", "behaviour_vectors", "embedding_check", "mantel",
    "pair_distances", "PROTOCOL_TITLES", "PROTOCOLS", "Fold", "ProtocolRun", "check_fold_docs",
    "config_kfold", "group_folds", "protocol_folds", "run_protocol", "short_label", "temporal_folds", "EvalOptions",
    "Evaluation", "Sample", "artifact_splits", "baseline_text", "config_attrs", "evaluate", "Sweep", "choose",
    "sweep", "sweep_text", "tune",
]
