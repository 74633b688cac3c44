"""`kubeinfer bench serve`: stats math, datasets, the SSE reader, and the load generator against an
in-process fake OpenAI server (Starlette under uvicorn on 127.0.0.1, port 0, in a thread of its own so
its delays do not depend on the client's event loop).

The fake server takes its behaviour from the model name ("ttft=0.05,itl=0.01,n=4,cold=2": seconds to
the first content chunk, between chunks, chunks per answer, first requests of that model that are slow)
and from markers in the prompt ("[503]", "[429]", "[stream-error]", "[cut]", "[hang]", "[nousage]").
"""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
import statistics
import threading
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from kubeinfer.cli import main
from kubeinfer_devkit.bench import datasets, stats
from kubeinfer_devkit.bench.client import SSEReader, http_error
from kubeinfer_devkit.bench.datasets import DatasetError, Prompt
from kubeinfer_devkit.bench.loadgen import (
    BenchResult,
    LoadConfig,
    arrival_times,
    request_body,
    run_load,
    run_repeats,
)
from kubeinfer_devkit.bench.report import format_table
from tests.cases import FIXTURES

# --- stats -------------------------------------------------------------------------------------


def test_percentile_interpolates_linearly_like_numpy():
    assert stats.percentile([1, 2, 3, 4], 50) == 2.5
    assert stats.percentile([1, 2, 3, 4], 90) == pytest.approx(3.7)  # rank 2.7
    assert stats.percentile([10], 99) == 10
    assert stats.percentile([5, 1, 3], 0) == 1 and stats.percentile([5, 1, 3], 100) == 5
    assert stats.percentile([], 50) is None
    with pytest.raises(ValueError):
        stats.percentile([1], 101)


def test_percentile_matches_numpy_on_random_samples():
    np = pytest.importorskip("numpy")  # not a dev dependency: the hand-computed cases above always run
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 100, 1001):
        values = rng.exponential(size=n).tolist()
        for q in (0, 50, 90, 99, 100):
            assert stats.percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_distribution_scales_to_milliseconds():
    d = stats.distribution([0.1, 0.2, 0.3], 1000)
    assert d == pytest.approx({"p50": 200.0, "p90": 280.0, "p99": 298.0, "mean": 200.0})
    assert stats.distribution([]) == {"p50": None, "p90": None, "p99": None, "mean": None}


def test_spread_is_mean_sample_stddev_min_max_cv():
    s = stats.spread([1.0, 2.0, 3.0, 4.0])
    sd = statistics.stdev([1, 2, 3, 4])
    assert s == pytest.approx({"mean": 2.5, "stddev": sd, "min": 1.0, "max": 4.0, "cv": sd / 2.5})
    assert stats.spread([7.0]) == {"mean": 7.0, "stddev": 0.0, "min": 7.0, "max": 7.0, "cv": 0.0}
    assert stats.spread([0.0, 0.0])["cv"] is None
    assert stats.spread([])["mean"] is None


def test_summarize_mirrors_nesting_counts_missing_errors_as_zero_and_skips_none():
    runs = [
        {"requests_per_s": 10.0, "latency_ms": {"p50": 1.0, "p99": None}, "errors": {"timeout": 2}},
        {"requests_per_s": 20.0, "latency_ms": {"p50": 3.0, "p99": 5.0}, "errors": {}},
    ]
    s = stats.summarize(runs)
    assert s["requests_per_s"]["mean"] == 15.0
    assert s["latency_ms"]["p50"]["max"] == 3.0
    assert s["latency_ms"]["p99"] == {"mean": 5.0, "stddev": 0.0, "min": 5.0, "max": 5.0, "cv": 0.0}
    assert s["errors"]["timeout"]["mean"] == 1.0 and s["errors"]["timeout"]["min"] == 0.0
    assert stats.summarize(runs, ["errors"]).keys() == {"errors"}


# --- datasets ----------------------------------------------------------------------------------


def test_synthetic_is_deterministic_and_about_input_len_tokens():
    a = datasets.synthetic(5, 50, output_len=7, seed=1)
    assert a == datasets.synthetic(5, 50, output_len=7, seed=1)
    assert a != datasets.synthetic(5, 50, output_len=7, seed=2)
    assert len({p.prompt for p in a}) == 5
    for p in a:
        assert p.prompt is not None and len(p.prompt.split()) == 50  # one word ~ one token
        assert set(p.prompt.split()) <= set(datasets.WORDS) and p.max_tokens == 7


