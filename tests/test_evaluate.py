"""Validation protocols, metric aggregation, embedding validation and tuning.

Pure parts are checked against values worked out by hand; the protocols are checked for
leakage on the fitted artifacts themselves (their ``configurations`` and date window), and the
whole evaluation runs once on a store with a known ground truth (tests/ground_truth.py).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy.stats import spearmanr
import polars as pl
import pytest
from ground_truth import configs, write_store

from rece_dist.evaluate import (
    EvalOptions,
    EvaluationError,
    artifact_splits,
    baseline_rows,
    choose,
    config_kfold,
    evaluate,
    mantel,
    methods,
    pair_distances,
    protocol_folds,
    run_protocol,
    table_footnotes,
)
from rece_dist.embedding import probe_rows, typical_grid
from rece_dist.pipeline import FeatureSet, TrainSettings, featurize_store, fit_ensemble
from rece_dist.recipe import fit_recipe
from rece_dist.metrics import relative_pinball
from rece_dist.refit import Cell, Fitter, aggregate
from rece_dist.shards import ShardStats

QS = (0.1, 0.5, 0.9)
# borrow 0: the seed's RECE, whose one-configuration specialists are exactly the donor baseline
# (checked below); borrowing itself is checked through the sweep's borrow grid.
SETTINGS = TrainSettings(specialists=2, holdout_every=2, noncrossing=False, borrow=0.0)


# --- metrics and aggregation by hand ----------------------------------------------------------

def _cell(cid: str, y, values, method="m", split="unseen", target="beta") -> Cell:
    return Cell("loco", "f", method, split, cid, target, np.asarray(y, float), np.asarray(values, float))


A = _cell("a", [10, 20], [[8, 10, 12], [18, 20, 22]])   # pinball per q: .2, 0, .2 ; mean |y| 15
B = _cell("b", [100], [[50, 90, 95]])                    # pinball per q: 5, 5, 4.5 ; mean |y| 100


def test_relative_pinball_by_hand():
    assert relative_pinball(A.y, A.values, QS) == pytest.approx((0.4 / 3) / 15)
    assert relative_pinball(B.y, B.values, QS) == pytest.approx((14.5 / 3) / 100)
    assert np.isnan(relative_pinball(np.zeros(0), np.zeros((0, 3)), QS))


def test_aggregate_pools_rows_and_averages_configurations():
    row = aggregate([A, B], QS, ("method", "target")).row(0, named=True)
    assert row["rows"] == 3 and row["configs"] == 2
    assert row["pinball_0.1"] == pytest.approx((0.2 + 0.2 + 5) / 3)
    assert row["pinball_0.5"] == pytest.approx(5 / 3)
    assert row["pinball_0.9"] == pytest.approx((0.2 + 0.2 + 4.5) / 3)
    assert row["rel_pinball"] == pytest.approx(np.mean([1.8, 5 / 3, 4.9 / 3]) / (130 / 3))  # pooled
    assert row["rel_pinball_macro"] == pytest.approx(((0.4 / 3) / 15 + (14.5 / 3) / 100) / 2)  # per config
    assert row["interval_coverage"] == pytest.approx(2 / 3)  # 100 lies above [50, 95]
    assert row["coverage_0.9"] == pytest.approx(2 / 3)
    assert row["mape_p50"] == pytest.approx(0.0)  # median of 0, 0, 0.1


def test_aggregate_groups_by_cell_fields_and_config_attributes():
    cells = [A, B, _cell("a", [1.0], [[0, 1, 2]], split="seen")]
    by_split = aggregate(cells, QS, ("split",))
    assert by_split["split"].to_list() == ["seen", "unseen"] and by_split["rows"].to_list() == [1, 3]
    by_gpu = aggregate(cells, QS, ("gpu",), {"a": {"gpu": "H100"}, "b": {"gpu": "L40S"}})
    assert dict(zip(by_gpu["gpu"], by_gpu["rows"])) == {"H100": 3, "L40S": 1}


def test_baseline_table_marks_what_a_method_cannot_predict():
    meths = methods(2)
    cells = [_cell("a", A.y, A.values, m.key, split) for m in meths for split in ("seen", "unseen")
             if not (m.key == "per_config" and split == "unseen") and not (m.key == "donor" and split == "seen")]
    scores = aggregate(cells, QS, ("protocol", "method", "split", "target"))
    rows = baseline_rows(scores, meths, "loco", "beta")
    per_config = next(r for r in rows if r[0].startswith("per-configuration"))
    assert per_config[1:5] != ["n/a"] * 4 and per_config[5:] == ["n/a"] * 4
    donor = next(r for r in rows if r[0].startswith("nearest"))
    assert donor[1:5] == ["n/a"] * 4 and donor[5] == "100.0%"
    notes = table_footnotes(scores, meths, "loco")
    assert any("per-configuration models, unseen: needs the configuration's own data" in n for n in notes)
    assert len(notes) == 2


def test_choose_takes_the_lowest_criterion():
    crit = pl.DataFrame({"method": ["K=2 T=0.1", "K=1 T=0.1", "K=4 T=1"], "criterion": [0.3, 0.3, 0.1]})
    assert choose(crit)["method"] == "K=4 T=1"
    assert choose(crit.filter(pl.col("criterion") > 0.2))["method"] == "K=1 T=0.1"  # tie: name order


# --- embedding validation by hand -------------------------------------------------------------

def test_pair_distances_by_hand():
    M = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])  # pairs (0,1), (0,2), (1,2)
    np.testing.assert_allclose(pair_distances(M, "cosine"), [1, 2, 1])
    np.testing.assert_allclose(pair_distances(M, "euclidean"), [np.sqrt(2), 2, np.sqrt(2)])
    np.testing.assert_allclose(pair_distances(M, "rms"), [1, np.sqrt(2), 1])


def test_mantel_detects_monotone_and_reversed_relations():
    x = np.array([[0.0], [1.0], [3.0], [7.0], [8.0], [12.0]])
    d = pair_distances(x, "euclidean")
    rho, p = mantel(d, np.sqrt(d) * 3, len(x), permutations=999)
    assert rho == pytest.approx(1.0) and p < 0.02
    rho, p = mantel(d, -d, len(x), permutations=199)
    assert rho == pytest.approx(-1.0) and p > 0.9


def test_mantel_p_value_equals_a_scipy_loop_over_the_same_permutations():
    """The permutation statistics are one matrix product; scipy's spearmanr per permutation is the reference."""
    n = 8
    rng = np.random.default_rng(3)
    x = rng.normal(size=(n, 2))
    d_a = pair_distances(x, "euclidean")
    d_b = np.round(pair_distances(x + rng.normal(scale=0.7, size=(n, 2)), "euclidean"), 1)  # ties too
    rho, p = mantel(d_a, d_b, n, permutations=299, seed=5)
    iu = np.triu_indices(n, 1)
    B = np.zeros((n, n))
    B[iu] = d_b
    B = B + B.T
    perm_rng = np.random.default_rng(5)
    ref_rho = spearmanr(d_a, d_b).statistic
    hits = sum(spearmanr(d_a, B[np.ix_(q, q)][iu]).statistic >= ref_rho - 1e-12
               for q in (perm_rng.permutation(n) for _ in range(299)))
    assert rho == pytest.approx(ref_rho) and 0.0 < p < 1.0
    assert p == (1 + hits) / 300


