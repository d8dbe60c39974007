"""The training job end to end on local Ray, against a store with a known ground truth.

See ``closed_form.py``: step durations and request overheads are linear in raw columns plus
exponential noise, so the fitted ensemble is checked against the true conditional quantiles.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import polars as pl
import pytest
import ray
from closed_form import REQ_NOISE, STEP_NOISE, truth_alpha, truth_beta, write_closed_form_store
from ground_truth import write_store

from rece_dist import artifact
from rece_dist.ensemble import RECEModel
from rece_dist.errors import ReceError, SchemaError, StoreError
from rece_dist.fitcache import FitCache, RowSamples
from rece_dist.pipeline import (TrainSettings, design, featurize_store, fit_ensemble, part_rows, predict_shards,
                                 sample_rows)
from rece_dist.recipe import fit_recipe, train, widening_factor
from rece_dist.store import Store


def test_recovers_known_quantiles(truth_store, trained):
    _, cfgs = truth_store
    model = RECEModel(trained.artifact)
    P = np.array([0, 512, 2000, 1024])
    D = np.array([100, 0, 10, 64])
    rows = pl.DataFrame({"prefill_tokens": P, "decode_tokens": D, "scheduled_tokens": P + D,
                         "num_prefill_reqs": (P > 0).astype(int), "num_decode_reqs": D,
                         "running_depth": [10, 20, 30, 40], "kv_usage_gpu_ratio": [0.1, 0.5, 0.9, 0.3],
                         "kv_blocks_offloaded": [0] * 4, "kv_blocks_restored": [0] * 4})
    for k, cfg in enumerate(cfgs):
        pred = model.predict(cfg, rows, "beta")
        for j, tau in enumerate(model.quantiles):
            truth = truth_beta(k, P, D) - STEP_NOISE * np.log(1 - tau)
            np.testing.assert_allclose(pred[:, j], truth, rtol=0.02)
    req = pl.DataFrame({"prompt_tokens": [100, 2000, 3900], "waiting_depth": [0, 5, 10],
                        "running_depth": [10, 50, 100], "kv_usage_gpu_ratio": [0.2, 0.5, 0.8]})
    pred = model.predict(cfgs[0].to_dict(), req, "alpha")  # a configuration document works as well
    truth = truth_alpha(np.array([100, 2000, 3900]))[:, None] - REQ_NOISE * np.log(1 - np.array([0.1, 0.5, 0.9]))
    np.testing.assert_allclose(pred, truth, rtol=0.05)


def test_held_out_coverage_near_nominal(trained):
    held = trained.artifact["metrics"]["held_out"]
    for target in ("alpha", "beta"):
        m = held[target]["all"]
        assert m["rows"] > 1000
        assert 0.75 <= m["interval_coverage"] <= 0.85, (target, m)
        assert abs(m["coverage_0.5"] - 0.5) < 0.05


def test_each_configuration_gets_its_own_specialist(truth_store, trained):
    _, cfgs = truth_store
    doc = trained.artifact
    assert len(doc["specialists"]) == 2
    assert sorted(m for s in doc["specialists"] for m in s["members"]) == sorted(c.config_id for c in cfgs)
    model = RECEModel(doc)
    for cfg in cfgs:
        w = model.weights(cfg)
        assert w.sum() == pytest.approx(1.0)
        assert np.argmax(w) == model.members[cfg.config_id]


def test_artifact_round_trip_predicts_identically(truth_store, trained, tmp_path):
    _, cfgs = truth_store
    path = tmp_path / "artifact.json"
    path.write_bytes(artifact.canonical_bytes(trained.artifact))
    loaded = RECEModel(artifact.load(str(path)))
    live = RECEModel(trained.artifact)
    rng = np.random.default_rng(5)
    rows = pl.DataFrame({"prefill_tokens": rng.integers(0, 2048, 200), "decode_tokens": rng.integers(0, 128, 200),
                         "running_depth": rng.integers(0, 128, 200), "kv_usage_gpu_ratio": rng.uniform(0, 1, 200),
                         "kv_blocks_offloaded": np.zeros(200, int), "kv_blocks_restored": np.zeros(200, int)}
                        ).with_columns(scheduled_tokens=pl.col("prefill_tokens") + pl.col("decode_tokens"),
                                       num_prefill_reqs=(pl.col("prefill_tokens") > 0).cast(pl.Int64),
                                       num_decode_reqs=pl.col("decode_tokens"))
    for cfg in cfgs:
        np.testing.assert_array_equal(live.predict(cfg, rows), loaded.predict(cfg, rows))
        np.testing.assert_array_equal(live.weights(cfg), loaded.weights(cfg))
    assert json.loads(path.read_bytes())["schema_version"] == artifact.SCHEMA_VERSION


def test_training_is_deterministic(truth_store, trained, ray_local):
    root, _ = truth_store
    again = train(root, TrainSettings(**trained.artifact["training"]["settings"]))
    assert artifact.digest(again.artifact) == artifact.digest(trained.artifact)


def test_empty_store_and_empty_window_are_clear_errors(tmp_path, truth_store, ray_local):
    with pytest.raises(StoreError, match="not a trace store"):
        train(str(tmp_path / "nothing"), TrainSettings())
    empty = Store(str(tmp_path / "empty"))
    empty.init()
    with pytest.raises(StoreError, match="no configuration documents"):
        train(empty.uri, TrainSettings())
    root, _ = truth_store
    with pytest.raises(StoreError, match="no trace partitions in 2025-01-01..2025-01-31"):
        train(root, TrainSettings(date_from="2025-01-01", date_to="2025-01-31"))


def test_nan_durations_name_the_file(tmp_path, ray_local):
    root = str(tmp_path / "bad")
    cfgs = write_closed_form_store(root, seed=1)
    store = Store(root)
    part = store.partitions("steps", [cfgs[1].config_id], "2026-11-02", "2026-11-02")[0]
    df = pl.read_parquet(part.files[0]).with_columns(duration_us=pl.lit(float("nan")))
    store.write_partition("steps", cfgs[1].config_id, "2026-11-02", df)
    with pytest.raises(SchemaError, match=r"date=2026-11-02/part-0.parquet: column 'duration_us' has \d+ NaN"):
        train(root, TrainSettings(specialists=2))


def test_bad_settings_rejected():
    with pytest.raises(ReceError, match="quantiles"):
        TrainSettings(quantiles=(0.9, 0.1))
    with pytest.raises(ReceError, match="temperature"):
        TrainSettings(temperature=0)
    with pytest.raises(ReceError, match="borrow"):
        TrainSettings(borrow=1.5)


def test_borrowing_everything_is_the_global_model(truth_store, ray_local):
    """borrow=1 gives every configuration equal weight in every specialist: each specialist's
    LP is the global model's (up to a constant factor on the weights), fitted independently."""
    settings = TrainSettings(specialists=2, borrow=1.0, noncrossing=False)
    fs = featurize_store(truth_store[0], settings)
    doc = fit_ensemble(fs, settings)
    glob = fit_ensemble(fs, settings, labels={c: 0 for c in fs.config_ids})
    assert len(doc["specialists"]) == 2 and len(glob["specialists"]) == 1
    ref = glob["specialists"][0]["coefficients"]
    for sp in doc["specialists"]:
        assert len(sp["members"]) < len(fs.config_ids)
        for t in ("alpha", "beta"):
            for q, coef in sp["coefficients"][t].items():
                np.testing.assert_allclose(coef, ref[t][q], rtol=1e-5, atol=1e-9, err_msg=f"{t} {q}")


