"""Load generator for OpenAI-compatible endpoints: `kubeinfer bench serve`, and the API that other
benchmarks (`bench overhead`, `bench routing`) reuse.

API
---
::

    from kubeinfer_devkit.bench.loadgen import LoadConfig, run_load, run_repeats

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
How a request is measured (the clock, TTFT, ITL, output tokens), how SSE is read, and the error types
of `RequestRecord`: :mod:`kubeinfer_devkit.bench.client`, which sends the requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import httpx

from kubeinfer_devkit.bench import datasets, stats
from kubeinfer_devkit.bench.client import RequestRecord, Sender, aiohttp_sender, httpx_sender, request_headers
from kubeinfer_devkit.bench.datasets import Prompt

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
    url, headers = config.endpoint_url, request_headers(config)
    async with contextlib.AsyncExitStack() as stack:
        if transport is None:
            clients = [await aiohttp_sender(stack, config, url, headers)]
        else:
            clients = [await httpx_sender(stack, config, url, headers, transport)]
        if config.warmup:
            warm = min(config.concurrency or 1, config.warmup)
            await _phase(clients, bodies[: config.warmup], None, warm, None, config.seed)
        duration, records = await _phase(
            clients, bodies[config.warmup :], config.rate, config.concurrency, on_progress, config.seed
        )
    return RunResult.from_records(config, duration, records)


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
