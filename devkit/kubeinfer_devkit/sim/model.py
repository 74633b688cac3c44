"""The simulated engine: block-hashed prefix cache, continuous batching and step latencies.

Pure and deterministic: no I/O, no sleeping, no wall clock. Time is whatever the caller passes as `now`
(seconds); the server passes the event loop's clock, tests a virtual one. One engine step is
`Engine.schedule(now)` (what runs, and for how long) followed by `Engine.complete(step, now + duration)`
(the tokens it produced). Prompts, their tokens and block hashes, and the answers' words come from
:mod:`kubeinfer_devkit.sim.tokens`.

What is modelled, after vLLM's v1 scheduler:

* Prefix cache: a block of the prompt hits only when the whole prefix up to it matches (the chained
  block hashes of `tokens.encode`). Hits are whole blocks, and at most `prompt_tokens - 1` tokens (the
  last token is recomputed for its logits, as in vLLM). Blocks of running sequences are pinned; a
  finished sequence's blocks stay cached until evicted, least recently used first, when a new sequence
  needs space within `num_blocks`.
* Continuous batching: up to `max_num_seqs` running sequences, the rest wait in FIFO order. Each step
  spends a budget of `max_num_batched_tokens`: one token per decoding sequence first, then prefill
  chunks (chunked prefill), admitting waiting sequences while the budget, the sequence limit and free
  KV blocks allow. A decoding sequence that needs a block when none is free preempts the most recently
  admitted one, which is recomputed later (vLLM's recompute preemption).
* Step time: `decode_ms + decode_ms_per_seq * decoding sequences` if any sequence decodes, plus
  `prefill_overhead_ms + prefill_ms_per_token * prefill tokens` if any prefill runs. A lone request's
  time to first token is therefore `prefill_overhead_ms + prefill_ms_per_token * uncached tokens`.
* Output: every request generates exactly `max_tokens` tokens (finish reason "length").
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field, fields

from kubeinfer_devkit.sim.tokens import Prompt


@dataclass(frozen=True)
class EngineConfig:
    """Options of the simulated engine; the names are `kubeinfer sim`'s flags.

    The defaults are roughly a 7-8B fp16 model on one 24-48 GB GPU (A10G/L4/L40S class) under vLLM; see
    docs/simulator.md for where the numbers come from.
    """

    max_num_seqs: int = 256
    """Running sequences at most (vLLM's --max-num-seqs default)."""
    max_num_batched_tokens: int = 2048
    """Tokens per step: decode tokens plus prefill chunks (vLLM's default for the API server)."""
    num_blocks: int = 2048
    """KV cache size in blocks: 2048 x 16 = 32768 tokens, ~4 GiB at Llama-3-8B's 128 KiB per token."""
    block_size: int = 16
    max_model_len: int = 8192
    prefill_overhead_ms: float = 5.0
    """Fixed cost of a step that runs any prefill."""
    prefill_ms_per_token: float = 0.2
    """Per prompt token computed (not served from the prefix cache): ~5000 tokens/s."""
    decode_ms: float = 20.0
    """Fixed cost of a decode step (reading the weights once)."""
    decode_ms_per_seq: float = 0.1
    """Added per sequence decoding in the step (attention over its KV, sampling)."""
    seed: int = 0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name != "seed" and value < 0:
                raise ValueError(f"{f.name} must be >= 0, not {value}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "num_blocks", "block_size", "max_model_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.max_model_len > self.num_blocks * self.block_size:
            # A request of max_model_len tokens could never be admitted: it would wait forever.
            raise ValueError(
                f"max_model_len={self.max_model_len} does not fit in the KV cache: "
                f"num_blocks * block_size = {self.num_blocks * self.block_size} tokens"
            )

    def step_seconds(self, prefill_tokens: int, decoding: int) -> float:
        ms = 0.0
        if decoding:
            ms += self.decode_ms + self.decode_ms_per_seq * decoding
        if prefill_tokens:
            ms += self.prefill_overhead_ms + self.prefill_ms_per_token * prefill_tokens
        return ms / 1000.0


# --- engine ---------------------------------------------------------------------------------------------

WAITING, RUNNING, FINISHED = "waiting", "running", "finished"


class Request:
    """One request inside the engine. Times are the caller's clock; None until they happen."""

    __slots__ = (
        "arrival",
        "blocks",
        "cached_tokens",
        "computed",
        "finish_reason",
        "finished_at",
        "first_token_at",
        "held",
        "id",
        "last_token_at",
        "max_tokens",
        "num_prompt",
        "output",
        "preemptions",
        "prefill_computed",
        "prev_token_at",
        "prompt",
        "scheduled_at",
        "state",
        "target",
    )

    def __init__(self, seq_id: int, prompt: Prompt, max_tokens: int, arrival: float) -> None:
        self.id = seq_id
        self.prompt = prompt
        self.num_prompt = prompt.num_tokens
        self.max_tokens = max_tokens
        self.arrival = arrival
        self.state = WAITING
        self.output = 0
        """Tokens generated so far."""
        self.target = prompt.num_tokens
        """Tokens to prefill in the current residency: the prompt, plus the output after a preemption."""
        self.computed = 0
        """Tokens of `target` whose KV exists (prefix-cache hits included)."""
        self.cached_tokens: int | None = None
        """Prompt tokens served from the prefix cache at the first admission."""
        self.prefill_computed = 0
        """Prompt tokens actually computed, over all residencies."""
        self.held: list[int] = []
        """Hashes of the cached blocks this sequence pins."""
        self.blocks = 0
        """KV blocks held in all: `held` plus private ones (partial and output blocks)."""
        self.preemptions = 0
        self.scheduled_at: float | None = None
        self.first_token_at: float | None = None
        self.prev_token_at: float | None = None
        self.last_token_at: float | None = None
        self.finished_at: float | None = None
        self.finish_reason: str | None = None

    @property
    def finished(self) -> bool:
        return self.state == FINISHED

    def __repr__(self) -> str:
        return f"<seq {self.id} {self.state} prompt={self.num_prompt} out={self.output}/{self.max_tokens}>"


@dataclass(eq=False, slots=True)
class Step:
    """One engine iteration: what it computes, for how long, and (after `complete`) what it produced."""

    start: float
    duration: float
    prefills: list[tuple[Request, int]]
    """Sequences prefilling in this step, with their chunk of tokens."""
    decodes: list[Request]
    emitted: list[Request] = field(default_factory=list)
    """Sequences that got one more token (filled by `complete`)."""
    finished: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.prefills) + len(self.decodes)


class Engine:
    """The scheduler and KV cache of one simulated vLLM engine."""

    def __init__(self, config: EngineConfig | None = None) -> None:
        self.config = config or EngineConfig()
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._next_id = 0
        # KV blocks: a cached block is known by its hash, with the number of running sequences pinning it;
        # those pinned by none are evictable, in LRU order. Other free blocks carry nothing.
        self._refs: dict[int, int] = {}
        self._lru: OrderedDict[int, None] = OrderedDict()
        self._free = self.config.num_blocks
        # Cumulative counters, as vLLM exports them.
        self.prefix_queries = 0
        self.prefix_hits = 0
        self.prompt_tokens = 0
        self.prompt_tokens_cached = 0
        self.generation_tokens = 0
        self.preemptions = 0
        self.finished: dict[str, int] = {"stop": 0, "length": 0, "abort": 0, "error": 0, "repetition": 0}

    # -- state ---------------------------------------------------------------------------------------

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def used_blocks(self) -> int:
        """Blocks pinned by running sequences (cached-but-free blocks are free, as in vLLM)."""
        return self.config.num_blocks - self._free - len(self._lru)

    @property
    def cached_blocks(self) -> int:
        """Blocks holding a cached prefix, pinned or not."""
        return len(self._refs)

    def kv_usage(self) -> float:
        return self.used_blocks / self.config.num_blocks

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def is_cached(self, block_hash: int) -> bool:
        return block_hash in self._refs

    # -- requests ------------------------------------------------------------------------------------

    def add(self, prompt: Prompt, max_tokens: int, now: float) -> Request:
        """Queue a request; the caller has checked it fits in max_model_len."""
        if max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        if prompt.num_tokens + max_tokens > self.config.max_model_len:
            raise ValueError("prompt + max_tokens exceeds max_model_len")
        seq = Request(self._next_id, prompt, max_tokens, now)
        self._next_id += 1
        self.waiting.append(seq)
        return seq

    def abort(self, seq: Request, now: float) -> None:
        """The client went away: drop the sequence wherever it is."""
        if seq.state == WAITING:
            self.waiting.remove(seq)
        elif seq.state == RUNNING:
            self.running.remove(seq)
            self._release(seq)
        else:
            return
        self._finish(seq, "abort", now)

    # -- one step ------------------------------------------------------------------------------------

    def schedule(self, now: float) -> Step | None:
        """Pick the work of the next step (and reserve its KV blocks). None: nothing can run."""
        cfg = self.config
        budget = cfg.max_num_batched_tokens
        prefills: list[tuple[Request, int]] = []
        decodes: list[Request] = []
        preempted = False

        # Running sequences first, in admission order (vLLM's scheduler does the same).
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.computed < seq.target:
                chunk = min(seq.target - seq.computed, budget)
                prefills.append((seq, chunk))
                budget -= chunk
                i += 1
                continue
            # Decoding: the token fed this step needs a KV slot.
            need = -(-(seq.num_prompt + seq.output) // cfg.block_size) - seq.blocks
            while need > 0 and self._free + len(self._lru) < need:
                victim = self.running.pop()  # the most recently admitted
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.state != RUNNING:
                break
            if need > 0:
                self._allocate(need)
                seq.blocks += need
            decodes.append(seq)
            budget -= 1
            i += 1

        # Then waiting sequences, FIFO, while everything they need is available (none after a preemption:
        # memory is short).
        while self.waiting and not preempted and budget > 0 and len(self.running) < cfg.max_num_seqs:
            seq = self.waiting[0]
            if not self._admit(seq):
                break  # head-of-line: later requests do not overtake it
            self.waiting.popleft()
            seq.state = RUNNING
            if seq.scheduled_at is None:
                seq.scheduled_at = now
            self.running.append(seq)
            chunk = min(seq.target - seq.computed, budget)
            prefills.append((seq, chunk))
            budget -= chunk

        if not prefills and not decodes:
            return None
        prefill_tokens = sum(n for _, n in prefills)
        return Step(now, cfg.step_seconds(prefill_tokens, len(decodes)), prefills, decodes)

    def complete(self, step: Step, now: float) -> Step:
        """The step ended at `now`: sequences whose prefill is done and decoding ones get a token."""
        for seq, chunk in step.prefills:
            if seq.state != RUNNING:  # aborted during the step
                continue
            seq.computed += chunk
            if seq.output == 0:
                seq.prefill_computed += chunk
            if seq.computed >= seq.target:
                self._emit(seq, step, now)
        for seq in step.decodes:
            if seq.state == RUNNING:
                self._emit(seq, step, now)
        if step.finished:
            self.running = [s for s in self.running if s.state == RUNNING]
        return step

    def _emit(self, seq: Request, step: Step, now: float) -> None:
        if seq.first_token_at is None:
            seq.first_token_at = now
            self.prompt_tokens += seq.num_prompt
            self.prompt_tokens_cached += seq.cached_tokens or 0
        seq.output += 1
        seq.prev_token_at, seq.last_token_at = seq.last_token_at, now
        self.generation_tokens += 1
        step.emitted.append(seq)
        if seq.output >= seq.max_tokens:
            self._release(seq)
            self._finish(seq, "length", now)
            step.finished.append(seq)

    def _finish(self, seq: Request, reason: str, now: float) -> None:
        seq.state = FINISHED
        seq.finish_reason = reason
        seq.finished_at = now
        self.finished[reason] += 1

    # -- KV blocks -----------------------------------------------------------------------------------

    def _admit(self, seq: Request) -> bool:
        """Give `seq` the blocks for its `target` tokens, reusing cached prefix blocks. False: no room."""
        cfg = self.config
        bs = cfg.block_size
        hashes = seq.prompt.block_hashes
        # Whole blocks only, and never the last token: it is recomputed for its logits.
        limit = min(len(hashes), (seq.target - 1) // bs)
        hits = 0
        refs = self._refs
        while hits < limit and hashes[hits] in refs:
            hits += 1
        total = -(-seq.target // bs)
        new = total - hits
        idle_hits = sum(1 for h in hashes[:hits] if refs[h] == 0)
        if new + idle_hits > self._free + len(self._lru):
            return False

        self.prefix_queries += seq.target
        self.prefix_hits += hits * bs
        for h in hashes[:hits]:
            if refs[h] == 0:
                del self._lru[h]
            refs[h] += 1
        self._allocate(new)
        held = list(hashes[:hits])
        # The new full prompt blocks become cached now, so a request admitted later hits them (it cannot
        # get its first token before this one computes them: it is scheduled after it).
        for h in hashes[hits:]:
            if h in refs:  # cached although an earlier block missed: keep a private copy
                break
            refs[h] = 1
            held.append(h)
        seq.held = held
        seq.blocks = total
        seq.computed = hits * bs
        if seq.cached_tokens is None:
            seq.cached_tokens = hits * bs
        return True

    def _allocate(self, n: int) -> None:
        """Take `n` free blocks: never-cached ones first, then evict the least recently used cached ones."""
        take = min(n, self._free)
        self._free -= take
        for _ in range(n - take):
            h, _ = self._lru.popitem(last=False)
            del self._refs[h]

    def _release(self, seq: Request) -> None:
        refs, lru = self._refs, self._lru
        # Last block first, so that a prefix's first blocks, the most shared, are the last evicted.
        for h in reversed(seq.held):
            r = refs[h] - 1
            refs[h] = r
            if r == 0:
                lru[h] = None
        self._free += seq.blocks - len(seq.held)
        seq.held = []
        seq.blocks = 0

    def _preempt(self, seq: Request) -> None:
        self._release(seq)
        seq.state = WAITING
        seq.computed = 0
        seq.target = seq.num_prompt + seq.output  # recompute everything, then generate the next token
        seq.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(seq)


def simulate(
    engine: Engine, arrivals: Iterable[tuple[float, Prompt, int]], start: float = 0.0
) -> list[Request]:
    """Run `engine` on a virtual clock from `start` until it is idle and every request of `arrivals`
    (time, prompt, max_tokens) finished; the new sequences in arrival order, their timings filled in."""
    pending = deque(sorted(arrivals, key=lambda a: a[0]))
    out: list[Request] = []
    now = start
    while pending or engine.has_work():
        while pending and pending[0][0] <= now:
            t, prompt, max_tokens = pending.popleft()
            out.append(engine.add(prompt, max_tokens, t))
        step = engine.schedule(now) if engine.has_work() else None
        if step is None:
            if not pending:
                raise RuntimeError("engine stalled with work left")  # cannot happen: config is validated
            now = max(now, pending[0][0])
            continue
        now += step.duration
        engine.complete(step, now)
    return out
