"""Pick a replica for one request: pure functions of the endpoints, their loads and the request.

The gateway keeps the state (in-flight counts, scrapes, the round-robin counter, the `PrefixIndex`)
and calls `choose` per attempt; a retry passes the replicas it already tried in `exclude`.
"""

from __future__ import annotations

import bisect
import hashlib
import json
from collections import OrderedDict
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

from kubeinfer.api.v1alpha1 import RoutingStrategy
from kubeinfer.gateway.scrape import ReplicaStats

Reason = Literal[
    "round-robin", "least-load", "prefix-hit", "prefix-overloaded-fallback", "session", "adapter-affinity"
]

VNODES = 100
"""Points per endpoint on the hash ring: enough that each endpoint owns close to 1/N of the keys."""

STALE_AFTER = 3
"""A scrape older than this many scrape intervals is ignored (a replica that stopped answering /metrics
would otherwise keep the load it had when it went quiet)."""

BLOCK_CHARS = 256
"""Prefix granularity, in characters of prompt text (about 64 tokens of English). Engines cache in
blocks of 16 tokens; a coarser block costs fewer hashes per request and loses less than one block of
reuse per request."""

MAX_PREFIX_CHARS = 32768
"""Only the first this many characters are hashed (128 blocks): enough for long system prompts and
few-shot examples, and it bounds the cost per request (tens of µs)."""

INDEX_BLOCKS_PER_REPLICA = 8192
"""How many prefix blocks the `PrefixIndex` remembers per replica, least recently used first out:
about half a million tokens, the order of a large GPU's KV cache. Beyond that the replica has most
likely evicted the block itself."""


@dataclass(frozen=True)
class Endpoint:
    id: str
    """Stable name of the replica (the pod name): the ring hashes it, so it must survive restarts."""
    address: str
    """ip:port to connect to."""
    model: str
    """LLMModel name; the caller resolves served names and aliases to it."""
    ready: bool = True
    phase: str = ""
    """Where a replica that is not ready stands (scheduling, starting, loading), for cold-start progress."""
    adapters: tuple[tuple[str, int, float], ...] | None = None
    """LoRA adapters loaded at start, as (name, engine id, scale): llama-server pods (their
    annotation). None: the replica's adapters change at run time (vLLM) and its scrape says."""

    def serves_adapter(self, name: str, load: Load | None) -> bool:
        if self.adapters is not None:
            return any(a[0] == name for a in self.adapters)
        stats = load.scraped if load is not None else None
        return stats is not None and stats.loaded_adapters is not None and name in stats.loaded_adapters


@dataclass(frozen=True)
class Load:
    inflight: int = 0
    """Requests this gateway has open to the replica: exact and current."""
    scraped: ReplicaStats | None = None
    """The replica's last /metrics, which also counts other gateways' requests but lags."""
    scraped_at: float | None = None
    inflight_at_scrape: int = 0
    """`inflight` when the scrape arrived: the part of the scraped load that was our own."""


@dataclass(frozen=True)
class RouteRequest:
    model: str
    prefix: tuple[int, ...] = ()
    """The prompt's chained block hashes (`prefix_blocks`); empty = nothing to share, route by load."""
    session: str | None = None
    """Value of the model's session header, if any: pins the session to one replica."""
    adapter: str | None = None
    """A LoRA adapter the request names: only replicas that serve it are candidates, and of those the
    ones running it already are preferred (its weights are in their GPU slots: no swap)."""


@dataclass(frozen=True)
class Decision:
    endpoint_id: str
    reason: Reason


