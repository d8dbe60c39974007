"""Deployment configurations: model shape x GPU x vLLM serving settings.

A configuration is the unit RECE reasons about: its ``config_id`` names a store partition,
its configuration vector places it in the embedding space that specialists cluster and mix
over, and its derived quantities (FLOPs and KV bytes per token, KV capacity) feed both the
trace generator and the features. Derived quantities live here and only here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import yaml

from .errors import ConfigError

GIB = 2**30


@dataclass(frozen=True)
class ModelShape:
    """The parts of a HuggingFace ``config.json`` that decide compute, memory and KV size."""

    name: str
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    num_experts: int = 1
    experts_per_token: int = 1
    weight_bytes: int = 2

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 1

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def attn_params_per_layer(self) -> int:
        kv = self.num_kv_heads * self.head_dim
        return 2 * self.hidden_size * self.hidden_size + 2 * self.hidden_size * kv

    @property
    def mlp_params_per_expert(self) -> int:
        return 3 * self.hidden_size * self.intermediate_size  # gate, up, down (SwiGLU)

    @property
    def total_params(self) -> int:
        per_layer = self.attn_params_per_layer + self.num_experts * self.mlp_params_per_expert
        return self.num_layers * per_layer + 2 * self.vocab_size * self.hidden_size

    @property
    def active_params(self) -> int:
        per_layer = self.attn_params_per_layer + self.experts_per_token * self.mlp_params_per_expert
        return self.num_layers * per_layer + 2 * self.vocab_size * self.hidden_size

    @property
    def flops_per_token(self) -> float:
        """Dense matmul FLOPs for one token through the active weights (2 per MAC)."""
        return 2.0 * self.active_params

    @property
    def expert_flops_per_token(self) -> float:
        """FLOPs one token spends in one expert's MLP across all layers."""
        return 2.0 * self.num_layers * self.mlp_params_per_expert if self.is_moe else 0.0

    @property
    def expert_params(self) -> int:
        """Parameters of one routed expert across all layers (0 for a dense model)."""
        return self.num_layers * self.mlp_params_per_expert if self.is_moe else 0

    @property
    def dense_flops_per_token(self) -> float:
        """FLOPs per token outside the routed experts (attention projections, dense MLP, embeddings)."""
        return self.flops_per_token - self.experts_per_token * self.expert_flops_per_token

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V for one token across all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.weight_bytes

    @property
    def attn_flops_per_token_ctx(self) -> float:
        """Attention score + value FLOPs per (query token, context token) pair, all layers."""
        return 4.0 * self.num_layers * self.hidden_size

    @classmethod
    def from_hf_config(cls, doc: Mapping[str, Any], name: str, source: str = "<inline>") -> "ModelShape":
        """Read a HuggingFace ``config.json`` document; name the missing field and the file."""
        required = ["hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"]
        missing = [k for k in required if k not in doc]
        if missing:
            raise ConfigError(f"{source}: model config is missing field(s) {', '.join(missing)}")
        dtype = str(doc.get("torch_dtype", "bfloat16"))
        weight_bytes = {"float32": 4, "bfloat16": 2, "float16": 2, "float8_e4m3fn": 1, "int8": 1}.get(dtype)
        if weight_bytes is None:
            raise ConfigError(f"{source}: unsupported torch_dtype {dtype!r}")
        try:
            shape = cls(
                name=name,
                hidden_size=int(doc["hidden_size"]),
                num_layers=int(doc["num_hidden_layers"]),
                num_attention_heads=int(doc["num_attention_heads"]),
                num_kv_heads=int(doc.get("num_key_value_heads") or doc["num_attention_heads"]),
                intermediate_size=int(doc["intermediate_size"]),
                vocab_size=int(doc["vocab_size"]),
                num_experts=int(doc.get("num_local_experts") or doc.get("num_experts") or 1),
                experts_per_token=int(doc.get("num_experts_per_tok") or 1),
                weight_bytes=weight_bytes,
            )
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{source}: model config has a non-integer size field ({exc})") from exc
        shape.check(source)
        return shape

    def check(self, source: str) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, int) and v <= 0:
                raise ConfigError(f"{source}: model field {f.name} must be positive, got {v}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"{source}: hidden_size {self.hidden_size} is not divisible by num_attention_heads")
        if self.experts_per_token > self.num_experts:
            raise ConfigError(f"{source}: experts_per_token exceeds num_experts")


@dataclass(frozen=True)
class GPU:
    """One accelerator type: the numbers a roofline and a communication model need."""

    name: str
    peak_tflops: float
    hbm_tbps: float
    memory_gib: float
    link_gbps: float
    link_latency_us: float
    pcie_gbps: float


@dataclass(frozen=True)
class ServingSettings:
    """vLLM engine settings that change step times and queueing."""

    tp: int = 1
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 128
    max_model_len: int = 4096
    block_size: int = 16
    chunked_prefill: bool = True
    prefix_caching: bool = False
    cpu_offload: bool = False
    expert_parallel: int = 1
    gpu_memory_utilization: float = 0.9
    vllm_version: str = "0.11.0"

    def check(self, source: str) -> None:
        for name in ("tp", "max_num_batched_tokens", "max_num_seqs", "max_model_len", "block_size", "expert_parallel"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"{source}: serving.{name} must be a positive integer, got {v!r}")
        if self.tp & (self.tp - 1):
            raise ConfigError(f"{source}: serving.tp must be a power of two, got {self.tp}")
        for name in ("chunked_prefill", "prefix_caching", "cpu_offload"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{source}: serving.{name} must be true or false, got {getattr(self, name)!r}")
        util = self.gpu_memory_utilization
        if not isinstance(util, (int, float)) or isinstance(util, bool) or not 0.1 <= util <= 1.0:
            raise ConfigError(f"{source}: serving.gpu_memory_utilization must be a number in [0.1, 1], got {util!r}")
        if not isinstance(self.vllm_version, str):
            raise ConfigError(f"{source}: serving.vllm_version must be a string, got {self.vllm_version!r}")
        if not self.chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ConfigError(
                f"{source}: without chunked prefill max_num_batched_tokens ({self.max_num_batched_tokens}) "
                f"must be at least max_model_len ({self.max_model_len})"
            )


@dataclass(frozen=True)
class DeploymentConfig:
    """A fully resolved deployment: everything needed to simulate it or compute its features."""

    model: ModelShape
    gpu: GPU
    serving: ServingSettings = field(default_factory=ServingSettings)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": dataclasses.asdict(self.model),
            "gpu": dataclasses.asdict(self.gpu),
            "serving": dataclasses.asdict(self.serving),
        }

    @property
    def config_id(self) -> str:
        """Content hash: the same resolved configuration always gets the same id."""
        canon = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canon.encode()).hexdigest()[:16]

    @property
    def label(self) -> str:
        s = self.serving
        return f"{self.model.name}/{self.gpu.name}/tp{s.tp}/mbt{s.max_num_batched_tokens}/seqs{s.max_num_seqs}"

    # --- derived quantities, in one place -------------------------------------------------
    @property
    def weight_bytes_per_gpu(self) -> float:
        return self.model.total_params * self.model.weight_bytes / self.serving.tp

    @property
    def dense_bytes_per_gpu(self) -> float:
        """Weights every step reads whatever the batch: all but the routed experts."""
        m = self.model
        return self.weight_bytes_per_gpu - m.num_experts * m.expert_params * m.weight_bytes / self.serving.tp

    @property
    def expert_parallel(self) -> int:
        """Expert-parallel degree (1 for dense models, whatever the setting says)."""
        return self.serving.expert_parallel if self.model.is_moe else 1

    @property
    def experts_local(self) -> float:
        """Routed experts on one GPU: whole experts under expert parallelism, a TP slice of each otherwise."""
        return self.model.num_experts / self.expert_parallel

    @property
    def expert_bytes_local(self) -> float:
        """Bytes of one local expert on one GPU."""
        ep = self.expert_parallel
        return self.model.expert_params * self.model.weight_bytes / (1 if ep > 1 else self.serving.tp)

    @property
    def expert_shards(self) -> int:
        """GPUs one token's expert FLOPs spread over: EP ranks, else the TP group."""
        ep = self.expert_parallel
        return ep if ep > 1 else self.serving.tp

    @property
    def collectives_per_step(self) -> int:
        """TP all-reduces per forward pass: two per layer (one under expert parallelism), none at TP 1."""
        if self.serving.tp == 1:
            return 0
        return self.model.num_layers * (1 if self.expert_parallel > 1 else 2)

    @property
    def kv_capacity_tokens(self) -> int:
        """Tokens of KV cache vLLM can hold across the TP group after weights and a reserve."""
        s = self.serving
        usable = self.gpu.memory_gib * GIB * s.gpu_memory_utilization
        reserve = 2.0 * GIB  # activations, CUDA graphs
        per_gpu = usable - self.weight_bytes_per_gpu - reserve
        if per_gpu <= 0:
            return 0
        return int(per_gpu * s.tp / self.model.kv_bytes_per_token)

    @property
    def kv_blocks_total(self) -> int:
        return self.kv_capacity_tokens // self.serving.block_size

    @property
    def hbm_bytes_per_us(self) -> float:
        return self.gpu.hbm_tbps * 1e6  # TB/s -> bytes/us

    @property
    def flops_per_us(self) -> float:
        return self.gpu.peak_tflops * 1e6  # TFLOPS -> FLOP/us

    @property
    def link_bytes_per_us(self) -> float:
        return self.gpu.link_gbps * 1e3

    @property
    def pcie_bytes_per_us(self) -> float:
        return self.gpu.pcie_gbps * 1e3

    def check(self, source: str) -> None:
        self.serving.check(source)
        m, tp, ep = self.model, self.serving.tp, self.serving.expert_parallel
        if m.num_attention_heads % tp:
            raise ConfigError(f"{source}: {m.name} has {m.num_attention_heads} attention heads, not divisible by TP {tp}")
        if m.is_moe and m.num_experts % ep:
            raise ConfigError(f"{source}: {m.name} has {m.num_experts} experts, not divisible by expert_parallel {ep}")
        if self.kv_capacity_tokens < self.serving.max_model_len:
            raise ConfigError(
                f"{source}: {self.model.name} at TP{self.serving.tp} does not fit on {self.gpu.name} "
                f"(KV capacity {self.kv_capacity_tokens} tokens < max_model_len {self.serving.max_model_len})"
            )
        if self.model.is_moe is False and self.serving.expert_parallel != 1:
            raise ConfigError(f"{source}: expert_parallel > 1 needs a mixture-of-experts model")


