"""Replica choice: least-load, round-robin, prefix-aware (bounded-load consistent hashing), sessions."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from kubeinfer.gateway.routing import (
    Decision,
    Endpoint,
    HashRing,
    Load,
    RouteRequest,
    choose,
    load_score,
    prefix_key,
    ring,
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
    return load_score(load, now=NOW, scrape_interval=INTERVAL, target_inflight=TARGET)


def test_score_inflight_only():
    assert score(Load(inflight=3)) == 3
    assert score(Load()) == 0


def test_score_fresh_vllm_capture():
    # 2 own + 8 running + 6 waiting + KV pressure 0.0078 x 8.
    assert score(fresh(VLLM_LOAD, inflight=2)) == pytest.approx(2 + 8 + 6 + 0.007814407814407787 * TARGET)


def test_score_llama_capture_has_no_kv_term():
    assert score(fresh(LLAMA_LOAD, inflight=1)) == 1 + 4 + 4


def test_score_kv_pressure_weighs_a_full_cache_as_a_full_batch():
    assert score(fresh(stats(running=1, kv=1.0))) == 1 + TARGET
    assert score(fresh(stats(running=1, kv=0.5))) == 1 + TARGET / 2


def test_score_stale_scrape_falls_back_to_own_inflight():
    assert score(fresh(VLLM_LOAD, inflight=2, age=3 * INTERVAL + 0.01)) == 2
    assert score(fresh(VLLM_LOAD, inflight=2, age=3 * INTERVAL)) > 14  # exactly 3 intervals: still fresh
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
        req = RouteRequest("m", prefix_key=f"prompt {n}")
        d = pick(strategy, endpoints, request=req, rr_counter=n, exclude=frozenset({"c-tried"}))
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


def test_least_load_avoids_kv_pressure():
    loads = {"pod-0": fresh(stats(running=2, kv=0.95)), "pod-1": fresh(stats(running=4, kv=0.1))}
    # pod-0: 2 + 7.6 = 9.6; pod-1: 4 + 0.8 = 4.8.
    assert pick("least-load", eps(2), loads).endpoint_id == "pod-1"


def test_least_load_ties_go_to_the_smallest_id_whatever_the_order():
    endpoints = eps(5)
    loads = {e.id: Load(inflight=2) for e in endpoints} | {
        "pod-3": Load(inflight=1),
        "pod-1": Load(inflight=1),
    }
    rng = random.Random(7)
    for _ in range(20):
        rng.shuffle(endpoints)
        shuffled_loads = dict(rng.sample(sorted(loads.items()), len(loads)))
        assert pick("least-load", endpoints, shuffled_loads) == Decision("pod-1", "least-load")


def test_least_load_ignores_the_prefix():
    loads = {"pod-0": Load(inflight=1)}
    for n in range(20):
        d = pick("least-load", eps(2), loads, RouteRequest("m", prefix_key=f"p{n}"))
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


def prefix(key: str | bytes, session: str | None = None) -> RouteRequest:
    return RouteRequest("m", prefix_key=key, session=session)


def test_prefix_aware_follows_the_ring_and_is_deterministic():
    endpoints = eps(8)
    ring = HashRing([e.id for e in endpoints])
    for key in KEYS[:500]:
        d = pick("prefix-aware", endpoints, request=prefix(key))
        assert d == Decision(ring.owner(key), "prefix-hit")
        assert pick("prefix-aware", endpoints[::-1], request=prefix(key)) == d


def test_prefix_aware_same_prefix_same_replica_different_prefixes_spread():
    endpoints = eps(4)
    same = {
        pick("prefix-aware", endpoints, request=prefix("shared system prompt")).endpoint_id for _ in range(50)
    }
    assert len(same) == 1
    spread = Counter(pick("prefix-aware", endpoints, request=prefix(k)).endpoint_id for k in KEYS[:2000])
    assert len(spread) == 4 and min(spread.values()) > 300


def test_prefix_aware_excluded_owner_goes_to_the_next_on_the_ring():
    endpoints = eps(8)
    ring = HashRing([e.id for e in endpoints])
    for key in KEYS[:200]:
        first, second = list(ring.walk(key))[:2]
        d = pick("prefix-aware", endpoints, request=prefix(key), exclude=frozenset({first}))
        assert d == Decision(second, "prefix-hit")


def test_prefix_aware_skips_an_overloaded_owner():
    endpoints = eps(4)
    key = "long shared system prompt"
    first, second = list(HashRing([e.id for e in endpoints]).walk(key))[:2]
    # owner at 10, others idle: mean 2.5, bound 1.25 x 3.5 = 4.375.
    loads = {first: Load(inflight=10)}
    assert pick("prefix-aware", endpoints, loads, prefix(key)) == Decision(second, "prefix-hit")
    # Busier than the rest but within the bound: stays. Others at 4, owner at 5: bound 1.25 x 5.25.
    loads = {e.id: Load(inflight=4) for e in endpoints} | {first: Load(inflight=5)}
    assert pick("prefix-aware", endpoints, loads, prefix(key)) == Decision(first, "prefix-hit")


def test_prefix_aware_bound_is_inclusive():
    endpoints = eps(4)
    key = "k"
    first, second = list(HashRing([e.id for e in endpoints]).walk(key))[:2]
    # load_bound 2: bound = 2 x (x/4 + 1) = x/2 + 2, equal to the owner's load x at x = 4.
    at = pick("prefix-aware", endpoints, {first: Load(inflight=4)}, prefix(key), load_bound=2.0)
    over = pick("prefix-aware", endpoints, {first: Load(inflight=5)}, prefix(key), load_bound=2.0)
    assert at == Decision(first, "prefix-hit")
    assert over == Decision(second, "prefix-hit")


def test_prefix_aware_counts_the_scraped_load():
    endpoints = eps(4)
    key = "k"
    first, second = list(HashRing([e.id for e in endpoints]).walk(key))[:2]
    # 8 running + 6 waiting seen by the engine: 14 > 1.25 x (3.5 + 1).
    busy = pick("prefix-aware", endpoints, {first: fresh(VLLM_LOAD)}, prefix(key))
    assert busy == Decision(second, "prefix-hit")
    stale = pick("prefix-aware", endpoints, {first: fresh(VLLM_LOAD, age=60)}, prefix(key))
    assert stale == Decision(first, "prefix-hit")


def test_prefix_aware_hot_prefix_spills_in_ring_order_within_the_bound():
    endpoints = eps(4)
    key = "one very popular system prompt"
    walk = list(HashRing([e.id for e in endpoints]).walk(key))
    inflight = Counter[str]()
    for _ in range(40):
        loads = {e.id: Load(inflight=inflight[e.id]) for e in endpoints}
        d = pick("prefix-aware", endpoints, loads, prefix(key))
        assert d.reason == "prefix-hit"
        inflight[d.endpoint_id] += 1
    mean = 40 / 4
    assert max(inflight.values()) <= 1.25 * (mean + 1) + 1
    # The owner gets the most, and the overflow goes to its ring successors, not at random.
    assert inflight[walk[0]] == max(inflight.values())
    assert inflight[walk[0]] >= inflight[walk[1]] >= inflight[walk[3]]


def test_without_a_bound_a_hot_prefix_would_pile_up():
    endpoints = eps(4)
    inflight = Counter[str]()
    for _ in range(40):
        loads = {e.id: Load(inflight=inflight[e.id]) for e in endpoints}
        inflight[pick("prefix-aware", endpoints, loads, prefix("hot"), load_bound=1000.0).endpoint_id] += 1
    assert sorted(inflight.values()) == [40]


def test_prefix_aware_falls_back_to_least_load_when_all_are_over_the_bound():
    # Only reachable with a bound below 1: the least-loaded replica is never above the mean.
    endpoints = eps(3)
    loads = {"pod-0": Load(inflight=12), "pod-1": Load(inflight=9), "pod-2": Load(inflight=10)}
    # mean 10.33, bound 0.5 x 11.33 = 5.67: nobody qualifies.
    d = pick("prefix-aware", endpoints, loads, prefix("k"), load_bound=0.5)
    assert d == Decision("pod-1", "prefix-overloaded-fallback")


def test_prefix_aware_without_a_prefix_routes_by_load():
    loads = {"pod-0": Load(inflight=1), "pod-2": Load(inflight=1)}
    assert pick("prefix-aware", eps(3), loads, prefix("")) == Decision("pod-1", "least-load")
    assert pick("prefix-aware", eps(3), loads, prefix(b"")) == Decision("pod-1", "least-load")


def test_prefix_aware_single_endpoint():
    assert pick("prefix-aware", eps(1), {"pod-0": Load(inflight=50)}, prefix("k")) == Decision(
        "pod-0", "prefix-hit"
    )


# sessions


@pytest.mark.parametrize("strategy", ["least-load", "round-robin", "prefix-aware"])
def test_session_pins_to_its_ring_owner_under_any_strategy(strategy):
    endpoints = eps(8)
    ring = HashRing([e.id for e in endpoints])
    for n in range(100):
        session = f"user-{n}"
        # The prompt changes every turn; the session does not.
        d = pick(strategy, endpoints, request=prefix(f"turn {n}", session=session), rr_counter=n)
        assert d == Decision(ring.owner(session), "session")


def test_session_spills_from_an_overloaded_owner():
    endpoints = eps(4)
    first, second = list(HashRing([e.id for e in endpoints]).walk("user-1"))[:2]
    d = pick("least-load", endpoints, {first: Load(inflight=20)}, prefix("p", session="user-1"))
    assert d == Decision(second, "session")


def test_empty_session_is_no_session():
    assert pick("round-robin", eps(3), request=prefix("p", session=""), rr_counter=1) == Decision(
        "pod-1", "round-robin"
    )


# prefix_key


def chat(*messages: tuple[str, object]) -> dict[str, object]:
    return {"model": "m", "messages": [{"role": r, "content": c} for r, c in messages]}


SYSTEM = "You are a careful assistant. " * 100  # 2900 characters


def test_prefix_key_chat_roles_and_order():
    key = prefix_key(chat(("system", "be brief"), ("user", "hi")))
    assert "system" in key and "be brief" in key and "user" in key and "hi" in key
    assert key.index("be brief") < key.index("hi")
    assert prefix_key(chat(("user", "be brief"), ("system", "hi"))) != key  # roles count
    assert prefix_key(chat(("system", "hi"), ("user", "be brief"))) != key  # order counts


def test_prefix_key_long_shared_system_prompt_lands_together():
    a = prefix_key(chat(("system", SYSTEM), ("user", "What is 2+2?")))
    b = prefix_key(chat(("system", SYSTEM), ("user", "Write a poem.")))
    assert a == b and len(a) == 2048
    assert SYSTEM.startswith(a[a.index("You") :])


def test_prefix_key_short_prompts_stay_apart():
    a = prefix_key(chat(("system", "short"), ("user", "What is 2+2?")))
    b = prefix_key(chat(("system", "short"), ("user", "Write a poem.")))
    assert a != b


def test_prefix_key_max_chars():
    assert len(prefix_key(chat(("user", "x" * 100)), max_chars=10)) == 10
    assert prefix_key(chat(("user", "ab")), max_chars=10000).count("ab") == 1


def test_prefix_key_multimodal_text_parts_and_image_urls():
    def body(url: str, text: str = "describe") -> dict[str, object]:
        parts = [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}}]
        return chat(("system", "vision"), ("user", parts))

    key = prefix_key(body("https://example.com/cat.png"))
    assert "describe" in key and "image_url" in key
    assert key == prefix_key(body("https://example.com/cat.png"))
    assert key != prefix_key(body("https://example.com/dog.png"))
    assert key != prefix_key(body("https://example.com/cat.png", text="caption"))


def test_prefix_key_inline_image_is_a_short_digest():
    data = "data:image/png;base64," + "iVBORw0KGgo" * 10_000
    parts = [{"type": "image_url", "image_url": {"url": data}}, {"type": "text", "text": "what is this?"}]
    key = prefix_key(chat(("user", parts)))
    assert "iVBOR" not in key and len(key) < 100
    assert key.endswith("what is this?\n")
    other = [
        {"type": "image_url", "image_url": {"url": data + "AA"}},
        {"type": "text", "text": "what is this?"},
    ]
    assert prefix_key(chat(("user", other))) != key


def test_prefix_key_stops_at_max_chars():
    # Nothing after the cut is looked at: this part could not even be hashed.
    unhashable = [{"type": "image_url", "image_url": {"url": object()}}]
    body = chat(("system", SYSTEM), ("user", unhashable))
    assert len(prefix_key(body)) == 2048


def test_prefix_key_completions():
    assert prefix_key({"model": "m", "prompt": "Once upon a time"}) == "Once upon a time"
    assert prefix_key({"prompt": ["first prompt", "second prompt"]}) == "first prompt"
    assert prefix_key({"prompt": [1, 2, 3]}) == prefix_key({"prompt": [[1, 2, 3], [4]]}) != ""
    assert prefix_key({"prompt": [1, 2, 3]}) != prefix_key({"prompt": [1, 2, 4]})
    assert prefix_key({"prompt": "y" * 5000}) == "y" * 2048


def test_prefix_key_odd_bodies():
    assert prefix_key({}) == ""
    assert prefix_key({"prompt": []}) == ""
    assert prefix_key({"messages": "not a list", "prompt": "p"}) == "p"
    # A tool-calling assistant turn has no content; non-dict entries are skipped.
    key = prefix_key(
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None}, 7]}
    )
    assert "q" in key and "assistant" in key


def test_prefix_key_routes_shared_system_prompts_to_one_replica():
    endpoints = eps(8)
    chosen = {
        pick(
            "prefix-aware", endpoints, request=prefix(prefix_key(chat(("system", SYSTEM), ("user", q))))
        ).endpoint_id
        for q in ("a", "b", "c", "d", "e")
    }
    assert len(chosen) == 1


def test_prefix_stays_on_owner_at_low_load_and_spills_when_busy():
    """A lightly loaded fleet keeps a hot prefix on its owner (its KV cache) rather than paying a full
    prefill elsewhere; only a busy owner spills."""
    eps = [Endpoint(id=f"r{i}", address=f"10.0.0.{i}:8000", model="m") for i in range(8)]
    req = RouteRequest(model="m", prefix_key="a long shared system prompt")
    owner = ring(tuple(sorted(e.id for e in eps))).owner(req.prefix_key)

    def pick(inflight: int, **kw):
        loads = {owner: Load(inflight=inflight)}
        return choose("prefix-aware", eps, loads, req, now=0.0, scrape_interval=1.0, rr_counter=0,
                      target_inflight=32, **kw)  # fmt: skip

    assert pick(3) == Decision(owner, "prefix-hit")
    assert pick(15) == Decision(owner, "prefix-hit")  # under half of targetInflight
    busy = pick(20)
    assert busy is not None and busy.endpoint_id != owner and busy.reason == "prefix-hit"
    # Without the floor the mean-based bound alone spills at the third request.
    assert pick(3, min_bound=0).endpoint_id != owner