def load_score(load: Load, *, now: float, scrape_interval: float) -> float:
    """How busy a replica is, in requests:

        score = inflight + max(0, running + waiting - inflight_at_scrape)   (the last term if fresh)

    * `inflight`, our own open requests, is exact and moves the instant we route, so a burst between two
      scrapes spreads instead of piling onto the replica that looked idlest at the last scrape (KubeAI's
      least-load routes on this count alone).
    * The scraped `running + waiting` beyond what we had open when the scrape arrived is load our count
      cannot see: other gateway replicas' traffic, requests the engine still holds after we gave up on
      them. Our own requests are not counted twice: with a single gateway the term is about 0, and the
      score is the exact in-flight count.
    * No KV-cache term: measured with `kubeinfer bench routing` (docs/benchmarks.md), adding
      `kv_cache_usage x targetInflight` made least-load worse than round-robin, because a scrape's KV
      figure lags by up to an interval while whole bursts are routed on it. KV pressure that matters
      shows up as `waiting` (requests the engine cannot schedule) in the next scrape.
    * A scrape older than STALE_AFTER intervals counts as absent (a replica whose /metrics hangs must not
      keep its last, perhaps low, number), leaving `inflight` alone, which is never stale.
    """
    score = float(load.inflight)
    stats = load.scraped
    if (
        stats is not None
        and load.scraped_at is not None
        and now - load.scraped_at <= STALE_AFTER * scrape_interval
    ):
        score += max(0, stats.running + stats.waiting - load.inflight_at_scrape)
    return score


def choose(
    strategy: RoutingStrategy,
    endpoints: Iterable[Endpoint],
    loads: Mapping[str, Load],
    request: RouteRequest,
    *,
    now: float,
    scrape_interval: float,
    rr_counter: int,
    target_inflight: int,
    cached: Mapping[str, int] | None = None,
    load_bound: float = 1.25,
    min_bound: float = 0.5,
    exclude: frozenset[str] = frozenset(),
) -> Decision | None:
    """The replica for `request`, or None when no ready replica of its model is left to try.

    * round-robin: the `rr_counter`-th of the candidates sorted by id (the caller increments it).
    * least-load: the lowest `load_score`; ties are broken in round-robin order from `rr_counter`, so
      equally loaded replicas take turns (a fixed order would send a burst's ties to the same few).
    * prefix-aware: `cached` says, per replica, how many leading blocks of `request.prefix` it was sent
      recently (`PrefixIndex.match`). Of the replicas with score <= bound, where
      bound = max(load_bound * (mean score + 1), min_bound * target_inflight), the one with the longest
      cached prefix is taken (ties: the least loaded), so requests that share a prefix meet its KV
      cache. A prefix nobody holds goes to the least-loaded replica, which then holds it: new prefixes
      are placed by load, not by a hash, so a few groups cannot pile onto one replica, and requests that
      share nothing are routed exactly as by least-load. A hot prefix whose holders are all over the
      bound spills to the least-loaded replica ("prefix-overloaded-fallback"), which warms it too, and
      later requests pick the less loaded of the holders. The `+ 1` counts the request being placed
      and keeps an idle fleet from having a bound of 0; the floor `min_bound * target_inflight` keeps a
      lightly loaded fleet from spilling (with one hot prefix and seven idle replicas the mean alone
      would put the bound near 2, and the third concurrent request would pay a full prefill elsewhere
      although its holder batches many sequences at once for little extra per-token cost).
    * A request with a (non-empty) session, under any strategy, is pinned by consistent hashing with
      bounded loads (Mirrokni, Thorup, Zadimoghaddam 2018): the session's point on a hash ring names
      its replica, the first one from there within the same bound is taken. A conversation stays on the
      replica that holds its history's KV cache, and every gateway replica agrees on it without state.

    Candidates are the ready endpoints of `request.model` not in `exclude`; missing loads count as 0.
    """
    if scrape_interval <= 0 or target_inflight < 1 or load_bound <= 0 or min_bound < 0:
        raise ValueError("scrape_interval, load_bound must be > 0, min_bound >= 0, target_inflight >= 1")
    adapter = request.adapter
    candidates = sorted(
        {
            e.id
            for e in endpoints
            if e.ready
            and e.model == request.model
            and e.id not in exclude
            and (adapter is None or e.serves_adapter(adapter, loads.get(e.id)))
        }
    )
    if not candidates:
        return None
    n = len(candidates)
    if strategy == "round-robin" and not request.session:
        return Decision(candidates[rr_counter % n], "round-robin")

    empty = Load()
    scores = {
        i: load_score(loads.get(i, empty), now=now, scrape_interval=scrape_interval) for i in candidates
    }
    turn = {i: (k - rr_counter) % n for k, i in enumerate(candidates)}
    least = min(candidates, key=lambda i: (scores[i], turn[i]))
    bound = max(load_bound * (sum(scores.values()) / n + 1), min_bound * target_inflight)

    if adapter is not None and not request.session:
        running = [i for i in candidates if _running(loads.get(i), adapter) and scores[i] <= bound]
        if running:
            return Decision(min(running, key=lambda i: (scores[i], turn[i])), "adapter-affinity")
    if request.session:
        for i in ring(tuple(candidates)).walk(request.session):
            if scores[i] <= bound:
                return Decision(i, "session")
        return Decision(least, "prefix-overloaded-fallback")
    if strategy != "prefix-aware" or not request.prefix or not cached:
        return Decision(least, "least-load")
    holders = [i for i in candidates if cached.get(i, 0) > 0]
    if not holders:
        return Decision(least, "least-load")
    within = [i for i in holders if scores[i] <= bound]
    if not within:
        return Decision(least, "prefix-overloaded-fallback")
    return Decision(min(within, key=lambda i: (-cached[i], scores[i], turn[i])), "prefix-hit")


