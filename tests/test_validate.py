"""``validate_store`` on a good store, and the message each kind of bad input gets."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import polars as pl
import pytest

from rece_dist.cli import main
from rece_dist.errors import ReceError
from rece_dist.store import Store
from rece_dist.synth import sample_configs, simulate_config
from rece_dist.validate import validate_store


@pytest.fixture(scope="module")
def good_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two configurations, two days, written the way ``rece synth`` writes them (without Ray)."""
    root = tmp_path_factory.mktemp("good")
    store = Store(str(root))
    store.init({"generator": "test"})
    for i, cfg in enumerate(sample_configs(2, seed=11)):
        store.write_config(cfg)
        for table, by_date in simulate_config(cfg, i, 11, 800, 2, "2026-05-01").items():
            for day, df in by_date.items():
                store.write_partition(table, cfg.config_id, day, df)
    return root


@pytest.fixture
def store(good_store: Path, tmp_path: Path) -> Path:
    """A private copy to break."""
    return Path(shutil.copytree(good_store, tmp_path / "store"))


def first(store: Path, table: str = "steps") -> Path:
    return sorted((store / table).rglob("*.parquet"))[0]


def first_config(store: Path) -> Path:
    return sorted((store / "configs").glob("*.json"))[0]


def rewrite(path: Path, fn) -> None:
    fn(pl.read_parquet(path)).write_parquet(path)


def edit_config(path: Path, fn) -> None:
    doc = json.loads(path.read_text())
    fn(doc)
    path.write_text(json.dumps(doc))


def test_good_store_passes(good_store: Path) -> None:
    report = validate_store(str(good_store))
    assert report.configs == 2
    assert report.partitions == {"steps": 4, "requests": 4}
    assert report.rows["steps"] == 1600 and report.rows["requests"] > 0
    assert report.dates == ("2026-05-01", "2026-05-02")
    assert "valid store, 2 configurations" in report.summary()


def expect(store: Path, *fragments: str) -> None:
    with pytest.raises(ReceError) as err:
        validate_store(str(store))
    for fragment in fragments:
        assert fragment in str(err.value), str(err.value)


def test_missing_column(store: Path) -> None:
    path = first(store)
    rewrite(path, lambda df: df.drop("duration_us"))
    expect(store, str(path), "missing column 'duration_us'")


def test_wrong_column_type(store: Path) -> None:
    path = first(store, "requests")
    rewrite(path, lambda df: df.with_columns(pl.col("arrival_ns").cast(pl.String)))
    expect(store, str(path), "column 'arrival_ns' has type String, expected Int64")


def test_nan_durations(store: Path) -> None:
    path = first(store)
    rewrite(path, lambda df: df.with_columns(pl.when(pl.col("step_id") % 7 == 0).then(float("nan")).otherwise(pl.col("duration_us")).alias("duration_us")))
    expect(store, str(path), "column 'duration_us'", "NaN")


def test_negative_durations(store: Path) -> None:
    path = first(store)
    rewrite(path, lambda df: df.with_columns(-pl.col("duration_us")))
    expect(store, str(path), "column 'duration_us' has negative value(s)")


def test_truncated_parquet(store: Path) -> None:
    path = first(store)
    path.write_bytes(path.read_bytes()[:1000])
    expect(store, str(path), "cannot read Parquet")


def test_garbage_parquet(store: Path) -> None:
    path = first(store, "requests")
    path.write_bytes(b"not a parquet file at all" * 10)
    expect(store, str(path), "cannot read Parquet")


def test_config_id_does_not_match_content(store: Path) -> None:
    path = first_config(store)
    edit_config(path, lambda d: d["serving"].update(max_num_seqs=d["serving"]["max_num_seqs"] * 2))
    expect(store, str(path), "does not match its content")


def test_malformed_config_file(store: Path) -> None:
    path = first_config(store)
    path.write_text('{"model": ')
    expect(store, str(path), "not valid JSON")


def test_unknown_gpu(store: Path) -> None:
    path = first_config(store)
    edit_config(path, lambda d: d.update(gpu="B200"))
    expect(store, str(path), "unknown GPU 'B200'")


def test_model_missing_a_field(store: Path) -> None:
    path = first_config(store)
    edit_config(path, lambda d: d["model"].pop("hidden_size"))
    expect(store, str(path), "model is missing field(s) hidden_size")


def test_data_without_a_configuration_document(store: Path) -> None:
    path = first_config(store)
    path.unlink()
    expect(store, f"configuration {path.stem} has data but no document")


def test_not_a_store(tmp_path: Path) -> None:
    expect(tmp_path, "not a trace store (no store.json)")


def test_unsupported_format(store: Path) -> None:
    (store / "store.json").write_text('{"format": 99}')
    expect(store, "store.json: unsupported store format 99")


def test_cli_reports_a_bad_store_in_one_line(store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = first(store)
    rewrite(path, lambda df: df.drop("kv_usage_gpu_ratio"))
    assert main(["validate", str(store)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rece: error: ") and str(path) in err and "kv_usage_gpu_ratio" in err
    assert "Traceback" not in err


def test_cli_passes_a_good_store(good_store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(good_store)]) == 0
    assert "valid store" in capsys.readouterr().out