def test_typical_grid_averages_each_percentile_over_configurations():
    ranges = [{"P": (0.0, 500.0, 900.0), "Q": (0.0, 0.0, 0.0)},
              {"P": (0.0, 600.0, 1500.0), "Q": (0.0, 1.0, 4.0)},
              {"P": (0.0, 100.0, 900.0), "Q": (2.0, 5.0, 8.0)}]
    grid = typical_grid(ranges)
    assert grid["P"] == [0.0, 400.0, 1100.0]  # every configuration counts once
    assert grid["Q"] == pytest.approx([2.0 / 3.0, 2.0, 4.0])
    assert typical_grid([{"P": (3.0, 3.0, 3.0)}]) == {"P": [3.0]}  # equal values collapse


def test_probe_rows_build_consistent_batches():
    probes = probe_rows({"beta": {"prefill_tokens": [0.0, 512.0], "decode_tokens": [8.0], "kv_usage_gpu_ratio": [0.5]},
                         "alpha": {"prompt_tokens": [100.0], "waiting_depth": [0.0, 2.0], "running_depth": [4.0],
                                   "kv_usage_gpu_ratio": [0.1, 0.9]}})
    beta = probes["beta"]
    assert beta.height == 2 and probes["alpha"].height == 4
    assert beta["scheduled_tokens"].to_list() == [8.0, 520.0]
    assert beta["running_depth"].to_list() == [8.0, 9.0]  # decodes, plus one prefilling request