def _running(load: Load | None, adapter: str) -> bool:
    stats = load.scraped if load is not None else None
    return stats is not None and adapter in stats.running_adapters


class PrefixIndex:
    """Which prompt-prefix blocks each replica was sent recently: per replica, an LRU set of block
    hashes (at most `capacity`, oldest out), a model of what its KV cache holds.

    It only sees this gateway's own traffic and guesses evictions by count, as AIBrix's prefix-cache
    router guesses from its own table; a replica that evicted a block sooner only costs that request a
    prefill. Several gateway replicas each learn their own index, so a prefix may be placed once per
    gateway.
    """

    def __init__(self, capacity: int = INDEX_BLOCKS_PER_REPLICA) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = capacity
        self._blocks: dict[str, OrderedDict[int, None]] = {}

    def match(self, prefix: Sequence[int], candidates: Iterable[str]) -> dict[str, int]:
        """Per candidate holding at least the first block: how many leading blocks of `prefix` it holds."""
        out: dict[str, int] = {}
        for i in candidates:
            held = self._blocks.get(i)
            if not held:
                continue
            n = 0
            for block in prefix:
                if block not in held:
                    break
                n += 1
            if n:
                out[i] = n
        return out

    def record(self, prefix: Sequence[int], endpoint_id: str) -> None:
        """`endpoint_id` was sent a prompt starting with `prefix`: it now caches those blocks."""
        held = self._blocks.setdefault(endpoint_id, OrderedDict())
        for block in prefix:
            held[block] = None
            held.move_to_end(block)
        while len(held) > self.capacity:
            held.popitem(last=False)

    def retain(self, endpoint_ids: Collection[str]) -> None:
        """Forget replicas that are gone (their pods, and caches, no longer exist)."""
        for i in [i for i in self._blocks if i not in endpoint_ids]:
            del self._blocks[i]

    def held(self, endpoint_id: str) -> int:
        """How many blocks the index thinks `endpoint_id` caches."""
        return len(self._blocks.get(endpoint_id, ()))

    def __len__(self) -> int:
        return sum(len(held) for held in self._blocks.values())