def test_shared_prefix_groups_share_the_system_prompt_and_interleave():
    groups = 4
    ps = datasets.shared_prefix(40, groups, system_prompt_len=100, question_len=10, seed=3)
    assert ps == datasets.shared_prefix(40, groups, system_prompt_len=100, question_len=10, seed=3)
    systems: dict[int, set[str]] = defaultdict(set)
    for p in ps:
        (role_s, system), (role_u, question) = p.messages
        assert (role_s, role_u) == ("system", "user")
        assert len(system.split()) == 100 and len(question.split()) == 10
        assert p.group is not None
        systems[p.group].add(system)
    assert all(len(s) == 1 for s in systems.values()) and len(systems) == groups  # same group, same prefix
    firsts = {next(iter(s)).split()[0] for s in systems.values()}
    assert len(firsts) == groups  # different groups differ from the first token
    order = [p.group for p in ps]
    for b in range(0, 40, groups):  # every block holds every group once: groups interleave
        assert sorted(order[b : b + groups]) == list(range(groups))
    # No fixed period: round-robin over R replicas spreads every group over several replicas.
    for replicas in (2, 3, 4):
        for r in range(replicas):
            assert len({order[i] for i in range(r, 40, replicas)}) > 1
    assert datasets.shared_prefix(8, 4, 100, 10, seed=4) != ps[:8]


def test_prompt_converts_between_chat_and_completions():
    assert Prompt(prompt="hi").chat_messages() == [{"role": "user", "content": "hi"}]
    p = Prompt(messages=(("system", "be brief"), ("user", "hi")))
    assert p.completion_prompt() == "be brief\n\nhi"


def test_jsonl_loads_prompts_and_messages(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text(
        '{"prompt": "one", "max_tokens": 5}\n\n'
        '{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "two"}]}\n'
    )
    ps = datasets.load_jsonl(f)
    assert ps == [Prompt(prompt="one", max_tokens=5), Prompt(messages=(("system", "s"), ("user", "two")))]
    assert [p.prompt for p in datasets.cycle(ps, 3)] == ["one", None, "one"]


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ('{"prompt": "ok"}\n{"prompt": "broken"\n', ":2: not valid JSON"),
        ('{"prompt": "ok"}\n\n{"text": "x"}\n', ":3: expected 'prompt'"),
        ('{"prompt": "ok", "max_tokens": "5"}\n', ":1: 'max_tokens' must be an integer"),
        ('{"messages": [{"role": "user"}]}\n', ":1: each message needs"),
        ("[1, 2]\n", ":1: expected a JSON object"),
        ("\n", "no prompts"),
    ],
)
def test_jsonl_bad_lines_say_where(tmp_path, lines, message):
    f = tmp_path / "bad.jsonl"
    f.write_text(lines)
    with pytest.raises(DatasetError, match=r"bad\.jsonl") as exc:
        datasets.load_jsonl(f)
    assert message in str(exc.value)


def test_jsonl_missing_file():
    with pytest.raises(DatasetError, match=r"nope\.jsonl"):
        datasets.load_jsonl("nope.jsonl")


# --- request bodies, URLs, the SSE reader ------------------------------------------------------


def test_request_body_asks_streams_for_usage_and_honours_per_prompt_max_tokens():
    cfg = LoadConfig(url="http://x", model="m", max_tokens=9, extra_body={"temperature": 0})
    body = json.loads(request_body(cfg, Prompt(prompt="hi")))
    assert body == {
        "model": "m",
        "max_tokens": 9,
        "stream": True,
        "messages": [{"role": "user", "content": "hi"}],
        "stream_options": {"include_usage": True},
        "temperature": 0,
    }
    cfg = LoadConfig(url="http://x", model="m", endpoint="completions", stream=False, ignore_eos=True)
    body = json.loads(request_body(cfg, Prompt(prompt="hi", max_tokens=3)))
    assert body == {"model": "m", "max_tokens": 3, "stream": False, "prompt": "hi", "ignore_eos": True}


