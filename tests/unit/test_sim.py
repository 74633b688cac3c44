"""`kubeinfer sim`: the pure engine model on a virtual clock, then the server against vLLM 0.32's captures.

Server tests run the simulator in-process on 127.0.0.1 port 0 with latencies scaled down to milliseconds.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from kubeinfer.gateway.scrape import parse_metrics
from kubeinfer_devkit.sim.model import Engine, EngineConfig, simulate
from kubeinfer_devkit.sim.server import create_app, running_sim
from kubeinfer_devkit.sim.tokens import VOCAB, Prompt, chat_pieces, encode, output_words, tokenize
from tests.cases import FIXTURES

VLLM = FIXTURES / "vllm-0.32.0"

# Latencies of the server tests: fast, but far enough apart to compare.
FAST = {"decode_ms": 2.0, "decode_ms_per_seq": 0.01, "prefill_overhead_ms": 0.5, "prefill_ms_per_token": 0.05}


def words(n: int, start: int = 0) -> str:
    return " ".join(VOCAB[(start + i) % len(VOCAB)] for i in range(n))


def prompt(n_tokens: int, start: int = 0, block_size: int = 16) -> Prompt:
    return encode([words(n_tokens, start)], block_size)


def config(**kw: Any) -> EngineConfig:
    return EngineConfig(**{"prefill_overhead_ms": 5.0, "prefill_ms_per_token": 0.2, "decode_ms": 20.0,
                           "decode_ms_per_seq": 0.1, **kw})  # fmt: skip


# --- tokens ---------------------------------------------------------------------------------------------


def test_tokens_are_words_and_long_words_are_cut():
    assert tokenize("Hello, world!\n  two\tthree") == ["Hello,", "world!", "two", "three"]
    assert tokenize("a " + "x" * 40) == ["a", "x" * 16, "x" * 16, "x" * 8]
    assert all(tokenize(w) == [w] for w in VOCAB)  # an answer re-tokenizes to as many tokens


def test_block_hashes_chain_over_the_prefix():
    a, b = prompt(100), encode([words(40) + " different " + words(59, 41)], 16)
    assert (a.num_tokens, len(a.block_hashes)) == (100, 6)  # full blocks only
    # Blocks 0 and 1 (tokens 0-31) agree; block 2 holds the first difference, and so does every later hash.
    assert a.block_hashes[:2] == b.block_hashes[:2]
    assert all(x != y for x, y in zip(a.block_hashes[2:], b.block_hashes[2:], strict=True))
    # Pieces tokenize separately but chain as one prompt.
    pieces = chat_pieces([("system", words(50)), ("user", "hi")])
    assert encode(pieces, 16).num_tokens == 1 + 50 + 1 + 1 + 1
    assert (
        encode(pieces, 16).block_hashes[:3]
        == encode(chat_pieces([("system", words(50))]), 16).block_hashes[:3]
    )


# --- engine on a virtual clock --------------------------------------------------------------------------


def test_batching_limit_queues_the_rest_fifo():
    engine = Engine(config(max_num_seqs=2))
    seqs = [engine.add(prompt(20, i * 100), 4, 0.0) for i in range(5)]
    step = engine.schedule(0.0)
    assert step is not None
    assert (engine.num_running, engine.num_waiting) == (2, 3)
    assert [s for s, _ in step.prefills] == seqs[:2]
    engine.complete(step, step.duration)
    assert simulate(engine, [], start=step.duration) == []
    assert all(s.finished and s.output == 4 for s in seqs)
    # FIFO: each later request is scheduled no earlier than the one before it.
    scheduled = [s.scheduled_at for s in seqs]
    assert scheduled == sorted(scheduled)
    assert seqs[2].scheduled_at >= min(seqs[0].finished_at, seqs[1].finished_at)
    assert engine.finished["length"] == 5


def test_cached_prefix_cuts_prefill_and_ttft():
    cfg = config()
    system = words(2000)
    first = encode(chat_pieces([("system", system), ("user", "what is one")]), 16)
    second = encode(chat_pieces([("system", system), ("user", "and what is two")]), 16)
    engine = Engine(cfg)
    a, b = simulate(engine, [(0.0, first, 8), (10.0, second, 8)])
    # Alone and uncached: overhead + 0.2 ms per prompt token.
    assert a.first_token_at - a.arrival == pytest.approx((5.0 + 0.2 * first.num_tokens) / 1000)
    # 2001 prompt tokens ("<|system|>" + 2000 words) = 125 full blocks in the cache, 16 tokens each.
    assert b.cached_tokens == 125 * 16 == 2000
    assert b.first_token_at - b.arrival == pytest.approx((5.0 + 0.2 * (second.num_tokens - 2000)) / 1000)
    assert a.first_token_at - a.arrival > 0.4 and b.first_token_at - b.arrival < 0.01
    # vLLM's counters: every prompt token is queried, hits are whole cached blocks.
    assert engine.prefix_queries == first.num_tokens + second.num_tokens
    assert engine.prefix_hits == 2000
    assert engine.prompt_tokens == first.num_tokens + second.num_tokens
    assert engine.prompt_tokens_cached == 2000


def test_a_fully_cached_prompt_still_computes_its_last_block():
    engine = Engine(config())
    p = prompt(64)  # exactly 4 blocks
    a, b = simulate(engine, [(0.0, p, 1), (1.0, p, 1)])
    # At most prompt - 1 tokens can hit (the last token's logits are needed): 3 whole blocks.
    assert (a.cached_tokens, b.cached_tokens) == (0, 48)
    assert engine.prefix_hits == 48


def test_lru_eviction_under_a_small_kv_budget():
    # 9 blocks of 4 tokens; a 13-token prompt takes 4: 3 full, cacheable blocks and 1 partial, private one.
    engine = Engine(config(num_blocks=9, block_size=4, max_model_len=36))
    a, b, c, d = (prompt(13, start, block_size=4) for start in (0, 100, 200, 300))

    def run(p: Prompt) -> int | None:
        (seq,) = simulate(engine, [(0.0, p, 1)])
        return seq.cached_tokens

    def cached(p: Prompt) -> list[bool]:
        return [engine.is_cached(h) for h in p.block_hashes]

    assert [run(a), run(b)] == [0, 0]
    assert engine.cached_blocks == 6 and engine.kv_usage() == 0.0  # cached but unpinned: free
    # c takes the 3 never-cached blocks and evicts the least recently used one: a's last block (a
    # sequence frees its last block first, so its first blocks, the most shared, go last).
    assert run(c) == 0
    assert cached(a) == [True, True, False] and cached(b) == [True] * 3
    assert run(b) == 12  # whole blocks, at most prompt - 1 tokens
    assert run(a) == 8  # recomputes its last block, evicting c's last one (c is now least recent)
    assert cached(c) == [True, True, False]
    run(d)  # needs 4: the free one, then c's two and b's last, in LRU order
    assert cached(a) == [True] * 3 and cached(b) == [True, True, False] and cached(c) == [False] * 3


def test_running_sequences_pin_their_blocks():
    cfg = config(num_blocks=10, block_size=4, max_model_len=40)
    engine = Engine(cfg)
    # Two 13-token prompts with long answers hold 2 x 4 blocks; a third cannot be admitted until one ends.
    seqs = simulate(
        engine, [(0.0, prompt(13, 0, 4), 3), (0.0, prompt(13, 100, 4), 3), (0.0, prompt(13, 200, 4), 3)]
    )
    assert seqs[2].scheduled_at >= min(seqs[0].finished_at, seqs[1].finished_at)
    engine2 = Engine(cfg)
    for i in range(2):
        engine2.add(prompt(13, 100 * i, 4), 3, 0.0)
    step = engine2.schedule(0.0)
    assert step is not None and engine2.used_blocks == 8 and engine2.kv_usage() == pytest.approx(0.8)


def test_decode_preempts_the_newest_when_blocks_run_out():
    # 8 blocks of 4 tokens: two requests of 12 prompt + 12 output tokens need 6 blocks each at the end.
    cfg = config(num_blocks=8, block_size=4, max_model_len=32)
    engine = Engine(cfg)
    a, b = simulate(engine, [(0.0, prompt(12, 0, 4), 12), (0.0, prompt(12, 100, 4), 12)])
    assert engine.preemptions >= 1 and b.preemptions >= 1 and a.preemptions == 0
    assert (a.output, b.output) == (12, 12) and engine.used_blocks == 0
    assert b.finished_at > a.finished_at


def test_long_prompts_prefill_in_chunks():
    engine = Engine(config(max_num_batched_tokens=512))
    (seq,) = simulate(engine, [(0.0, prompt(1200), 1)])
    # Three steps of 512, 512 and 176 tokens, each with its own overhead.
    assert seq.first_token_at == pytest.approx((3 * 5.0 + 0.2 * 1200) / 1000)


def test_decode_step_slows_with_the_batch():
    def itl(batch: int) -> float:
        seqs = simulate(Engine(config()), [(0.0, prompt(16, 100 * i), 10) for i in range(batch)])
        return seqs[0].last_token_at - seqs[0].prev_token_at

    assert itl(1) == pytest.approx((20.0 + 0.1) / 1000)
    assert itl(64) == pytest.approx((20.0 + 0.1 * 64) / 1000)
    assert itl(64) > itl(8) > itl(1)


def test_same_seed_same_run_and_text():
    arrivals = [(i * 0.003, prompt(50 + i, i * 7), 5 + i % 4) for i in range(40)]

    def run(seed: int) -> list[tuple[Any, ...]]:
        seqs = simulate(Engine(config(max_num_seqs=4, seed=seed)), arrivals)
        return [(s.first_token_at, s.finished_at, s.cached_tokens, s.preemptions) for s in seqs]

    assert run(1) == run(1)
    p = prompt(30)
    assert output_words(1, p.digest, 10) == output_words(1, p.digest, 10)
    assert output_words(1, p.digest, 10)[:4] == output_words(1, p.digest, 4)  # a longer answer extends
    assert output_words(1, p.digest, 10) != output_words(2, p.digest, 10)
    assert output_words(1, p.digest, 10) != output_words(1, prompt(30, 1).digest, 10)


def test_abort_frees_the_request_wherever_it_is():
    engine = Engine(config(max_num_seqs=1))
    running, waiting = engine.add(prompt(40), 100, 0.0), engine.add(prompt(40, 50), 100, 0.0)
    step = engine.schedule(0.0)
    assert step is not None
    engine.abort(waiting, 0.001)
    engine.abort(running, 0.001)
    engine.complete(step, step.duration)  # the step's tokens go nowhere
    assert (engine.num_running, engine.num_waiting, engine.used_blocks) == (0, 0, 0)
    assert engine.finished["abort"] == 2 and not step.emitted


def test_config_is_checked():
    with pytest.raises(ValueError, match="does not fit"):
        EngineConfig(num_blocks=10, block_size=16, max_model_len=1000)
    with pytest.raises(ValueError, match="max_num_seqs"):
        EngineConfig(max_num_seqs=0)
    with pytest.raises(ValueError, match="decode_ms"):
        EngineConfig(decode_ms=-1)


# --- the server -----------------------------------------------------------------------------------------


def _shape(obj: Any) -> Any:
    """The keys of a JSON value, recursively (lists by their first element)."""
    if isinstance(obj, dict):
        return {k: _shape(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_shape(obj[0])] if obj else []
    return None


def _events(text: str) -> list[Any]:
    assert text.endswith("data: [DONE]\n\n")
    chunks = [c for c in text.split("\n\n") if c]
    assert all(c.startswith("data: ") for c in chunks)
    return [json.loads(c[6:]) for c in chunks[:-1]]


def _capture(name: str) -> tuple[Any, int]:
    body, status = (VLLM / name).read_text().strip().rsplit("\n", 1)
    return json.loads(body), int(status.split()[1])


CHAT = {"model": "sim", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 5}


async def test_chat_and_completion_bodies_are_shaped_like_vllm():
    async with running_sim(**FAST) as sim, httpx.AsyncClient(base_url=sim.url) as client:
        chat = (await client.post("/v1/chat/completions", json=CHAT)).json()
        real = json.loads((VLLM / "chat_completion.json").read_text())
        assert _shape(chat) == _shape(real)
        assert list(chat) == list(real)  # same order too
        assert chat["choices"][0]["finish_reason"] == "length"
        usage = {"prompt_tokens": 4, "total_tokens": 9, "completion_tokens": 5}
        assert chat["usage"] == {**usage, "prompt_tokens_details": None, "completion_tokens_details": None}
        assert len(tokenize(chat["choices"][0]["message"]["content"])) == 5

        completion = (await client.post("/v1/completions", json={"model": "sim", "prompt": "a b c"})).json()
        assert _shape(completion) == _shape(json.loads((VLLM / "completion.json").read_text()))
        assert completion["usage"]["completion_tokens"] == 16  # the default max_tokens

        models = (await client.get("/v1/models")).json()
        assert _shape(models) == _shape(json.loads((VLLM / "models.json").read_text()))
        assert models["data"][0]["id"] == "sim"

        health = await client.get("/health")
        assert (health.status_code, health.content) == (200, b"")


async def test_chat_stream_is_shaped_like_vllm():
    real = _events((VLLM / "chat_completion_stream.txt").read_text())
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    async with running_sim(**FAST) as sim, httpx.AsyncClient(base_url=sim.url) as client:
        r = await client.post("/v1/chat/completions", json=body)
        assert r.headers["content-type"].startswith("text/event-stream")
        events = _events(r.text)
        # role chunk, one chunk per token (the last with finish_reason), the usage chunk
        assert len(events) == 1 + 5 + 1
        for mine, theirs in [
            (events[0], real[0]),
            (events[1], real[1]),
            (events[-2], real[-2]),
            (events[-1], real[-1]),
        ]:
            assert _shape(mine) == _shape(theirs)
        assert events[-2]["choices"][0]["finish_reason"] == "length"
        assert events[-1]["choices"] == [] and events[-1]["usage"] == {
            "prompt_tokens": 4, "total_tokens": 9, "completion_tokens": 5
        }  # fmt: skip
        streamed = "".join(e["choices"][0]["delta"]["content"] for e in events[:-1])
        whole = (await client.post("/v1/chat/completions", json=CHAT)).json()
        assert streamed == whole["choices"][0]["message"]["content"]  # same request, same text

        # Without include_usage: no usage chunk; the last chunk carries the fingerprint, as vLLM's.
        events = _events((await client.post("/v1/chat/completions", json={**CHAT, "stream": True})).text)
        assert len(events) == 6 and "usage" not in events[-1] and "system_fingerprint" in events[-1]


async def test_completion_stream_with_usage():
    body = {"model": "sim", "prompt": "one two three", "max_tokens": 3, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    async with running_sim(**FAST) as sim, httpx.AsyncClient(base_url=sim.url) as client:
        events = _events((await client.post("/v1/completions", json=body)).text)
    assert [e["object"] for e in events] == ["text_completion"] * 4
    assert [e["choices"][0]["finish_reason"] for e in events[:3]] == [None, None, "length"]
    assert set(events[0]["choices"][0]) == {"index", "text", "logprobs", "finish_reason", "stop_reason",
                                            "prompt_token_ids", "token_ids"}  # fmt: skip
    assert events[3]["choices"] == [] and events[3]["usage"]["prompt_tokens"] == 3


async def test_errors_are_vllms():
    app = create_app(max_model_len=512, num_blocks=64, **FAST)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://sim") as client:
        r = await client.post("/v1/chat/completions", content=b"{bad")
        assert (r.json(), r.status_code) == _capture("error_bad_json.txt")  # byte for byte the capture

        r = await client.post("/v1/chat/completions", json={**CHAT, "model": "nope"})
        body, status = _capture("error_unknown_model.txt")
        body["error"]["message"] = body["error"]["message"].replace("tiny", "sim")
        assert (r.json(), r.status_code) == (body, status)

        r = await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 100000})
        assert (r.json(), r.status_code) == _capture("error_too_long.txt")

        r = await client.post(
            "/v1/chat/completions", json={**CHAT, "messages": [{"role": "user", "content": words(600)}]}
        )
        assert r.status_code == 400 and "maximum context length is 512" in r.json()["error"]["message"]

        assert (await client.post("/v1/chat/completions", json=[1])).status_code == 400
        assert (await client.post("/v1/completions", json={"prompt": 3})).status_code == 400
        assert (await client.get("/v1/embeddings")).json() == {"detail": "Not Found"}
        assert (await client.get("/v1/chat/completions")).status_code == 405


async def test_max_tokens_and_max_completion_tokens_are_honoured():
    app = create_app(max_model_len=64, num_blocks=8, **FAST)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://sim") as client:

        async def tokens(body: dict[str, Any]) -> int:
            r = await client.post("/v1/chat/completions", json={**CHAT, **body})
            return int(r.json()["usage"]["completion_tokens"])

        assert await tokens({"max_tokens": 3}) == 3
        assert await tokens({"max_tokens": None, "max_completion_tokens": 7}) == 7
        assert await tokens({"max_tokens": None}) == 16
        assert await tokens({"max_tokens": 64}) == 60  # shortened to fit the context, as vLLM does
    await app.aclose()


async def test_metrics_are_vllms_names_and_parse_like_the_capture():
    real_text = (VLLM / "metrics_after_prefix_hits.txt").read_text()
    real = {f.name: f for f in text_string_to_metric_families(real_text)}
    async with running_sim(**FAST) as sim, httpx.AsyncClient(base_url=sim.url) as client:
        for i in range(3):
            await client.post(
                "/v1/completions", json={"model": "sim", "prompt": words(100) + f" q{i}", "max_tokens": 2}
            )
        text = (await client.get("/metrics")).text

    mine = {f.name: f for f in text_string_to_metric_families(text)}
    assert set(mine) <= set(real), set(mine) - set(real)
    for name, family in mine.items():
        assert (family.type, family.documentation) == (real[name].type, real[name].documentation), name
        labels = {frozenset(s.labels) for s in family.samples}
        if name == "vllm:cache_config_info":  # the sim has fewer cache settings to report
            assert labels.pop() <= next(frozenset(s.labels) for s in real[name].samples)
        else:
            assert labels == {frozenset(s.labels) for s in real[name].samples}, name
    # every family the gateway or a dashboard needs is there
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:prefix_cache_queries", "vllm:prefix_cache_hits", "vllm:cache_config_info",
                 "vllm:prompt_tokens", "vllm:generation_tokens", "vllm:request_success",
                 "vllm:time_to_first_token_seconds", "vllm:e2e_request_latency_seconds",
                 "vllm:inter_token_latency_seconds"):  # fmt: skip
        assert name in mine

    ours, theirs = parse_metrics(text), parse_metrics(real_text)
    filled = [f for f in vars(theirs) if getattr(theirs, f) is not None]
    assert [f for f in vars(ours) if getattr(ours, f) is not None] == filled
    assert (ours.engine, ours.running, ours.waiting, ours.kv_cache_usage) == ("vllm", 0, 0, 0.0)
    assert ours.prompt_tokens_total == ours.prefix_cache_queries == 3 * 101
    assert ours.prefix_cache_hits == 2 * 96  # the 100 shared words: 6 whole blocks, on the 2nd and 3rd
    assert (ours.generation_tokens_total, ours.block_size) == (6, 16)
    assert ours.kv_cache_bytes == 2048 * 16 * 131072


async def test_metrics_under_load_show_the_queue():
    slow = {**FAST, "decode_ms": 20.0}
    async with running_sim(max_num_seqs=2, **slow) as sim, httpx.AsyncClient(base_url=sim.url) as client:
        body = {"model": "sim", "prompt": "x y", "max_tokens": 10}
        tasks = [
            asyncio.create_task(client.post("/v1/completions", json={**body, "prompt": f"p {i}"}))
            for i in range(5)
        ]
        while sim.app.engine.num_running < 2:
            await asyncio.sleep(0.001)
        stats = parse_metrics((await client.get("/metrics")).text)
        assert (stats.running, stats.waiting) == (2, 3)
        assert stats.kv_cache_usage == pytest.approx(2 / 2048)
        await asyncio.gather(*tasks)


async def test_a_shared_prefix_is_served_from_the_cache_faster():
    system = words(2000)

    async def ttft(client: httpx.AsyncClient, question: str, system: str) -> float:
        messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
        body = {"model": "sim", "max_tokens": 2, "stream": True, "messages": messages}
        start = time.perf_counter()
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            async for _ in r.aiter_lines():
                return time.perf_counter() - start
        raise AssertionError("empty stream")

    async with running_sim(**FAST) as sim, httpx.AsyncClient(base_url=sim.url) as client:
        before = parse_metrics((await client.get("/metrics")).text)
        # The best of three each, so that one stall of a busy CI machine cannot decide the comparison.
        cold = min(
            [await ttft(client, "what is the first question", system=f"{k} {system}") for k in range(3)]
        )
        warm = min([await ttft(client, f"and question number {k}", system=f"0 {system}") for k in range(3)])
        after = parse_metrics((await client.get("/metrics")).text)
    assert cold > 0.1  # 2000 x 0.05 ms = 100 ms of prefill
    assert warm < cold / 2, (cold, warm)
    assert after.prefix_cache_hits - before.prefix_cache_hits == 3 * 2000


async def test_a_client_that_goes_away_aborts_its_request():
    async with (
        running_sim(**{**FAST, "decode_ms": 10.0}) as sim,
        httpx.AsyncClient(base_url=sim.url) as client,
    ):
        body = {**CHAT, "max_tokens": 1000, "stream": True}
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            async for _ in r.aiter_lines():
                break
        deadline = time.monotonic() + 5
        while sim.app.engine.finished["abort"] == 0:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.005)
        assert sim.app.engine.num_running == 0 and sim.app.engine.used_blocks == 0


async def test_the_openai_sdk_works_against_it():
    openai = pytest.importorskip("openai")
    async with running_sim(model="sim-7b", **FAST) as sim:
        client = openai.AsyncOpenAI(base_url=f"{sim.url}/v1", api_key="unused", max_retries=0)
        chat = await client.chat.completions.create(
            model="sim-7b", messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )
        assert chat.choices[0].finish_reason == "length" and chat.usage.completion_tokens == 4
        assert len(chat.choices[0].message.content.split()) == 4

        completion = await client.completions.create(model="sim-7b", prompt="once upon", max_tokens=3)
        assert completion.choices[0].text and completion.usage.prompt_tokens == 2

        stream = await client.chat.completions.create(
            model="sim-7b", messages=[{"role": "user", "content": "hi"}], max_tokens=4, stream=True,
            stream_options={"include_usage": True},
        )  # fmt: skip
        chunks = [c async for c in stream]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == chat.choices[0].message.content
        assert chunks[-1].usage.completion_tokens == 4

        models = await client.models.list()
        assert [m.id for m in models.data] == ["sim-7b"]
        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(model="other", messages=[{"role": "user", "content": "x"}])
        await client.close()


async def test_prompt_tokens_details_report_cached_tokens():
    async with (
        running_sim(prompt_tokens_details=True, **FAST) as sim,
        httpx.AsyncClient(base_url=sim.url) as c,
    ):
        body = {"model": "sim", "prompt": words(64), "max_tokens": 1}
        first = (await c.post("/v1/completions", json=body)).json()["usage"]
        second = (await c.post("/v1/completions", json=body)).json()["usage"]
    assert (first["prompt_tokens_details"], second["prompt_tokens_details"]) == (
        {"cached_tokens": 0},
        {"cached_tokens": 48},
    )


def test_cli_sim_starts_with_defaults():
    from kubeinfer.cli import build_parser

    args = build_parser().parse_args(["sim", "--port", "1"])
    assert (args.model, args.max_num_seqs, args.decode_ms, args.num_blocks) == ("sim", 256, 20.0, 2048)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = Path(sys.executable).with_name("kubeinfer")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "kubeinfer.cli"]
    proc = subprocess.Popen([*cmd, "sim", "--host", "127.0.0.1", "--port", str(port), "--model", "sim"])
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, "kubeinfer sim did not come up"
            time.sleep(0.05)
        r = httpx.post(
            f"http://127.0.0.1:{port}/v1/chat/completions", json={**CHAT, "max_tokens": 2}, timeout=10
        )
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
    finally:
        proc.terminate()
        proc.wait(10)
