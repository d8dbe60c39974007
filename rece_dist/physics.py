"""The generator's ground truth: what one vLLM engine step (beta) and one request's API-server
overhead (alpha) cost on a given deployment.

A step runs the dense GEMMs, the attention kernels and the MoE experts one after another, so
each kernel family is its own roofline, ``max(compute, memory)``, and the step is their sum plus
the tensor-parallel collectives, KV copies over PCIe and the CPU work around the forward pass.
Everything is per GPU: weights, FLOPs and KV bytes divide across the TP group. The datasheet
numbers come from ``config.py``; how much of them a real step reaches is the one small set of
constants in :class:`Efficiency`, calibrated once against the reference runs (``rece synth
--check-reference``), never per run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from .config import DeploymentConfig
from .errors import ConfigError

ACTIVATION_BYTES = 2  # BF16 activations travel through the collectives


@dataclass(frozen=True)
class VllmRelease:
    """What a vLLM release changes for the generator."""

    cpu_factor: float  # per-step CPU work relative to 0.11.0
    async_scheduling: bool  # plans step N+1 while step N runs: new requests join one step later


# Releases the generator knows (older ones spent more Python time per step). 0.14.0 made async
# scheduling the default (vllm-project/vllm #27614): scheduling overlaps GPU execution, which
# hides part of the per-step CPU work, and a request that arrives during step N is first
# scheduled in step N+2.
VLLM_RELEASES: dict[str, VllmRelease] = {
    "0.10.2": VllmRelease(cpu_factor=1.15, async_scheduling=False),
    "0.11.0": VllmRelease(cpu_factor=1.0, async_scheduling=False),
    "0.13.0": VllmRelease(cpu_factor=0.95, async_scheduling=False),
    "0.14.0": VllmRelease(cpu_factor=0.9, async_scheduling=True),
}


def vllm_release(version: str) -> VllmRelease:
    """The release a configuration names; the generator refuses to guess unknown ones."""
    try:
        return VLLM_RELEASES[version]
    except KeyError:
        raise ConfigError(
            f"the generator does not model vLLM {version!r}; known releases: {', '.join(VLLM_RELEASES)}"
        ) from None


@dataclass(frozen=True)
class Efficiency:
    """Fractions of the datasheet a real vLLM step reaches, and its fixed CPU costs.

    One set for every deployment, calibrated against the reference runs (H100, three models,
    TP 1/2/4): decode steps at low load (ITL p75) are a weight read at ~92% of HBM bandwidth
    plus ~2 ms of CPU work, growing by ~20 us per running sequence beyond its KV reads; GEMMs
    and FlashAttention on prefill-sized batches reach 70% / 45% of peak and the fused-MoE
    grouped GEMMs (small per-expert batches) 30% (the 20 req/s stages bound these from below);
    NVLink collectives reach 70% of link bandwidth and host copies 75% of PCIe.
    """

    gemm: float = 0.70
    attention: float = 0.45
    moe: float = 0.30
    hbm: float = 0.92
    link: float = 0.70
    pcie: float = 0.75
    step_us: float = 2200.0
    per_seq_us: float = 20.0
    per_token_us: float = 0.2


class StepTerms(NamedTuple):
    """One step's time split by cause (us). The step time is their sum."""

    linear_us: float  # dense GEMMs: roofline of token FLOPs vs one read of the dense weights
    attention_us: float  # prefill attention FLOPs vs prior-context KV reads; decode KV reads
    moe_us: float  # routed expert GEMMs vs reads of the experts the batch touches
    comm_us: float  # TP all-reduces (and EP all-to-alls), latency + bandwidth
    offload_us: float  # KV blocks copied between GPU and host (CPU offload)
    overhead_us: float  # CPU work per step: scheduler, input prep, sampling