@pytest.mark.parametrize(
    "url",
    [
        "http://h:1",
        "http://h:1/",
        "http://h:1/v1",
        "http://h:1/v1/",
        "http://h:1/v1/chat/completions",
        "http://h:1/v1/completions",
    ],
)
def test_endpoint_url_with_or_without_v1(url):
    assert LoadConfig(url=url, model="m").endpoint_url == "http://h:1/v1/chat/completions"
    assert LoadConfig(url=url, model="m", endpoint="completions").endpoint_url == "http://h:1/v1/completions"


def test_config_validation_and_dict_hide_the_api_key():
    with pytest.raises(ValueError, match="concurrency"):
        LoadConfig(url="http://x", model="m", concurrency=0).validate()
    with pytest.raises(ValueError, match="http"):
        LoadConfig(url="x:8000", model="m").validate()
    d = LoadConfig(url="http://x", model="m", api_key="sk-secret", headers={"x-key": "secret"}).to_dict()
    assert "secret" not in json.dumps(d) and d["api_key"] == "set"


def _read(text: bytes, piece: int) -> SSEReader:
    s = SSEReader()
    for i in range(0, len(text), piece):
        s.feed(text[i : i + piece], float(i))
    s.close(float(len(text)))
    return s


@pytest.mark.parametrize("piece", [1, 7, 100, 1 << 20])
def test_stream_reader_on_real_captures_whatever_the_read_sizes(piece):
    vllm = _read((FIXTURES / "vllm-0.32.0" / "chat_completion_stream.txt").read_bytes(), piece)
    # vLLM's first chunk is the role with content "": not content, not TTFT.
    assert (vllm.chunks, vllm.usage_tokens, vllm.input_tokens, vllm.error) == (5, 5, 25, None)
    assert len(vllm.gaps) == 4
    llama = _read((FIXTURES / "llama-server" / "chat_completion_stream.txt").read_bytes(), piece)
    assert (llama.chunks, llama.usage_tokens, llama.error) == (4, None, None)  # content null: not content


def test_stream_reader_error_events():
    s = _read(b'data: {"choices":[{"delta":{"content":"a"}}]}\n\ndata: {"error":{"code":"oops"}}\n\n', 9)
    assert s.error == "stream_error:oops" and s.chunks == 1
    s = _read(b'event: error\ndata: {"type":"overloaded"}\n\n', 100)
    assert s.error == "stream_error"
    s = _read(b'data: {"choices":[{"delta":{"content":"error"}}]}\n\n', 100)  # the word, not an event
    assert s.error is None and s.chunks == 1


def test_http_errors_keep_only_codes_that_add_something():
    vllm_400 = (FIXTURES / "vllm-0.32.0" / "error_too_long.txt").read_bytes().splitlines()[0]
    assert http_error(400, vllm_400) == "http_400"  # vLLM's code repeats the status
    assert http_error(503, b'{"error": {"code": 50}}') == "http_503:50"
    assert http_error(429, b'{"error": {"code": "rate_limit_exceeded"}}') == "http_429:rate_limit_exceeded"
    assert http_error(502, b"<html>bad gateway</html>") == "http_502"


# --- the fake OpenAI server --------------------------------------------------------------------


