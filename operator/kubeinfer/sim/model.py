"""The simulated engine: tokenizer, block-hashed prefix cache, continuous batching and step latencies.

Pure and deterministic: no I/O, no sleeping, no wall clock. Time is whatever the caller passes as `now`
(seconds); the server passes the event loop's clock, tests a virtual one. One engine step is
`Engine.schedule(now)` (what runs, and for how long) followed by `Engine.complete(step, now + duration)`
(the tokens it produced).

What is modelled, after vLLM's v1 scheduler:

* Tokens: a token is a whitespace-separated word, words longer than `MAX_TOKEN_CHARS` count one token per
  that many characters. Real tokenizers give ~1.3 tokens per English word; one per word keeps prompts'
  token counts easy to reason about (a 2000-word system prompt is 2000 tokens).
* Prefix cache: the prompt's full blocks of `block_size` tokens are hashed in a chain (each hash covers
  its block and every block before it, as vLLM's do), so a block hits only when the whole prefix up to it
  matches. Hits are whole blocks, and at most `prompt_tokens - 1` tokens (the last token is recomputed
  for its logits, as in vLLM). Blocks of running sequences are pinned; a finished sequence's blocks stay
  cached until evicted, least recently used first, when a new sequence needs space within `num_blocks`.
* Continuous batching: up to `max_num_seqs` running sequences, the rest wait in FIFO order. Each step
  spends a budget of `max_num_batched_tokens`: one token per decoding sequence first, then prefill
  chunks (chunked prefill), admitting waiting sequences while the budget, the sequence limit and free
  KV blocks allow. A decoding sequence that needs a block when none is free preempts the most recently
  admitted one, which is recomputed later (vLLM's recompute preemption).
* Step time: `decode_ms + decode_ms_per_seq * decoding sequences` if any sequence decodes, plus
  `prefill_overhead_ms + prefill_ms_per_token * prefill tokens` if any prefill runs. A lone request's
  time to first token is therefore `prefill_overhead_ms + prefill_ms_per_token * uncached tokens`.
* Output: every request generates exactly `max_tokens` pseudo-words (finish reason "length"), drawn
  from a RNG seeded by `seed` and the prompt, so the same request always gets the same text.
"""

from __future__ import annotations

import hashlib
import random
import re
import struct
from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields
from functools import lru_cache

MAX_TOKEN_CHARS = 16
"""A longer word counts as one token per this many characters (a URL or a base64 blob is not one token)."""

_LONG_WORD = re.compile(rf"\S{{{MAX_TOKEN_CHARS + 1}}}")

_SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
VOCAB: tuple[str, ...] = tuple(random.Random(0).sample([a + b for a in _SYLLABLES for b in _SYLLABLES], 1024))
"""The words the simulator answers with: two syllables each, so each re-tokenizes as exactly one token.
A power of two, so that 16 random bits pick one uniformly."""


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


# --- tokens ---------------------------------------------------------------------------------------------


def tokenize(text: str) -> list[str]:
    """Whitespace-separated words; a word over MAX_TOKEN_CHARS counts one token per MAX_TOKEN_CHARS."""
    words = text.split()
    if _LONG_WORD.search(text) is None:  # the usual case: skip the per-word loop
        return words
    n = MAX_TOKEN_CHARS
    return [w[i : i + n] for w in words for i in range(0, len(w), n)]


@dataclass(frozen=True, slots=True)
class Prompt:
    num_tokens: int
    block_hashes: tuple[int, ...]
    """Chained hashes of the prompt's full blocks: block i's hash covers tokens [0, (i + 1) * block_size)."""
    digest: bytes
    """Digest of the prompt text, stable across processes: seeds the output text."""


def _chain(parent: int, tokens: Sequence[str], start: int, block_size: int) -> list[int]:
    """Hashes of the full blocks of `tokens` from index `start` (a block boundary), chained on `parent`.

    Python's hash() of a tuple: fast, and only ever compared within one process (vLLM's "builtin" hash).
    """
    out = []
    for i in range(start, len(tokens) - block_size + 1, block_size):
        parent = hash((parent, *tokens[i : i + block_size]))
        out.append(parent)
    return out


_ROOT = 0x5EED


@lru_cache(maxsize=256)
def _head(piece: str, block_size: int) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """Tokens and block hashes of a prompt's first piece. Cached: requests that share a long system
    prompt (the case prefix caching is for) tokenize and hash it once."""
    tokens = tokenize(piece)
    return tuple(tokens), tuple(_chain(_ROOT, tokens, 0, block_size))


def encode(pieces: Sequence[str], block_size: int) -> Prompt:
    """The prompt made of `pieces` (tokenized separately, so a piece boundary is a token boundary)."""
    if not pieces:
        return Prompt(0, (), hashlib.blake2b(b"", digest_size=8).digest())
    head_tokens, head_hashes = _head(pieces[0], block_size)
    digest = hashlib.blake2b("\x00".join(pieces).encode(), digest_size=8).digest()
    if len(pieces) == 1:
        return Prompt(len(head_tokens), head_hashes, digest)
    tokens = list(head_tokens)
    for piece in pieces[1:]:
        tokens += tokenize(piece)
    parent = head_hashes[-1] if head_hashes else _ROOT
    hashes = head_hashes + tuple(_chain(parent, tokens, len(head_hashes) * block_size, block_size))
    return Prompt(len(tokens), hashes, digest)


def chat_pieces(messages: Sequence[tuple[str, str]]) -> list[str]:
    """The chat template: each message as `<|role|>` and its text, then the generation prompt."""
    return [f"<|{role}|>\n{text}" for role, text in messages] + ["<|assistant|>"]


def output_words(seed: int, digest: bytes, n: int) -> list[str]:
    """The `n` words answered to a prompt with this digest. A longer answer extends a shorter one.

    The RNG is BLAKE2b in counter mode keyed by seed and prompt: 32 words per hash, no RNG object to seed
    per request.
    """
    key = seed.to_bytes(16, "big", signed=True) + digest
    out: list[str] = []
    mask = len(VOCAB) - 1
    for block in range(-(-n // 32)):
        raw = hashlib.blake2b(key + block.to_bytes(4, "big")).digest()
        out += [VOCAB[i & mask] for i in _WORD_INDICES.unpack(raw)]
    del out[n:]
    return out


_WORD_INDICES = struct.Struct(">32H")


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