def test_borrowed_configuration_enters_as_a_fixed_row_sample(truth_store, ray_local):
    """A share below 1 of a shard is a random sample of its training rows, the same on every call
    (the weights that keep a configuration's share: the next test)."""
    settings = TrainSettings()
    fs = featurize_store(truth_store[0], settings)
    ref, st = fs.shard_refs[0], fs.stats[0]
    X, y = ray.get(sample_rows.remote(ref, "beta"))
    Xs, ys = ray.get(sample_rows.remote(ref, "beta", 0.25, 7))
    Xs2, _ = ray.get(sample_rows.remote(ref, "beta", 0.25, 7))
    n = len(y)
    assert n == st.train_rows["beta"] and abs(len(ys) - 0.25 * n) < 4 * np.sqrt(0.25 * 0.75 * n)
    np.testing.assert_array_equal(Xs, Xs2)
    rows = {tuple(r) for r in np.column_stack([X, y])}
    assert all(tuple(r) in rows for r in np.column_stack([Xs, ys]))


def test_designs_share_one_sample_per_shard_and_share(truth_store, ray_local):
    """Designs that take the same share of a shard read one ``sample_rows`` object (one task),
    however many specialists, quantiles or folds ask for it; another share is another sample."""
    fs = featurize_store(truth_store[0], TrainSettings())
    by_config: dict[str, list[int]] = {}
    for i, st in enumerate(fs.stats):
        by_config.setdefault(st.config_id, []).append(i)
    a, b = sorted(by_config)
    store = RowSamples()
    first = design(fs, "beta", by_config, [a], 0.5, 500).samples(fs, "beta", 3, store)
    again = design(fs, "beta", by_config, [a], 0.5, 500).samples(fs, "beta", 3, store)
    other = design(fs, "beta", by_config, [b], 0.5, 500).samples(fs, "beta", 3, store)
    assert [r.hex() for r in first] == [r.hex() for r in again]
    # a's shards are a member's share in `first`, a borrowed one in `other`: different samples
    shared = {r.hex() for r in first} & {r.hex() for r in other}
    assert not shared


