"""The evaluation report: one folder with ``index.html`` and the PNGs it shows (matplotlib, Agg).

Every number on the page comes from a ``review.Review`` (the evaluation, the donor experiment
and drift); the page only lays it out.
Plots: calibration per quantile (nominal vs observed one-sided coverage), error by
configuration and by GPU / model on unseen configurations, the configurations in 2-D (PCA of
the artifact's embedding) coloured by specialist, predicted intervals against observed
latencies for a sample of unseen rows, the sensitivity sweep, embedding vs behaviour distance,
and the donor experiment.
"""

from __future__ import annotations

import html
import io
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import NullFormatter  # noqa: E402
import numpy as np  # noqa: E402
import polars as pl  # noqa: E402
import ray  # noqa: E402

from .donors import describe  # noqa: E402
from .ensemble import RECEModel  # noqa: E402
from .evaluate.run import ev_targets  # noqa: E402
from .evaluate.targets import targets_rows  # noqa: E402
from .evaluate import (PROTOCOL_TITLES, SPLITS, Evaluation, Method, baseline_rows, fmt,  # noqa: E402
                       short_label, sweep_text, table_footnotes)
from .evaluate.baselines import _folds  # noqa: E402
from .pipeline import TARGETS  # noqa: E402
from .progress import RETRIES, gather  # noqa: E402
from .review import Review  # noqa: E402

DPI = 110


def _colors(meths: Sequence[Method]) -> dict[str, Any]:
    cmap = plt.get_cmap("tab10")
    return {m.key: cmap(i) for i, m in enumerate(meths)}


Png = tuple[str, bytes]  # a figure's file name and its PNG


def _save(fig: plt.Figure, name: str) -> Png:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return name, buf.getvalue()


def _main_protocol(ev: Evaluation) -> str:
    return "loco" if "loco" in ev.runs else next(iter(ev.runs))


# --- plots -------------------------------------------------------------------------------------