class FakeOpenAI:
    def __init__(self) -> None:
        self.seen: dict[str, int] = defaultdict(int)
        self.in_flight: dict[str, int] = defaultdict(int)
        self.max_in_flight: dict[str, int] = defaultdict(int)
        routes = [
            Route("/v1/chat/completions", self.handle, methods=["POST"]),
            Route("/v1/completions", self.handle, methods=["POST"]),
        ]
        self.app = Starlette(routes=routes)

    async def handle(self, request: Request) -> Response:
        body = await request.json()
        model = body["model"]
        opts = dict(kv.split("=") for kv in model.split(",") if "=" in kv)
        ttft, itl, n = float(opts.get("ttft", 0)), float(opts.get("itl", 0)), int(opts.get("n", 3))
        self.seen[model] += 1
        cold = self.seen[model] <= int(opts.get("cold", 0))
        chat = "messages" in body
        text = body["messages"][-1]["content"] if chat else body["prompt"]
        headers = {"x-fake-count": str(self.seen[model])}
        if "[503]" in text:
            err = {"error": {"message": "busy", "type": "ServiceUnavailable", "code": 503}}
            return JSONResponse(err, 503)
        if "[429]" in text:
            err = {"error": {"message": "slow down", "type": "requests", "code": "rate_limit_exceeded"}}
            return JSONResponse(err, 429)
        self.in_flight[model] += 1
        self.max_in_flight[model] = max(self.max_in_flight[model], self.in_flight[model])
        if not body.get("stream"):
            try:
                await asyncio.sleep(ttft + itl * (n - 1) + (0.25 if cold else 0))
            finally:
                self.in_flight[model] -= 1
            choice = {"message": {"role": "assistant", "content": "w " * n}} if chat else {"text": "w " * n}
            usage = {"prompt_tokens": 11, "completion_tokens": n}
            return JSONResponse({"choices": [choice], "usage": usage}, headers=headers)
        return StreamingResponse(
            self.stream(model, text, chat, ttft, itl, n, cold, body), media_type="text/event-stream",
            headers=headers,
        )  # fmt: skip

    async def stream(self, model, text, chat, ttft, itl, n, cold, body) -> AsyncIterator[bytes]:
        def event(obj: object) -> bytes:
            return b"data: " + json.dumps(obj).encode() + b"\n\n"

        def chunk(content: str) -> bytes:
            choice = {"delta": {"content": content}} if chat else {"text": content}
            return event({"choices": [{"index": 0, **choice, "finish_reason": None}]})

        try:
            if chat:
                yield event({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
            await asyncio.sleep(ttft + (0.25 if cold else 0))
            if "[hang]" in text:
                await asyncio.sleep(5)
            for i in range(n):
                if i:
                    await asyncio.sleep(itl)
                yield chunk(f" w{i}")
                if "[cut]" in text:
                    raise RuntimeError("the fake engine dies mid-stream")
                if "[stream-error]" in text:
                    yield event({"error": {"message": "engine died", "code": "internal"}})
                    yield b"data: [DONE]\n\n"
                    return
            if "[nousage]" not in text and (body.get("stream_options") or {}).get("include_usage"):
                yield event({"choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": n}})
            yield b"data: [DONE]\n\n"
        finally:
            self.in_flight[model] -= 1


@pytest.fixture(scope="module")
def fake() -> Iterator[tuple[str, FakeOpenAI]]:
    server_app = FakeOpenAI()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(server_app.app, log_level="critical", lifespan="off", timeout_graceful_shutdown=1)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "the fake server did not start"
        time.sleep(0.01)
    yield f"http://127.0.0.1:{port}", server_app
    server.should_exit = True
    thread.join(5)
    sock.close()


def _prompts(*texts: str) -> list[Prompt]:
    return [Prompt(prompt=t) for t in texts]


async def test_ttft_and_itl_are_the_injected_delays(fake):
    url, _ = fake
    cfg = LoadConfig(url=url, model="ttft=0.1,itl=0.03,n=6,a", iterations=6, concurrency=3)
    r = await run_load(cfg)
    assert r.success == 6 and r.errors == {}
    # Lower bounds are the injected delays; upper bounds are loose, since CI machines are shared.
    assert 95 <= r.ttft_ms["p50"] <= 600
    assert 25 <= r.itl_ms["p50"] <= 300
    assert r.ttft_ms["p50"] < r.latency_ms["p50"]
    assert all(len(rec.itl) == 5 for rec in r.records)
    assert 245 <= r.latency_ms["p50"] <= 1500  # 0.1 + 5 * 0.03
    assert r.output_tokens == 36 and r.output_tokens_from == {"usage": 6} and r.input_tokens == 66
    assert r.output_tokens_per_s == pytest.approx(36 / r.duration_s)
    assert r.requests_per_s == pytest.approx(6 / r.duration_s)


async def test_without_streaming_ttft_is_latency_and_completions_work(fake):
    url, _ = fake
    cfg = LoadConfig(url=url, model="ttft=0.05,itl=0.01,n=4,b", iterations=4, concurrency=2, stream=False)
    r = await run_load(cfg)
    assert r.success == 4 and r.ttft_ms == r.latency_ms and r.itl_ms["p50"] is None
    assert r.output_tokens == 16 and r.output_tokens_from == {"usage": 4}
    cfg = LoadConfig(url=url, model="n=4,c", endpoint="completions", iterations=3)
    r = await run_load(cfg, prompts=_prompts("x", "y [nousage]"))
    assert r.success == 3 and r.errors == {}
    assert r.output_tokens_from == {"usage": 2, "chunks": 1} and r.output_tokens == 12


async def test_errors_are_classified(fake):
    url, _ = fake
    texts = ("ok", "[503]", "[429]", "[stream-error]", "[cut]", "[hang]", "ok")
    cfg = LoadConfig(url=url, model="n=3,d", iterations=len(texts), concurrency=7, timeout=0.5)
    r = await run_load(cfg, prompts=_prompts(*texts))
    assert r.errors == {
        "connection_lost": 1,
        "http_429:rate_limit_exceeded": 1,
        "http_503": 1,  # vLLM repeats the status as the code: nothing to add
        "stream_error:internal": 1,
        "timeout": 1,
    }
    assert (r.success, r.failed) == (2, 5)
    assert r.output_tokens == 6  # failed requests count for nothing
    assert "http_503 1" in format_table(BenchResult(r.config, [r]))


async def test_connection_refused_is_a_connection_error():
    with socket.socket() as s:  # a port nobody listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = await run_load(LoadConfig(url=f"http://127.0.0.1:{port}", model="m", iterations=2))
    assert r.errors == {"connection_error": 2} and r.success == 0 and r.latency_ms["p50"] is None


async def test_warmup_is_sent_first_and_left_out(fake):
    url, server = fake
    # The first two requests of a model are 250 ms slower: the warm-up takes them.
    warm = await run_load(LoadConfig(url=url, model="cold=2,e", iterations=4, warmup=2))
    assert server.seen["cold=2,e"] == 6
    # Under 250 ms, the cold ones' extra delay: the bound tells them apart, loosely (shared CI).
    assert warm.requests == 4 and warm.latency_ms["p99"] < 200
    assert [rec.index for rec in warm.records] == [0, 1, 2, 3]
    cold = await run_load(LoadConfig(url=url, model="cold=2,f", iterations=4))
    assert cold.latency_ms["p99"] > 240


async def test_closed_loop_keeps_concurrency_in_flight(fake):
    url, server = fake
    r = await run_load(LoadConfig(url=url, model="ttft=0.05,g", iterations=9, concurrency=3))
    assert r.success == 9 and server.max_in_flight["ttft=0.05,g"] == 3


async def test_open_loop_follows_the_seeded_poisson_schedule(fake):
    url, server = fake
    rate, n = 50.0, 50
    cfg = LoadConfig(url=url, model="n=1,h", iterations=n, rate=rate, seed=5)
    r = await run_load(cfg)
    assert r.success == n
    planned = arrival_times(n, rate, seed=5)
    assert planned == arrival_times(n, rate, seed=5) != arrival_times(n, rate, seed=6)
    starts = sorted(rec.start for rec in r.records)
    late = [abs(a - b) for a, b in zip(starts, planned, strict=True)]
    assert statistics.median(late) < 0.1 and max(late) < 0.5  # sent on schedule (loosely: shared CI)
    # The schedule itself is Poisson at `rate`: mean gap 1/rate (loosely: 50 samples).
    assert planned[-1] / (n - 1) == pytest.approx(1 / rate, rel=0.35)
    gaps = [b - a for a, b in itertools.pairwise(planned)]
    assert statistics.stdev(gaps) == pytest.approx(statistics.mean(gaps), rel=0.4)  # exponential: sd = mean
    # With --concurrency as well, it caps the requests in flight.
    cfg = LoadConfig(url=url, model="ttft=0.05,i", iterations=12, rate=500, concurrency=2)
    assert (await run_load(cfg)).success == 12 and server.max_in_flight["ttft=0.05,i"] == 2


async def test_repeats_are_seeded_and_summarised(fake):
    url, _ = fake
    calls: list[tuple[int, int, int]] = []
    cfg = LoadConfig(url=url, model="ttft=0.01,j", iterations=3, concurrency=1, seed=7)
    result = await run_repeats(cfg, 3, on_progress=lambda run, done, total: calls.append((run, done, total)))
    assert [run.config.seed for run in result.runs] == [7, 8, 9]
    assert calls[-1] == (2, 3, 3) and len(calls) == 9
    rps = [run.requests_per_s for run in result.runs]
    s = result.summary()["requests_per_s"]
    assert s["mean"] == pytest.approx(statistics.mean(rps))
    assert s["stddev"] == pytest.approx(statistics.stdev(rps))
    assert s["cv"] == pytest.approx(statistics.stdev(rps) / statistics.mean(rps))
    assert (s["min"], s["max"]) == (min(rps), max(rps))
    p50s = [run.latency_ms["p50"] for run in result.runs]
    assert result.summary()["latency_ms"]["p50"]["mean"] == pytest.approx(statistics.mean(p50s))
    table = format_table(result)
    assert "stddev" in table and "CV" in table and "TTFT p99 (ms)" in table


async def test_response_headers_are_captured_when_asked(fake):
    url, _ = fake
    cfg = LoadConfig(url=url, model="k", iterations=2, capture_headers=("x-fake-count",))
    r = await run_load(cfg)
    assert sorted(rec.headers["x-fake-count"] for rec in r.records) == ["1", "2"]


async def test_injected_transport_is_used():
    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"choices": [{"message": {"content": "a b c"}}]})

    cfg = LoadConfig(url="http://in-process", model="m", iterations=2, stream=False)
    r = await run_load(cfg, transport=httpx.MockTransport(answer))
    assert r.success == 2 and r.output_tokens_from == {"words": 2} and r.output_tokens == 6


