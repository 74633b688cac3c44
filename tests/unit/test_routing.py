"""Replica choice: least-load, round-robin, prefix-aware (a prefix index with bounded load), sessions."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from kubeinfer.gateway.routing import (
    Decision,
    Endpoint,
    HashRing,
    Load,
    PrefixIndex,
    RouteRequest,
    choose,
    load_score,
    prefix_blocks,
    prompt_text,
)
from kubeinfer.gateway.scrape import ReplicaStats, parse_metrics
from tests.cases import FIXTURES

NOW = 10_000.0
INTERVAL = 5.0
TARGET = 8
VLLM_LOAD = parse_metrics(
    (FIXTURES / "vllm-0.32.0/metrics_under_load.txt").read_text()
)  # 8 running, 6 waiting
LLAMA_LOAD = parse_metrics((FIXTURES / "llama-server/metrics_under_load.txt").read_text())  # 4 + 4, no KV


def eps(n: int, model: str = "m") -> list[Endpoint]:
    return [Endpoint(f"pod-{i}", f"10.0.0.{i}:8000", model) for i in range(n)]


def pick(strategy, endpoints, loads=None, request=None, **kw) -> Decision | None:
    kw = {"now": NOW, "scrape_interval": INTERVAL, "rr_counter": 0, "target_inflight": TARGET} | kw
    return choose(strategy, endpoints, loads or {}, request or RouteRequest("m"), **kw)


def stats(running: int = 0, waiting: int = 0, kv: float | None = None) -> ReplicaStats:
    return ReplicaStats(engine="vllm", running=running, waiting=waiting, kv_cache_usage=kv)


def fresh(s: ReplicaStats, inflight: int = 0, age: float = 1.0) -> Load:
    return Load(inflight=inflight, scraped=s, scraped_at=NOW - age)


# load_score


def score(load: Load) -> float:
    return load_score(load, now=NOW, scrape_interval=INTERVAL)


def test_score_inflight_only():
    assert score(Load(inflight=3)) == 3
    assert score(Load()) == 0


def test_score_fresh_vllm_capture_adds_what_we_did_not_send():
    # The engine runs 8 and queues 6; we had 2 open when the scrape came and 3 now.
    assert score(Load(3, VLLM_LOAD, NOW - 1, inflight_at_scrape=2)) == 3 + (8 + 6 - 2)


def test_score_does_not_count_our_own_requests_twice():
    # A single gateway: everything the engine saw was ours.
    assert score(Load(14, VLLM_LOAD, NOW - 1, inflight_at_scrape=14)) == 14
    # The engine saw fewer than we had open (requests on their way): never below our own count.
    assert score(Load(20, VLLM_LOAD, NOW - 1, inflight_at_scrape=20)) == 20


def test_score_llama_capture():
    assert score(fresh(LLAMA_LOAD, inflight=1)) == 1 + 4 + 4


def test_score_ignores_kv_usage():
    # Measured to make least-load worse than round-robin (docs/benchmarks.md): the figure lags.
    assert score(fresh(stats(running=1, kv=1.0))) == score(fresh(stats(running=1, kv=0.0))) == 1


def test_score_stale_scrape_falls_back_to_own_inflight():
    assert score(fresh(VLLM_LOAD, inflight=2, age=3 * INTERVAL + 0.01)) == 2
    assert score(fresh(VLLM_LOAD, inflight=2, age=3 * INTERVAL)) == 16  # exactly 3 intervals: still fresh
    assert score(Load(inflight=2, scraped=VLLM_LOAD, scraped_at=None)) == 2


# candidates


def test_no_candidates():
    assert pick("least-load", []) is None
    assert pick("least-load", eps(2, model="other")) is None
    assert pick("least-load", [Endpoint("a", "1.2.3.4:8000", "m", ready=False)]) is None
    assert pick("least-load", eps(2), exclude=frozenset({"pod-0", "pod-1"})) is None


@pytest.mark.parametrize("strategy", ["least-load", "round-robin", "prefix-aware"])
def test_only_ready_endpoints_of_the_model_not_excluded(strategy):
    endpoints = [
        Endpoint("a-not-ready", "10.0.0.1:8000", "m", ready=False),
        Endpoint("b-other-model", "10.0.0.2:8000", "other"),
        Endpoint("c-tried", "10.0.0.3:8000", "m"),
        Endpoint("d-ok", "10.0.0.4:8000", "m"),
    ]
    for n in range(20):
        req = RouteRequest("m", prefix=(n, n + 1))
        cached = {"c-tried": 2, "a-not-ready": 2, "b-other-model": 2}
        d = pick(
            strategy, endpoints, request=req, rr_counter=n, exclude=frozenset({"c-tried"}), cached=cached
        )
        assert d is not None and d.endpoint_id == "d-ok"


def test_invalid_arguments():
    with pytest.raises(ValueError):
        pick("least-load", eps(2), scrape_interval=0)
    with pytest.raises(ValueError):
        pick("least-load", eps(2), target_inflight=0)
    with pytest.raises(ValueError):
        pick("prefix-aware", eps(2), load_bound=0)


# least-load


def test_least_load_picks_lowest_inflight():
    loads = {"pod-0": Load(inflight=3), "pod-1": Load(inflight=1), "pod-2": Load(inflight=2)}
    assert pick("least-load", eps(3), loads) == Decision("pod-1", "least-load")


def test_least_load_missing_load_counts_as_idle():
    loads = {"pod-0": Load(inflight=1), "pod-1": Load(inflight=1)}
    assert pick("least-load", eps(3), loads) == Decision("pod-2", "least-load")


def test_least_load_sees_other_gateways_through_the_scrape():
    # pod-0 is idle for us but the engine runs 8 and queues 6 (other gateway replicas' traffic).
    loads = {"pod-0": fresh(VLLM_LOAD), "pod-1": Load(inflight=5)}
    assert pick("least-load", eps(2), loads).endpoint_id == "pod-1"


def test_least_load_ignores_a_stale_scrape():
    loads = {"pod-0": fresh(VLLM_LOAD, age=3 * INTERVAL + 1), "pod-1": Load(inflight=5)}
    assert pick("least-load", eps(2), loads).endpoint_id == "pod-0"


def test_least_load_ties_take_turns_whatever_the_order():
    endpoints = eps(5)
    loads = {e.id: Load(inflight=2) for e in endpoints} | {
        "pod-3": Load(inflight=1),
        "pod-1": Load(inflight=1),
    }
    rng = random.Random(7)
    got = []
    for n in range(20):
        rng.shuffle(endpoints)
        shuffled_loads = dict(rng.sample(sorted(loads.items()), len(loads)))
        got.append(pick("least-load", endpoints, shuffled_loads, rr_counter=n).endpoint_id)
    # Only the two least loaded, in turns decided by the counter, not by the shuffled order.
    # The first at or after position rr_counter % 5 in id order.
    assert got == ["pod-1", "pod-1", "pod-3", "pod-3", "pod-1"] * 4


def test_least_load_equal_replicas_is_round_robin():
    # Equal requests on equal replicas: the in-flight counts stay level, ties rotate.
    endpoints = eps(4)
    inflight = Counter[str]()
    got = []
    for n in range(12):
        d = pick("least-load", endpoints, {i: Load(inflight=c) for i, c in inflight.items()}, rr_counter=n)
        got.append(d.endpoint_id)
        inflight[d.endpoint_id] += 1
        if n % 4 == 3:
            inflight.clear()  # the batch ends
    assert sorted(Counter(got).values()) == [3, 3, 3, 3]


def test_least_load_ignores_the_prefix():
    loads = {"pod-0": Load(inflight=1)}
    for n in range(20):
        d = pick("least-load", eps(2), loads, RouteRequest("m", prefix=(n,)), cached={"pod-0": 1})
        assert d == Decision("pod-1", "least-load")


def test_least_load_spreads_a_burst_between_scrapes():
    # Every scrape says idle; our own counts must spread the burst evenly.
    endpoints = eps(4)
    inflight = Counter[str]()
    for _ in range(40):
        loads = {e.id: fresh(stats(), inflight=inflight[e.id]) for e in endpoints}
        inflight[pick("least-load", endpoints, loads).endpoint_id] += 1
    assert sorted(inflight.values()) == [10, 10, 10, 10]


# round-robin


def test_round_robin_is_fair_and_ordered():
    endpoints = eps(3)
    got = [pick("round-robin", endpoints, rr_counter=n).endpoint_id for n in range(9)]
    assert got == ["pod-0", "pod-1", "pod-2"] * 3
    reversed_got = [pick("round-robin", endpoints[::-1], rr_counter=n).endpoint_id for n in range(9)]
    assert reversed_got == got


def test_round_robin_ignores_load():
    loads = {"pod-0": Load(inflight=100)}
    d = pick("round-robin", eps(2), loads, rr_counter=4)
    assert d == Decision("pod-0", "round-robin")


def test_round_robin_over_the_remaining_candidates():
    counts = Counter(
        pick("round-robin", eps(4), rr_counter=n, exclude=frozenset({"pod-2"})).endpoint_id
        for n in range(300)
    )
    assert counts == {"pod-0": 100, "pod-1": 100, "pod-3": 100}


# the hash ring

KEYS = [f"request-{k}" for k in range(10_000)]


def owners(ring: HashRing) -> list[str]:
    return [ring.owner(k) for k in KEYS]


def test_ring_spreads_keys_evenly():
    counts = Counter(owners(HashRing([f"pod-{i}" for i in range(8)])))
    assert len(counts) == 8
    assert all(0.7 * 1250 <= c <= 1.3 * 1250 for c in counts.values()), counts


def test_ring_is_stable_across_processes():
    # Pinned: a process-salted hash (Python's hash()) would break routing across gateway replicas.
    assert list(HashRing(["a", "b", "c"]).walk("hello")) == ["c", "b", "a"]
    assert HashRing([f"pod-{i}" for i in range(8)]).owner("system prompt") == "pod-0"


def test_ring_walk_visits_each_endpoint_once_owner_first():
    ring = HashRing([f"pod-{i}" for i in range(8)])
    for key in KEYS[:200]:
        walk = list(ring.walk(key))
        assert walk[0] == ring.owner(key)
        assert sorted(walk) == sorted(f"pod-{i}" for i in range(8))


def test_ring_str_and_bytes_keys_agree():
    ring = HashRing(["a", "b", "c", "d"])
    assert all(ring.owner(k) == ring.owner(k.encode()) for k in KEYS[:500])


@pytest.mark.parametrize("removed", range(8))
def test_removing_one_of_eight_moves_only_its_keys(removed):
    ids = [f"pod-{i}" for i in range(8)]
    before = owners(HashRing(ids))
    after = owners(HashRing([i for i in ids if i != f"pod-{removed}"]))
    moved = [b for b, a in zip(before, after, strict=True) if b != a]
    # Exactly the removed endpoint's keys move, and they are about 1/8 of all.
    assert set(moved) == {f"pod-{removed}"}
    assert len(moved) == before.count(f"pod-{removed}")
    assert len(moved) / len(KEYS) <= 1 / 8 + 0.025


def test_adding_a_ninth_moves_only_keys_to_it():
    ids = [f"pod-{i}" for i in range(8)]
    before = owners(HashRing(ids))
    after = owners(HashRing([*ids, "pod-8"]))
    moved = [a for b, a in zip(before, after, strict=True) if b != a]
    assert set(moved) == {"pod-8"}
    assert 1 / 9 - 0.025 <= len(moved) / len(KEYS) <= 1 / 9 + 0.025


# prefix-aware


def prefix(blocks: tuple[int, ...] = (1, 2, 3), session: str | None = None) -> RouteRequest:
    return RouteRequest("m", prefix=blocks, session=session)


def test_prefix_aware_goes_to_the_replica_holding_the_longest_prefix():
    cached = {"pod-1": 2, "pod-2": 3, "pod-3": 1}
    d = pick("prefix-aware", eps(4), request=prefix(), cached=cached)
    assert d == Decision("pod-2", "prefix-hit")
    assert pick("prefix-aware", eps(4)[::-1], request=prefix(), cached=cached) == d


def test_prefix_aware_equal_holders_least_loaded_first():
    loads = {"pod-1": Load(inflight=3), "pod-2": Load(inflight=1)}
    d = pick("prefix-aware", eps(4), loads, prefix(), cached={"pod-1": 3, "pod-2": 3})
    assert d == Decision("pod-2", "prefix-hit")


def test_prefix_aware_a_holder_beats_an_idle_replica_within_the_bound():
    # 4 + 0 + 0 + 0: mean 1, bound max(1.25 x 2, 0.5 x 8) = 4: the holder at 4 still qualifies.
    loads = {"pod-0": Load(inflight=4)}
    assert pick("prefix-aware", eps(4), loads, prefix(), cached={"pod-0": 1}) == Decision(
        "pod-0", "prefix-hit"
    )


def test_prefix_aware_new_prefix_goes_to_the_least_loaded():
    loads = {"pod-0": Load(inflight=2), "pod-1": Load(inflight=1), "pod-3": Load(inflight=1)}
    assert pick("prefix-aware", eps(4), loads, prefix(), cached={}) == Decision("pod-2", "least-load")
    assert pick("prefix-aware", eps(4), loads, prefix(), cached=None) == Decision("pod-2", "least-load")


def test_prefix_aware_skips_an_overloaded_holder():
    endpoints = eps(4)
    # holder at 10, others idle: mean 2.5, bound max(1.25 x 3.5, 4) = 4.375.
    loads = {"pod-0": Load(inflight=10), "pod-1": Load(inflight=1)}
    d = pick("prefix-aware", endpoints, loads, prefix(), cached={"pod-0": 3})
    assert d == Decision("pod-2", "prefix-overloaded-fallback")
    # A second holder within the bound wins over the least-loaded non-holder.
    d = pick("prefix-aware", endpoints, loads, prefix(), cached={"pod-0": 3, "pod-1": 2})
    assert d == Decision("pod-1", "prefix-hit")


def test_prefix_aware_bound_is_inclusive():
    # load_bound 2: bound = 2 x (x/4 + 1) = x/2 + 2, equal to the holder's load x at x = 4.
    at = pick(
        "prefix-aware", eps(4), {"pod-0": Load(inflight=4)}, prefix(), load_bound=2.0, cached={"pod-0": 1}
    )
    over = pick(
        "prefix-aware", eps(4), {"pod-0": Load(inflight=5)}, prefix(), load_bound=2.0, cached={"pod-0": 1}
    )
    assert at == Decision("pod-0", "prefix-hit")
    assert over == Decision("pod-1", "prefix-overloaded-fallback")


def test_prefix_aware_counts_the_scraped_load_of_others():
    # 8 running + 6 waiting seen by the engine, none of it ours: 14 > max(1.25 x (3.5 + 1), 4).
    busy = pick("prefix-aware", eps(4), {"pod-0": fresh(VLLM_LOAD)}, prefix(), cached={"pod-0": 3})
    assert busy == Decision("pod-1", "prefix-overloaded-fallback")
    stale = pick("prefix-aware", eps(4), {"pod-0": fresh(VLLM_LOAD, age=60)}, prefix(), cached={"pod-0": 3})
    assert stale == Decision("pod-0", "prefix-hit")


def route_all(requests: list[tuple[int, ...]], n: int, concurrency: int, **kw) -> list[str]:
    """Route `requests` in order through choose + PrefixIndex as the gateway does, `concurrency` open at
    once (the oldest ends when another arrives)."""
    endpoints, index = eps(n), PrefixIndex()
    inflight, open_, got = Counter[str](), [], []
    for k, blocks in enumerate(requests):
        if len(open_) == concurrency:
            inflight[open_.pop(0)] -= 1
        loads = {i: Load(inflight=c) for i, c in inflight.items()}
        cached = index.match(blocks, [e.id for e in endpoints])
        d = pick(
            "prefix-aware",
            endpoints,
            loads,
            RouteRequest("m", prefix=blocks),
            cached=cached,
            rr_counter=k,
            **kw,
        )
        index.record(blocks, d.endpoint_id)
        inflight[d.endpoint_id] += 1
        open_.append(d.endpoint_id)
        got.append(d.endpoint_id)
    return got


def test_prefix_aware_groups_stay_home_and_every_replica_gets_some():
    # 32 groups of a shared prefix plus a question, in random order, 8 replicas, 64 in flight and the
    # gateway's default targetInflight of 32: the shape of `kubeinfer bench routing`'s shared-prefix.
    rng = random.Random(1)
    groups = [rng.randrange(32) for _ in range(800)]
    requests = [(1000 + g, 2000 + g, 3000 + g, rng.randrange(10**9)) for g in groups]
    got = route_all(requests, 8, 64, target_inflight=32)
    by_group = {g: Counter(r for gg, r in zip(groups, got, strict=True) if gg == g) for g in set(groups)}
    homes = {g: c.most_common(1)[0][0] for g, c in by_group.items()}
    off_home = sum(r != homes[g] for g, r in zip(groups, got, strict=True)) / len(got)
    assert off_home < 0.05
    # New groups are placed by load: no replica is left without one (a hash ring left one idle).
    per_replica = Counter(homes.values())
    assert len(per_replica) == 8 and max(per_replica.values()) <= 6, per_replica


def test_prefix_aware_without_sharing_is_least_load():
    rng = random.Random(2)
    requests = [tuple(rng.randrange(10**9) for _ in range(4)) for _ in range(400)]
    got = route_all(requests, 8, 64)
    assert sorted(Counter(got).values()) == [50] * 8


def test_prefix_aware_hot_prefix_spreads_to_more_holders_within_the_bound():
    got = route_all([(7, 8, 9)] * 200, 4, 40)
    counts = Counter(got)
    assert len(counts) >= 2
    mean = 40 / 4
    # No replica ever above the bound; the first holder got the most.
    assert max(counts.values()) / 200 * 40 <= 1.25 * (mean + 1) + 1
    assert counts[got[0]] == max(counts.values())


def test_without_a_bound_a_hot_prefix_would_pile_up():
    assert set(route_all([(7, 8, 9)] * 200, 4, 40, load_bound=1000.0)) == {"pod-0"}


def test_prefix_aware_without_a_prefix_routes_by_load():
    loads = {"pod-0": Load(inflight=1), "pod-2": Load(inflight=1)}
    d = pick("prefix-aware", eps(3), loads, prefix(()), cached={"pod-0": 5})
    assert d == Decision("pod-1", "least-load")


def test_prefix_aware_single_endpoint():
    d = pick("prefix-aware", eps(1), {"pod-0": Load(inflight=50)}, prefix(), cached={"pod-0": 1})
    assert d == Decision("pod-0", "prefix-hit")


# the prefix index


def test_index_matches_leading_blocks_only():
    index = PrefixIndex()
    index.record((1, 2, 3), "a")
    index.record((1, 2, 9), "b")
    assert index.match((1, 2, 3, 4), ["a", "b", "c"]) == {"a": 3, "b": 2}
    assert index.match((5, 2, 3), ["a", "b"]) == {}
    assert index.match((1, 2, 3), ["b"]) == {"b": 2}  # only the candidates asked about


def test_index_evicts_the_least_recently_sent_blocks_per_replica():
    index = PrefixIndex(capacity=4)
    index.record((1, 2), "a")
    index.record((3, 4), "a")
    index.record((1, 2), "a")  # used again: now the newest
    index.record((5, 6), "a")  # evicts 3, 4
    assert index.match((1, 2), ["a"]) == {"a": 2}
    assert index.match((3, 4), ["a"]) == {}
    assert len(index) == 4


def test_index_retain_forgets_replicas_that_are_gone():
    index = PrefixIndex()
    index.record((1,), "a")
    index.record((1,), "b")
    index.retain({"b"})
    assert index.match((1,), ["a", "b"]) == {"b": 1}
    with pytest.raises(ValueError):
        PrefixIndex(capacity=0)


# sessions


@pytest.mark.parametrize("strategy", ["least-load", "round-robin", "prefix-aware"])
def test_session_pins_to_its_ring_owner_under_any_strategy(strategy):
    endpoints = eps(8)
    ring = HashRing([e.id for e in endpoints])
    for n in range(100):
        session = f"user-{n}"
        # The prompt changes every turn; the session does not.
        d = pick(
            strategy, endpoints, request=prefix((n,), session=session), rr_counter=n, cached={"pod-0": 1}
        )
        assert d == Decision(ring.owner(session), "session")


def test_session_spills_from_an_overloaded_owner():
    endpoints = eps(4)
    first, second = list(HashRing([e.id for e in endpoints]).walk("user-1"))[:2]
    d = pick("least-load", endpoints, {first: Load(inflight=20)}, prefix(session="user-1"))
    assert d == Decision(second, "session")


def test_empty_session_is_no_session():
    assert pick("round-robin", eps(3), request=prefix(session=""), rr_counter=1) == Decision(
        "pod-1", "round-robin"
    )


# prompt_text and prefix_blocks


def chat(*messages: tuple[str, object]) -> dict[str, object]:
    return {"model": "m", "messages": [{"role": r, "content": c} for r, c in messages]}


SYSTEM = "You are a careful assistant. " * 100  # 2900 characters


def test_prompt_text_chat_roles_and_order():
    text = prompt_text(chat(("system", "be brief"), ("user", "hi")))
    assert "system" in text and "be brief" in text and "user" in text and "hi" in text
    assert text.index("be brief") < text.index("hi")
    assert prompt_text(chat(("user", "be brief"), ("system", "hi"))) != text  # roles count
    assert prompt_text(chat(("system", "hi"), ("user", "be brief"))) != text  # order counts


def test_blocks_shared_system_prompt_shares_its_blocks():
    a = prefix_blocks(chat(("system", SYSTEM), ("user", "What is 2+2? " * 40)))
    b = prefix_blocks(chat(("system", SYSTEM), ("user", "Write a poem. " * 40)))
    shared = len(prompt_text(chat(("system", SYSTEM)))) // 256  # whole blocks of the system turn
    assert shared == 11
    assert a[:shared] == b[:shared] and a[shared:] != b[shared:]


def test_blocks_are_chained():
    # The same text at another position is another block: a hash covers everything before it too.
    one = prefix_blocks({"prompt": "x" * 256 + "y" * 256})
    two = prefix_blocks({"prompt": "y" * 256 + "y" * 256})
    assert len(one) == len(two) == 2 and one[1] != two[1]
    assert prefix_blocks({"prompt": "y" * 512}) == two


def test_blocks_short_prompt_and_partial_block():
    assert prefix_blocks({"prompt": "x" * 255}) == ()
    assert len(prefix_blocks({"prompt": "x" * 767})) == 2
    assert len(prefix_blocks({"prompt": "x" * 100}, block_chars=10)) == 10


def test_blocks_max_chars():
    assert len(prefix_blocks({"prompt": "x" * 100_000})) == 32768 // 256
    assert len(prompt_text(chat(("user", "x" * 100)), max_chars=10)) == 10
    assert prompt_text(chat(("user", "ab")), max_chars=10000).count("ab") == 1


def test_prompt_text_multimodal_text_parts_and_image_urls():
    def body(url: str, text: str = "describe") -> dict[str, object]:
        parts = [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}}]
        return chat(("system", "vision"), ("user", parts))

    text = prompt_text(body("https://example.com/cat.png"))
    assert "describe" in text and "image_url" in text
    assert text == prompt_text(body("https://example.com/cat.png"))
    assert text != prompt_text(body("https://example.com/dog.png"))
    assert text != prompt_text(body("https://example.com/cat.png", text="caption"))


def test_prompt_text_inline_image_is_a_short_digest():
    data = "data:image/png;base64," + "iVBORw0KGgo" * 10_000
    parts = [{"type": "image_url", "image_url": {"url": data}}, {"type": "text", "text": "what is this?"}]
    text = prompt_text(chat(("user", parts)))
    assert "iVBOR" not in text and len(text) < 100
    assert text.endswith("what is this?\n")
    other = [
        {"type": "image_url", "image_url": {"url": data + "AA"}},
        {"type": "text", "text": "what is this?"},
    ]
    assert prompt_text(chat(("user", other))) != text


def test_prompt_text_stops_at_max_chars():
    # Nothing after the cut is looked at: this part could not even be hashed.
    unhashable = [{"type": "image_url", "image_url": {"url": object()}}]
    body = chat(("system", SYSTEM), ("user", unhashable))
    assert len(prompt_text(body, max_chars=2048)) == 2048


def test_prompt_text_completions():
    assert prompt_text({"model": "m", "prompt": "Once upon a time"}) == "Once upon a time"
    assert prompt_text({"prompt": ["first prompt", "second prompt"]}) == "first prompt"
    assert prompt_text({"prompt": [1, 2, 3]}) == prompt_text({"prompt": [[1, 2, 3], [4]]}) != ""
    assert prompt_text({"prompt": [1, 2, 3]}) != prompt_text({"prompt": [1, 2, 4]})
