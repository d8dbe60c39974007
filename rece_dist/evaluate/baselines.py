"""The methods every protocol compares, and the side-by-side tables of their metrics.

Fitted on exactly the same training shards of each fold: one global quantile model,
per-configuration models (scored only where the configuration has its own training data),
the nearest configuration as a donor (per-configuration models mixed with top-1 by embedding
similarity, scored only where the configuration has no data), and RECE mixed densely and
sparsely (top-k).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import polars as pl

SPLITS = ("seen", "unseen")


@dataclass(frozen=True)
class Method:
    """A way to predict a fold's rows: which fit, how it mixes, which rows it is defined for.

    ``scope`` "own": only configurations with training data in the fold (per-configuration
    models); "other": only configurations without (a donor for a configuration that has data
    is just its own model); "all": every row.
    """

    key: str
    title: str
    fit: str
    top_k: int | None   # None: dense
    scope: str
    not_defined: str = ""  # why a split has no numbers, for the table


def methods(sparse_top_k: int = 2) -> tuple[Method, ...]:
    return (
        Method("global", "global model (1 specialist)", "global", None, "all"),
        Method("per_config", "per-configuration models", "per_config", 1, "own",
               "needs the configuration's own data"),
        Method("donor", "nearest configuration as donor", "per_config", 1, "other",
               "defined only for configurations without data"),
        Method("rece_dense", "RECE, dense mixing", "rece", None, "all"),
        Method(f"rece_top{sparse_top_k}", f"RECE, top-{sparse_top_k} mixing", "rece", sparse_top_k, "all"),
    )


# --- text tables --------------------------------------------------------------------------------

TABLE_METRICS = (("interval_coverage", "cov P10-P90", "pct"), ("mape_p50", "MAPE P50", "pct"),
                 ("rel_pinball_macro", "rel pinball", "num"), ("interval_width", "width us", "num"))


def fmt(v: Any, kind: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{100 * v:.1f}%" if kind == "pct" else f"{v:.4g}"


def baseline_rows(scores: pl.DataFrame, meths: Sequence[Method], protocol: str, target: str) -> list[list[str]]:
    """The side-by-side table of one protocol and target: a header row then one row per method."""
    head = ["method"] + [f"{split}: {title}" for split in SPLITS for _, title, _ in TABLE_METRICS]
    rows = [head]
    sub = scores.filter((pl.col("protocol") == protocol) & (pl.col("target") == target))
    for m in meths:
        row = [m.title]
        for split in SPLITS:
            r = sub.filter((pl.col("method") == m.key) & (pl.col("split") == split))
            if r.height:
                row += [fmt(r[col][0], kind) for col, _, kind in TABLE_METRICS]
            else:
                row += ["n/a"] * len(TABLE_METRICS)
        rows.append(row)
    return rows


def table_footnotes(scores: pl.DataFrame, meths: Sequence[Method], protocol: str) -> list[str]:
    """Why a method has no numbers for a split in this protocol."""
    sub = scores.filter(pl.col("protocol") == protocol)
    out = []
    for m in meths:
        missing = [s for s in SPLITS if not sub.filter((pl.col("method") == m.key) & (pl.col("split") == s)).height]
        if missing:
            out.append(f"n/a: {m.title}, {' and '.join(missing)}: {m.not_defined or 'no rows'}")
    return out


def _folds(n: int) -> str:
    return f"{n} fold" + ("s" if n != 1 else "")


def text_table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
