"""One request of the load generator, measured: the HTTP clients and the reading of their responses.

`run_load` (:mod:`kubeinfer_devkit.bench.loadgen`) sends each request body through a `Sender`: aiohttp
for real endpoints (`aiohttp_sender`), or httpx over an injected transport (`httpx_sender`). Either
gives one `RequestRecord` per request, with the same figures and the same error types.

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
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiohttp
import httpx

if TYPE_CHECKING:
    from kubeinfer_devkit.bench.loadgen import LoadConfig


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


# A non-empty string value of a field that carries generated output, in chat or completions chunks.
_CONTENT = re.compile(rb'"(?:content|text|reasoning_content|reasoning|arguments)"\s*:\s*"[^"]')
# The rare chunks worth a JSON parse: a usage object or an error (one scan finds either).
_RARE = re.compile(rb'"(?:usage"\s*:\s*\{|error"\s*:)')


def error_type(prefix: str, body: Any, status: int | None = None) -> str:
    """`prefix` plus the OpenAI error `code`, unless there is none or it only repeats the status."""
    err = body.get("error") if isinstance(body, dict) else None
    code = err.get("code") if isinstance(err, dict) else None
    if code is None or isinstance(code, bool) or str(code) == str(status):
        return prefix
    return f"{prefix}:{str(code)[:64]}"


def http_error(status: int, raw: bytes) -> str:
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    return error_type(f"http_{status}", body, status)


class SSEReader:
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
                self.error = error_type("stream_error", obj)
            return True
        usage = obj.get("usage") if isinstance(obj, dict) else None
        if isinstance(usage, dict):
            if isinstance(usage.get("completion_tokens"), int):
                self.usage_tokens = usage["completion_tokens"]
            if isinstance(usage.get("prompt_tokens"), int):
                self.input_tokens = usage["prompt_tokens"]
        return False


def request_headers(config: LoadConfig) -> dict[str, str]:
    headers = {"content-type": "application/json", **config.headers}
    if config.api_key:
        headers["authorization"] = f"Bearer {config.api_key}"
    return headers


async def _send_httpx(
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
    """As `_send_httpx`, with aiohttp: the same record, the same error types."""
    start = time.perf_counter()
    rec = RequestRecord(index=index, start=start, latency=0.0)
    sse: SSEReader | None = None
    try:
        async with asyncio.timeout(config.timeout), session.post(url, data=body, headers=headers) as resp:
            _capture(config, resp.headers, rec)
            if resp.status >= 300 or not config.stream:
                raw = await resp.read()
                rec.latency = time.perf_counter() - start
                rec.ttft = rec.latency
                _parse_plain(rec, resp.status, raw)
            else:
                sse = SSEReader()
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
            rec.error = http_error(resp.status_code, await resp.aread())
            return
        sse = SSEReader()
        perf_counter = time.perf_counter
        # Read to the very end (not just to [DONE]) so the connection goes back to the pool.
        async for data in resp.aiter_bytes():
            sse.feed(data, perf_counter())
    _end_stream(rec, sse, start)


def _end_stream(rec: RequestRecord, sse: SSEReader, start: float) -> None:
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
        rec.error = http_error(status, raw)
        return
    try:
        obj = json.loads(raw)
    except ValueError:
        obj = None
    if not isinstance(obj, dict):
        rec.error = "invalid_response"
        return
    if obj.get("error"):
        rec.error = error_type(f"http_{status}", obj, status)
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
"""Sends one request body (with its index) and measures it: `_send_httpx` or `_send_aiohttp` on a client."""


async def aiohttp_sender(
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


async def httpx_sender(
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
        return _send_httpx(client, config, url, body, headers, index)

    return send