def plot_calibration(ev: Evaluation, protocol: str) -> Png:
    """Nominal quantile vs observed share of rows at or below it; the diagonal is perfect."""
    qs = ev.settings.quantiles
    colors = _colors(ev.methods)
    fig, axes = plt.subplots(1, len(TARGETS), figsize=(11, 4.4), sharey=True)
    for ax, t in zip(axes, TARGETS):
        ax.plot([0, 1], [0, 1], color="0.6", lw=1, zorder=0)
        for m in ev.methods:
            for split, style in zip(SPLITS, ("--", "-")):
                r = ev.scores.filter((pl.col("protocol") == protocol) & (pl.col("method") == m.key)
                                     & (pl.col("split") == split) & (pl.col("target") == t))
                if r.height:
                    ax.plot(qs, [r[f"coverage_{q:g}"][0] for q in qs], style, marker="o", ms=4, color=colors[m.key],
                            label=f"{m.title} ({split})")
        ax.set(title=f"{t}: {protocol}", xlabel="nominal quantile", xlim=(0, 1), ylim=(0, 1))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("observed share of rows <= predicted quantile")
    axes[-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
    return _save(fig, f"calibration_{protocol}.png")


def _grouped_bars(ax: plt.Axes, table: pl.DataFrame, key: str, groups: Sequence[str], metric: str,
                  meths: Sequence[Method], colors: dict[str, Any]) -> None:
    """Horizontal bars: one row per group, one bar per method that has numbers."""
    shown = [m for m in meths if table.filter(pl.col("method") == m.key).height]
    height = 0.8 / max(1, len(shown))
    y = np.arange(len(groups))
    for i, m in enumerate(shown):
        sub = {r[key]: r[metric] for r in table.filter(pl.col("method") == m.key).iter_rows(named=True)}
        ax.barh(y + (i - (len(shown) - 1) / 2) * height, [sub.get(g, np.nan) for g in groups], height,
                color=colors[m.key], label=m.title)
    ax.grid(axis="x", alpha=0.3)


def plot_errors(ev: Evaluation, table: pl.DataFrame, key: str, protocol: str, name: str) -> Png | None:
    """Unseen P50 error and P10-P90 coverage per group (configuration, GPU or model), both targets."""
    sub = table.filter((pl.col("protocol") == protocol) & (pl.col("split") == "unseen"))
    if not sub.height:
        return None
    labels = {c: cfg.label for c, cfg in ev.configs.items()} if key == "config_id" else {}
    groups = sorted(sub[key].unique().to_list(), key=lambda g: labels.get(g, g))
    colors = _colors(ev.methods)
    lo, hi = ev.settings.quantiles[0], ev.settings.quantiles[-1]
    fig, axes = plt.subplots(1, 2 * len(TARGETS), figsize=(16, 1.6 + 0.42 * len(groups)), sharey=True)
    for j, t in enumerate(TARGETS):
        st = sub.filter(pl.col("target") == t)
        err, cov = axes[2 * j], axes[2 * j + 1]
        _grouped_bars(err, st, key, groups, "mape_p50", ev.methods, colors)
        err.set(xscale="log", xlabel="median |P50 - y| / y (log)", title=f"{t}: P50 error")
        _grouped_bars(cov, st, key, groups, "interval_coverage", ev.methods, colors)
        cov.axvline(hi - lo, color="k", lw=1, ls=":")
        cov.set(xlim=(0, 1), xlabel=f"P{lo * 100:g}-P{hi * 100:g} coverage (dotted: nominal)", title=f"{t}: coverage")
    axes[0].set_yticks(np.arange(len(groups)), [labels.get(g, g) for g in groups], fontsize=7)
    axes[0].invert_yaxis()
    handles, names = axes[1].get_legend_handles_labels()
    fig.legend(handles, names, loc="upper center", ncol=len(names), fontsize=8, bbox_to_anchor=(0.5, 1.0))
    fig.suptitle(f"unseen rows ({protocol})", y=1.04, fontsize=10)
    fig.tight_layout()
    return _save(fig, name)


def plot_embedding(ev: Evaluation) -> Png:
    """Store configurations in the artifact's embedding, first two principal components."""
    model = RECEModel(ev.artifact)
    ids = sorted(ev.configs)
    E = np.vstack([model.embed(ev.configs[c]) for c in ids])
    mean = E.mean(axis=0)
    _, s, Vt = np.linalg.svd(E - mean, full_matrices=False)
    pad = np.zeros((2 - min(len(Vt), 2), E.shape[1]))  # an embedding of one probe has one axis
    axes2 = np.vstack([Vt[:2], pad])
    P = (E - mean) @ axes2.T
    C = (model.centroids - mean) @ axes2.T
    share = np.append(s[:2] ** 2 / max((s ** 2).sum(), 1e-12), [0.0, 0.0])[:2]
    fig, ax = plt.subplots(figsize=(9, 6.5))
    cmap = plt.get_cmap("tab10")
    for i, c in enumerate(ids):
        spec = model.members.get(c)
        if spec is None:
            ax.scatter(*P[i], marker="x", color="0.4", s=50)
        else:
            ax.scatter(*P[i], color=cmap(spec % 10), s=60, edgecolor="k", lw=0.5)
    _place_labels(ax, P, [short_label(ev.configs[c]) for c in ids])
    for j, cen in enumerate(C):
        ax.scatter(*cen, marker="*", s=260, color=cmap(j % 10), edgecolor="k", lw=0.8, label=f"specialist {j} centroid")
    ax.scatter([], [], marker="x", color="0.4", label="not in the artifact")
    ax.set(xlabel=f"PC1 ({share[0]:.0%} of variance)", ylabel=f"PC2 ({share[1]:.0%})" if len(share) > 1 else "PC2",
           title="configurations in the artifact's embedding, coloured by specialist")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, "embedding_pca.png")


def _place_labels(ax: plt.Axes, P: np.ndarray, texts: Sequence[str], size: float = 6.5) -> None:
    """Label points top to bottom, moving a label down until its box clears the ones placed before.

    Works in points (1/72 in) after the axes limits are final; a label box is estimated as
    0.55 * size per character by 1.3 * size.
    """
    ax.autoscale_view()
    ax.figure.canvas.draw()
    xy = ax.transData.transform(P) * 72.0 / ax.figure.dpi
    boxes: list[tuple[float, float, float, float]] = []
    for i in np.argsort(-xy[:, 1], kind="stable"):
        w, h = 0.55 * size * len(texts[i]), 1.3 * size
        x0, y0 = xy[i, 0] + 4, xy[i, 1] + 2
        while any(x0 < bx + bw and bx < x0 + w and y0 < by + bh and by < y0 + h for bx, by, bw, bh in boxes):
            y0 -= h
        boxes.append((x0, y0, w, h))
        ax.annotate(texts[i], P[i], fontsize=size, xytext=(x0 - xy[i, 0], y0 - xy[i, 1]), textcoords="offset points")


