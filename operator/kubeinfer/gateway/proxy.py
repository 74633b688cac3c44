"""The request path: `POST /v1/{chat/completions,completions,embeddings,responses,messages}`.

Read the body (bounded), check it just enough to answer bad requests ourselves, admit it (API key,
limits, the model's queue), pick a replica (`routing.choose`), and relay the upstream response as it
arrives. Connection errors and 502/503/504 before the first byte are retried on another replica; a
replica that fails mid-stream ends an SSE stream with an error event, since the status line is sent.

This is a raw ASGI handler, not a Starlette endpoint: Starlette's StreamingResponse runs an anyio task
group per response to notice disconnects, which cost more CPU than the whole relay. Here one watcher
task waits for the client's `http.disconnect` and cancels the relay, which closes the upstream
response so the engine stops generating too.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any, Protocol

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse

from kubeinfer.gateway import translate as tr
from kubeinfer.gateway.admission import ModelQueue, QueueFull, QueueTimeout
from kubeinfer.gateway.auth import ApiKey, Denied
from kubeinfer.gateway.registry import ModelEntry
from kubeinfer.gateway.routing import Endpoint, Load, RouteRequest, choose, prefix_blocks
from kubeinfer.gateway.state import State
from kubeinfer.gateway.upstream import UpstreamError, UpstreamResponse
from kubeinfer.gateway.usage import (
    SSEUsage,
    Usage,
    prepare_stream_request,
    stream_request_bytes,
    usage_from_dict,
    usage_from_json,
)

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

TRANSLATED = ("responses", "messages")  # what the gateway can turn into chat completions for a remote
PROXIED = ("chat/completions", "completions", "embeddings", "responses", "messages")
RETRY_STATUSES = {502, 503, 504}
USAGE_BODY_LIMIT = 1 << 20  # JSON bodies longer than this are passed on without reading their usage
# Hop-by-hop and length headers are the proxy's own business on each side.
# The client's API key is the gateway's business, never the engine's.
_CLIENT_ONLY = {"accept-encoding", "authorization", "x-api-key"}
_DROP_HEADERS = {"host", "content-length", "connection", "keep-alive", "transfer-encoding", "te", "upgrade"}
_NOT_FORWARDED = frozenset(h.encode() for h in _DROP_HEADERS | _CLIENT_ONLY)  # as ASGI gives names
_DROP_WITH_TYPE = _DROP_HEADERS | {"content-type"}  # a translated body has its own content type

_access_log = logging.getLogger("kubeinfer.gateway.access")


def error(
    status: int,
    message: str,
    type_: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """OpenAI's error envelope."""
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def _has_image(body: dict[str, Any]) -> bool:
    for message in body.get("messages") or []:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and part.get("type") in ("image_url", "image", "input_image"):
                    return True
    for item in body.get("input") or [] if isinstance(body.get("input"), list) else []:
        content = item.get("content") if isinstance(item, dict) else None
        if isinstance(content, list) and any(
            isinstance(p, dict) and p.get("type") == "input_image" for p in content
        ):
            return True
    return False