# --- folds: which shards train and which are scored (no Ray) ----------------------------------

def _fake_fs(n_configs: int = 6, dates=("2026-11-01", "2026-11-02", "2026-11-03")) -> FeatureSet:
    cfgs = {c.config_id: c for c in configs(n_configs)}
    stats = [ShardStats(cid, d) for cid in sorted(cfgs) for d in dates]
    return FeatureSet("mem://", cfgs, [], [], stats)


@pytest.mark.parametrize("protocol,key", [("loco", lambda c: c.config_id), ("logo", lambda c: c.gpu.name),
                                          ("lomo", lambda c: c.model.name)])
def test_group_protocols_hold_out_whole_groups(protocol, key):
    fs = _fake_fs()
    folds = protocol_folds(fs, protocol)
    groups = {key(c) for c in fs.configs.values()}
    assert len(folds) == len(groups)
    unseen_all = []
    for f in folds:
        train_cfgs = {fs.stats[i].config_id for i in f.train}
        test_cfgs = {fs.stats[i].config_id for i in f.unseen}
        assert test_cfgs == set(f.held_out_configs) and not train_cfgs & test_cfgs
        assert len({key(fs.configs[c]) for c in test_cfgs}) == 1
        assert train_cfgs | test_cfgs == set(fs.config_ids)
        assert f.seen == f.train
        unseen_all += f.unseen
    assert sorted(unseen_all) == list(range(len(fs.stats)))  # every shard is unseen exactly once


def test_temporal_trains_only_on_older_dates():
    fs = _fake_fs()
    (f,) = protocol_folds(fs, "temporal")
    assert {fs.stats[i].date for i in f.unseen} == {"2026-11-03"} == set(f.held_out_dates)
    assert {fs.stats[i].date for i in f.train} == {"2026-11-01", "2026-11-02"}
    assert not f.held_out_configs  # every configuration has older data


def test_protocols_that_cannot_run_say_why():
    one_date = _fake_fs(dates=("2026-11-01",))
    with pytest.raises(EvaluationError, match="temporal validation needs more than 1 date"):
        protocol_folds(one_date, "temporal")
    same_gpu = _fake_fs(1)
    with pytest.raises(EvaluationError, match="logo .* at least 2"):
        protocol_folds(same_gpu, "logo")


def test_kfold_over_configurations_holds_each_out_once():
    fs = _fake_fs()
    folds = config_kfold(fs, 3, seed=1)
    held = [c for f in folds for c in f.held_out_configs]
    assert sorted(held) == fs.config_ids
    for f in folds:
        assert not {fs.stats[i].config_id for i in f.train} & f.held_out_configs
    assert len(config_kfold(fs, None)) == 6


# --- on a real store with Ray -------------------------------------------------------------------

@pytest.fixture(scope="module")
def truth_fs(tmp_path_factory, ray_local) -> FeatureSet:
    root = str(tmp_path_factory.mktemp("gt") / "store")
    write_store(root, n_configs=3, rows=1000, dates=("2026-11-01", "2026-11-02", "2026-11-03"))
    return featurize_store(root, SETTINGS)