# --- configuration vector -------------------------------------------------------------------

@dataclass(frozen=True)
class VectorEntry:
    name: str
    formula: str
    fn: Callable[[DeploymentConfig], float]


# The seed's configuration vector (Phase 2). Each entry is already normalised by the divisor
# shown in ``formula`` so every coordinate is O(1); cosine similarity runs on these values.
CONFIG_VECTOR: tuple[VectorEntry, ...] = (
    VectorEntry("hidden_size", "hidden_size / 4096", lambda c: c.model.hidden_size / 4096),
    VectorEntry("num_layers", "num_layers / 32", lambda c: c.model.num_layers / 32),
    VectorEntry("gqa_ratio", "num_kv_heads / num_attention_heads", lambda c: c.model.num_kv_heads / c.model.num_attention_heads),
    VectorEntry("is_moe", "1 if MoE else 0", lambda c: float(c.model.is_moe)),
    VectorEntry("num_experts", "num_experts / 8 if MoE else 0", lambda c: c.model.num_experts / 8 if c.model.is_moe else 0.0),
    VectorEntry("hardware_tflops", "peak_tflops / 1000", lambda c: c.gpu.peak_tflops / 1000),
    VectorEntry("hardware_bandwidth", "hbm_GBps / 3000", lambda c: c.gpu.hbm_tbps * 1000 / 3000),
    VectorEntry("memory_gb", "memory_gib / 80", lambda c: c.gpu.memory_gib / 80),
    VectorEntry("max_batch_tokens", "max_num_batched_tokens / 8192", lambda c: c.serving.max_num_batched_tokens / 8192),
    VectorEntry("max_num_seqs", "max_num_seqs / 256", lambda c: c.serving.max_num_seqs / 256),
    VectorEntry("inv_tp", "1 / tp", lambda c: 1.0 / c.serving.tp),
    VectorEntry("chunked_prefill", "1 if chunked prefill else 0", lambda c: float(c.serving.chunked_prefill)),
    VectorEntry("prefix_caching", "1 if prefix caching else 0", lambda c: float(c.serving.prefix_caching)),
    VectorEntry("cpu_offload", "1 if CPU KV offload else 0", lambda c: float(c.serving.cpu_offload)),
)


