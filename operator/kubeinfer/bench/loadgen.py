"""Load generator for OpenAI-compatible endpoints: `kubeinfer bench serve`, and the API that other
benchmarks (`bench overhead`, `bench routing`) reuse.

API
---
::

    from kubeinfer.bench.loadgen import LoadConfig, run_load, run_repeats

    result = await run_load(LoadConfig(url="http://127.0.0.1:8000", model="tiny", concurrency=8))
    result.latency_ms["p99"], result.to_dict()   # figures; to_dict() has stable keys
    result.records                                # one RequestRecord per measured request

`async def run_load(config, *, prompts=None, transport=None, on_progress=None) -> RunResult`
    One run: `config.warmup` requests (closed loop, figures discard them), then `config.iterations`
    measured ones. `prompts` replaces the configured dataset (a sequence of `datasets.Prompt`, used
    in order and wrapped around; warm-up takes the first ones); `on_progress(done, total)` is called
    after each measured request. Requests go out with aiohttp, one keep-alive connection per request in
    flight. `transport`, an httpx transport, replaces the network (e.g. `httpx.ASGITransport` for an
    app in the same process: it buffers whole responses, so TTFT is the latency and ITL 0 there, or
    `httpx.MockTransport`); the requests then go through an `httpx.AsyncClient` instead.

`async def run_repeats(config, repeat, ...) -> BenchResult`
    `repeat` runs, run i with seed `config.seed + i` (fresh prompts and arrivals, so a prefix cache
    warmed by run i does not flatter run i+1); `BenchResult.summary()` gives mean, stddev, min, max and
    CV per figure (see `stats.summarize`). `on_progress(run, done, total)`.

`LoadConfig` fields: `url` (base URL, with or without /v1), `model`, `endpoint` ("chat" or
"completions"), `iterations`, `concurrency` (closed loop: that many requests in flight; with `rate`:
a cap on requests in flight), `rate` (open loop: Poisson arrivals at that many requests/s, seeded),
`max_tokens`, `stream`, `warmup`, `api_key`, `seed`, `timeout` (seconds, whole request), `dataset`
("synthetic", "shared-prefix" or "file"), `input_len`, `output_len` (synthetic and shared-prefix:
max_tokens per request; None: `max_tokens`), `groups`, `system_prompt_len`, `question_len`,
`dataset_path` (JSONL), `ignore_eos` (vLLM: always generate max_tokens), `extra_body` (merged into
each request body, e.g. {"temperature": 0}), `headers` (sent with each request), `capture_headers`
(response headers kept in each RequestRecord, e.g. ("x-kubeinfer-replica",) to see the routing).

`RunResult` fields and `to_dict()` keys: `requests` (measured), `success`, `failed`, `duration_s`,
`requests_per_s` (successful requests / duration), `latency_ms`, `ttft_ms` and `itl_ms` (each
{p50, p90, p99, mean}, None without samples), `output_tokens`, `input_tokens`, `output_tokens_per_s`,
`output_tokens_from` ({"usage" | "chunks" | "words": requests}), `errors` ({type: count}) and `config`
(`LoadConfig.to_dict()`: the API key and header values are left out); `records` stays out of the dict.

Measurement
-----------
The clock is `time.perf_counter`; a request's time starts when it is handed to the client (its body is
serialized beforehand) and ends when its response has been read to the end. TTFT is the time to the
first chunk carrying content (text, reasoning or tool-call arguments; vLLM's empty role chunk does not
count); ITL are the gaps between consecutive content chunks, pooled over all requests; chunks read
together get the same timestamp, as the client saw them. Without streaming TTFT equals latency and
there is no ITL. Output tokens come from the response's `usage` (streams ask for it with
`stream_options.include_usage`), else the number of content chunks, else (non-streamed) the words.

SSE is split into lines as bytes arrive and each `data:` payload is searched with two regular
expressions (content? a usage object or an error?); JSON is parsed for the usage chunk and error
events only. Measured on a vLLM chunk: about half the cost of splitting and `json.loads` per chunk,
and a small part of what the HTTP client spends per chunk (docs/benchmarks.md has the numbers).

Error types: `http_<status>` (plus `:<code>` when the OpenAI error body has a `code` other than the
status), `stream_error[:<code>]` (an error event inside a 200 stream), `timeout`, `connection_error`
(could not connect), `connection_lost` (the connection broke mid-request), `invalid_response`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import aiohttp
import httpx

from kubeinfer.bench import datasets, stats
from kubeinfer.bench.datasets import Prompt

Endpoint = Literal["chat", "completions"]
Dataset = Literal["synthetic", "shared-prefix", "file"]
ENDPOINT_PATHS: dict[str, str] = {"chat": "/chat/completions", "completions": "/completions"}


@dataclass(frozen=True)
class LoadConfig:
    """What to send, how fast and how many; see the module docstring."""

    url: str
    model: str
    endpoint: Endpoint = "chat"
    iterations: int = 100
    concurrency: int | None = None
    rate: float | None = None
    max_tokens: int = 128
    stream: bool = True
    warmup: int = 0
    api_key: str | None = None
    seed: int = 0
    timeout: float = 60.0
    dataset: Dataset = "synthetic"
    input_len: int = 128
    output_len: int | None = None
    groups: int = 4
    system_prompt_len: int = 1024
    question_len: int = 32
    dataset_path: str | None = None
    ignore_eos: bool = False
    extra_body: Mapping[str, Any] = field(default_factory=dict)
    headers: Mapping[str, str] = field(default_factory=dict)
    capture_headers: tuple[str, ...] = ()

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        if self.endpoint not in ENDPOINT_PATHS:
            raise ValueError(f"endpoint must be 'chat' or 'completions', not {self.endpoint!r}")
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"url must start with http:// or https://, not {self.url!r}")
        if self.iterations < 1:
            raise ValueError("iterations must be at least 1")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if self.rate is not None and self.rate <= 0:
            raise ValueError("rate must be positive")
        if self.warmup < 0 or self.max_tokens < 1 or self.timeout <= 0:
            raise ValueError("warmup must be >= 0, max_tokens >= 1 and timeout > 0")
        if self.dataset not in ("synthetic", "shared-prefix", "file"):
            raise ValueError(f"unknown dataset {self.dataset!r}")
        if self.dataset == "file" and not self.dataset_path:
            raise ValueError("the file dataset needs dataset_path")

    @property
    def endpoint_url(self) -> str:
        base = self.url.rstrip("/")
        for path in ENDPOINT_PATHS.values():  # a full endpoint URL was given: keep its base
            if base.endswith("/v1" + path):
                base = base[: -len(path)]
        return (base if base.endswith("/v1") else base + "/v1") + ENDPOINT_PATHS[self.endpoint]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["api_key"] = "set" if self.api_key else None  # never echo a secret into results
        d["headers"] = sorted(self.headers)
        d["extra_body"] = dict(self.extra_body)
        d["capture_headers"] = list(self.capture_headers)
        return d


@dataclass
class RequestRecord:
    """One request as measured. Times in seconds; `start` counts from the start of its phase."""

    index: int
    start: float
    latency: float
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    input_tokens: int | None = None
    tokens_from: str | None = None  # "usage", "chunks" or "words"
    error: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class RunResult:
    """The figures of one run; `to_dict()` is the stable JSON form (without `records`)."""

    config: LoadConfig
    requests: int
    success: int
    failed: int
    duration_s: float
    requests_per_s: float
    latency_ms: dict[str, float | None]
    ttft_ms: dict[str, float | None]
    itl_ms: dict[str, float | None]
    output_tokens: int
    input_tokens: int
    output_tokens_per_s: float
    output_tokens_from: dict[str, int]
    errors: dict[str, int]
    records: list[RequestRecord] = field(repr=False)

    @classmethod
    def from_records(cls, config: LoadConfig, duration_s: float, records: list[RequestRecord]) -> RunResult:
        ok = [r for r in records if r.ok]
        out_tokens = sum(r.output_tokens for r in ok)
        return cls(
            config=config,
            requests=len(records),
            success=len(ok),
            failed=len(records) - len(ok),
            duration_s=duration_s,
            requests_per_s=len(ok) / duration_s if duration_s > 0 else 0.0,
            latency_ms=stats.distribution([r.latency for r in ok], 1000),
            ttft_ms=stats.distribution([r.ttft for r in ok if r.ttft is not None], 1000),
            itl_ms=stats.distribution([gap for r in ok for gap in r.itl], 1000),
            output_tokens=out_tokens,
            input_tokens=sum(r.input_tokens or 0 for r in ok),
            output_tokens_per_s=out_tokens / duration_s if duration_s > 0 else 0.0,
            output_tokens_from=dict(Counter(r.tokens_from for r in ok if r.tokens_from)),
            errors=dict(sorted(Counter(r.error for r in records if r.error).items())),
            records=records,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "success": self.success,
            "failed": self.failed,
            "duration_s": self.duration_s,
            "requests_per_s": self.requests_per_s,
            "latency_ms": self.latency_ms,
            "ttft_ms": self.ttft_ms,
            "itl_ms": self.itl_ms,
            "output_tokens": self.output_tokens,
            "input_tokens": self.input_tokens,
            "output_tokens_per_s": self.output_tokens_per_s,
            "output_tokens_from": self.output_tokens_from,
            "errors": self.errors,
            "config": self.config.to_dict(),
        }


# The figures summarised across repeats (the counters and totals they derive from are left out).
SUMMARY_FIGURES = (
    "requests_per_s",
    "success",
    "failed",
    "latency_ms",
    "ttft_ms",
    "itl_ms",
    "output_tokens_per_s",
    "errors",
)


@dataclass
class BenchResult:
    config: LoadConfig
    runs: list[RunResult]

    def summary(self) -> dict[str, Any]:
        return stats.summarize([run.to_dict() for run in self.runs], SUMMARY_FIGURES)

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "repeat": len(self.runs),
            "runs": [run.to_dict() for run in self.runs],
            "summary": self.summary(),
        }


def arrival_times(n: int, rate: float, seed: int) -> list[float]:
    """Send times (seconds from the start) of a Poisson process at `rate`/s; the first is at 0."""
    rng = random.Random(f"arrivals:{seed}")
    times, t = [], 0.0
    for _ in range(n):
        times.append(t)
        t += rng.expovariate(rate)
    return times


def build_prompts(config: LoadConfig, n: int) -> list[Prompt]:
    if config.dataset == "synthetic":
        return datasets.synthetic(n, config.input_len, config.output_len, config.seed)
    if config.dataset == "shared-prefix":
        return datasets.shared_prefix(
            n, config.groups, config.system_prompt_len, config.question_len, config.output_len, config.seed
        )
    return datasets.cycle(datasets.load_jsonl(config.dataset_path or ""), n)


def request_body(config: LoadConfig, prompt: Prompt) -> bytes:
    body: dict[str, Any] = {
        "model": config.model,
        "max_tokens": prompt.max_tokens if prompt.max_tokens is not None else config.max_tokens,
        "stream": config.stream,
    }
    if config.endpoint == "chat":
        body["messages"] = prompt.chat_messages()
    else:
        body["prompt"] = prompt.completion_prompt()
    if config.stream:
        body["stream_options"] = {"include_usage": True}
    if config.ignore_eos:
        body["ignore_eos"] = True
    body.update(config.extra_body)
    return json.dumps(body).encode()


# A non-empty string value of a field that carries generated output, in chat or completions chunks.
_CONTENT = re.compile(rb'"(?:content|text|reasoning_content|reasoning|arguments)"\s*:\s*"[^"]')
# The rare chunks worth a JSON parse: a usage object or an error (one scan finds either).
_RARE = re.compile(rb'"(?:usage"\s*:\s*\{|error"\s*:)')


def _error_type(prefix: str, body: Any, status: int | None = None) -> str:
    """`prefix` plus the OpenAI error `code`, unless there is none or it only repeats the status."""
    err = body.get("error") if isinstance(body, dict) else None
    code = err.get("code") if isinstance(err, dict) else None
    if code is None or isinstance(code, bool) or str(code) == str(status):
        return prefix
    return f"{prefix}:{str(code)[:64]}"


def _http_error(status: int, raw: bytes) -> str:
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    return _error_type(f"http_{status}", body, status)


class _Stream:
    """Incremental SSE reader of one streamed response: content times, usage and error events."""

    __slots__ = ("buf", "chunks", "error", "event", "first", "gaps", "input_tokens", "last", "usage_tokens")

    def __init__(self) -> None:
        self.buf = b""
        self.event = b""
        self.first: float | None = None
        self.last = 0.0
        self.gaps: list[float] = []
        self.chunks = 0
        self.usage_tokens: int | None = None
        self.input_tokens: int | None = None
        self.error: str | None = None

    def feed(self, data: bytes, now: float) -> None:
        # Hot path (every chunk of every stream): no method call per line, two regex scans per payload.
        lines = (self.buf + data).split(b"\n") if self.buf else data.split(b"\n")
        self.buf = lines.pop()  # an incomplete last line waits for the next read
        for line in lines:
            if line.startswith(b"data:"):
                payload = line[5:].strip()
                if (self.event or _RARE.search(payload)) and self.rare(payload):
                    continue
                if _CONTENT.search(payload):
                    if self.first is None:
                        self.first = now
                    else:
                        self.gaps.append(now - self.last)
                    self.last = now
                    self.chunks += 1
            elif line.startswith(b"event:"):
                self.event = line[6:].strip()
            elif not line.strip():
                self.event = b""  # a blank line ends an event

    def close(self, now: float) -> None:
        """The stream ended: a last line without a newline still counts."""
        if self.buf:
            buf, self.buf = self.buf, b""
            self.feed(buf + b"\n", now)

    def rare(self, payload: bytes) -> bool:
        """Take the usage from a usage chunk; True when the payload is an error event (not content)."""
        if payload == b"[DONE]" or not payload:
            return True
        try:
            obj = json.loads(payload)
        except ValueError:
            obj = None
        if self.event == b"error" or (isinstance(obj, dict) and obj.get("error")):
            if self.error is None:
                self.error = _error_type("stream_error", obj)
            return True
        usage = obj.get("usage") if isinstance(obj, dict) else None
        if isinstance(usage, dict):
            if isinstance(usage.get("completion_tokens"), int):
                self.usage_tokens = usage["completion_tokens"]
            if isinstance(usage.get("prompt_tokens"), int):
                self.input_tokens = usage["prompt_tokens"]
        return False


def _headers(config: LoadConfig) -> dict[str, str]:
    headers = {"content-type": "application/json", **config.headers}
    if config.api_key:
        headers["authorization"] = f"Bearer {config.api_key}"
    return headers


async def _send(
    client: httpx.AsyncClient, config: LoadConfig, url: str, body: bytes, headers: dict[str, str], index: int
) -> RequestRecord:
    start = time.perf_counter()
    rec = RequestRecord(index=index, start=start, latency=0.0)
    try:
        async with asyncio.timeout(config.timeout):
            await _exchange(client, url, body, headers, config, rec, start)
    except (TimeoutError, httpx.TimeoutException):
        rec.error = "timeout"
    except (httpx.ConnectError, httpx.ProxyError, httpx.UnsupportedProtocol):
        rec.error = "connection_error"
    except httpx.TransportError:  # read/write errors, the server closing mid-response
        rec.error = "connection_lost"
    except (httpx.DecodingError, httpx.StreamError):
        rec.error = "invalid_response"
    if not rec.latency:
        rec.latency = time.perf_counter() - start
    return rec


async def _send_aiohttp(
    session: aiohttp.ClientSession, config: LoadConfig, url: str, body: bytes, headers: dict[str, str],
    index: int,
) -> RequestRecord:  # fmt: skip
    """`_send` with aiohttp: the same record, the same error types."""
    start = time.perf_counter()
    rec = RequestRecord(index=index, start=start, latency=0.0)
    sse: _Stream | None = None
    try:
        async with asyncio.timeout(config.timeout), session.post(url, data=body, headers=headers) as resp:
            _capture(config, resp.headers, rec)
            if resp.status >= 300 or not config.stream:
                raw = await resp.read()
                rec.latency = time.perf_counter() - start
                rec.ttft = rec.latency
                _parse_plain(rec, resp.status, raw)
            else:
                sse = _Stream()
                perf_counter = time.perf_counter
                async for data in resp.content.iter_any():  # to the very end: the connection is reused
                    sse.feed(data, perf_counter())
        if sse is not None:
            _end_stream(rec, sse, start)
    except TimeoutError:
        rec.error = "timeout"
    except (aiohttp.ClientConnectorError, aiohttp.InvalidURL):
        rec.error = "connection_error"
    except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
        rec.error = "connection_lost"  # the server closed or broke the connection mid-response
    except aiohttp.ClientError:  # a malformed status line or headers
        rec.error = "invalid_response"
    if not rec.latency:
        rec.latency = time.perf_counter() - start
    return rec


def _capture(config: LoadConfig, headers: Mapping[str, str], rec: RequestRecord) -> None:
    for name in config.capture_headers:  # both clients' header maps are case-insensitive
        if name in headers:
            rec.headers[name] = headers[name]


async def _exchange(
    client: httpx.AsyncClient,
    url: str,
    body: bytes,
    headers: dict[str, str],
    config: LoadConfig,
    rec: RequestRecord,
    start: float,
) -> None:
    """One request with httpx: a whole answer, or (`config.stream`) a stream read to its end."""
    if not config.stream:
        resp = await client.post(url, content=body, headers=headers)
        rec.latency = time.perf_counter() - start
        rec.ttft = rec.latency
        _capture(config, resp.headers, rec)
        _parse_plain(rec, resp.status_code, resp.content)
        return
    async with client.stream("POST", url, content=body, headers=headers) as resp:
        _capture(config, resp.headers, rec)
        if resp.status_code >= 300:
            rec.error = _http_error(resp.status_code, await resp.aread())
            return
        sse = _Stream()
        perf_counter = time.perf_counter
        # Read to the very end (not just to [DONE]) so the connection goes back to the pool.
        async for data in resp.aiter_bytes():
            sse.feed(data, perf_counter())
    _end_stream(rec, sse, start)


def _end_stream(rec: RequestRecord, sse: _Stream, start: float) -> None:
    """A stream read to its end: latency, TTFT, ITL, tokens, or the error event it carried."""
    end = time.perf_counter()
    sse.close(end)
    rec.latency = end - start
    if sse.error:
        rec.error = sse.error
        return
    rec.ttft = sse.first - start if sse.first is not None else rec.latency
    rec.itl = sse.gaps
    rec.input_tokens = sse.input_tokens
    if sse.usage_tokens is not None:
        rec.output_tokens, rec.tokens_from = sse.usage_tokens, "usage"
    else:
        rec.output_tokens, rec.tokens_from = sse.chunks, "chunks"


def _parse_plain(rec: RequestRecord, status: int, raw: bytes) -> None:
    """A whole (non-streamed) answer: its error type, or its output tokens."""
    if status >= 300:
        rec.error = _http_error(status, raw)
        return
    try:
        obj = json.loads(raw)
    except ValueError:
        obj = None
    if not isinstance(obj, dict):
        rec.error = "invalid_response"
        return
    if obj.get("error"):
        rec.error = _error_type(f"http_{status}", obj, status)
        return
    usage = obj.get("usage")
    if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
        rec.output_tokens, rec.tokens_from = usage["completion_tokens"], "usage"
        if isinstance(usage.get("prompt_tokens"), int):
            rec.input_tokens = usage["prompt_tokens"]
        return
    choices = obj.get("choices")
    first = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}
    message = first.get("message")
    text = message.get("content") if isinstance(message, dict) else first.get("text")
    rec.output_tokens, rec.tokens_from = len(text.split()) if isinstance(text, str) else 0, "words"


Sender = Callable[[bytes, int], Awaitable[RequestRecord]]
"""Sends one request body (with its index) and measures it: `_send` or `_send_aiohttp` on a client."""


async def _phase(
    clients: Sequence[Sender],
    bodies: Sequence[bytes],
    rate: float | None,
    concurrency: int | None,
    on_progress: Callable[[int, int], None] | None,
    seed: int,
) -> tuple[float, list[RequestRecord]]:
    n = len(bodies)
    records: list[RequestRecord | None] = [None] * n
    done = 0

    async def one(i: int, send: Sender) -> None:
        nonlocal done
        records[i] = await send(bodies[i], i)
        done += 1
        if on_progress:
            on_progress(done, n)

    t0 = time.perf_counter()
    if rate is None:
        indexes = iter(range(n))

        async def worker(send: Sender) -> None:
            for i in indexes:  # shared: each worker takes the next request when it is free
                await one(i, send)

        workers = min(concurrency or 1, n)
        await asyncio.gather(*(worker(clients[w % len(clients)]) for w in range(workers)))
    else:
        slots = asyncio.Semaphore(concurrency) if concurrency else None

        async def capped(i: int) -> None:
            client = clients[i % len(clients)]
            if slots is None:
                await one(i, client)
            else:
                async with slots:
                    await one(i, client)

        tasks = []
        for i, at in enumerate(arrival_times(n, rate, seed)):
            delay = t0 + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(capped(i)))
        await asyncio.gather(*tasks)
    duration = time.perf_counter() - t0
    out = [r for r in records if r is not None]
    for r in out:
        r.start -= t0
    return duration, out


async def run_load(
    config: LoadConfig,
    *,
    prompts: Sequence[Prompt] | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> RunResult:
    """One warm-up + measured run; see the module docstring. Raises ValueError or DatasetError."""
    config.validate()
    n = config.warmup + config.iterations
    chosen = datasets.cycle(prompts, n) if prompts else build_prompts(config, n)
    bodies = [request_body(config, p) for p in chosen]
    url, headers = config.endpoint_url, _headers(config)
    async with contextlib.AsyncExitStack() as stack:
        if transport is None:
            clients = [await _aiohttp_sender(stack, config, url, headers)]
        else:
            clients = [await _httpx_sender(stack, config, url, headers, transport)]
        if config.warmup:
            warm = min(config.concurrency or 1, config.warmup)
            await _phase(clients, bodies[: config.warmup], None, warm, None, config.seed)
        duration, records = await _phase(
            clients, bodies[config.warmup :], config.rate, config.concurrency, on_progress, config.seed
        )
    return RunResult.from_records(config, duration, records)


async def _aiohttp_sender(
    stack: contextlib.AsyncExitStack, config: LoadConfig, url: str, headers: dict[str, str]
) -> Sender:
    """The client of real endpoints: one aiohttp session, keep-alive, a connection per request in
    flight. Against a replica that answers at once, httpx cost 2.9 ms of CPU per request (3.6 ms per
    16-token stream, after spreading its connections over clients of 8 for encode/httpx#3215) where
    aiohttp cost 0.4 (0.6 ms): docs/benchmarks.md."""
    session = await stack.enter_async_context(
        aiohttp.ClientSession(
            # No pool limit: the loop's own concurrency bounds the connections.
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30),
            timeout=aiohttp.ClientTimeout(total=None),  # asyncio.timeout(config.timeout) in _send_aiohttp
            trust_env=False,  # a proxy from the environment would be measured along with the endpoint
            cookie_jar=aiohttp.DummyCookieJar(),
        )
    )

    def send(body: bytes, index: int) -> Awaitable[RequestRecord]:
        return _send_aiohttp(session, config, url, body, headers, index)

    return send


async def _httpx_sender(
    stack: contextlib.AsyncExitStack,
    config: LoadConfig,
    url: str,
    headers: dict[str, str],
    transport: httpx.AsyncBaseTransport,
) -> Sender:
    """An injected httpx transport (an app in this process, a mock), which owns its pool."""
    client = await stack.enter_async_context(
        httpx.AsyncClient(transport=transport, timeout=httpx.Timeout(config.timeout), trust_env=False)
    )

    def send(body: bytes, index: int) -> Awaitable[RequestRecord]:
        return _send(client, config, url, body, headers, index)

    return send


async def run_repeats(
    config: LoadConfig,
    repeat: int = 1,
    *,
    prompts: Sequence[Prompt] | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
    on_progress: Callable[[int, int, int], None] | None = None,
) -> BenchResult:
    """`repeat` runs, run i seeded with `config.seed + i`; see the module docstring."""
    if repeat < 1:
        raise ValueError("repeat must be at least 1")
    runs = []
    for i in range(repeat):

        def progress(done: int, total: int, run: int = i) -> None:
            if on_progress:
                on_progress(run, done, total)

        runs.append(
            await run_load(replace(config, seed=config.seed + i), prompts=prompts, transport=transport,
                           on_progress=progress)
        )  # fmt: skip
    return BenchResult(config, runs)