def _assert_trained_only_on(fs: FeatureSet, fold, doc: dict) -> None:
    trained = set(doc["configurations"])
    assert trained == {fs.stats[i].config_id for i in fold.train}
    assert not trained & fold.held_out_configs
    first, last = doc["training"]["date_window"]
    assert all(not first <= d <= last for d in fold.held_out_dates)


def test_no_fit_sees_a_held_out_configuration_or_date(truth_fs, evaluation):
    """Every protocol's fitted artifacts: trained exactly on the fold's training shards.

    LOCO is audited on the evaluation's own fits (all three kinds); the other protocols fit
    the global model only, which is enough to audit the fold construction they share.
    """
    runs = {"loco": evaluation.runs["loco"]}
    fitter = Fitter(truth_fs, SETTINGS)
    global_only = [m for m in methods() if m.key == "global"]
    for protocol in ("logo", "lomo", "temporal"):
        runs[protocol] = run_protocol(fitter, protocol_folds(truth_fs, protocol), global_only, SETTINGS.temperature)
    for protocol, run in runs.items():
        assert len(run.folds) == {"loco": 3, "logo": 2, "lomo": 2, "temporal": 1}[protocol]
        for fold, docs in zip(run.folds, run.docs):
            assert set(docs) == ({"rece", "global", "per_config"} if protocol == "loco" else {"global"})
            for doc in docs.values():
                _assert_trained_only_on(truth_fs, fold, doc)
            if protocol == "temporal":
                assert docs["global"]["training"]["date_window"] == ["2026-11-01", "2026-11-02"]
        unseen = {(c.fold, c.config_id) for c in run.cells if c.split == "unseen"}
        held = {(f.name, truth_fs.stats[i].config_id) for f in run.folds for i in f.unseen}
        assert unseen == held
        if protocol != "temporal":
            assert all(truth_fs.stats[i].config_id in f.held_out_configs for f in run.folds for i in f.unseen)


@pytest.fixture(scope="module")
def evaluation(truth_fs):
    doc = fit_ensemble(truth_fs, SETTINGS)
    opts = EvalOptions(protocols=("loco",), sparse_top_k=1, k_grid=(2,), temperatures=(0.1, 1.0), top_ks=(1, None),
                       borrows=(0.0, 0.5), sample_rows=50)
    return evaluate(truth_fs, SETTINGS, doc, opts)


def _metric(ev, method: str, split: str, target: str, metric: str) -> float:
    s = ev.scores.filter((pl.col("protocol") == "loco") & (pl.col("method") == method) & (pl.col("split") == split)
                         & (pl.col("target") == target))
    assert s.height == 1, (method, split, target)
    return s[metric][0]


def test_every_method_is_scored_where_it_is_defined(evaluation):
    ev = evaluation
    present = set(zip(ev.scores["method"], ev.scores["split"]))
    for m in ev.methods:
        assert ((m.key, "seen") in present) == (m.key != "donor")
        assert ((m.key, "unseen") in present) == (m.key != "per_config")
    # LOCO unseen: every configuration once, all of its rows (3 dates x 1000 rows per target)
    u = ev.by_config.filter((pl.col("method") == "global") & (pl.col("split") == "unseen") & (pl.col("target") == "beta"))
    assert u.height == 3 and set(u["rows"].to_list()) == {3000.0}


def test_ground_truth_transfers_through_pooled_models_not_donors(evaluation):
    """One latency law for all configurations: a pooled fit transfers it, a donor's own law does not."""
    ev = evaluation
    for target in ("alpha", "beta"):
        for method in ("global", "per_config", "rece_dense"):
            assert 0.7 <= _metric(ev, method, "seen", target, "interval_coverage") <= 0.9
    assert 0.7 <= _metric(ev, "global", "unseen", "alpha", "interval_coverage") <= 0.9  # alpha's law is config-free
    assert _metric(ev, "global", "unseen", "beta", "rel_pinball") < 0.8 * _metric(ev, "donor", "unseen", "beta", "rel_pinball")