def config_vector(cfg: DeploymentConfig) -> np.ndarray:
    """The seed's configuration vector for one configuration (see ``CONFIG_VECTOR``)."""
    return np.array([e.fn(cfg) for e in CONFIG_VECTOR], dtype=np.float64)


# --- catalog: hardware, models, configuration documents ------------------------------------

def _data_path(*parts: str) -> Path:
    return Path(str(resources.files("rece_dist").joinpath("data", *parts)))


class Catalog:
    """Known GPUs and models. Ships H100/A100/L40S and a handful of HF configs; users extend it."""

    def __init__(self, gpus: dict[str, GPU], models: dict[str, ModelShape]):
        self.gpus = gpus
        self.models = models

    @classmethod
    def default(cls, hardware_file: str | Path | None = None, model_dirs: list[str | Path] | None = None) -> "Catalog":
        gpus = load_hardware(_data_path("hardware.yaml"))
        if hardware_file:
            gpus.update(load_hardware(Path(hardware_file)))
        models = load_model_dir(_data_path("model_configs"))
        for d in model_dirs or []:
            models.update(load_model_dir(Path(d)))
        return cls(gpus, models)

    def gpu(self, name: str, source: str = "<catalog>") -> GPU:
        try:
            return self.gpus[name]
        except KeyError:
            raise ConfigError(f"{source}: unknown GPU {name!r}; known: {', '.join(sorted(self.gpus))}") from None

    def model(self, name: str, source: str = "<catalog>") -> ModelShape:
        try:
            return self.models[name]
        except KeyError:
            raise ConfigError(f"{source}: unknown model {name!r}; known: {', '.join(sorted(self.models))}") from None

    def resolve(self, doc: Mapping[str, Any], source: str = "<inline>") -> DeploymentConfig:
        """Turn a configuration document into a checked ``DeploymentConfig``.

        ``model`` and ``gpu`` are catalog names or inline objects (an inline model is a
        HuggingFace config or an already resolved shape with a ``name``).
        """
        if not isinstance(doc, Mapping):
            raise ConfigError(f"{source}: a configuration document must be a mapping")
        for key in ("model", "gpu"):
            if key not in doc:
                raise ConfigError(f"{source}: configuration is missing {key!r}")
        unknown = set(doc) - {"model", "gpu", "serving", "config_id", "label"}
        if unknown:
            raise ConfigError(f"{source}: unknown configuration key(s) {', '.join(sorted(unknown))}")
        model = _resolve_model(self, doc["model"], source)
        gpu = _resolve_gpu(self, doc["gpu"], source)
        serving_doc = doc.get("serving") or {}
        known = {f.name for f in dataclasses.fields(ServingSettings)}
        bad = set(serving_doc) - known
        if bad:
            raise ConfigError(f"{source}: unknown serving setting(s) {', '.join(sorted(bad))}")
        cfg = DeploymentConfig(model, gpu, ServingSettings(**serving_doc))
        cfg.check(source)
        claimed = doc.get("config_id")
        if claimed and claimed != cfg.config_id:
            raise ConfigError(f"{source}: config_id {claimed} does not match its content ({cfg.config_id})")
        return cfg


