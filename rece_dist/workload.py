"""Client load for the simulated engine: when requests arrive and how long they are.

A :class:`Workload` is a list of load stages (duration, request rate) with an arrival process
(``poisson``, ``constant`` spacing like inference-perf's constant load, ``mmpp`` for a
two-state Markov-modulated burst process, ``batched`` for fan-out bursts of near-simultaneous
requests) and a length model: heavy-tailed chat traffic (lognormal body, Pareto tail,
optional shared system prompts) or inference-perf's shared-prefix workload. A
:class:`RequestSource` turns it into arrays, one slice of at most a minute at a time, so an
open-ended run (``repeat``) never materialises more requests than the engine consumes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

ARRIVAL_KINDS = ("poisson", "constant", "mmpp", "batched")
CHUNK_S = 60.0  # longest slice of a stage generated at once
_BURST_FRACTION = 0.25  # share of time an MMPP spends in its high state
_BURST_DWELL_S = (20.0, 60.0)  # mean dwell in the high and the low state
_BATCH_SPREAD_US = 3000.0  # members of a fan-out batch land within a few ms


@dataclass(frozen=True)
class Stage:
    """A stretch of constant mean request rate."""

    duration_s: float
    rate_rps: float


@dataclass(frozen=True)
class RequestShapes:
    """Lengths of a batch of requests; ``group``/``prefix_len`` describe shared prompt prefixes."""

    prompt: np.ndarray
    output: np.ndarray
    group: np.ndarray  # shared-prefix group, -1 for none
    prefix_len: np.ndarray  # tokens shared with the rest of the group


@dataclass(frozen=True)
class HeavyTailLengths:
    """Chat-like traffic: lognormal prompt and output lengths, a Pareto tail of long prompts
    and outputs, and optionally a few shared system prompts at the start of the prompt."""

    prompt_median: float
    prompt_sigma: float
    output_median: float
    output_sigma: float
    tail_frac: float = 0.05
    tail_alpha: float = 1.3
    prefix_groups: int = 0
    prefix_len: int = 0

    def sample(self, rng: np.random.Generator, n: int, max_model_len: int, first: int = 0) -> RequestShapes:
        """``n`` requests, independent of their position ``first`` in the stream."""
        prompt = _heavy_tail(rng, n, self.prompt_median, self.prompt_sigma, self.tail_frac, self.tail_alpha)
        output = _heavy_tail(rng, n, self.output_median, self.output_sigma, self.tail_frac, self.tail_alpha)
        if self.prefix_groups:
            group = rng.integers(0, self.prefix_groups, n)
            prefix = np.full(n, self.prefix_len, dtype=np.int64)
            prompt = prompt + prefix
        else:
            group = np.full(n, -1, dtype=np.int64)
            prefix = np.zeros(n, dtype=np.int64)
        return _clip(prompt, output, group, prefix, max_model_len)


@dataclass(frozen=True)
class SharedPrefixLengths:
    """inference-perf's ``shared_prefix`` data in multi-turn mode: ``num_groups`` system prompts,
    each shared by ``users_per_group`` users; each user owns one fixed question and re-sends the
    same prompt every round (requests go to users round-robin); a fixed output length
    (``ignore_eos``). So from its second round on, a user's whole prompt is a prefix-cache
    candidate: the cache group is the user and the shared prefix is the whole prompt.
    ``prompt_quantiles`` ((probability, tokens) pairs) spreads the users' prompt lengths like a
    measured distribution instead of system+question exactly."""

    system_prompt_len: int
    question_len: int
    output_len: int
    num_groups: int
    users_per_group: int
    prompt_quantiles: tuple[tuple[float, float], ...] = ()

    def sample(self, rng: np.random.Generator, n: int, max_model_len: int, first: int = 0) -> RequestShapes:
        """Requests ``first`` .. ``first + n - 1`` of the round-robin over users."""
        users = self.num_groups * self.users_per_group
        user = (first + np.arange(n)) % users
        if self.prompt_quantiles:
            probs, values = (np.array(v, dtype=np.float64) for v in zip(*self.prompt_quantiles))
            per_user = np.rint(np.interp((np.arange(users) + 0.5) / users, probs, values)).astype(np.int64)
            prompt = per_user[user]
        else:
            prompt = np.full(n, self.system_prompt_len + self.question_len, dtype=np.int64)
        output = np.full(n, self.output_len, dtype=np.int64)
        return _clip(prompt, output, user, prompt, max_model_len)


Lengths = HeavyTailLengths | SharedPrefixLengths


@dataclass(frozen=True)
class Workload:
    """Load stages, arrival process, lengths and the client's timeout.

    ``repeat`` cycles the stages forever (the generator stops the engine after a step quota);
    otherwise requests end with the last stage (a reference run).
    """

    stages: tuple[Stage, ...]
    lengths: Lengths
    arrivals: str = "poisson"
    burstiness: float = 3.0
    timeout_s: float = 300.0
    repeat: bool = False

    def __post_init__(self) -> None:
        if self.arrivals not in ARRIVAL_KINDS:
            raise ValueError(f"unknown arrival process {self.arrivals!r}")
        if not self.stages or any(s.duration_s <= 0 or s.rate_rps < 0 for s in self.stages):
            raise ValueError("a workload needs stages with positive durations and non-negative rates")
        if self.repeat and not any(s.rate_rps > 0 for s in self.stages):
            raise ValueError("a repeating workload needs a stage with a positive rate")


@dataclass(frozen=True)
class RequestChunk:
    """Requests in arrival order (times in us from the start of the run)."""

    arrival_us: np.ndarray
    shapes: RequestShapes
    stage: np.ndarray


class RequestSource:
    """Yields a workload's requests chunk by chunk; deterministic for a given generator."""

    def __init__(self, workload: Workload, rng: np.random.Generator, max_model_len: int):
        self.workload = workload
        self.rng = rng
        self.max_model_len = max_model_len
        self._slices = self._iter_slices()
        self._emitted = 0
        self._next_constant_us = 0.0
        self._high = False
        self._state_end_us = 0.0  # when the MMPP's current state ends (absolute, us)

    def next_chunk(self) -> RequestChunk | None:
        """The next non-empty slice of requests, or None when the workload has ended."""
        for stage_idx, t0, t1, rate in self._slices:
            times = self._arrivals(t0, t1, rate)
            if len(times):
                shapes = self.workload.lengths.sample(self.rng, len(times), self.max_model_len, first=self._emitted)
                self._emitted += len(times)
                return RequestChunk(times, shapes, np.full(len(times), stage_idx, dtype=np.int64))
        return None

    def _iter_slices(self) -> Iterator[tuple[int, float, float, float]]:
        t = 0.0
        while True:
            for k, st in enumerate(self.workload.stages):
                end = t + st.duration_s * 1e6
                while t < end:
                    t1 = min(end, t + CHUNK_S * 1e6)
                    yield k, t, t1, st.rate_rps
                    t = t1
            if not self.workload.repeat:
                return

    def _arrivals(self, t0: float, t1: float, rate: float) -> np.ndarray:
        if rate <= 0:
            return np.empty(0)
        kind = self.workload.arrivals
        if kind == "constant":
            gap = 1e6 / rate
            start = max(self._next_constant_us, t0)
            times = start + gap * np.arange(int(np.ceil((t1 - start) / gap)))
            times = times[times < t1]
            self._next_constant_us = (times[-1] if len(times) else start - gap) + gap
            return times
        if kind == "poisson":
            return _poisson(self.rng, t0, t1, rate)
        if kind == "mmpp":
            return self._mmpp(t0, t1, rate)
        return self._batched(t0, t1, rate)

    def _mmpp(self, t0: float, t1: float, rate: float) -> np.ndarray:
        """Two-state Markov-modulated Poisson: bursts at ``burstiness`` x the mean rate for a
        quarter of the time, a calmer rate otherwise, same mean."""
        high = min(self.workload.burstiness, 0.95 / _BURST_FRACTION) * rate
        low = (rate - _BURST_FRACTION * high) / (1 - _BURST_FRACTION)
        parts = []
        t = t0
        while t < t1:
            if self._state_end_us <= t:
                self._high = not self._high
                dwell = self.rng.exponential(_BURST_DWELL_S[0 if self._high else 1] * 1e6)
                self._state_end_us = max(self._state_end_us, t0) + dwell
                continue
            end = min(t1, self._state_end_us)
            parts.append(_poisson(self.rng, t, end, high if self._high else low))
            t = end
        return np.concatenate(parts)

    def _batched(self, t0: float, t1: float, rate: float) -> np.ndarray:
        """Fan-out bursts: batches arrive as a Poisson process, each a geometric number of
        requests (mean ``burstiness``) spread over a few milliseconds."""
        mean_batch = max(self.workload.burstiness, 1.0)
        epochs = _poisson(self.rng, t0, t1, rate / mean_batch)
        sizes = self.rng.geometric(1.0 / mean_batch, len(epochs))
        times = np.repeat(epochs, sizes) + self.rng.exponential(_BATCH_SPREAD_US, int(sizes.sum()))
        return np.sort(np.minimum(times, np.nextafter(t1, t0)))


