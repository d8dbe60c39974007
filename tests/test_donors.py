"""Donor selection: the greedy max-min ranking by hand, candidate files, the CLI, the experiment."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from ground_truth import configs, write_store
from rece_dist.cli import main
from rece_dist.config import config_vector
from rece_dist.donors import (distinct_splits, donor_experiment, greedy_max_min, load_candidates, new_candidates,
                              rank_donors, split_sizes)
from rece_dist.errors import ConfigError
from rece_dist.refit import EvaluationError, Fitter
from rece_dist.pipeline import TrainSettings, featurize_store
from rece_dist.embedding import Embedding
from rece_dist.store import Store


def test_greedy_max_min_by_hand():
    # covered: 0. Candidates 1, 2, 2.1 -> 2.1 (2.1 away), then 1 (1 from 0), then 2 (0.1 from 2.1)
    picks = greedy_max_min(np.array([[0.0]]), np.array([[1.0], [2.0], [2.1]]), 3)
    assert [i for i, _ in picks] == [2, 0, 1]
    np.testing.assert_allclose([s for _, s in picks], [2.1, 1.0, 0.1])
    assert greedy_max_min(np.array([[0.0]]), np.array([[1.0], [2.0], [2.1]]), 1) == [(2, pytest.approx(2.1))]


def test_greedy_without_existing_points_and_ties():
    picks = greedy_max_min(np.zeros((0, 1)), np.array([[0.0], [4.0], [1.0]]), 3)
    assert picks[0] == (0, np.inf)          # nothing covered: first candidate
    assert picks[1] == (1, pytest.approx(4.0))
    assert picks[2] == (2, pytest.approx(1.0))
    tie = greedy_max_min(np.array([[0.0]]), np.array([[-1.0], [1.0]]), 1)
    assert tie == [(0, pytest.approx(1.0))]  # equal distances: lower index


def test_rank_donors_in_the_stores_embedding():
    stored, extra = configs(3), configs(6)[3:]
    cands = [stored[1], *extra]           # a copy of a stored configuration covers nothing
    picks = rank_donors(stored, cands, len(cands))
    assert picks[-1].config == stored[1] and picks[-1].score == pytest.approx(0.0)
    emb = Embedding.fit(np.vstack([config_vector(c) for c in stored]))
    E = emb(np.vstack([config_vector(c) for c in stored]))
    first = [np.linalg.norm(E - emb(config_vector(c)), axis=1).min() for c in cands]
    assert picks[0].config == cands[int(np.argmax(first))] and picks[0].score == pytest.approx(max(first))
    assert picks[0].nearest_distance == pytest.approx(max(first))
    assert [p.rank for p in picks] == [1, 2, 3, 4]


def _candidates_file(tmp_path, docs) -> str:
    path = tmp_path / "candidates.yaml"
    path.write_text(yaml.safe_dump(docs))
    return str(path)


def test_candidate_files_resolve_and_fail_clearly(tmp_path):
    path = _candidates_file(tmp_path, [{"model": "Llama-2-7b-hf", "gpu": "L40S", "serving": {"tp": 2}},
                                       {"model": "Llama-3.1-8B", "gpu": "H100-SXM"}])
    got = load_candidates(path)
    assert [c.label.split("/mbt")[0] for c in got] == ["Llama-2-7b-hf/L40S/tp2", "Llama-3.1-8B/H100-SXM/tp1"]
    with pytest.raises(ConfigError, match="expected a non-empty list"):
        load_candidates(_candidates_file(tmp_path, {"model": "x"}))
    with pytest.raises(ConfigError, match=r"candidates.yaml\[1\]: unknown GPU 'B200'"):
        load_candidates(_candidates_file(tmp_path, [{"model": "Llama-2-7b-hf", "gpu": "L40S"},
                                                    {"model": "Llama-2-7b-hf", "gpu": "B200"}]))
    with pytest.raises(ConfigError, match="not found"):
        load_candidates(str(tmp_path / "missing.yaml"))


def test_new_candidates_drops_stored_and_repeated():
    stored = {c.config_id: c for c in configs(2)}
    extra = configs(4)[2:]
    keep, dropped = new_candidates(stored, [configs(1)[0], extra[0], extra[0], extra[1]])
    assert keep == extra and len(dropped) == 2
    assert "already in the store" in dropped[0] and "listed twice" in dropped[1]


def test_donors_cli_prints_the_ranking(tmp_path, capsys):
    store = Store(str(tmp_path / "store"))
    store.init()
    stored = configs(3)
    for c in stored:
        store.write_config(c)
    extra = configs(6)[3:]
    docs = [{"model": c.model.name, "gpu": c.gpu.name, "serving": {"tp": c.serving.tp}} for c in [stored[0], *extra]]
    assert main(["donors", "--store", store.uri, "--candidates", _candidates_file(tmp_path, docs), "--n", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("skipped: ") and "already in the store" in out[0]
    expected = [p.config.config_id for p in rank_donors(stored, extra, 2)]
    rows = [line for line in out if line[:1].isdigit()]
    assert [r.split()[0] for r in rows] == ["1", "2"]
    assert [next(w for w in r.split() if w in expected) for r in rows] == expected


def test_splits_are_distinct_and_partition_the_configurations():
    ids = [f"c{i}" for i in range(6)]
    assert split_sizes(6) == (1, 2, 3)
    splits = distinct_splits(ids, 5, seed=3)
    assert len({(tuple(t), tuple(b)) for t, b, _ in splits}) == 5
    for t, b, p in splits:
        assert sorted(t + b + p) == ids and len(t) == 1 and len(b) == 2
    with pytest.raises(EvaluationError, match="at least 5 configurations"):
        split_sizes(4)


def test_donor_experiment_fits_base_plus_each_candidate_only(tmp_path, ray_local):
    root = str(tmp_path / "store")
    write_store(root, n_configs=5, rows=1000, dates=("2026-11-01",))
    settings = TrainSettings(specialists=2, holdout_every=2, noncrossing=False)
    fs = featurize_store(root, settings)
    fitter = Fitter(fs, settings)
    exp = donor_experiment(fitter, trials=1, seed=0)
    (trial,) = exp.trials
    assert len(trial.targets) == 1 and len(trial.base) == 2 and len(trial.pool) == 2
    ranked = rank_donors([fs.configs[c] for c in trial.base], [fs.configs[c] for c in trial.pool], 2)
    assert trial.pool == [p.config.config_id for p in ranked] and trial.top == trial.pool[0]
    assert set(trial.scores["candidate"]) == {"base", *trial.pool}
    assert np.isfinite(trial.scores["criterion"].to_numpy()).all()
    assert trial.random_mean() == pytest.approx(np.mean([trial.score(c) for c in trial.pool]))
    fitted = [set(doc["configurations"]) for doc in fitter.docs.values()]
    assert sorted(map(sorted, fitted)) == sorted([sorted(trial.base)] + [sorted(trial.base + [c]) for c in trial.pool])
    s = exp.summary().row(0, named=True)
    assert s["top_donor"] == pytest.approx(trial.score(trial.top)) and s["base_only"] == pytest.approx(trial.score("base"))
    assert s["random_mape_beta"] == pytest.approx(np.mean([trial.score(c, "mape_p50_beta") for c in trial.pool]))


def test_review_notes_a_skipped_donor_experiment_and_still_evaluates(tmp_path, ray_local):
    """Fewer than 5 configurations: the queued donor fits are never asked for, the page says why."""
    from rece_dist.artifact import canonical_bytes
    from rece_dist.evaluate import EvalOptions
    from rece_dist.recipe import train
    from rece_dist.review import review_artifact

    root = str(tmp_path / "store")
    write_store(root, n_configs=3, rows=600, dates=("2026-11-01", "2026-11-02"))
    settings = TrainSettings(specialists=2, holdout_every=2, noncrossing=False, select_folds=0)
    art = tmp_path / "artifact.json"
    art.write_bytes(canonical_bytes(train(root, settings).artifact))
    options = EvalOptions(protocols=("temporal",), k_grid=(1,), temperatures=(0.1,), top_ks=(None,))
    rv = review_artifact(str(art), root, options)
    assert rv.donors is None and rv.evaluation.runs["temporal"].folds
    assert any("skipped the donor experiment" in n and "at least 5 configurations" in n for n in rv.notes), rv.notes