def _resolve_model(cat: Catalog, m: Any, source: str) -> ModelShape:
    if isinstance(m, str):
        return cat.model(m, source)
    if isinstance(m, Mapping):
        if "num_layers" in m:  # already resolved shape
            known = {f.name for f in dataclasses.fields(ModelShape)}
            missing = known - set(m) - {"num_experts", "experts_per_token", "weight_bytes"}
            if missing:
                raise ConfigError(f"{source}: model is missing field(s) {', '.join(sorted(missing))}")
            shape = ModelShape(**{k: v for k, v in m.items() if k in known})
            shape.check(source)
            return shape
        return ModelShape.from_hf_config(m, str(m.get("name", "inline-model")), source)
    raise ConfigError(f"{source}: 'model' must be a catalog name or an object")


def _resolve_gpu(cat: Catalog, g: Any, source: str) -> GPU:
    if isinstance(g, str):
        return cat.gpu(g, source)
    if isinstance(g, Mapping):
        return _gpu_from_doc(str(g.get("name", "")), g, source)
    raise ConfigError(f"{source}: 'gpu' must be a catalog name or an object")


def _gpu_from_doc(name: str, d: Mapping[str, Any], source: str) -> GPU:
    fields = [f.name for f in dataclasses.fields(GPU) if f.name != "name"]
    missing = [k for k in fields if k not in d]
    if not name:
        raise ConfigError(f"{source}: GPU entry has no name")
    if missing:
        raise ConfigError(f"{source}: GPU {name!r} is missing field(s) {', '.join(missing)}")
    try:
        vals = {k: float(d[k]) for k in fields}
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: GPU {name!r} has a non-numeric field") from None
    if any(v <= 0 for v in vals.values()):
        raise ConfigError(f"{source}: GPU {name!r} fields must be positive")
    return GPU(name=name, **vals)