def test_only_capped_samples_outlive_a_fit(truth_store, ray_local):
    """A FitCache keeps the samples of capped fits (bounded by the cap) for later fits; uncapped
    samples are every training row, and a fit keeps them only while it runs. The embedding
    profile's samples are always capped."""
    fs = featurize_store(truth_store[0], TrainSettings())
    uncapped, capped = FitCache(), FitCache()
    fit_ensemble(fs, TrainSettings(specialists=1), cache=uncapped)
    fit_ensemble(fs, TrainSettings(specialists=1, rows_per_config=500), cache=capped)
    assert len(uncapped.samples) == len(fs.stats)  # the profile's: one beta sample per shard
    # one per shard and target; the beta fit takes the same 500 rows of each shard as the profile
    # (whose cap is min(rows_per_config, 1,000)), so it reads the profile's samples
    assert len(capped.samples) == 2 * len(fs.stats)


def test_rows_per_config_caps_every_configuration_and_keeps_its_share(truth_store, ray_local):
    """With ``rows_per_config`` a configuration enters a fit as a fixed sample of about that many
    training rows, member or borrowed, at the row weight that keeps its share of the fit's total
    weight (a member 1, a borrowed configuration ``borrow``); without it nothing is sampled."""
    settings = TrainSettings()
    fs = featurize_store(truth_store[0], settings)
    by_config: dict[str, list[int]] = {}
    for i, st in enumerate(fs.stats):
        by_config.setdefault(st.config_id, []).append(i)
    member, other = sorted(by_config)
    n = {c: sum(fs.stats[i].train_rows["beta"] for i in by_config[c]) for c in by_config}
    cap = 500
    d = design(fs, "beta", by_config, [member], 0.5, cap)
    parts = [part_rows(ray.get(r), d.scale, d.columns, w)
             for r, w in zip(d.samples(fs, "beta", 3, RowSamples()), d.spec().row_weights)]
    got = {c: (sum(len(parts[k][1]) for k, (i, _, _) in enumerate(d.parts) if fs.stats[i].config_id == c),
               sum(parts[k][2].sum() for k, (i, _, _) in enumerate(d.parts) if fs.stats[i].config_id == c))
           for c in by_config}
    assert abs(got[member][0] - cap) < 4 * np.sqrt(cap) and abs(got[other][0] - 0.5 * cap) < 4 * np.sqrt(cap)
    assert got[member][1] == pytest.approx(cap, rel=0.1) and got[other][1] == pytest.approx(0.5 * cap, rel=0.15)
    assert d.rows == n[member] and d.size == pytest.approx(1.5 * cap)
    full = design(fs, "beta", by_config, [member], 0.5, None)
    assert [keep for _, _, keep in full.parts] == [1.0 if fs.stats[i].config_id == member else 0.5 for i, _, _ in full.parts]


def test_specialist_above_max_fit_rows_is_fitted_over_its_shards(truth_store, ray_local, capsys):
    """No task stacks a specialist above --max-fit-rows: the reduction runs over its shards and
    must land on the same exact optimum as the stacked fit; it skips the joint non-crossing LP."""
    base = TrainSettings(specialists=2, noncrossing=False)
    fs = featurize_store(truth_store[0], base)
    stacked = fit_ensemble(fs, base)
    capsys.readouterr()
    over = fit_ensemble(fs, dataclasses.replace(base, max_fit_rows=1, noncrossing=True))
    assert "fitted over" in capsys.readouterr().err
    for a, b in zip(stacked["specialists"], over["specialists"]):
        assert b["crossings"] == {"alpha": None, "beta": None}
        for t in ("alpha", "beta"):
            for fa, fb in zip(a["fit"][t], b["fit"][t]):
                assert abs(fa["objective"] - fb["objective"]) <= 1e-9 * abs(fa["objective"])
            for q in a["coefficients"][t]:
                np.testing.assert_allclose(b["coefficients"][t][q], a["coefficients"][t][q], rtol=1e-6, atol=1e-9)


def test_widening_factor_by_hand():
    r = np.array([0.5, 1.0, 2.0, 3.0, np.nan])
    assert widening_factor(r, np.ones(5), 0.75) == 2.0          # 3 of 4 finite ratios <= 2
    assert widening_factor(r, np.array([1, 1, 1, 5, 1.0]), 0.75) == 3.0  # the 3.0 row weighs half
    assert widening_factor(np.array([-2.0, -1.0]), np.ones(2), 0.9) == 0.0  # never negative
    assert widening_factor(np.array([np.nan]), np.ones(1), 0.9) == 1.0       # nothing to measure: unchanged