def test_rece_with_one_configuration_per_specialist_is_the_donor(evaluation):
    """K=2 on 2 training configurations: each specialist is one configuration's own fit, so top-1
    mixing is exactly the nearest donor (dense mixing is not: an unseen configuration's profile
    lies between the two)."""
    for target in ("alpha", "beta"):
        for metric in ("rel_pinball", "interval_coverage", "mape_p50"):
            donor = _metric(evaluation, "donor", "unseen", target, metric)
            assert _metric(evaluation, "rece_top1", "unseen", target, metric) == pytest.approx(donor, rel=1e-9)


def test_sweep_and_embedding_check_cover_the_grid(evaluation):
    ev = evaluation
    sw = ev.sweep
    assert sw.folds == 3
    assert set(sw.grid["top_k"].to_list()) == {"1", "dense"} and set(sw.grid["temperature"].to_list()) == {0.1, 1.0}
    assert set(sw.grid["borrow"].to_list()) == {0.0, 0.5}
    best = sw.grid.sort("criterion").row(0, named=True)
    assert sw.chosen["criterion"] == pytest.approx(best["criterion"])
    chk = ev.embedding
    assert len(chk.emb_distance) == 3 and set(chk.behaviour_distance) == {"alpha", "beta"}
    assert chk.clusters["K"].to_list() == [2]


def test_borrowing_transfers_the_shared_law(evaluation):
    """Every configuration of tests/ground_truth.py follows one law, weight reads included. A
    training fold holds two configurations, so at K=2 each specialist has one and cannot tell its
    weight-read time from its intercept; borrowing the other's rows pins that down, which must
    show as a lower held-out loss at every temperature and top-k."""
    crit = (evaluation.sweep.grid.filter(pl.col("target") == "beta")
            .pivot(on="borrow", index=["temperature", "top_k"], values="criterion"))
    assert crit.height == 4
    assert (crit["0.5"] < 0.5 * crit["0.0"]).all(), crit  # measured: 0.04 vs 0.31
    assert evaluation.sweep.chosen["borrow"] == 0.5


def test_probe_grid_recovers_the_stores_input_distributions(evaluation):
    """tests/ground_truth.py draws P ~ U{0..1023}, D ~ U{1..127}, kv ~ U(0, 1), L ~ U{16..2047} for every
    configuration, so the typical 10/50/90% grid is known."""
    g = evaluation.embedding.probe_grid
    np.testing.assert_allclose(g["beta"]["prefill_tokens"], [102, 512, 921], atol=25)
    np.testing.assert_allclose(g["beta"]["decode_tokens"], [13.6, 64, 114.4], atol=4)
    np.testing.assert_allclose(g["beta"]["kv_usage_gpu_ratio"], [0.1, 0.5, 0.9], atol=0.03)
    np.testing.assert_allclose(g["alpha"]["prompt_tokens"], [219, 1032, 1845], atol=50)


def test_artifact_splits_follow_what_the_artifact_trained_on():
    fs = _fake_fs(3)
    trained = fs.config_ids[:2]
    doc = {"configurations": {c: {} for c in trained}, "training": {"date_window": ["2026-11-01", "2026-11-02"]}}
    split = artifact_splits(fs, doc)
    seen = {(fs.stats[i].config_id, fs.stats[i].date) for i in split["seen"]}
    assert seen == {(c, d) for c in trained for d in ("2026-11-01", "2026-11-02")}
    assert len(split["unseen"]) == 9 - 4