def plot_intervals(ev: Evaluation, target: str = "beta", panels: int = 4) -> Png | None:
    """Unseen rows of a few configurations: RECE's P10-P90 band and P50, observed values, donor P50."""
    samples = [s for s in ev.samples if s.target == target and "rece_dense" in s.values][:panels]
    if not samples:
        return None
    lo_q, hi_q = ev.settings.quantiles[0], ev.settings.quantiles[-1]
    j50 = ev.settings.quantiles.index(0.5) if 0.5 in ev.settings.quantiles else len(ev.settings.quantiles) // 2
    cols = 2 if len(samples) > 1 else 1
    rows = (len(samples) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(6.2 * cols, 3.9 * rows), squeeze=False)
    for ax, s in zip(axes.flat, samples):
        v = s.values["rece_dense"]
        order = np.argsort(v[:, j50])
        x = np.arange(len(order))
        inside = np.mean((s.y >= v[:, 0]) & (s.y <= v[:, -1]))
        ax.fill_between(x, v[order, 0], v[order, -1], color="tab:blue", alpha=0.25,
                        label=f"RECE P{lo_q * 100:g}-P{hi_q * 100:g}")
        ax.plot(x, v[order, j50], color="tab:blue", lw=1.2, label="RECE P50")
        if "donor" in s.values:
            ax.plot(x, s.values["donor"][order, j50], color="tab:red", lw=1, ls="--",
                    label="nearest donor P50 (clipped to the axes)")
        ax.scatter(x, s.y[order], s=6, color="k", label="observed", zorder=3)
        lo, hi = min(s.y.min(), v[:, 0].min()), max(s.y.max(), v[:, -1].max())
        ax.set_ylim(lo - 0.1 * (hi - lo), hi + 0.1 * (hi - lo))  # a wild donor leaves the axes, not the data
        ax.set(title=f"{ev.configs[s.config_id].label} ({s.protocol}, unseen)\n"
                     f"{inside:.0%} of these rows inside the band", xlabel="rows sorted by RECE P50",
               ylabel=f"{target} (us)")
        ax.title.set_fontsize(8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(samples):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, f"intervals_{target}.png")


def plot_sensitivity(ev: Evaluation) -> Png | None:
    """Unseen relative pinball against temperature: one panel per borrow value, a colour per K,
    solid for dense mixing, dotted for top-1, dashed for other top-k (K=1 ignores borrow and is
    drawn in every panel)."""
    if ev.sweep is None:
        return None
    g = ev.sweep.grid.filter(pl.col("target") == TARGETS[0])
    borrows = sorted(set(g.filter(pl.col("K") > 1)["borrow"].to_list())) or [0.0]
    ks = sorted(set(g["K"].to_list()))
    colour = {K: plt.cm.viridis(i / max(len(ks) - 1, 1)) for i, K in enumerate(ks)}
    fig, axes = plt.subplots(1, len(borrows), figsize=(4.2 * len(borrows) + 2, 4.6), sharey=True, squeeze=False)
    c = ev.sweep.chosen
    for ax, b in zip(axes[0], borrows):
        panel = g.filter((pl.col("borrow") == b) | (pl.col("K") == 1))
        for (K, top_k), sub in sorted(panel.group_by(["K", "top_k"]), key=lambda kv: (kv[0][0], str(kv[0][1]))):
            sub = sub.sort("temperature")
            ax.plot(sub["temperature"], sub["criterion"], marker="o", ms=3, color=colour[K],
                    ls={"dense": "-", "1": ":"}.get(top_k, "--"), label=f"K={K}, top-k {top_k}")
        if c["K"] == 1 or c["borrow"] == b:
            ax.scatter([c["temperature"]], [c["criterion"]], s=150, facecolor="none", edgecolor="k", lw=1.5,
                       zorder=5, label="chosen")
        ax.set(xscale="log", yscale="log", xlabel="temperature", title=f"borrow {b:g}")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("relative pinball, unseen (mean of alpha, beta)")
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
    fig.suptitle(f"sensitivity ({ev.sweep.folds}-fold grouped CV over configurations)")
    return _save(fig, "sensitivity.png")