def test_unseen_calibration_covers_configurations_never_seen(tmp_path, ray_local):
    """Each configuration carries its own unexplained factor (ground_truth's config_spread), so a
    configuration outside training is off by it: the plain interval, which carries only the
    noise within a configuration, misses; the calibrated one, widened by factors measured on
    other held-out configurations, covers one whose factor lies inside the range the calibration
    saw. (With four calibration configurations that range is all there is to learn from: a
    factor outside it is a 2-in-5 event, so coverage is asserted per configuration.) Seen
    configurations are left exactly as they were."""
    root = str(tmp_path / "store")
    cfgs = write_store(root, n_configs=6, rows=600, config_spread=0.25, seed=3)
    factor = dict(zip((c.config_id for c in cfgs), np.exp(0.25 * np.random.default_rng(4).standard_normal(6))))
    # One specialist: with 2 per specialist, 4 configurations pin the configuration-level terms
    # (bias, dense_read_us, tp_comm_fixed_us) only through borrowed rows, and the transfer error
    # is then the specialists' extrapolation rather than the factor this test is about.
    settings = TrainSettings(specialists=1, holdout_every=2, noncrossing=False, calibrate_folds=4)
    fs = featurize_store(root, settings)
    ids = fs.config_ids
    train_shards = fs.shards_of(ids[:4])
    doc = fit_recipe(fs, settings, train_shards)
    cal = doc["unseen_calibration"]
    assert cal["folds"] == 4 and cal["factors"]["beta"]["0.5"] == 1.0
    plain = {k: v for k, v in doc.items() if k != "unseen_calibration"}

    def coverage(d, shards, rows):
        out = predict_shards(d, fs, shards, rows=rows)
        y = np.concatenate([o["beta"][0] for o in out])
        v = np.vstack([o["beta"][1] for o in out])
        return float(np.mean((y >= v[:, 0]) & (y <= v[:, -1]))), v

    assert cal["factors"]["beta"]["0.9"] > 1.5 and cal["factors"]["beta"]["0.1"] > 1.5, cal
    lo, hi = min(factor[c] for c in ids[:4]), max(factor[c] for c in ids[:4])
    inside = [c for c in ids[4:] if lo <= factor[c] <= hi]
    assert inside, "the store's draw must put a held-out configuration inside the calibration range"
    for c in inside:
        cov_plain, _ = coverage(plain, fs.shards_of([c]), "all")
        cov_cal, _ = coverage(doc, fs.shards_of([c]), "all")
        assert cov_cal > cov_plain + 0.2 and cov_cal >= 0.7, (c, factor[c], lo, hi, cov_plain, cov_cal)
    seen_plain = coverage(plain, train_shards, "holdout")[1]
    np.testing.assert_array_equal(coverage(doc, train_shards, "holdout")[1], seen_plain)


def test_a_cost_no_fit_saw_is_flagged_not_silently_left_out(truth_store, trained):
    """The ground-truth store is dense-only: a MoE configuration's expert terms were zero on every
    training row, so predict warns and ``rece predict``'s payload names exactly them; a training
    configuration's rows flag nothing (columns dropped as collinear are not unobserved)."""
    import warnings

    from rece_dist.config import Catalog, DeploymentConfig, ServingSettings
    from rece_dist.ensemble import UnobservedFeatureWarning, predict_payload

    model = RECEModel(trained.artifact)
    cat = Catalog.default()
    moe = DeploymentConfig(cat.model("Mixtral-8x7B-v0.1"), cat.gpu("H100-SXM"), ServingSettings(tp=2))
    rows = [{"prefill_tokens": 512, "decode_tokens": 32, "running_depth": 33, "kv_usage_gpu_ratio": 0.3}]
    with pytest.warns(UnobservedFeatureWarning, match="moe_roofline_us"):
        model.predict(moe, rows)
    flagged = predict_payload(model, moe, {"beta": rows}, "test")["beta_unobserved_features"]
    tp_terms = {"tp_comm_fixed_us", "tp_allreduce_us"} if all(c.serving.tp == 1 for c in truth_store[1]) else set()
    assert set(flagged) == {"moe_roofline_us", "moe_read_us", "moe_compute_us"} | tp_terms
    own = truth_store[1][0]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnobservedFeatureWarning)
        model.predict(own, rows)
    out = predict_payload(model, own, {"beta": rows, "alpha": [
        {"prompt_tokens": 100, "waiting_depth": 1, "running_depth": 2, "kv_usage_gpu_ratio": 0.2}]}, "test")
    assert "warnings" not in out and "beta_unobserved_features" not in out