def test_transfer_targets_by_hand():
    """Ratio of pooled MAPEs, worst configuration's own ratio, coverage and pinball gains."""
    from rece_dist.evaluate.targets import targets_rows, transfer_targets

    a, b = configs(2)
    own = [_cell(a.config_id, [100, 100], [[90, 110, 130], [70, 90, 110]], "per_config", "seen"),   # 10%, 10%
           _cell(b.config_id, [100], [[90, 105, 120]], "per_config", "seen")]                         # 5%
    rece = [_cell(a.config_id, [100, 100], [[90, 120, 130], [70, 80, 110]], "rece_dense"),           # 20%, 20%
            _cell(b.config_id, [100], [[90, 115, 120]], "rece_dense"),                                # 15%
            _cell(a.config_id, [100], [[95, 100, 105]], "rece_dense", "seen")]
    base = [_cell(c.config_id, [100] * n, [[50, 150, 200]] * n, m) for m in ("global", "donor") for c, n in ((a, 2), (b, 1))]
    cells = own + rece + base
    scores = aggregate(cells, QS, ("protocol", "method", "split", "target"))
    by_config = aggregate(cells, QS, ("protocol", "method", "split", "target", "config_id"))
    df = transfer_targets(scores, by_config, {"alpha": "rece_dense", "beta": "rece_dense"}, {a.config_id: a, b.config_id: b}, None)
    r = df.filter(pl.col("target") == "beta").row(0, named=True)
    assert r["protocol"] == "loco" and r["ratio"] == pytest.approx(0.2 / 0.1) and r["ratio_met"]
    assert r["worst_ratio"] == pytest.approx(0.15 / 0.05) and r["worst_config"] == b.label
    assert r["coverage"] == 1.0 and not r["coverage_met"]  # 100% is not 80% +- 5 pp
    assert r["seen_coverage"] == 1.0 and not r["seen_met"]
    rp = lambda cs: np.mean([relative_pinball(c.y, c.values, QS) for c in cs])  # one cell per configuration
    assert r["gain_vs_global"] == pytest.approx(1 - rp(rece[:2]) / rp(base[:2]))
    assert r["gain_met"] == (r["gain_vs_global"] >= 0.2 and r["gain_vs_donor"] >= 0.2)
    assert not r["spearman_met"]  # no embedding check: nothing shows the target is met
    assert any("MISS" in c for c in targets_rows(df)[1])


def test_unseen_calibration_never_sees_the_group_it_measures(truth_fs):
    """Each calibration fold's refit trained on every configuration but the ones it holds out."""
    settings = TrainSettings(specialists=1, holdout_every=2, noncrossing=False, calibrate_folds=3)
    doc = fit_recipe(truth_fs, settings)
    groups = doc["unseen_calibration"]["groups"]
    ids = set(doc["configurations"])
    assert len(groups) == 3
    held = [set(g["held_out"]) for g in groups]
    assert set().union(*held) == ids and sum(map(len, held)) == len(ids)  # each configuration held out once
    for g in groups:
        assert set(g["trained_on"]) == ids - set(g["held_out"])


def test_one_law_transfers_to_an_unseen_configuration_within_noise(evaluation):
    """The ground truth's law is identical across configurations, so the pooled model's P50 on a
    configuration it never saw is as good as that configuration's own model on its own rows."""
    for target in ("alpha", "beta"):
        own = _metric(evaluation, "per_config", "seen", target, "mape_p50")
        assert _metric(evaluation, "global", "unseen", target, "mape_p50") <= 1.25 * own, target


def test_model_based_coordinates_of_one_law_are_the_behaviour_itself(evaluation):
    """One law for every configuration (tests/ground_truth.py): the global model of the LOCO fold
    that never saw a configuration predicts its P50 on the probe grid about as its own model
    does, so its model-based coordinates are its behaviour vector up to noise and transfer error
    (measured RMS log ratio: alpha <= 0.029, beta <= 0.056, the latter the one configuration the
    other two bracket least), and their pair distances are the behaviour distances (beta's span
    0.05 to 0.98)."""
    chk = evaluation.embedding
    assert chk.model_based is not None
    for t, bound in (("alpha", 0.05), ("beta", 0.1)):
        own_error = np.sqrt(((chk.model_based[t] - chk.behaviour[t]) ** 2).mean(axis=1))
        assert own_error.max() <= bound, (t, own_error)
        np.testing.assert_allclose(pair_distances(chk.model_based[t], "rms"), chk.behaviour_distance[t],
                                   atol=2 * bound)
        assert np.isfinite(chk.spearman[t]["model_rms"])


