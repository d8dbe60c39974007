"""Discrete-event simulation of one vLLM engine with V1 scheduler semantics.

Per step: running requests are served first, in admission order (every decode gets its one
token, ongoing chunked prefills get what is left of ``max_num_batched_tokens``); when the
paged KV cache has no block for a running request the newest running request is preempted
(recompute: its blocks are freed and it goes back to the front of the waiting queue); if
nothing was preempted, waiting requests are admitted in FCFS order while the token budget,
``max_num_seqs`` and free blocks allow, reusing prefix-cached (or, with CPU offload, restored)
blocks of their shared prefix. The client's timeout aborts a request wherever it is.

Speed: the step loop never walks the running batch. A decoding request's state is a line, so
the batch is kept as aggregates that change only at events (admission, prefill completion,
finish, preemption, abort): the number of decodes, the sum of their context lengths as an
affine function of the step number, and a histogram of their KV-block phase, which gives the
number of new blocks a step needs in O(1). Finishing steps are known when a request starts
decoding. A decode-only step therefore costs a few dozen Python operations regardless of
batch size, and per-request work happens once per event.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from dataclasses import dataclass

import numpy as np

from .config import DeploymentConfig
from .physics import STEP_NOISE, ApiOverhead, StepModel, vllm_release
from .workload import RequestSource

API, WAITING, PREFILL, DECODE, DONE, ABORTED = range(6)
_NOISE_BATCH = 8192
_PRESSURE_FRACTION = 0.05  # free KV below this share evicts idle prefix-cache blocks

STEP_FIELDS = (
    "t_start_us", "duration_us", "running_depth", "waiting_depth", "num_prefill_reqs", "prefill_tokens",
    "num_decode_reqs", "num_finished", "num_preempted", "kv_blocks_used", "kv_blocks_offloaded", "kv_blocks_restored",
)


@dataclass(frozen=True)
class SimResult:
    """Per-step and per-request columns; times are us from the start of the run (NaN = never)."""

    steps: dict[str, np.ndarray]
    requests: dict[str, np.ndarray]
    kv_blocks_total: int


class Engine:
    """One engine replica serving one request source."""

    def __init__(
        self,
        cfg: DeploymentConfig,
        source: RequestSource,
        rng: np.random.Generator,
        model: StepModel | None = None,
        api: ApiOverhead = ApiOverhead(),
    ):
        s = cfg.serving
        self.model = model or StepModel(cfg)
        self.api = api
        self.async_scheduling = vllm_release(s.vllm_version).async_scheduling
        self.source = source
        self.rng = rng
        self.timeout_us = source.workload.timeout_s * 1e6
        self.bs = s.block_size
        self.max_seqs = s.max_num_seqs
        self.max_tokens = s.max_num_batched_tokens
        self.chunked = s.chunked_prefill
        self.prefix_caching = s.prefix_caching
        self.offload = s.cpu_offload
        self.total_blocks = cfg.kv_blocks_total
        self.free = self.total_blocks
        self.pressure_blocks = int(self.total_blocks * _PRESSURE_FRACTION)
        self.last_pressure = -1

        # per request, in arrival order (grown one chunk at a time)
        self.arrival: list[float] = []
        self.prompt: list[int] = []
        self.output: list[int] = []
        self.group: list[int] = []
        self.prefix_len: list[int] = []
        self.stage: list[int] = []
        self.alpha_mult: list[float] = []
        self.alpha_add: list[float] = []
        self.state: list[int] = []
        self.queued: list[float] = []
        self.sched: list[float] = []
        self.first: list[float] = []
        self.finish: list[float] = []
        self.departed: list[float] = []
        self.cached_prompt: list[int] = []
        self.gen: list[int] = []
        self.npre: list[int] = []
        self.target: list[int] = []  # tokens the current prefill pass must cover
        self.computed: list[int] = []
        self.held: list[int] = []  # KV blocks held while prefilling
        self.cpu_blocks: list[int] = []  # blocks parked in host memory (CPU offload)
        self.s0: list[int] = []  # first decode step of the current decode run
        self.pos0: list[int] = []  # position written at step s0
        self.fin_step: list[int] = []
        self.groups_seen: set[int] = set()
        self.group_live: dict[int, int] = {}
        self.group_release: dict[int, int] = {}

        # queues and the running batch
        self.next_req = 0  # first request not yet arrived
        self.next_arrival = math.inf
        self.next_expiry_req = 0
        self.next_expiry = math.inf
        self.pending: list[tuple[float, int]] = []  # (queued time, request) inside the API server
        self.waiting: deque[int] = deque()
        self.n_waiting = 0
        self.running: list[int] = []  # admission order; the tail is preempted first
        self.prefilling: list[int] = []
        self.n_dec = 0
        self.ctx_base = 0  # sum over decodes of (pos0 - s0 + 1): context at step s is ctx_base + n_dec*s
        self.phase_hist = [0] * self.bs  # decodes by (pos0 - s0) mod block_size
        self.finishing: dict[int, list[int]] = {}
        self.offloaded = 0  # blocks moved this step (reset when the step is recorded)
        self.restored = 0

        self.step = 0
        self.t = 0.0
        self.t_prev = 0.0  # start of the previous step: with async scheduling the current
        # step was planned then, so only requests queued by that time can be in it
        self.rows: list[tuple[float, ...]] = []
        self._noise_mult: list[float] = []
        self._noise_add: list[float] = []
        self._noise_k = 0
        self._load_chunk()

    # --- main loop ----------------------------------------------------------------------------
    def run(self, max_steps: int | None = None) -> SimResult:
        """Simulate until ``max_steps`` steps ran or the workload ended and drained."""
        limit = math.inf if max_steps is None else max_steps
        while self.step < limit:
            t = self.t
            if self.next_arrival <= t:
                self._arrive(t)
            cutoff = self.t_prev if self.async_scheduling else t
            if self.pending and self.pending[0][0] <= cutoff:
                self._enqueue(cutoff)
            if self.next_expiry <= t:
                self._expire(t)
            if self.running or self.n_waiting:
                self._step(t)
                continue
            wake = min(self.next_arrival, self.pending[0][0] if self.pending else math.inf)
            if wake == math.inf:
                break
            self.t = self.t_prev = max(t, wake)  # an idle engine schedules as soon as work arrives
        return self._result()

    def _step(self, t: float) -> None:
        s, bs = self.step, self.bs
        budget = self.max_tokens - self.n_dec
        need = self.phase_hist[-s % bs] if self.n_dec else 0
        plan: list[tuple[int, int, int]] = []  # (request, prefill tokens, new blocks)
        if self.prefilling:
            target, computed, held = self.target, self.computed, self.held
            for i in self.prefilling:
                if budget <= 0:
                    break
                c = min(target[i] - computed[i], budget)
                nb = -(-(computed[i] + c) // bs) - held[i]
                plan.append((i, c, nb))
                need += nb
                budget -= c
        preempted = 0
        if need > self.free:
            preempted, need, budget = self._preempt(s, need, budget, plan)
        self.free -= need
        if not preempted and self.n_waiting and budget > 0 and len(self.running) < self.max_seqs:
            self._admit(t, s, budget, plan)
        if self.free < self.pressure_blocks:
            self.last_pressure = s

        n_dec = self.n_dec
        pf_tokens = pairs = pf_ctx = 0
        for i, c, _ in plan:
            done = self.computed[i]
            pf_tokens += c
            pairs += c * done + c * (c + 1) // 2
            pf_ctx += done
        base = self.model.time_us(
            n_dec, self.ctx_base + n_dec * s, pf_tokens, pairs, pf_ctx, n_dec + len(plan), self.offloaded + self.restored
        )
        k = self._noise_k
        if k == len(self._noise_mult):
            mult, add = STEP_NOISE.draw(self.rng, _NOISE_BATCH)
            self._noise_mult, self._noise_add, k = mult.tolist(), add.tolist(), 0
        self._noise_k = k + 1
        dur = base * self._noise_mult[k] + self._noise_add[k]
        t_end = t + dur

        finished = self._complete_prefills(plan, s, t_end) if plan else 0
        ids = self.finishing.pop(s, None)
        if ids:
            for i in ids:
                if self.state[i] == DECODE and self.fin_step[i] == s:
                    self.free += self._drop_decode(i, s, 1)
                    self.gen[i] = self.output[i]
                    self._retire(i, t_end)
                    finished += 1
        self.rows.append((
            t, dur, len(self.running) + finished, self.n_waiting, len(plan), pf_tokens, n_dec, finished, preempted,
            self.total_blocks - self.free, self.offloaded, self.restored,
        ))
        self.offloaded = self.restored = 0
        self.step = s + 1
        self.t_prev, self.t = t, t_end

    # --- scheduling events ----------------------------------------------------------------------
    def _preempt(self, s: int, need: int, budget: int, plan: list[tuple[int, int, int]]) -> tuple[int, int, int]:
        """Preempt the newest running requests until the step's block demand fits."""
        n = 0
        while need > self.free and self.running:
            v = self.running.pop()
            if self.state[v] == PREFILL:
                for k, (i, c, nb) in enumerate(plan):
                    if i == v:
                        need -= nb
                        budget += c
                        del plan[k]
                        break
                self.prefilling.remove(v)
                blocks = self.held[v]
            else:
                if (self.pos0[v] - self.s0[v] + s) % self.bs == 0:
                    need -= 1
                blocks = self._drop_decode(v, s, 0)
            self.free += blocks
            self._leave_group(v, s)
            if self.offload:
                self.cpu_blocks[v] = blocks
                self.offloaded += blocks
            self.state[v] = WAITING
            self.target[v] = self.prompt[v] + self.gen[v]
            self.computed[v] = self.held[v] = 0
            self.npre[v] += 1
            self.waiting.appendleft(v)
            self.n_waiting += 1
            n += 1
        self.last_pressure = s
        return n, need, budget

    def _admit(self, t: float, s: int, budget: int, plan: list[tuple[int, int, int]]) -> None:
        """Admit waiting requests FCFS while budget, max_num_seqs and free blocks allow."""
        bs = self.bs
        while self.n_waiting and budget > 0 and len(self.running) < self.max_seqs:
            i = self.waiting[0]
            if self.state[i] != WAITING:  # aborted while waiting
                self.waiting.popleft()
                continue
            cached, restore = self._cache_hit(i)
            todo = self.target[i] - cached
            c = min(todo, budget)
            if c < todo and not self.chunked:
                break
            nb = -(-(cached + c) // bs)
            if nb > self.free:
                self.last_pressure = s
                break
            self.waiting.popleft()
            self.n_waiting -= 1
            if restore:
                self.restored += restore
                self.cpu_blocks[i] = 0
            self.free -= nb
            budget -= c
            self.state[i] = PREFILL
            self.computed[i] = cached
            self.held[i] = 0
            self.running.append(i)
            self.prefilling.append(i)
            g = self.group[i]
            if g >= 0:
                self.group_live[g] = self.group_live.get(g, 0) + 1
            if self.sched[i] != self.sched[i]:  # NaN: first admission
                self.sched[i] = t
                self.cached_prompt[i] = cached
            plan.append((i, c, nb))

    def _cache_hit(self, i: int) -> tuple[int, int]:
        """Tokens this admission need not compute, and blocks to restore from host memory.

        A group's shared prefix stays in the GPU prefix cache while a request of the group is
        running, or if it was released after the last time free KV ran short (LRU eviction);
        with CPU offload an evicted prefix, and a preempted request's own blocks, come back
        from host memory instead of being recomputed. vLLM always recomputes the last token.
        """
        bs = self.bs
        hit = restore = 0
        g = self.group[i]
        if g >= 0 and g in self.groups_seen:
            blocks = self.prefix_len[i] // bs
            if self.prefix_caching and (self.group_live.get(g, 0) or self.group_release.get(g, -1) > self.last_pressure):
                hit = blocks * bs
            elif self.offload:
                hit, restore = blocks * bs, blocks
        own = self.cpu_blocks[i]
        if own and own * bs > hit:
            hit, restore = own * bs, own
        return min(hit, self.target[i] - 1), restore

    def _complete_prefills(self, plan: list[tuple[int, int, int]], s: int, t_end: float) -> int:
        """Apply the step's prefill chunks; a finished prefill samples a token and starts decoding."""
        finished = 0
        for i, c, nb in plan:
            self.computed[i] += c
            self.held[i] += nb
            if self.computed[i] < self.target[i]:
                continue
            self.prefilling.remove(i)
            g = self.group[i]
            if g >= 0 and g not in self.groups_seen:
                self.groups_seen.add(g)
                if self.offload:  # the connector stores the new prefix blocks to host memory
                    self.offloaded += self.prefix_len[i] // self.bs
            self.gen[i] += 1
            if self.first[i] != self.first[i]:
                self.first[i] = t_end
            if self.gen[i] >= self.output[i]:
                self.free += self.held[i]
                self._retire(i, t_end)
                finished += 1
                continue
            pos0, s0 = self.prompt[i] + self.gen[i] - 1, s + 1
            self.state[i] = DECODE
            self.pos0[i], self.s0[i] = pos0, s0
            self.n_dec += 1
            self.ctx_base += pos0 - s0 + 1
            self.phase_hist[(pos0 - s0) % self.bs] += 1
            fin = s0 + self.output[i] - self.gen[i] - 1
            self.fin_step[i] = fin
            self.finishing.setdefault(fin, []).append(i)
        return finished

    def _drop_decode(self, i: int, s: int, after: int) -> int:
        """Take a decoding request out of the aggregates at step ``s`` (``after``: once the
        step's token is computed); returns the KV blocks it held and records its progress."""
        pos0, s0 = self.pos0[i], self.s0[i]
        pos = pos0 + s - s0
        self.n_dec -= 1
        self.ctx_base -= pos0 - s0 + 1
        self.phase_hist[(pos0 - s0) % self.bs] -= 1
        self.gen[i] = pos - self.prompt[i] + 1 + after
        return -(-(pos + after) // self.bs)

    def _retire(self, i: int, t_end: float) -> None:
        """A request finished generating: free its slot; the client only gets it in time."""
        self.state[i] = DONE
        self.finish[i] = t_end
        if t_end <= self.arrival[i] + self.timeout_us:
            self.departed[i] = t_end + self.api.delivery_us * self.alpha_mult[i]
        self.running.remove(i)
        self._leave_group(i, self.step)

    def _leave_group(self, i: int, s: int) -> None:
        g = self.group[i]
        if g >= 0:
            live = self.group_live[g] - 1
            self.group_live[g] = live
            if not live:
                self.group_release[g] = s

    # --- arrivals and timeouts ------------------------------------------------------------------
    def _load_chunk(self) -> None:
        chunk = self.source.next_chunk()
        if chunk is None:
            return
        n = len(chunk.arrival_us)
        sh = chunk.shapes
        mult, add = self.api.noise.draw(self.rng, n)
        self.arrival += chunk.arrival_us.tolist()
        self.prompt += sh.prompt.tolist()
        self.output += sh.output.tolist()
        self.group += sh.group.tolist()
        self.prefix_len += sh.prefix_len.tolist()
        self.stage += chunk.stage.tolist()
        self.alpha_mult += mult.tolist()
        self.alpha_add += add.tolist()
        self.target += sh.prompt.tolist()
        nan = [math.nan] * n
        zero = [0] * n
        for col in (self.queued, self.sched, self.first, self.finish, self.departed):
            col += nan
        for col in (self.cached_prompt, self.gen, self.npre, self.computed, self.held, self.cpu_blocks, self.s0, self.pos0, self.fin_step):
            col += zero
        self.state += [API] * n
        if self.next_req < len(self.arrival):
            self.next_arrival = self.arrival[self.next_req]
        if self.next_expiry_req < len(self.arrival):
            self.next_expiry = self.arrival[self.next_expiry_req] + self.timeout_us

    def _arrive(self, t: float) -> None:
        """Requests that reached the API server by ``t`` pay their alpha and queue up."""
        depth = len(self.running)
        while self.next_arrival <= t:
            i = self.next_req
            alpha = self.api.deterministic_us(self.prompt[i], depth) * self.alpha_mult[i] + self.alpha_add[i]
            heapq.heappush(self.pending, (self.arrival[i] + alpha, i))
            self.next_req = i + 1
            if self.next_req == len(self.arrival):
                self._load_chunk()
            self.next_arrival = self.arrival[self.next_req] if self.next_req < len(self.arrival) else math.inf

    def _enqueue(self, t: float) -> None:
        while self.pending and self.pending[0][0] <= t:
            q, i = heapq.heappop(self.pending)
            if self.state[i] != API:
                continue
            self.state[i] = WAITING
            self.queued[i] = q
            self.waiting.append(i)
            self.n_waiting += 1

    def _expire(self, t: float) -> None:
        """The client gave up on every request older than its timeout: abort it wherever it is."""
        n = len(self.arrival)
        while self.next_expiry <= t:
            i = self.next_expiry_req
            st = self.state[i]
            if st == WAITING:
                self.n_waiting -= 1
            elif st == PREFILL:
                self.running.remove(i)
                self.prefilling.remove(i)
                self.free += self.held[i]
                self._leave_group(i, self.step)
            elif st == DECODE:
                self.running.remove(i)
                self.free += self._drop_decode(i, self.step, 0)
                self._leave_group(i, self.step)
            if st in (API, WAITING, PREFILL, DECODE):
                self.state[i] = ABORTED
                self.finish[i] = t
            self.next_expiry_req = i + 1
            self.next_expiry = self.arrival[i + 1] + self.timeout_us if i + 1 < n else math.inf

    # --- output -------------------------------------------------------------------------------
    def _result(self) -> SimResult:
        rows = np.array(self.rows, dtype=np.float64).reshape(-1, len(STEP_FIELDS))
        steps = {name: rows[:, k] for k, name in enumerate(STEP_FIELDS)}
        end = float(steps["t_start_us"][-1] + steps["duration_us"][-1]) if len(rows) else 0.0
        n = len(self.queued)
        queued = np.array(self.queued, dtype=np.float64)
        seen = np.flatnonzero(queued <= end) if n else np.empty(0, dtype=np.int64)
        gen = np.array(self.gen, dtype=np.int64)
        state = np.array(self.state, dtype=np.int64)
        # decoding requests' progress lives in the aggregates; read it out at the end
        for i in np.flatnonzero(state == DECODE):
            gen[i] = self.pos0[i] + self.step - self.s0[i] - self.prompt[i] + 1

        def pick(xs: list, dtype: type) -> np.ndarray:
            return np.asarray(xs, dtype=dtype)[seen]

        requests = {
            "arrival_us": pick(self.arrival, np.float64),
            "queued_us": queued[seen],
            "scheduled_us": pick(self.sched, np.float64),
            "first_token_us": pick(self.first, np.float64),
            "finished_us": pick(self.finish, np.float64),
            "departed_us": pick(self.departed, np.float64),
            "prompt_tokens": pick(self.prompt, np.int64),
            "cached_prompt_tokens": pick(self.cached_prompt, np.int64),
            "output_tokens": gen[seen],
            "target_output_tokens": pick(self.output, np.int64),
            "num_preemptions": pick(self.npre, np.int64),
            "stage": pick(self.stage, np.int64),
        }
        return SimResult(steps, requests, self.total_blocks)