def plot_embedding_check(ev: Evaluation) -> Png | None:
    """Embedding (latency profile) distance against latency-behaviour distance, per config pair."""
    chk = ev.embedding
    if chk is None:
        return None
    fig, axes = plt.subplots(1, len(TARGETS), figsize=(11, 4.2))
    for ax, t in zip(axes, TARGETS):
        sp = chk.spearman[t]
        ax.scatter(chk.emb_distance, chk.behaviour_distance[t], s=14, alpha=0.7)
        ax.set(xlabel="embedding distance (RMS log ratio of profiles)", ylabel="behaviour distance (RMS log P50 ratio)",
               title=f"{t}: Spearman {sp['mixing']:.2f} (Mantel p {sp['p_mixing']:.3f})")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, "embedding_validation.png")


def plot_donors(rv: Review) -> Png | None:
    """Per trial: unseen error after adding each pool candidate, in ranking order (top donor first)."""
    exp, ev = rv.donors, rv.evaluation
    if exp is None:
        return None
    fig, axes = plt.subplots(1, len(exp.trials), figsize=(4.2 * len(exp.trials), 4.2), squeeze=False, sharey=True)
    for i, (ax, t) in enumerate(zip(axes[0], exp.trials)):
        vals = [t.score(c) for c in t.pool]
        ax.bar(range(len(vals)), vals, color=["tab:green"] + ["tab:gray"] * (len(vals) - 1))
        ax.axhline(t.random_mean(), color="k", ls="--", lw=1, label="random candidate (mean)")
        ax.axhline(t.score("base"), color="tab:red", ls=":", lw=1.2, label="base only")
        ax.set_xticks(range(len(vals)), [short_label(ev.configs[c]) for c in t.pool], rotation=40,
                      ha="right", fontsize=6.5)
        ax.set_title(f"trial {i + 1}: {len(t.targets)} targets, base {len(t.base)}", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].set(ylabel="unseen relative pinball (log)", yscale="log")
    axes[0, 0].yaxis.set_minor_formatter(NullFormatter())
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("adding one candidate's data (green: top-ranked donor)", fontsize=10)
    fig.tight_layout()
    return _save(fig, "donors.png")


# --- HTML --------------------------------------------------------------------------------------

def _table(rows: Sequence[Sequence[Any]], caption: str = "") -> str:
    head, body = rows[0], rows[1:]
    th = "".join(f"<th>{html.escape(str(c))}</th>" for c in head)
    trs = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in body)
    cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
    return f"<table>{cap}<thead><tr>{th}</tr></thead><tbody>{trs}</tbody></table>"


def _frame_rows(df: pl.DataFrame, pct: Sequence[str] = (), digits: int = 4) -> list[list[str]]:
    rows: list[list[str]] = [list(df.columns)]
    for r in df.iter_rows():
        rows.append([fmt(v, "pct") if c in pct else (f"{v:.{digits}g}" if isinstance(v, float) else str(v))
                     for c, v in zip(df.columns, r)])
    return rows


def _img(name: str | None, alt: str) -> str:
    return f'<figure><img src="{html.escape(name)}" alt="{html.escape(alt)}"></figure>' if name else ""


def _calibration_rows(ev: Evaluation, protocol: str) -> list[list[str]]:
    qs = ev.settings.quantiles
    rows = [["method", "split", "target"] + [f"P{q * 100:g} coverage (nominal {q:.0%})" for q in qs]]
    for m in ev.methods:
        for split in SPLITS:
            for t in TARGETS:
                r = ev.scores.filter((pl.col("protocol") == protocol) & (pl.col("method") == m.key)
                                     & (pl.col("split") == split) & (pl.col("target") == t))
                if r.height:
                    rows.append([m.title, split, t] + [fmt(r[f"coverage_{q:g}"][0], "pct") for q in qs])
    return rows