def test_cells_aggregated_in_ray_equal_the_same_cells_aggregated_in_memory(evaluation):
    cells = evaluation.runs["loco"].cells
    assert cells and all(c.rows == len(c.fetch().y) for c in cells[:5])
    by = ("protocol", "method", "split", "target", "config_id")
    in_ray, in_memory = aggregate(cells, QS, by), aggregate([c.fetch() for c in cells], QS, by)
    assert in_ray.height > 10
    assert in_ray.equals(in_memory)
    assert in_ray.equals(evaluation.by_config)


def test_a_held_out_cost_no_training_row_had_is_named_beside_the_worst_configuration(tmp_path, ray_local):
    """Five configurations, one at TP 2: leaving it out, the fold trains on TP 1 only, where every
    tensor-parallel term is 0 by its formula ((tp - 1) factor, log2(tp), tp > 1); those terms are
    named for that configuration and for no other."""
    from rece_dist.evaluate.targets import transfer_targets, unobserved_in_folds

    root = str(tmp_path / "store")
    cfgs = write_store(root, n_configs=5, rows=400)
    fs = featurize_store(root, SETTINGS)
    rece = [m for m in methods(1) if m.key == "rece_dense"]
    run = run_protocol(Fitter(fs, SETTINGS), protocol_folds(fs, "loco"), rece, SETTINGS.temperature)
    got = {k: v for k, v in unobserved_in_folds(fs, {"loco": run}).items() if v}
    (tp2,) = [c.config_id for c in cfgs if c.serving.tp > 1]
    assert got == {("loco", "beta", tp2): ["tp_comm_fixed_us", "tp_allreduce_us"],
                   ("loco", "alpha", tp2): ["tp_gt_1", "tp_comm_us"]}
    # the label shown for the worst configuration (here the TP 2 one) carries them
    scores = pl.DataFrame([{"protocol": "loco", "target": "beta", "method": m, "split": s, "mape_p50": 0.1,
                            "rel_pinball_macro": 0.1, "interval_coverage": 0.8, "interval_width": 1.0}
                           for m in ("per_config", "rece_dense", "global", "donor") for s in ("seen", "unseen")])
    by_config = pl.DataFrame([{"protocol": "loco", "target": "beta", "method": m, "split": s, "config_id": c.config_id,
                               "mape_p50": 0.5 if (c.config_id == tp2 and m == "rece_dense") else 0.1}
                              for m in ("per_config", "rece_dense") for s in ("seen", "unseen") for c in cfgs])
    row = transfer_targets(scores, by_config, {"alpha": "rece_dense", "beta": "rece_dense"}, fs.configs, None, got).row(0, named=True)
    assert row["worst_config"] == f"{fs.configs[tp2].label} (never observed: tp_comm_fixed_us, tp_allreduce_us)"


def test_evaluation_folds_nest_the_recipes_calibration(tmp_path, ray_local):
    """A fold's RECE fit is the recipe, calibration included: its calibration groups are drawn from
    the fold's training configurations only, so the widening a held-out configuration gets was
    measured without it (nested grouped cross-validation)."""
    root = str(tmp_path / "store")
    write_store(root, n_configs=5, rows=300)
    settings = dataclasses.replace(SETTINGS, specialists=1, calibrate_folds=3)
    fs = featurize_store(root, settings)
    chosen = [m for m in methods(1) if m.key in ("rece_dense", "global")]
    run = run_protocol(Fitter(fs, settings), protocol_folds(fs, "loco"), chosen, settings.temperature)
    for fold, docs in zip(run.folds, run.docs):
        # the global fit too: it is what an artifact pooling both targets ships, widening included
        for kind in ("rece", "global"):
            groups = docs[kind]["unseen_calibration"]["groups"]
            seen = set().union(*(set(g["held_out"]) | set(g["trained_on"]) for g in groups))
            assert seen == {fs.stats[i].config_id for i in fold.train} and not seen & fold.held_out_configs