def _poisson(rng: np.random.Generator, t0: float, t1: float, rate: float) -> np.ndarray:
    if rate <= 0 or t1 <= t0:
        return np.empty(0)
    mean_gap = 1e6 / rate
    expected = (t1 - t0) / mean_gap
    parts, t = [], t0
    while t < t1:
        gaps = rng.exponential(mean_gap, int(expected * 1.1) + 16)
        times = t + np.cumsum(gaps)
        parts.append(times[times < t1])
        t = times[-1]
    return np.concatenate(parts)


def _heavy_tail(rng: np.random.Generator, n: int, median: float, sigma: float, tail_frac: float, alpha: float) -> np.ndarray:
    body = median * np.exp(sigma * rng.standard_normal(n))
    tail = rng.random(n) < tail_frac
    body[tail] = median * 3.0 * (1.0 + rng.pareto(alpha, int(tail.sum())))
    return np.maximum(np.rint(body), 1).astype(np.int64)


def _clip(prompt: np.ndarray, output: np.ndarray, group: np.ndarray, prefix: np.ndarray, max_model_len: int) -> RequestShapes:
    """Fit every request into ``max_model_len`` (prompt first, at least one output token)."""
    prompt = np.clip(prompt, 1, max_model_len - 1)
    output = np.clip(output, 1, max_model_len - prompt)
    prefix = np.minimum(prefix, prompt - 1)
    return RequestShapes(prompt.astype(np.int64), output.astype(np.int64), group.astype(np.int64), prefix.astype(np.int64))