CSS = """
body{font-family:system-ui,sans-serif;margin:24px auto;max-width:1250px;color:#222;line-height:1.4}
h1{font-size:22px} h2{font-size:18px;border-bottom:1px solid #ccc;padding-bottom:3px;margin-top:32px}
h3{font-size:15px} table{border-collapse:collapse;margin:8px 0 16px;font-size:12.5px}
td,th{border:1px solid #ccc;padding:3px 7px;text-align:right} td:first-child,th:first-child{text-align:left}
th{background:#f1f3f5} caption{caption-side:top;text-align:left;font-weight:600;padding:4px 0}
figure{margin:8px 0} img{max-width:100%;border:1px solid #eee} .note{color:#555;font-size:13px}
pre{background:#f6f8fa;padding:8px;font-size:12px;overflow-x:auto}
"""


def render_html(rv: Review, images: dict[str, str | None]) -> str:
    ev = rv.evaluation
    main = _main_protocol(ev)
    doc = ev.artifact
    tr = doc.get("training", {})
    s = ev.settings
    parts = [f"<h1>RECE evaluation</h1><p class='note'>store <code>{html.escape(ev.store_uri)}</code>: "
             f"{len(ev.configs)} configurations; artifact with {len(doc['specialists'])} specialists, trained on "
             f"{tr.get('configurations', '?')} configurations, dates {'..'.join(tr.get('date_window', []))}. "
             f"Folds re-fit with the artifact's settings (K={s.specialists}, {s.clustering}, borrow {s.borrow:g}, "
             f"temperature {s.temperature:g}, quantiles {', '.join(f'{q:g}' for q in s.quantiles)}"
             f"{f', unseen intervals calibrated by {s.calibrate_folds} folds' if s.calibrate_folds else ''}), "
             + (f"each on at most {ev.options.fit_rows:,} training rows per configuration and target. "
                if ev.options.fit_rows else "each on every training row. ") +
             f"Generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC in {rv.seconds:.0f} s.</p>"]
    targets = ev_targets(ev)
    if len(targets):
        parts.append("<h2>Transfer targets</h2><p class='note'>Unseen configurations, the artifact's model for each "
                     "target (RECE as it mixes, or the global model where its model selection pooled the target): "
                     "P50 MAPE over the own-data (per-configuration) models' MAPE "
                     "on seen ones, with the worst configuration's ratio; P10-P90 coverage (target 80% +- 5 pp; "
                     "seen +- 3 pp) and median width; relative pinball gain over the global model and the nearest "
                     "donor (target >= 20%); Spearman of embedding vs behaviour distance (beta >= 0.6). "
                     "<b>MISS</b> marks a target not met.</p>")
        parts.append(_table(targets_rows(targets)))
    parts.append("<h2>Baselines, side by side</h2><p class='note'><b>seen</b>: held-out slice of the training "
                 "configurations; <b>unseen</b>: every row of the held-out configurations (or dates). Metrics pool "
                 "the rows of all folds; <i>rel pinball</i> is pinball / mean |y| averaged over configurations "
                 "(scale-free); width is the median P10-P90 width in microseconds. Per-configuration models need a "
                 "configuration's own data, so they have no unseen numbers when configurations are held out; the "
                 "nearest donor is only defined for configurations without data.</p>")
    for p, run in ev.runs.items():
        parts.append(f"<h3>{p}: {html.escape(PROTOCOL_TITLES[p])} ({_folds(len(run.folds))})</h3>")
        for t in TARGETS:
            parts.append(_table(baseline_rows(ev.scores, ev.methods, p, t), f"{p}, {t}"))
        parts += [f"<p class='note'>{html.escape(n)}</p>" for n in table_footnotes(ev.scores, ev.methods, p)]
    parts.append("<h2>The published artifact on this store</h2><p class='note'>The artifact itself, with its own "
                 "mixing, on the held-out slice of every shard of the store: <b>seen</b> where it trained on the "
                 "shard's configuration and date, <b>unseen</b> otherwise.</p>")
    names = {"interval_coverage": "cov P10-P90", "mape_p50": "MAPE P50", "rel_pinball": "rel pinball",
             "interval_width": "width us"}
    parts.append(_table(_frame_rows(ev.published.select(["split", "target", "rows", *names]).rename(names),
                                    pct=("cov P10-P90", "MAPE P50"))))
    parts.append(f"<h2>Calibration ({main})</h2><p class='note'>For each quantile, the share of rows at or below "
                 "the prediction; a calibrated model sits on the diagonal. Dashed: seen, solid: unseen.</p>")
    parts.append(_img(images.get("calibration"), "calibration"))
    parts.append(_table(_calibration_rows(ev, main)))
    parts.append(f"<h2>Error by configuration ({main}, unseen)</h2>" + _img(images.get("by_config"), "by configuration"))
    parts.append(f"<h2>Error by GPU and by model ({main}, unseen)</h2>"
                 + _img(images.get("by_gpu"), "by GPU") + _img(images.get("by_model"), "by model"))
    parts.append("<h2>Predicted intervals against observed latencies</h2><p class='note'>A random sample of unseen "
                 f"rows of a few configurations ({main}): RECE (dense) band and median, the nearest donor's median, "
                 "and what was observed.</p>" + _img(images.get("intervals_beta"), "intervals beta")
                 + _img(images.get("intervals_alpha"), "intervals alpha"))
    parts.append("<h2>Configuration embedding</h2>" + _img(images.get("embedding"), "embedding PCA"))
    clus = doc.get("clustering", {})
    sizes = ", ".join(f"specialist {sp['id']}: {len(sp['members'])}" for sp in doc["specialists"])
    parts.append(f"<p class='note'>Artifact clustering: {html.escape(str(clus.get('method')))}, K={clus.get('k')}, "
                 f"silhouette {fmt(clus.get('silhouette'), 'num')}; sizes {html.escape(sizes)}.</p>")
    if ev.embedding is not None:
        chk = ev.embedding
        rows = [["target", "Spearman, mixing embedding (latency profile)", "Mantel p",
                 "Spearman, configuration vector (cosine)", "Spearman, configuration vector (Euclidean)",
                 "Spearman, profile from a model that never saw the configuration"]]
        rows += [[t, fmt(chk.spearman[t]["mixing"], "num"), fmt(chk.spearman[t]["p_mixing"], "num"),
                  fmt(chk.spearman[t]["config_cosine"], "num"), fmt(chk.spearman[t]["config_euclidean"], "num"),
                  fmt(chk.spearman[t].get("model_rms"), "num")] for t in TARGETS]
        grid = "; ".join(f"{t}: " + ", ".join(f"{v} {'/'.join(f'{x:.3g}' for x in vals)}" for v, vals in g.items())
                         for t, g in chk.probe_grid.items())
        parts.append("<h3>Does embedding distance track latency behaviour?</h3><p class='note'>Behaviour of a "
                     "configuration: its own P50 model (fitted on its data alone) evaluated on a shared probe grid of "
                     "batch compositions (beta) and arrivals (alpha); behaviour distance between two configurations "
                     "is the RMS log ratio of those predictions. The grid takes, for each input, the typical 10th, "
                     "50th and 90th percentile over the configurations, so it covers decode-only and prefilling "
                     "steps, small and large batches; a configuration whose own model goes below 1 us there is "
                     "listed below. "
                     f"Grid: {html.escape(grid)}. {len(chk.config_ids)} configurations, {len(chk.emb_distance)} "
                     "pairs; the Mantel p-value permutes configurations. Mixing embedding: each configuration's "
                     "latency profile (log P50 step time on the artifact's probe batches from its pooled model, RMS "
                     "distance). Configuration vector: the seed's embedding, which mixing used before. Last column: "
                     "each configuration's log P50 on the same grid from the global model of the leave-one-"
                     "configuration-out fold that held it out, i.e. the profile of a deployment nobody profiled.</p>")
        for t, ids in chk.clipped.items():
            if ids:
                parts.append(f"<p class='note'>{t}: {len(ids)} configuration(s) still predict below 1 us somewhere on "
                             "the grid (their own model extrapolating; clipped there, which inflates their distances): "
                             f"{html.escape('; '.join(short_label(ev.configs[c]) for c in ids))}.</p>")
        parts.append(_table(rows) + _img(images.get("embedding_check"), "embedding validation"))
        parts.append("<h3>Cluster quality by K</h3><p class='note'>Silhouette of the embedding clusters (Euclidean), "
                     "and of the same labels on the behaviour vectors: high behaviour silhouette means specialists "
                     "group configurations that behave alike.</p>" + _table(_frame_rows(chk.clusters)))
    if ev.sweep is not None:
        parts.append("<h2>Sensitivity to temperature, K and top-k</h2>" + _img(images.get("sensitivity"), "sensitivity"))
        parts.append(f"<pre>{html.escape(sweep_text(ev.sweep))}</pre>")
    if rv.donors is not None:

        parts.append("<h2>Donor selection: does the top-ranked candidate help more than a random one?</h2>"
                     "<p class='note'>Per trial, some configurations are held out as targets, a few form the base set "
                     "and the rest are candidates. The candidates are ranked by greedy max-min coverage of the base "
                     "set's embedding; RECE is fitted on base + each candidate in turn and scored on the targets "
                     "(all rows). 'random candidate' is the exact mean over the pool.</p>")
        parts.append(_img(images.get("donors"), "donor experiment"))
        parts.append(_table(_frame_rows(rv.donors.summary()), "unseen relative pinball (and beta P50 MAPE) on the targets"))
        parts.append(f"<p><b>{html.escape(rv.donors.verdict())}</b></p>")
        labels = {c: short_label(cfg) for c, cfg in ev.configs.items()}
        trials = [["trial", "targets", "base", "candidates, ranked"]]
        trials += [[d["trial"], "; ".join(d["targets"]), "; ".join(d["base"]), "; ".join(d["ranking"])]
                   for d in describe(rv.donors, labels)]
        parts.append(_table(trials))
    if rv.drift is not None:
        d = rv.drift
        parts.append(f"<h2>Drift against the previous version</h2><p><b>{html.escape(d.reason)}</b></p>")
        parts.append(_table(_frame_rows(d.metrics)))
        if d.coefficients.height:
            parts.append(_table(_frame_rows(d.coefficients), "coefficient changes per matched specialist"))
        moved = [["configuration", "old specialist", "new specialist"]] + [
            [m["label"], m["old_specialist"], m["new_specialist"]] for m in d.moved]
        parts.append(_table(moved, "configurations that moved specialist") if d.moved
                     else "<p class='note'>No configuration moved specialist.</p>")
    if rv.notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in rv.notes) + "</ul>")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>RECE evaluation</title><style>{CSS}</style>"
            f"</head><body>{''.join(parts)}</body></html>")