class HashRing:
    """A consistent-hash ring: VNODES points per endpoint; a key belongs to the first point at or after
    its own hash. Removing an endpoint hands only its own keys to the next points; adding one takes
    about 1/N of every other endpoint's keys."""

    def __init__(self, ids: Sequence[str], vnodes: int = VNODES) -> None:
        points = sorted((_hash(f"{i}#{v}"), i) for i in ids for v in range(vnodes))
        self._hashes = [h for h, _ in points]
        self._ids = [i for _, i in points]
        self._distinct = len(set(ids))

    def owner(self, key: bytes | str) -> str:
        return next(self.walk(key))

    def walk(self, key: bytes | str) -> Iterator[str]:
        """Every endpoint once, in ring order from the key's point (its owner first)."""
        if not self._ids:
            return
        start = bisect.bisect_left(self._hashes, _hash(key))
        seen: set[str] = set()
        for n in range(len(self._ids)):
            i = self._ids[(start + n) % len(self._ids)]
            if i not in seen:
                seen.add(i)
                yield i
                if len(seen) == self._distinct:
                    return


@lru_cache(maxsize=256)
def ring(ids: tuple[str, ...]) -> HashRing:
    """The ring over these ids, built once per distinct set (the candidate set rarely changes)."""
    return HashRing(ids)


def _hash(key: bytes | str) -> int:
    data = key.encode() if isinstance(key, str) else key
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def prefix_blocks(
    body: Mapping[str, Any], block_chars: int = BLOCK_CHARS, max_chars: int = MAX_PREFIX_CHARS
) -> tuple[int, ...]:
    """The prompt of an OpenAI-style request body as chained hashes of `block_chars`-character blocks:
    block k's hash covers blocks 0..k, so two prompts share their first m hashes exactly when they share
    their first m blocks of text (as an engine's prefix cache hashes token blocks). A trailing partial
    block is left out, as engines do not cache it either; at most `max_chars` are hashed.

    The hashes are Python's `hash`, salted per process: the index lives in one gateway process.
    """
    text = prompt_text(body, max_chars)
    out: list[int] = []
    h = 0
    for start in range(0, len(text) - block_chars + 1, block_chars):
        h = hash((h, text[start : start + block_chars]))
        out.append(h)
    return tuple(out)


def prompt_text(body: Mapping[str, Any], max_chars: int = MAX_PREFIX_CHARS) -> str:
    """The start of the prompt of an OpenAI-style request body, as text to hash for prefix routing.

    Chat (`messages`): each message's role and content, in order; text parts as text, anything else (an
    image, audio) as a short hash of the part, so the same image gives the same text without hashing
    megabytes of base64. Completions (`prompt`): the prompt, the first one of a list (token-id prompts as
    their ids). Cut to `max_chars`.
    """
    out: list[str] = []
    size = 0
    for piece in _pieces(body):
        out.append(piece)
        size += len(piece)
        if size >= max_chars:  # stop early: later messages (and their images) cannot matter
            break
    return "".join(out)[:max_chars]


def _pieces(body: Mapping[str, Any]) -> Iterator[str]:
    messages = body.get("messages")
    if isinstance(messages, list):
        for message in messages:
            if not isinstance(message, dict):
                continue
            yield f"<|{message.get('role', '')}|>"
            yield from _content(message.get("content"))
            yield "\n"
        return
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        prompt = prompt[0]  # a batch of prompts: route on the first
    if isinstance(prompt, str):
        yield prompt
    elif isinstance(prompt, list):  # one prompt as token ids
        yield " ".join(str(t) for t in prompt)


def _content(content: Any) -> Iterator[str]:
    if isinstance(content, str):
        yield content
    elif isinstance(content, list):
        for part in content:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                yield part["text"]
            elif isinstance(part, str):
                yield part
            elif part is not None:
                # An image or audio part: its URL or inline data, reduced to a digest.
                blob = json.dumps(part, sort_keys=True, separators=(",", ":")).encode()
                kind = part.get("type", "part") if isinstance(part, dict) else "part"
                yield f"<{kind}:{hashlib.blake2b(blob, digest_size=8).hexdigest()}>"