def read_document(path: str | Path, what: str) -> Any:
    """Parse a JSON or YAML file (YAML is a superset of JSON); name the file on any failure."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: {what} not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read {what} ({exc.strerror})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid JSON/YAML ({exc})") from None


def load_hardware(path: Path) -> dict[str, GPU]:
    """Load a hardware catalog YAML (``gpus: {NAME: {peak_tflops: ..., ...}}``)."""
    doc = read_document(path, "hardware catalog")
    if not isinstance(doc, dict) or not isinstance(doc.get("gpus"), dict):
        raise ConfigError(f"{path}: hardware catalog needs a top-level 'gpus' mapping")
    return {name: _gpu_from_doc(name, d or {}, str(path)) for name, d in doc["gpus"].items()}


def load_model_dir(root: Path) -> dict[str, ModelShape]:
    """Every ``<root>/<Name>/config.json`` as a model called ``Name``."""
    out: dict[str, ModelShape] = {}
    for cfg_path in sorted(Path(root).glob("*/config.json")):
        out[cfg_path.parent.name] = load_hf_config(cfg_path)
    return out


def load_hf_config(path: Path) -> ModelShape:
    try:
        doc = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: model config not found") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None
    return ModelShape.from_hf_config(doc, Path(path).parent.name, str(path))


def load_config_file(path: str | Path, catalog: Catalog | None = None) -> DeploymentConfig:
    """Read one configuration document (JSON or YAML) and resolve it against the catalog."""
    doc = read_document(path, "configuration file")
    return (catalog or Catalog.default()).resolve(doc, str(path))


def as_config(config: DeploymentConfig | Mapping[str, Any] | str | Path, catalog: Catalog | None = None) -> DeploymentConfig:
    """A configuration however a caller holds it: resolved already, a document (dict), or a JSON/YAML file."""
    if isinstance(config, DeploymentConfig):
        return config
    if isinstance(config, Mapping):
        return (catalog or Catalog.default()).resolve(config, "configuration document")
    return load_config_file(config, catalog)
