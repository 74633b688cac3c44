"""Pick a replica for one request: pure functions of the endpoints, their loads and the request.

The gateway keeps the state (in-flight counts, scrapes, the round-robin counter) and calls `choose` per
attempt; a retry passes the replicas it already tried in `exclude`.
"""

from __future__ import annotations

import bisect
import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

from kubeinfer.api.v1alpha1 import RoutingStrategy
from kubeinfer.gateway.scrape import ReplicaStats

Reason = Literal["round-robin", "least-load", "prefix-hit", "prefix-overloaded-fallback", "session"]

VNODES = 100
"""Points per endpoint on the hash ring: enough that each endpoint owns close to 1/N of the keys."""

STALE_AFTER = 3
"""A scrape older than this many scrape intervals is ignored (a replica that stopped answering /metrics
would otherwise keep the load it had when it went quiet)."""


@dataclass(frozen=True)
class Endpoint:
    id: str
    """Stable name of the replica (the pod name): the ring hashes it, so it must survive restarts."""
    address: str
    """ip:port to connect to."""
    model: str
    """LLMModel name; the caller resolves served names and aliases to it."""
    ready: bool = True


@dataclass(frozen=True)
class Load:
    inflight: int = 0
    """Requests this gateway has open to the replica: exact and current."""
    scraped: ReplicaStats | None = None
    """The replica's last /metrics, which also counts other gateways' requests but lags."""
    scraped_at: float | None = None


@dataclass(frozen=True)
class RouteRequest:
    model: str
    prefix_key: bytes | str = ""
    """The prompt prefix to hash (see `prefix_key`); empty = nothing to share, route by load."""
    session: str | None = None
    """Value of the model's session header, if any: pins the session to one replica."""


@dataclass(frozen=True)
class Decision:
    endpoint_id: str
    reason: Reason


def load_score(load: Load, *, now: float, scrape_interval: float, target_inflight: int) -> float:
    """How busy a replica is, in requests:

        score = inflight + (running + waiting + kv_cache_usage * target_inflight   if the scrape is fresh)

    * `inflight`, our own open requests, is exact and moves the instant we route, so a burst between two
      scrapes spreads instead of piling onto the replica that looked idlest at the last scrape (KubeAI's
      least-load routes on this count alone).
    * `running + waiting` from the engine adds what our count cannot see: other gateway replicas' traffic
      and requests the engine still holds after we gave up on them. Once a scrape has seen one of our
      requests it counts twice; the bias is one per open request on every replica alike, so it does not
      favour any, and removing it would need to know which of ours the scrape had seen.
    * `kv_cache_usage * target_inflight` is memory pressure, as in llm-d's KV-cache-utilization scorer: a
      few long-context requests can fill the KV cache so that the next one waits or preempts, although
      the request count looks low. A full cache weighs as much as a full batch of `target_inflight`.
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
        score += stats.running + stats.waiting
        if stats.kv_cache_usage is not None:
            score += stats.kv_cache_usage * target_inflight
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
    load_bound: float = 1.25,
    min_bound: float = 0.5,
    exclude: frozenset[str] = frozenset(),
) -> Decision | None:
    """The replica for `request`, or None when no ready replica of its model is left to try.

    * round-robin: the `rr_counter`-th of the candidates sorted by id (the caller increments it).
    * least-load: the lowest `load_score`; ties go to the smallest id, so equal replicas are picked in
      a fixed order rather than by dict order.
    * prefix-aware: consistent hashing with bounded loads (Mirrokni, Thorup, Zadimoghaddam 2018). The
      prefix key's point on the ring names an owner, so requests sharing a prefix meet its KV cache
      there; walking on from that point, the first replica with
      score <= max(load_bound * (mean score + 1), min_bound * target_inflight) is taken, so a hot
      prefix spills to the next replica on the ring (which then warms the same prefix) instead of
      queueing behind one. The `+ 1` counts the request being placed and keeps an idle fleet from
      having a bound of 0. The floor `min_bound * target_inflight` keeps a lightly loaded fleet from
      spilling: with one hot prefix and seven idle replicas the mean alone would put the bound near 2,
      so the third concurrent request would pay a full prefill elsewhere although its owner batches
      many sequences at once for little extra per-token cost. Since the least-loaded replica is never
      above the mean, a `load_bound` >= 1 always finds one; the least-load fallback
      ("prefix-overloaded-fallback") can only happen with a bound below 1.
    * A request with a (non-empty) session, under any strategy, hashes the session instead, with the
      same bound: a conversation stays on the replica that holds its history's KV cache.

    Candidates are the ready endpoints of `request.model` not in `exclude`; missing loads count as 0.
    """
    if scrape_interval <= 0 or target_inflight < 1 or load_bound <= 0 or min_bound < 0:
        raise ValueError("scrape_interval, load_bound must be > 0, min_bound >= 0, target_inflight >= 1")
    candidates = sorted(
        {e.id for e in endpoints if e.ready and e.model == request.model and e.id not in exclude}
    )
    if not candidates:
        return None
    if strategy == "round-robin" and not request.session:
        return Decision(candidates[rr_counter % len(candidates)], "round-robin")

    empty = Load()
    scores = {
        i: load_score(
            loads.get(i, empty), now=now, scrape_interval=scrape_interval, target_inflight=target_inflight
        )
        for i in candidates
    }
    least = min(candidates, key=lambda i: (scores[i], i))

    if request.session:
        key: bytes | str = request.session
        reason: Reason = "session"
    elif strategy == "prefix-aware" and request.prefix_key:
        key, reason = request.prefix_key, "prefix-hit"
    else:
        return Decision(least, "least-load")

    bound = max(load_bound * (sum(scores.values()) / len(scores) + 1), min_bound * target_inflight)
    for i in ring(tuple(candidates)).walk(key):
        if scores[i] <= bound:
            return Decision(i, reason)
    return Decision(least, "prefix-overloaded-fallback")


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


def prefix_key(body: Mapping[str, Any], max_chars: int = 2048) -> str:
    """The start of the prompt of an OpenAI-style request body, for prefix-aware routing.

    Chat (`messages`): each message's role and content, in order; text parts as text, anything else (an
    image, audio) as a short hash of the part, so the same image gives the same key without hashing
    megabytes of base64 into the ring. Completions (`prompt`): the prompt, the first one of a list
    (token-id prompts as their ids). Cut to `max_chars`: requests that agree on their first `max_chars`
    characters, e.g. a long shared system prompt, get the same key and land on the same replica, which
    has that prefix's KV cache; a larger `max_chars` separates more requests that share a shorter
    prefix, a smaller one groups more.
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