# --- the CLI -----------------------------------------------------------------------------------

RUN_KEYS = {
    "requests",
    "success",
    "failed",
    "duration_s",
    "requests_per_s",
    "latency_ms",
    "ttft_ms",
    "itl_ms",
    "output_tokens",
    "input_tokens",
    "output_tokens_per_s",
    "output_tokens_from",
    "errors",
    "config",
}


def test_cli_json_has_the_documented_keys(fake, capsys):
    url, _ = fake
    args = ["bench", "serve", "--url", url + "/v1", "--model", "ttft=0.01,itl=0.005,n=4,l", "--json"]
    rc = main([*args, "--iterations", "6", "--concurrency", "2", "--warmup", "1", "--repeat", "2"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert out.keys() == {"config", "repeat", "runs", "summary"} and out["repeat"] == 2
    for run in out["runs"]:
        assert run.keys() == RUN_KEYS
        for key in ("latency_ms", "ttft_ms", "itl_ms"):
            assert run[key].keys() == {"p50", "p90", "p99", "mean"}
        assert run["success"] == 6 and run["errors"] == {}
    assert out["summary"]["latency_ms"]["p50"].keys() == {"mean", "stddev", "min", "max", "cv"}
    assert out["summary"]["requests_per_s"]["mean"] > 0
    assert out["config"]["warmup"] == 1 and out["config"]["api_key"] is None


def test_cli_table_shared_prefix_and_progress(fake, capsys):
    url, _ = fake
    rc = main(
        ["bench", "serve", "--url", url, "--model", "n=2,m", "--iterations", "8", "--progress",
         "--dataset", "shared-prefix", "--groups", "2", "--system-prompt-len", "50", "--question-len", "5"]
    )  # fmt: skip
    captured = capsys.readouterr()
    assert rc == 0
    assert "requests/s" in captured.out and "ITL p99 (ms)" in captured.out and "errors: none" in captured.out
    assert "shared-prefix: 2 groups" in captured.out
    assert "8/8" in captured.err  # the progress bar went to stderr


def test_cli_reports_failures_and_bad_files(fake, tmp_path, capsys):
    url, _ = fake
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "[503]"}\n')
    assert (
        main(["bench", "serve", "--url", url, "--model", "n", "--iterations", "2", "--dataset-path", str(f)])
        == 1
    )
    assert "http_503 2" in capsys.readouterr().out
    f.write_text('{"prompt": "fine"}\nnot json\n')
    assert main(["bench", "serve", "--url", url, "--model", "n", "--dataset-path", str(f)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "p.jsonl:2: not valid JSON" in err
    assert main(["bench", "serve", "--url", url, "--model", "n", "--concurrency", "0"]) == 1
    assert "concurrency" in capsys.readouterr().err


def test_summary_skips_figures_without_samples():
    s = stats.summarize([{"latency_ms": {"p50": None}}, {"latency_ms": {"p50": None}}])
    assert s["latency_ms"] == {}
