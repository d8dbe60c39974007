"""Catalog loading, configuration identity and the errors bad configuration input gets."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from rece_dist.config import Catalog, DeploymentConfig, ServingSettings, load_config_file, load_hf_config
from rece_dist.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return Catalog.default()


def test_shipped_catalog_loads(catalog: Catalog) -> None:
    assert set(catalog.gpus) == {"H100-SXM", "A100-SXM-80GB", "L40S"}
    assert catalog.gpus["H100-SXM"].peak_tflops == 989.5
    assert len(catalog.models) == 9
    assert {m for m, s in catalog.models.items() if s.is_moe} == {"Mixtral-8x7B-v0.1", "Mixtral-8x22B-v0.1"}
    llama = catalog.models["Llama-2-7b-hf"]
    assert (llama.hidden_size, llama.num_layers, llama.num_kv_heads) == (4096, 32, 32)
    assert 6.7e9 < llama.total_params < 6.8e9


def test_user_hardware_file_extends_and_overrides(tmp_path: Path) -> None:
    hw = tmp_path / "hw.yaml"
    hw.write_text(
        "gpus:\n"
        "  B200:\n    peak_tflops: 2250\n    hbm_tbps: 8\n    memory_gib: 180\n    link_gbps: 1800\n"
        "    link_latency_us: 6\n    pcie_gbps: 128\n"
        "  L40S:\n    peak_tflops: 362\n    hbm_tbps: 0.864\n    memory_gib: 40\n    link_gbps: 64\n"
        "    link_latency_us: 25\n    pcie_gbps: 32\n"
    )
    cat = Catalog.default(hardware_file=hw)
    assert cat.gpus["B200"].memory_gib == 180
    assert cat.gpus["L40S"].memory_gib == 40  # the user's entry wins
    assert "H100-SXM" in cat.gpus


def _doc(**serving: object) -> dict:
    return {"model": "Llama-3.1-8B", "gpu": "H100-SXM", "serving": {"tp": 2, **serving}}


def test_config_id_is_the_hash_of_the_canonical_document(catalog: Catalog) -> None:
    cfg = catalog.resolve(_doc(), "<test>")
    canon = json.dumps(cfg.to_dict(), sort_keys=True, separators=(",", ":"))
    assert cfg.config_id == hashlib.sha256(canon.encode()).hexdigest()[:16]
    other = subprocess.run(
        [sys.executable, "-c",
         "from rece_dist.config import Catalog; "
         "print(Catalog.default().resolve({'model': 'Llama-3.1-8B', 'gpu': 'H100-SXM', 'serving': {'tp': 2}}).config_id)"],
        capture_output=True, text=True, check=True, cwd=REPO,
    )
    assert other.stdout.strip() == cfg.config_id


def test_config_id_changes_with_every_setting(catalog: Catalog) -> None:
    base = catalog.resolve(_doc(), "<test>")
    changed = {
        "tp": 4, "max_num_batched_tokens": 4096, "max_num_seqs": 256, "max_model_len": 2048, "block_size": 32,
        "chunked_prefill": False, "prefix_caching": True, "cpu_offload": True, "gpu_memory_utilization": 0.85,
        "vllm_version": "0.14.0",
    }
    assert set(changed) | {"expert_parallel"} == {f.name for f in dataclasses.fields(ServingSettings)}
    ids = {base.config_id}
    for name, value in changed.items():
        serving = {"max_num_batched_tokens": 4096} if name == "chunked_prefill" else {}
        ids.add(catalog.resolve(_doc(**serving, **{name: value}), "<test>").config_id)
    mixtral = {"model": "Mixtral-8x7B-v0.1", "gpu": "H100-SXM", "serving": {"tp": 2}}
    ids.add(catalog.resolve(mixtral, "<test>").config_id)
    ids.add(catalog.resolve({**mixtral, "serving": {"tp": 2, "expert_parallel": 2}}, "<test>").config_id)
    ids.add(catalog.resolve({**_doc(), "gpu": "A100-SXM-80GB"}, "<test>").config_id)
    ids.add(catalog.resolve({**_doc(), "model": "Mistral-7B-v0.1"}, "<test>").config_id)
    assert len(ids) == len(changed) + 5


def test_malformed_hardware_file_names_the_file(tmp_path: Path) -> None:
    hw = tmp_path / "hw.yaml"
    hw.write_text("gpus: [unclosed\n")
    with pytest.raises(ConfigError, match=r"hw\.yaml: not valid JSON/YAML"):
        Catalog.default(hardware_file=hw)
    hw.write_text("gpus:\n  X1:\n    peak_tflops: 100\n")
    with pytest.raises(ConfigError, match=r"hw\.yaml: GPU 'X1' is missing field\(s\) hbm_tbps"):
        Catalog.default(hardware_file=hw)


def test_model_config_missing_field_names_file_and_field(tmp_path: Path) -> None:
    path = tmp_path / "Tiny" / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64, "vocab_size": 100}))
    with pytest.raises(ConfigError, match=r"Tiny/config\.json: model config is missing field\(s\) hidden_size"):
        load_hf_config(path)


def test_configuration_file_errors_name_the_file(tmp_path: Path, catalog: Catalog) -> None:
    bad = tmp_path / "cfg.yaml"
    bad.write_text("model: [Llama\n")
    with pytest.raises(ConfigError, match=r"cfg\.yaml: not valid JSON/YAML"):
        load_config_file(bad, catalog)
    bad.write_text("model: Llama-3.1-8B\ngpu: B200\n")
    with pytest.raises(ConfigError, match=r"cfg\.yaml: unknown GPU 'B200'"):
        load_config_file(bad, catalog)


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"model": "Qwen2.5-7B", "gpu": "H100-SXM", "serving": {"tp": 8}}, "28 attention heads, not divisible by TP 8"),
        ({"model": "Llama-3.1-8B", "gpu": "H100-SXM", "serving": {"chunked_prefill": False}},
         r"without chunked prefill max_num_batched_tokens \(2048\) must be at least max_model_len \(4096\)"),
        ({"model": "Llama-3.1-8B", "gpu": "H100-SXM", "serving": {"prefix_caching": "yes"}}, "serving.prefix_caching must be true or false"),
        ({"model": "Llama-3.1-8B", "gpu": "H100-SXM", "serving": {"gpu_memory_utilization": "high"}}, "gpu_memory_utilization must be a number"),
        ({"model": "Llama-2-70b-hf", "gpu": "L40S", "serving": {"tp": 1}}, "does not fit on L40S"),
    ],
)
def test_invalid_deployments_are_rejected(catalog: Catalog, doc: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        catalog.resolve(doc, "<test>")


def test_kv_capacity_grows_with_tp(catalog: Catalog) -> None:
    m, g = catalog.models["Llama-2-70b-hf"], catalog.gpus["H100-SXM"]
    caps = [DeploymentConfig(m, g, ServingSettings(tp=tp)).kv_capacity_tokens for tp in (2, 4, 8)]
    assert caps == sorted(caps) and caps[0] > 0