async def _read_body(request: Request, limit: int) -> bytes | None:
    """The body, or None if it exceeds `limit` (stops reading as soon as it does)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        return None
    # What request.stream() does, without an async generator per request.
    receive = request.receive
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.request":
            chunk = message.get("body", b"")
            if chunk:
                size += len(chunk)
                if size > limit:
                    return None
                chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)
        elif message["type"] == "http.disconnect":
            raise ClientDisconnect()


_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


@functools.lru_cache(maxsize=256)  # called per request with the model's queueTimeout
def parse_duration(text: str) -> float:
    """'30s', '5m', '1h30m', '500ms' -> seconds (the API's Duration format)."""
    total = 0.0
    for number, unit in _DURATION.findall(text):
        total += float(number) * _UNITS[unit]
    return total


def _try_pick(state: State, entry: ModelEntry, route: RouteRequest, tried: frozenset[str]) -> Endpoint | None:
    """A replica with room (own in-flight below the model's target), its slot taken; or None."""
    endpoints = state.registry.ready_endpoints(entry.name)
    full = frozenset(
        e.id for e in endpoints if state.loads.get(e.id, Load()).inflight >= entry.target_inflight
    )
    cached = state.prefix_index.match(route.prefix, (e.id for e in endpoints)) if route.prefix else None
    decision = choose(
        entry.routing.strategy, endpoints, state.loads, route, now=time.monotonic(),
        scrape_interval=state.settings.scrape_interval, rr_counter=state.rr.get(entry.name, 0),
        target_inflight=entry.target_inflight, cached=cached, exclude=tried | full,
    )  # fmt: skip
    if decision is None:
        return None
    state.rr[entry.name] = state.rr.get(entry.name, 0) + 1
    state.inflight(decision.endpoint_id, +1)  # taken here, so a concurrent request sees it at once
    if route.prefix:
        state.prefix_index.record(route.prefix, decision.endpoint_id)
    return next(e for e in endpoints if e.id == decision.endpoint_id)


async def _wait_for_another(
    state: State,
    entry: ModelEntry,
    route: RouteRequest,
    queue: ModelQueue[Endpoint],
    tried: frozenset[str],
    remaining: float,
) -> Endpoint | None:
    """A retry when every replica not yet tried is at its in-flight target: wait in the model's queue
    for one of them within the request's deadline (past maxQueue: the request was admitted once)."""

    def untried() -> bool:
        return any(e.id not in tried for e in state.registry.ready_endpoints(entry.name))

    if remaining <= 0 or not untried():
        return None
    try:
        return await queue.admit(
            lambda: _try_pick(state, entry, route, tried), untried, queue.waiting + 1, remaining
        )
    except (QueueFull, QueueTimeout):
        return None


@dataclass
class Trace:
    """One proxied request, for metrics and the access log."""

    model: ModelEntry
    replica: str
    key: ApiKey
    path: str
    arrived: float
    queue_wait: float
    retries: int
    first_chunk: float | None = None


async def proxy(state: State, scope: Scope, receive: Receive, send: Send) -> None:
    request = Request(scope, receive)
    arrived = time.monotonic()
    path = scope["path"].removeprefix("/v1/")
    if path not in PROXIED:
        resp = error(404, f"unknown endpoint /v1/{path}", "invalid_request_error", code="not_found")
        return await resp(scope, receive, send)
    outcome = await _forward(state, request, path, arrived)
    if isinstance(outcome, JSONResponse):
        return await outcome(scope, receive, send)
    trace, upstream, relay = outcome
    await _relay(state, trace, upstream, relay, receive, send)


async def _forward(
    state: State, request: Request, path: str, arrived: float
) -> JSONResponse | tuple[Trace, UpstreamResponse, Relay]:
    """Admission, routing and the upstream request: an error to answer, or an upstream to relay."""
    try:
        key = state.keys.authenticate(
            request.headers.get("authorization") or request.headers.get("x-api-key")
        )
    except Denied as denied:
        state.errors.labels("", denied.code).inc()
        return error(denied.status, denied.message, "invalid_request_error", code=denied.code)
    raw = await _read_body(request, state.settings.max_body_bytes)
    if raw is None:
        return error(413, f"request body over {state.settings.max_body_bytes} bytes", "invalid_request_error",
                     code="request_too_large")  # fmt: skip
    try:
        body = json.loads(raw)
    except ValueError as exc:
        return error(400, f"request body is not valid JSON: {exc}", "invalid_request_error")
    if not isinstance(body, dict):
        return error(400, "request body must be a JSON object", "invalid_request_error")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        return error(400, "you must provide a model parameter", "invalid_request_error", param="model")
    entry = state.registry.resolve(model)
    if entry is None:
        state.errors.labels(model, "model_not_found").inc()
        return error(404, f"The model `{model}` does not exist.", "invalid_request_error", param="model",
                     code="model_not_found")  # fmt: skip
    if not entry.accepts_images and _has_image(body):
        state.errors.labels(entry.name, "modality_unsupported").inc()
        return error(400, f"model `{model}` accepts text only", "invalid_request_error", param="messages",
                     code="modality_unsupported")  # fmt: skip
    try:
        state.keys.admit(key, model, time.monotonic(), remote=entry.remote is not None)
    except Denied as denied:
        state.errors.labels(entry.name, denied.code).inc()
        wait = {"Retry-After": str(max(1, round(denied.retry_after)))} if denied.retry_after else None
        kind = "rate_limit_error" if denied.status == 429 else "permission_error"
        return error(denied.status, denied.message, kind, param="model", code=denied.code, headers=wait)

    route = RouteRequest(
        model=entry.name,
        # Hashed only where it is used: the other strategies route by load alone.
        prefix=prefix_blocks(body) if entry.routing.strategy == "prefix-aware" else (),
        session=request.headers.get(entry.routing.session_header) if entry.routing.session_header else None,
    )  # fmt: skip
    upstream_path, translate = path, None
    body_up = body
    if entry.remote is not None and path in TRANSLATED and path not in entry.remote.native_apis:
        # A remote that only speaks chat completions: send the request as one, answer in the API asked.
        try:
            body_up = tr.responses_to_chat(body) if path == "responses" else tr.messages_to_chat(body)
        except tr.TranslationError as exc:
            return error(
                400, str(exc), "invalid_request_error", param=exc.param, code="unsupported_by_remote"
            )
        upstream_path, translate = "chat/completions", path
    # Ask every stream for its usage (for the ledger); strip it again if the client did not ask.
    sent, strip_usage = prepare_stream_request(upstream_path, body_up)
    headers = {
        k.decode("latin-1"): v.decode("latin-1") for k, v in request.headers.raw if k not in _NOT_FORWARDED
    }
    # The engine hop stays uncompressed, so usage can be read off the bytes.
    headers["accept-encoding"] = "identity"
    if entry.remote is not None:
        # A remote API gets its own model id and key; the client's key stays here.
        raw = json.dumps({**sent, "model": entry.remote.model}).encode()
        if entry.remote.api_key:
            headers["authorization"] = f"Bearer {entry.remote.api_key}"
    elif sent is not body:
        raw = stream_request_bytes(raw, body, sent)

    tried: frozenset[str] = frozenset()
    last_error = "no ready replica"
    queue = state.queues.get(entry.name)
    if queue is None:
        queue = state.queues[entry.name] = ModelQueue()
    timeout = state.settings.hold_timeout or parse_duration(entry.routing.queue_timeout)
    queue_wait = 0.0
    for attempt in range(state.settings.retries + 1):
        if attempt == 0:
            try:
                endpoint = await queue.admit(
                    lambda: _try_pick(state, entry, route, frozenset()),
                    lambda: bool(state.registry.ready_endpoints(entry.name)),
                    entry.routing.max_queue, timeout,
                )  # fmt: skip
            except QueueFull:
                state.errors.labels(entry.name, "queue_full").inc()
                return error(429, f"too many requests queued for `{model}`", "rate_limit_error",
                             code="queue_full", headers={"Retry-After": "1"})  # fmt: skip
            except QueueTimeout as exc:
                kind = "queue_timeout" if exc.had_replicas else "no_replica"
                state.errors.labels(entry.name, kind).inc()
                what = "a free replica" if exc.had_replicas else "a ready replica"
                return error(503, f"no {what} of `{model}` within {exc.waited:.0f}s", "service_unavailable",
                             code=kind, headers={"Retry-After": "5"})  # fmt: skip
            queue_wait = time.monotonic() - arrived
            state.queue_wait_for(entry.name).observe(queue_wait)
        else:
            # Retries go to another replica. If all the others are at their in-flight target, wait
            # for one in the queue (within the request's deadline, past maxQueue: it was admitted).
            retry = _try_pick(state, entry, route, tried)
            if retry is None:
                retry = await _wait_for_another(
                    state, entry, route, queue, tried, timeout - (time.monotonic() - arrived)
                )
            if retry is None:
                break
            endpoint = retry
            state.retries_for(entry.name).inc()
        tried = tried | {endpoint.id}
        if entry.remote is not None:
            url = f"{entry.remote.base_url.rstrip('/')}/{upstream_path}"
        else:
            url = f"http://{endpoint.address}/v1/{path}"
        started = time.monotonic()
        try:
            upstream = await state.upstream.post(url, headers, raw)
        except UpstreamError as exc:
            state.release(entry.name, endpoint.id)
            last_error = f"replica {endpoint.id}: {exc}"
            continue
        except BaseException:  # cancelled while connecting (the client left): give the slot back
            state.release(entry.name, endpoint.id)
            raise
        if upstream.status in RETRY_STATUSES and attempt < state.settings.retries:
            await upstream.close()
            state.release(entry.name, endpoint.id)
            last_error = f"replica {endpoint.id} answered {upstream.status}"
            continue
        state.ttfb_for(entry.name).observe(time.monotonic() - started)
        state.requests_for(entry.name, endpoint.id, upstream.status).inc()  # labels() str()s the code
        trace = Trace(entry, endpoint.id, key, path, arrived, queue_wait, attempt)
        is_sse = any(
            v.startswith("text/event-stream") and k.lower() == "content-type" for k, v in upstream.headers
        )
        relay: Relay
        if translate is not None and upstream.status == 200:
            relay = TranslatedSSE(translate, body) if is_sse else TranslatedJSON(translate, body)
        elif is_sse:
            relay = PlainSSE(strip_usage)
        else:
            relay = PlainJSON()
        return trace, upstream, relay

    state.errors.labels(entry.name, "upstream").inc()
    return error(502, f"upstream failure: {last_error}", "upstream_error", code="bad_gateway")


# --- Relaying the body -----------------------------------------------------------------------------


class Relay(Protocol):
    """What happens to the body on its way back: passed through, or translated; usage read off it."""

    is_sse: bool
    content_type: str | None
    """Content type to send instead of the upstream's (a translated body), or None to keep it."""

    def feed(self, chunk: bytes) -> bytes: ...

    def end(self) -> bytes: ...

    def usage(self) -> Usage | None: ...


class PlainSSE:
    is_sse: bool = True
    content_type: str | None = None

    def __init__(self, strip_usage: bool) -> None:
        self._sse = SSEUsage(strip_usage)
        self.feed = self._sse.feed  # per chunk: no call through a wrapper

    def end(self) -> bytes:
        return self._sse.flush()

    def usage(self) -> Usage | None:
        return self._sse.usage


class PlainJSON:
    """Passed through as it comes; the head (up to a bound) is kept to read the usage at the end."""

    is_sse: bool = False
    content_type: str | None = None

    def __init__(self) -> None:
        self._head: list[bytes] = []
        self._kept = 0

    def feed(self, chunk: bytes) -> bytes:
        if self._kept < USAGE_BODY_LIMIT:
            self._head.append(chunk)
            self._kept += len(chunk)
        return chunk

    def end(self) -> bytes:
        return b""

    def usage(self) -> Usage | None:
        return usage_from_json(b"".join(self._head)) if self._kept <= USAGE_BODY_LIMIT else None


class TranslatedSSE:
    """A remote's chat-completions stream, turned into the Responses or Messages API's events."""

    is_sse: bool = True
    content_type: str | None = "text/event-stream"

    def __init__(self, api: str, request: dict[str, Any]) -> None:
        self._stream: tr.ChatToResponsesStream | tr.ChatToMessagesStream = (
            tr.ChatToResponsesStream(request) if api == "responses" else tr.ChatToMessagesStream(request)
        )

    def feed(self, chunk: bytes) -> bytes:
        return self._stream.feed(chunk)

    def end(self) -> bytes:
        return self._stream.close()

    def usage(self) -> Usage | None:
        return Usage(*self._stream.usage) if self._stream.usage is not None else None


class TranslatedJSON:
    """A remote's chat completion, turned into a Responses or Messages API object once complete."""

    is_sse: bool = False
    content_type: str | None = "application/json"

    def __init__(self, api: str, request: dict[str, Any]) -> None:
        self._api, self._request = api, request
        self._chunks: list[bytes] = []
        self._usage: Usage | None = None

    def feed(self, chunk: bytes) -> bytes:
        self._chunks.append(chunk)
        return b""

    def end(self) -> bytes:
        chat = json.loads(b"".join(self._chunks))  # ValueError: not a chat completion (a 502 case)
        convert = tr.chat_to_responses if self._api == "responses" else tr.chat_to_messages
        self._usage = usage_from_dict(chat.get("usage")) if isinstance(chat, dict) else None
        return json.dumps(convert(chat, self._request)).encode()

    def usage(self) -> Usage | None:
        return self._usage


def _sse_error(exc: Exception) -> bytes:
    err = {
        "error": {
            "message": f"replica failed mid-stream: {exc}", "type": "upstream_error", "param": None,
            "code": "stream_interrupted",
        }
    }  # fmt: skip
    return f"data: {json.dumps(err)}\n\n".encode()


async def _relay(
    state: State, trace: Trace, upstream: UpstreamResponse, relay: Relay, receive: Receive, send: Send
) -> None:
    model, replica = trace.model.name, trace.replica
    drop = _DROP_WITH_TYPE if relay.content_type else _DROP_HEADERS
    headers = []
    for k, v in upstream.headers:
        name = k.lower()
        if name not in drop:
            headers.append((name.encode("latin-1"), v.encode("latin-1")))
    if relay.content_type:
        headers.append((b"content-type", relay.content_type.encode()))
    headers.append((b"x-kubeinfer-replica", replica.encode()))
    headers.append((b"x-kubeinfer-queue-wait-ms", f"{trace.queue_wait * 1000:.1f}".encode()))

    # The request body has been read, so the next receive() returns only when the client goes away.
    relaying = True
    main = asyncio.current_task()
    watcher = asyncio.ensure_future(receive())

    def on_disconnect(done: asyncio.Future[MutableMapping[str, Any]]) -> None:
        if relaying and main is not None and not done.cancelled() and done.exception() is None:
            main.cancel()

    watcher.add_done_callback(on_disconnect)
    outcome = "ok"
    started = False
    try:
        await send({"type": "http.response.start", "status": upstream.status, "headers": headers})
        started = True
        try:
            feed = relay.feed
            async for chunk in upstream.chunks():
                out = feed(chunk)
                if out:
                    if trace.first_chunk is None:
                        trace.first_chunk = time.monotonic()
                        state.ttft_for(model, replica).observe(trace.first_chunk - trace.arrived)
                    await send({"type": "http.response.body", "body": out, "more_body": True})
            tail = relay.end()
        except (UpstreamError, ValueError) as exc:
            # Too late for a status code: tell an SSE client in-band, as OpenAI's API does; a JSON
            # body can only be cut short, which the client sees as a broken response.
            outcome = "stream_interrupted"
            if not relay.is_sse:
                raise
            tail = relay.end() if isinstance(relay, TranslatedSSE) else _sse_error(exc)
        relaying = False
        await send({"type": "http.response.body", "body": tail, "more_body": False})
    except asyncio.CancelledError:
        if relaying and watcher.done() and not watcher.cancelled():
            outcome = "client_disconnected"  # closing `upstream` below makes the engine stop too
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
        else:
            raise
    except (UpstreamError, ValueError):
        if not started:
            raise
        outcome = "stream_interrupted"  # a cut JSON body: the connection ends without the rest
    finally:
        relaying = False
        watcher.cancel()
        state.release(model, replica)
        await upstream.close()
        usage = None
        if upstream.status == 200:
            usage = relay.usage()
            state.record_usage(trace.model, usage, trace.key.name)
            if usage is not None:
                state.keys.spend(trace.key, usage.prompt_tokens + usage.completion_tokens, time.monotonic())
        _finish(state, trace, upstream.status, outcome, usage)


def _finish(state: State, trace: Trace, status: int, outcome: str, usage: Usage | None) -> None:
    """Metrics and one structured access-log line per proxied request (never the key or the body)."""
    end = time.monotonic()
    state.duration_for(trace.model.name, trace.replica).observe(end - trace.arrived)
    if usage is not None and usage.completion_tokens > 1 and trace.first_chunk is not None:
        generating = end - trace.first_chunk
        if generating > 0:
            state.output_rate_for(trace.model.name).observe((usage.completion_tokens - 1) / generating)
    if _access_log.isEnabledFor(logging.INFO):
        ttft = trace.first_chunk - trace.arrived if trace.first_chunk is not None else None
        _access_log.info(
            "request",
            extra={
                "model": trace.model.name, "replica": trace.replica, "path": trace.path, "status": status,
                "outcome": outcome, "key": trace.key.name, "retries": trace.retries,
                "queue_wait_ms": round(trace.queue_wait * 1000, 2),
                "ttft_ms": round(ttft * 1000, 2) if ttft is not None else None,
                "duration_ms": round((end - trace.arrived) * 1000, 2),
                "prompt_tokens": usage.prompt_tokens if usage else None,
                "completion_tokens": usage.completion_tokens if usage else None,
            },
        )  # fmt: skip