def _figures(rv: Review) -> dict[str, Callable[[], Png | None]]:
    """The page's figures by key, each a call that draws it."""
    ev = rv.evaluation
    main = _main_protocol(ev)
    return {
        "by_config": lambda: plot_errors(ev, ev.by_config, "config_id", main, "errors_by_config.png"),
        "donors": lambda: plot_donors(rv),
        "intervals_beta": lambda: plot_intervals(ev, "beta"),
        "intervals_alpha": lambda: plot_intervals(ev, "alpha"),
        "by_gpu": lambda: plot_errors(ev, ev.by_gpu, "gpu", main, "errors_by_gpu.png"),
        "by_model": lambda: plot_errors(ev, ev.by_model, "model", main, "errors_by_model.png"),
        "calibration": lambda: plot_calibration(ev, main),
        "embedding": lambda: plot_embedding(ev),
        "embedding_check": lambda: plot_embedding_check(ev),
        "sensitivity": lambda: plot_sensitivity(ev),
    }


def draw_figure(rv: Review, key: str) -> Png | None:
    """One figure of the page (``_figures``) as its file name and PNG."""
    return _figures(rv)[key]()


# Why tasks: the ten figures are ~4.5 s of matplotlib, the last thing ``rece evaluate`` does; on
# the driver alone they kept every other core idle. PNG bytes come back, so a task on another
# node writes nothing there.
_draw_task = ray.remote(max_retries=RETRIES)(draw_figure)


def write_report(rv: Review, out_dir: str) -> Path:
    """Write ``out_dir/index.html`` and its PNGs (drawn in Ray tasks when Ray is running);
    returns the HTML path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    keys = list(_figures(rv))  # slowest first
    if ray.is_initialized():
        ref = ray.put(rv)
        pngs = gather([_draw_task.remote(ref, k) for k in keys], "report figures")
    else:
        pngs = [draw_figure(rv, k) for k in keys]
    images: dict[str, str | None] = {}
    for key, png in zip(keys, pngs):
        images[key] = None if png is None else png[0]
        if png is not None:
            (out / png[0]).write_bytes(png[1])
    path = out / "index.html"
    path.write_text(render_html(rv, images))
    return path