class StepModel:
    """Deterministic step time of one configuration; constants folded once per configuration."""

    def __init__(self, cfg: DeploymentConfig, eff: Efficiency = Efficiency()):
        m, s = cfg.model, cfg.serving
        tp = s.tp
        self.cfg = cfg
        self.eff = eff
        flops = cfg.flops_per_us
        hbm = cfg.hbm_bytes_per_us * eff.hbm
        self._lin_us_per_token = m.dense_flops_per_token / tp / (flops * eff.gemm)
        self._lin_read_us = cfg.dense_bytes_per_gpu / hbm
        self._attn_us_per_pair = m.attn_flops_per_token_ctx / tp / (flops * eff.attention)
        self._kv_us_per_token = m.kv_bytes_per_token / tp / hbm

        ep = cfg.expert_parallel
        self._moe = m.is_moe
        self._moe_us_per_token = m.experts_per_token * m.expert_flops_per_token / cfg.expert_shards / (flops * eff.moe)
        self._experts_local = cfg.experts_local
        self._expert_read_us = cfg.expert_bytes_local / hbm
        self._expert_miss = 1.0 - m.experts_per_token / m.num_experts if m.is_moe else 1.0

        link = cfg.link_bytes_per_us * eff.link
        hops = math.log2(tp)
        token_bytes = m.hidden_size * ACTIVATION_BYTES
        n_allreduce = cfg.collectives_per_step
        self._comm_fixed_us = n_allreduce * cfg.gpu.link_latency_us * hops
        self._comm_us_per_token = n_allreduce * token_bytes * 2 * (tp - 1) / tp / link
        if ep > 1:  # dispatch + combine per MoE layer
            self._comm_fixed_us += 2 * m.num_layers * cfg.gpu.link_latency_us * math.log2(ep)
            self._comm_us_per_token += 2 * m.num_layers * token_bytes * (ep - 1) / ep / link

        block_bytes = s.block_size * m.kv_bytes_per_token / tp
        self._offload_us_per_block = block_bytes / (cfg.pcie_bytes_per_us * eff.pcie) if s.cpu_offload else 0.0
        cpu = vllm_release(s.vllm_version).cpu_factor
        self._cpu_fixed_us = eff.step_us * cpu
        self._cpu_us_per_seq = eff.per_seq_us * cpu
        self._cpu_us_per_token = eff.per_token_us * cpu

    def time_us(self, *args: int | None, **kwargs: int | None) -> float:
        """Deterministic step time in us (arguments as :meth:`terms`); the engine's hot path."""
        return sum(self._terms(*args, **kwargs))

    def terms(self, *args: int | None, **kwargs: int | None) -> StepTerms:
        """The step's time split by cause; see :meth:`_terms` for the arguments."""
        return StepTerms(*self._terms(*args, **kwargs))

    def _terms(
        self,
        decode_tokens: int,
        decode_ctx: int,
        prefill_tokens: int = 0,
        prefill_pairs: int = 0,
        prefill_ctx: int = 0,
        num_seqs: int | None = None,
        xfer_blocks: int = 0,
    ) -> tuple[float, float, float, float, float, float]:
        """``decode_ctx`` is the KV tokens the decodes attend to (sum of their context lengths),
        ``prefill_pairs`` the causal (query, key) pairs of the prefill chunks, ``prefill_ctx``
        the already-cached context those chunks read, ``num_seqs`` the scheduled sequences
        (default: every decode plus one prefill) and ``xfer_blocks`` the KV blocks moved to or
        from host memory this step."""
        tokens = decode_tokens + prefill_tokens
        if num_seqs is None:
            num_seqs = decode_tokens + (1 if prefill_tokens else 0)
        linear = max(tokens * self._lin_us_per_token, self._lin_read_us)
        attention = max(decode_ctx * self._attn_us_per_pair, decode_ctx * self._kv_us_per_token)
        if prefill_tokens:
            attention += max(prefill_pairs * self._attn_us_per_pair, (prefill_ctx + prefill_tokens) * self._kv_us_per_token)
        moe = 0.0
        if self._moe:
            touched = self._experts_local * (1.0 - self._expert_miss**tokens)
            moe = max(tokens * self._moe_us_per_token, touched * self._expert_read_us)
        comm = self._comm_fixed_us + tokens * self._comm_us_per_token if self._comm_fixed_us else 0.0
        offload = xfer_blocks * self._offload_us_per_block
        overhead = self._cpu_fixed_us + num_seqs * self._cpu_us_per_seq + tokens * self._cpu_us_per_token
        return linear, attention, moe, comm, offload, overhead

    def decode_capacity_rps(self, prompt: float, output: float) -> float:
        """Rough requests/s this deployment sustains for a given mean prompt and output length.

        Used to place synthetic load between idle and saturated; it assumes the batch fills to
        the smaller of max_num_seqs and what the KV cache holds, and charges each request its
        share of decode steps plus one prefill of its prompt.
        """
        s = self.cfg.serving
        per_req_tokens = prompt + output / 2
        batch = max(1, min(s.max_num_seqs, int(self.cfg.kv_capacity_tokens / max(per_req_tokens, 1))))
        decode_step = self.time_us(batch, int(batch * per_req_tokens))
        pairs = int(prompt * (prompt + 1) / 2)
        prefill_extra = self.time_us(batch, int(batch * per_req_tokens), int(prompt), pairs) - decode_step
        us_per_request = output * decode_step / batch + max(prefill_extra, 0.0)
        return 1e6 / us_per_request


@dataclass(frozen=True)
class HeavyTailNoise:
    """Multiplicative lognormal jitter plus rare additive stalls with a Pareto tail.

    Draws are vectorised: ``value = deterministic * mult + add``.
    """

    sigma: float
    spike_prob: float
    spike_min_us: float
    spike_alpha: float
    spike_cap_us: float

    def draw(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        mult = np.exp(self.sigma * rng.standard_normal(n) - 0.5 * self.sigma**2)
        spikes = rng.random(n) < self.spike_prob
        add = np.zeros(n)
        k = int(spikes.sum())
        if k:
            add[spikes] = np.minimum(self.spike_min_us * (1.0 + rng.pareto(self.spike_alpha, k)), self.spike_cap_us)
        return mult, add


# Step-to-step variation: a few percent of jitter, and about one step in 3000 stalled by
# Python GC, an NCCL hiccup or host preemption (2 ms and up, heavy tail).
STEP_NOISE = HeavyTailNoise(sigma=0.04, spike_prob=3e-4, spike_min_us=2000.0, spike_alpha=1.6, spike_cap_us=400_000.0)


@dataclass(frozen=True)
class ApiOverhead:
    """Alpha: from the API server receiving a request to the engine's waiting queue.

    A fixed cost (HTTP parsing, request validation), tokenisation proportional to the prompt,
    and contention: the same Python process detokenises and streams every running request's
    output each step, so new requests wait longer when the running batch is deep. Noise is
    wider than for steps (the event loop is shared) with rarer but larger stalls. The same
    server delivers output to the client (``delivery_us``: engine -> API process -> SSE ->
    client), which the generator adds between ``finished_ns`` and ``departed_ns``.
    """

    base_us: float = 800.0
    per_prompt_token_us: float = 1.0
    per_running_us: float = 10.0
    delivery_us: float = 3800.0  # engine output -> client: IPC, detokenise, SSE, client parse
    noise: HeavyTailNoise = HeavyTailNoise(sigma=0.30, spike_prob=2e-3, spike_min_us=1500.0, spike_alpha=1.5, spike_cap_us=200_000.0)

    def deterministic_us(self, prompt_tokens: float, running_depth: int) -> float:
        return self.base_us + self.per_prompt_token_us * prompt_tokens + self.per_running_us * running_depth
