"""The `rece` command as a user drives it: train -> show -> predict -> export -> publish."""

from __future__ import annotations

import json

import numpy as np
import yaml
from closed_form import STEP_NOISE, configs, truth_beta
from ground_truth import write_store

from rece_dist.cli import main
from rece_dist.publish import list_versions, resolve


def test_train_show_predict_export(truth_store, ray_local, tmp_path, capsys):
    root, cfgs = truth_store
    out = str(tmp_path / "artifacts")
    assert main(["train", "--store", root, "--out", out, "--specialists", "2"]) == 0
    printed = capsys.readouterr().out
    assert "specialist" in printed and "pinball P50" in printed
    (version,) = list_versions(out)
    doc, manifest = resolve(out)
    assert manifest["version"] == version and "golden.json" in manifest["companions"]
    assert len(manifest["data"]["partitions"]) == 8  # 2 configs x 2 dates x 2 tables
    assert (tmp_path / "artifacts" / "artifacts" / version / "golden.json").is_file()

    assert main(["show", out]) == 0
    shown = capsys.readouterr().out
    assert version in shown and "Llama-2-7b-hf/L40S" in shown

    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps({"model": "Llama-2-7b-hf", "gpu": "L40S"}))
    rows = {"beta": [{"prefill_tokens": 1000, "decode_tokens": 50, "running_depth": 50, "kv_usage_gpu_ratio": 0.4}]}
    inp = tmp_path / "in.json"
    inp.write_text(json.dumps(rows))
    assert main(["predict", "--artifact", out, "--config", str(cfg_path), "--input", str(inp)]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["seen_in_training"] is True
    truth = truth_beta(1, np.array([1000]), np.array([50]))[0] - STEP_NOISE * np.log(0.5)
    assert abs(res["beta"][0]["0.5"] - truth) / truth < 0.02

    assert main(["export", "--artifact", out, "--format", "coefficient-set", "--out", str(tmp_path / "cs")]) == 0
    files = sorted((tmp_path / "cs").glob("*.yaml"))
    assert {f.stem for f in files} == {c.config_id for c in configs()}
    assert all(yaml.safe_load(f.read_text())["kind"] == "CoefficientSet" for f in files)

    # republishing identical content is a no-op: still one version
    art = tmp_path / "artifacts" / "artifacts" / version / "artifact.json"
    assert main(["publish", "--artifact", str(art), "--out", out]) == 0
    assert list_versions(out) == [version]


def test_bad_input_is_one_line_not_a_traceback(tmp_path, capsys):
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps({"model": "Llama-2-7b-hf", "gpu": "B300"}))
    inp = tmp_path / "in.json"
    inp.write_text("{}")
    assert main(["predict", "--artifact", str(tmp_path / "none.json"), "--config", str(cfg_path),
                 "--input", str(inp)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rece: error:") and "Traceback" not in err and err.count("\n") == 1


def test_nightly_gate_refuses_a_worse_model(truth_store, ray_local, tmp_path, capsys):
    root, _ = truth_store
    out = str(tmp_path / "artifacts")
    assert main(["train", "--store", root, "--out", out, "--specialists", "2"]) == 0
    (good,) = list_versions(out)
    # an L1 penalty this strong zeroes the token terms (worth ~3000 us a step): clearly worse held out
    worse = ["--specialists", "2", "--l1", "5000", "--allow-crossing"]
    assert main(["train", "--store", root, "--out", out, *worse]) == 2
    err = capsys.readouterr().err
    assert "refused" in err and "beta pinball" in err
    assert resolve(out)[1]["version"] == good and list_versions(out) == [good]
    assert main(["train", "--store", root, "--out", out, *worse, "--force"]) == 0
    assert resolve(out)[1]["version"] != good and resolve(out)[1]["previous"] == good


def test_calibrated_training_from_the_command_line(truth_store, ray_local, tmp_path, capsys):
    assert main(["train", "--store", truth_store[0], "--out", str(tmp_path / "a"), "--calibrate-folds", "2"]) == 2
    assert "needs at least 3 configurations" in capsys.readouterr().err  # the truth store has 2
    root, out = str(tmp_path / "store"), str(tmp_path / "b")
    write_store(root, n_configs=3, rows=300, config_spread=0.25)
    assert main(["train", "--store", root, "--out", out, "--specialists", "2", "--calibrate-folds", "3"]) == 0
    doc, _ = resolve(out)
    assert doc["unseen_calibration"]["folds"] == 3
    assert main(["show", out]) == 0
    assert "unseen configurations: intervals widened from the median (3-fold" in capsys.readouterr().out
