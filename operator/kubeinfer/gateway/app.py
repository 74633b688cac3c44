"""The gateway: one OpenAI-compatible API over every ready replica (ASGI, Starlette + httpx).

The request path: read the body (bounded), check it just enough to answer bad requests ourselves,
pick a replica (`routing.choose`), and stream the upstream response through without buffering.
Connection errors and 502/503/504 before the first byte are retried on another replica; a replica
that fails mid-stream ends the stream with an SSE error event, since the status line was already sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import httpx
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from kubeinfer.gateway import translate as translate_mod
from kubeinfer.gateway.admission import ModelQueue, QueueFull, QueueTimeout
from kubeinfer.gateway.auth import ApiKey, Denied, KeyStore
from kubeinfer.gateway.registry import ModelEntry, Registry
from kubeinfer.gateway.routing import Endpoint, Load, RouteRequest, choose, prefix_key
from kubeinfer.gateway.scrape import ScrapeError, parse_metrics
from kubeinfer.gateway.usage import SSEUsage, Usage, prepare_stream_request, usage_from_dict, usage_from_json

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_access_log = logging.getLogger("kubeinfer.gateway.access")

TRANSLATED = ("responses", "messages")  # what the gateway can turn into chat completions for a remote
PROXIED = ("chat/completions", "completions", "embeddings", "responses", "messages")
RETRY_STATUSES = {502, 503, 504}
USAGE_BODY_LIMIT = 1 << 20  # JSON bodies longer than this are passed on without reading their usage
# Hop-by-hop and length headers are the proxy's own business on each side.
# The client's API key is the gateway's business, never the engine's.
_CLIENT_ONLY = {"accept-encoding", "authorization", "x-api-key"}
_DROP_HEADERS = {"host", "content-length", "connection", "keep-alive", "transfer-encoding", "te", "upgrade"}


@dataclass
class GatewaySettings:
    max_body_bytes: int = 32 << 20
    retries: int = 2
    hold_timeout: float | None = None
    """How long a request may wait for a replica; None: the model's routing.queueTimeout."""
    scrape_interval: float = 1.0
    scrape_timeout: float = 0.5
    connect_timeout: float = 5.0
    read_timeout: float = 600.0


@dataclass
class State:
    registry: Registry
    settings: GatewaySettings
    client: httpx.AsyncClient
    loads: dict[str, Load] = field(default_factory=dict)
    rr: dict[str, int] = field(default_factory=dict)
    queues: dict[str, ModelQueue[Endpoint]] = field(default_factory=dict)
    ledger: dict[tuple[str, str], dict[str, float]] = field(default_factory=dict)
    keys: KeyStore = field(default_factory=KeyStore)
    metrics: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        self._register()

    def _register(self) -> None:
        self.requests = Counter(
            "kubeinfer_gateway_requests", "Requests by model, replica and status code",
            ["model", "replica", "code"], registry=self.metrics,
        )  # fmt: skip
        self.errors = Counter(
            "kubeinfer_gateway_errors", "Errors answered by the gateway, by type", ["model", "type"],
            registry=self.metrics,
        )  # fmt: skip
        self.retries = Counter("kubeinfer_gateway_retries", "Retries on another replica", ["model"],
                               registry=self.metrics)  # fmt: skip
        self.tokens = Counter(
            "kubeinfer_gateway_tokens", "Tokens by model, API key and kind (prompt, completion)",
            ["model", "key", "kind"], registry=self.metrics,
        )  # fmt: skip
        self.cost = Counter(
            "kubeinfer_gateway_estimated_cost", "Estimated cost (spec.pricing) by model and API key",
            ["model", "key"], registry=self.metrics,
        )  # fmt: skip
        self.usage_requests = Counter(
            "kubeinfer_gateway_usage_requests", "Successful requests by model and API key", ["model", "key"],
            registry=self.metrics,
        )  # fmt: skip
        self.queued = Gauge(
            "kubeinfer_gateway_queued_requests", "Requests waiting for a replica (the autoscaler's signal)",
            ["model"], registry=self.metrics,
        )  # fmt: skip
        self.inflight_gauge = Gauge(
            "kubeinfer_gateway_inflight_requests", "Requests this gateway has open, by replica", ["replica"],
            registry=self.metrics,
        )  # fmt: skip
        self.queue_wait = Histogram(
            "kubeinfer_gateway_queue_wait_seconds", "Time a request waited for a replica slot", ["model"],
            buckets=_LATENCY_BUCKETS, registry=self.metrics,
        )  # fmt: skip
        self.ttfb = Histogram(
            "kubeinfer_gateway_time_to_first_byte_seconds", "Upstream time to response headers", ["model"],
            buckets=_LATENCY_BUCKETS, registry=self.metrics,
        )  # fmt: skip
        self.ttft = Histogram(
            "kubeinfer_gateway_time_to_first_token_seconds",
            "Arrival to the first body chunk sent back (the first token of a stream)", ["model", "replica"],
            buckets=_LATENCY_BUCKETS, registry=self.metrics,
        )  # fmt: skip
        self.duration = Histogram(
            "kubeinfer_gateway_request_duration_seconds", "Arrival to the last byte sent back",
            ["model", "replica"], buckets=_LATENCY_BUCKETS, registry=self.metrics,
        )  # fmt: skip
        self.output_rate = Histogram(
            "kubeinfer_gateway_output_tokens_per_second", "Completion tokens/s after the first token",
            ["model"], buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000), registry=self.metrics,
        )  # fmt: skip

    def record_usage(self, model: ModelEntry, usage: Usage | None, key: str = "anonymous") -> None:
        """The usage ledger: requests, tokens and estimated cost per API key and model."""
        entry = self.ledger.setdefault(
            (key, model.name), {"requests": 0, "promptTokens": 0, "completionTokens": 0, "estimatedCost": 0.0}
        )
        entry["requests"] += 1
        self.usage_requests.labels(model.name, key).inc()
        if usage is not None:
            entry["promptTokens"] += usage.prompt_tokens
            entry["completionTokens"] += usage.completion_tokens
            self.tokens.labels(model.name, key, "prompt").inc(usage.prompt_tokens)
            self.tokens.labels(model.name, key, "completion").inc(usage.completion_tokens)
            cost = model.cost(usage.prompt_tokens, usage.completion_tokens)
            if cost:
                entry["estimatedCost"] += cost
                self.cost.labels(model.name, key).inc(cost)

    def release(self, model: str, endpoint_id: str) -> None:
        """A request to `endpoint_id` ended: free its slot and let the model's queue move."""
        self.inflight(endpoint_id, -1)
        queue = self.queues.get(model)
        if queue is not None:
            queue.wake()

    def inflight(self, endpoint_id: str, delta: int) -> None:
        load = self.loads.get(endpoint_id, Load())
        self.loads[endpoint_id] = Load(max(0, load.inflight + delta), load.scraped, load.scraped_at)


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
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def parse_duration(text: str) -> float:
    """'30s', '5m', '1h30m', '500ms' -> seconds (the API's Duration format)."""
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    total = 0.0
    for number, unit in re.findall(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)", text):
        total += float(number) * units[unit]
    return total


def _try_pick(state: State, entry: ModelEntry, route: RouteRequest, tried: frozenset[str]) -> Endpoint | None:
    """A replica with room (own in-flight below the model's target), its slot taken; or None."""
    endpoints = state.registry.ready_endpoints(entry.name)
    full = frozenset(
        e.id for e in endpoints if state.loads.get(e.id, Load()).inflight >= entry.target_inflight
    )
    decision = choose(
        entry.routing.strategy, endpoints, state.loads, route, now=time.monotonic(),
        scrape_interval=state.settings.scrape_interval, rr_counter=state.rr.get(entry.name, 0),
        target_inflight=entry.target_inflight, exclude=tried | full,
    )  # fmt: skip
    if decision is None:
        return None
    state.rr[entry.name] = state.rr.get(entry.name, 0) + 1
    state.inflight(decision.endpoint_id, +1)  # taken here, so a concurrent request sees it at once
    return next(e for e in endpoints if e.id == decision.endpoint_id)


async def proxy(request: Request) -> Response:
    state: State = request.app.state.gw
    arrived = time.monotonic()
    path = request.path_params["path"]
    if path not in PROXIED:
        return error(404, f"unknown endpoint /v1/{path}", "invalid_request_error", code="not_found")
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
        model=entry.name, prefix_key=prefix_key(body),
        session=request.headers.get(entry.routing.session_header) if entry.routing.session_header else None,
    )  # fmt: skip
    upstream_path, translate = path, None
    if entry.remote is not None and path in TRANSLATED and path not in entry.remote.native_apis:
        # A remote that only speaks chat completions: send the request as one, answer in the API asked.
        try:
            body_up = (
                translate_mod.responses_to_chat(body)
                if path == "responses"
                else translate_mod.messages_to_chat(body)
            )
        except translate_mod.TranslationError as exc:
            return error(
                400, str(exc), "invalid_request_error", param=exc.param, code="unsupported_by_remote"
            )
        upstream_path, translate = "chat/completions", path
    else:
        body_up = body
    # Ask every stream for its usage (for the ledger); strip it again if the client did not ask.
    send, strip_usage = prepare_stream_request(upstream_path, body_up)
    if send is not body:
        raw = json.dumps(send).encode()
    headers = {k: v for k, v in request.headers.items() if k.lower() not in _DROP_HEADERS | _CLIENT_ONLY}
    # The engine hop stays uncompressed (httpx would ask for gzip), so usage can be read off the bytes.
    headers["accept-encoding"] = "identity"
    if entry.remote is not None:
        # A remote API gets its own model id and key; the client's key stays here.
        raw = json.dumps({**send, "model": entry.remote.model}).encode()
        if entry.remote.api_key:
            headers["authorization"] = f"Bearer {entry.remote.api_key}"
    tried: frozenset[str] = frozenset()
    last_error = "no ready replica"
    queue = state.queues.setdefault(entry.name, ModelQueue())
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
                queue_wait = time.monotonic() - arrived
                state.queue_wait.labels(entry.name).observe(queue_wait)
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
        else:
            # Retries go to another replica now or not at all: the client is already waiting.
            retry = _try_pick(state, entry, route, tried)
            if retry is None:
                break
            endpoint = retry
            state.retries.labels(entry.name).inc()
        tried = tried | {endpoint.id}
        if entry.remote is not None:
            url = f"{entry.remote.base_url.rstrip('/')}/{upstream_path}"
        else:
            url = f"http://{endpoint.address}/v1/{path}"
        started = time.monotonic()
        try:
            upstream = await state.client.send(
                state.client.build_request("POST", url, content=raw, headers=headers), stream=True
            )
        except httpx.HTTPError as exc:
            state.release(entry.name, endpoint.id)
            last_error = f"replica {endpoint.id}: {type(exc).__name__}"
            continue
        if upstream.status_code in RETRY_STATUSES and attempt < state.settings.retries:
            await upstream.aclose()
            state.release(entry.name, endpoint.id)
            last_error = f"replica {endpoint.id} answered {upstream.status_code}"
            continue
        state.ttfb.labels(entry.name).observe(time.monotonic() - started)
        state.requests.labels(entry.name, endpoint.id, str(upstream.status_code)).inc()
        trace = Trace(entry, endpoint.id, key, path, arrived, queue_wait, attempt)
        if translate is not None and upstream.status_code == 200:
            return _translated_back(state, trace, upstream, body, translate)
        return _stream_back(state, trace, upstream, strip_usage)

    state.errors.labels(entry.name, "upstream").inc()
    return error(502, f"upstream failure: {last_error}", "upstream_error", code="bad_gateway")


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


def _stream_back(
    state: State, trace: Trace, upstream: httpx.Response, strip_usage: bool
) -> StreamingResponse:
    is_sse = upstream.headers.get("content-type", "").startswith("text/event-stream")
    sse = SSEUsage(strip_usage) if is_sse else None
    head: list[bytes] = []  # a JSON body, kept (up to a bound) to read its usage at the end
    kept = 0
    model, endpoint_id = trace.model.name, trace.replica
    outcome = "ok"

    async def body() -> AsyncIterator[bytes]:
        nonlocal kept, outcome
        try:
            async for chunk in _raw_chunks(upstream):
                if sse is not None:
                    chunk = sse.feed(chunk)
                elif kept < USAGE_BODY_LIMIT:
                    head.append(chunk)
                    kept += len(chunk)
                if chunk:
                    if trace.first_chunk is None:
                        trace.first_chunk = time.monotonic()
                        state.ttft.labels(model, endpoint_id).observe(trace.first_chunk - trace.arrived)
                    yield chunk
            if sse is not None:
                rest = sse.flush()
                if rest:
                    yield rest
        except httpx.HTTPError as exc:
            outcome = "stream_interrupted"
            # Too late for a status code: tell an SSE client in-band, as OpenAI's API does.
            if not is_sse:
                raise
            err = {
                "error": {
                    "message": f"replica failed mid-stream: {type(exc).__name__}",
                    "type": "upstream_error", "param": None, "code": "stream_interrupted",
                }
            }  # fmt: skip
            yield f"data: {json.dumps(err)}\n\n".encode()
        except asyncio.CancelledError:
            outcome = "client_disconnected"  # closing `upstream` below makes the engine stop too
            raise
        finally:
            state.release(model, endpoint_id)
            await upstream.aclose()
            usage = None
            if upstream.status_code == 200:
                usage = sse.usage if sse is not None else usage_from_json(b"".join(head))
                state.record_usage(trace.model, usage, trace.key.name)
                if usage is not None:
                    now = time.monotonic()
                    state.keys.spend(trace.key, usage.prompt_tokens + usage.completion_tokens, now)
            _finish(state, trace, upstream.status_code, outcome, usage)

    headers = {k: v for k, v in upstream.headers.items() if k.lower() not in _DROP_HEADERS}
    headers["x-kubeinfer-replica"] = endpoint_id
    headers["x-kubeinfer-queue-wait-ms"] = f"{trace.queue_wait * 1000:.1f}"
    return StreamingResponse(body(), status_code=upstream.status_code, headers=headers)


def _translated_back(
    state: State, trace: Trace, upstream: httpx.Response, request: dict[str, Any], api: str
) -> Response:
    """A remote's chat-completions answer, turned into the Responses or Messages API the client used."""
    is_sse = upstream.headers.get("content-type", "").startswith("text/event-stream")
    model, endpoint_id = trace.model.name, trace.replica
    headers = {
        "x-kubeinfer-replica": endpoint_id,
        "x-kubeinfer-queue-wait-ms": f"{trace.queue_wait * 1000:.1f}",
    }
    stream: translate_mod.ChatToResponsesStream | translate_mod.ChatToMessagesStream
    if api == "responses":
        stream = translate_mod.ChatToResponsesStream(request)
    else:
        stream = translate_mod.ChatToMessagesStream(request)

    async def body() -> AsyncIterator[bytes]:
        outcome, usage = "ok", None
        try:
            if is_sse:
                async for chunk in _raw_chunks(upstream):
                    out = stream.feed(chunk)
                    if out:
                        if trace.first_chunk is None:
                            trace.first_chunk = time.monotonic()
                            state.ttft.labels(model, endpoint_id).observe(trace.first_chunk - trace.arrived)
                        yield out
                yield stream.close()
                if stream.usage is not None:
                    usage = Usage(*stream.usage)
            else:
                chat = json.loads(b"".join([c async for c in _raw_chunks(upstream)]))
                convert = (
                    translate_mod.chat_to_responses if api == "responses" else translate_mod.chat_to_messages
                )
                trace.first_chunk = time.monotonic()
                yield json.dumps(convert(chat, request)).encode()
                usage = usage_from_dict(chat.get("usage")) if isinstance(chat, dict) else None
        except (httpx.HTTPError, ValueError) as exc:
            outcome = "stream_interrupted"
            if not is_sse:
                raise
            yield stream.close() or f"event: error\ndata: {json.dumps({'error': str(exc)})}\n\n".encode()
        except asyncio.CancelledError:
            outcome = "client_disconnected"
            raise
        finally:
            state.release(model, endpoint_id)
            await upstream.aclose()
            state.record_usage(trace.model, usage, trace.key.name)
            if usage is not None:
                state.keys.spend(trace.key, usage.prompt_tokens + usage.completion_tokens, time.monotonic())
            _finish(state, trace, upstream.status_code, outcome, usage)

    media = "text/event-stream" if is_sse else "application/json"
    return StreamingResponse(body(), status_code=200, headers=headers, media_type=media)


def _finish(state: State, trace: Trace, status: int, outcome: str, usage: Usage | None) -> None:
    """Metrics and one structured access-log line per proxied request (never the key or the body)."""
    end = time.monotonic()
    ttft = trace.first_chunk - trace.arrived if trace.first_chunk is not None else None
    state.duration.labels(trace.model.name, trace.replica).observe(end - trace.arrived)
    if usage is not None and usage.completion_tokens > 1 and trace.first_chunk is not None:
        generating = end - trace.first_chunk
        if generating > 0:
            state.output_rate.labels(trace.model.name).observe((usage.completion_tokens - 1) / generating)
    if _access_log.isEnabledFor(logging.INFO):
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


async def _raw_chunks(upstream: httpx.Response) -> AsyncIterator[bytes]:
    if upstream.is_stream_consumed:  # built in memory (a transport that returns whole bodies)
        yield upstream.content
    else:
        async for chunk in upstream.aiter_raw():
            yield chunk


async def list_models(request: Request) -> JSONResponse:
    state: State = request.app.state.gw
    data = [
        {"id": public, "object": "model", "owned_by": "kubeinfer", "created": 0,
         "root": entry.served_name, "engine": entry.engine, "modalities": list(entry.modalities)}
        for entry, public in state.registry.listed()
    ]  # fmt: skip
    return JSONResponse({"object": "list", "data": data})


async def admin_models(request: Request) -> JSONResponse:
    """Per model: engine, replicas ready/total, queue, in-flight, and what the scrapes say."""
    state: State = request.app.state.gw
    now = time.monotonic()
    out = []
    for entry in state.registry.models.values():
        endpoints = state.registry.endpoints.get(entry.name, [])
        replicas: list[dict[str, Any]] = []
        for e in endpoints:
            load = state.loads.get(e.id, Load())
            fresh = (
                load.scraped is not None
                and load.scraped_at is not None
                and (now - load.scraped_at <= 3 * state.settings.scrape_interval)
            )
            stats = load.scraped if fresh else None
            replicas.append({
                "id": e.id, "address": e.address, "ready": e.ready, "inflight": load.inflight,
                "running": stats.running if stats else None, "waiting": stats.waiting if stats else None,
                "kvCacheUsage": stats.kv_cache_usage if stats else None,
                "prefixCacheHitRate": (
                    stats.prefix_cache_hits / stats.prefix_cache_queries
                    if stats and stats.prefix_cache_queries and stats.prefix_cache_hits is not None else None
                ),
            })  # fmt: skip
        queue = state.queues.get(entry.name)
        out.append({
            "name": entry.name, "servedName": entry.served_name, "aliases": list(entry.aliases),
            "engine": entry.engine, "modalities": list(entry.modalities), "strategy": entry.routing.strategy,
            "state": "ready" if any(e.ready for e in endpoints) else "unavailable",
            "replicas": {"ready": sum(e.ready for e in endpoints), "total": len(endpoints)},
            "queued": queue.waiting if queue else 0,
            "inflight": sum(state.loads.get(e.id, Load()).inflight for e in endpoints),
            "replicaStats": replicas,
        })  # fmt: skip
    return JSONResponse({"object": "list", "data": out})


async def admin_usage(request: Request) -> JSONResponse:
    state: State = request.app.state.gw
    data = [{"key": key, "model": model, **counts} for (key, model), counts in sorted(state.ledger.items())]
    return JSONResponse({"object": "list", "data": data})


async def healthz(request: Request) -> Response:
    return Response("ok")


async def readyz(request: Request) -> Response:
    """503 until discovery has listed models, pods and keys: a gateway that knows no model yet would
    answer 404 to every request, so it must not get traffic."""
    ready: Callable[[], bool] | None = request.app.state.ready
    if ready is not None and not ready():
        return Response("discovery not synced", status_code=503)
    return Response("ok")


async def metrics_endpoint(request: Request) -> Response:
    state: State = request.app.state.gw
    for model, queue in state.queues.items():
        state.queued.labels(model).set(queue.waiting)
    for endpoint_id, load in state.loads.items():
        state.inflight_gauge.labels(endpoint_id).set(load.inflight)
    return Response(generate_latest(state.metrics), media_type="text/plain; version=0.0.4")


async def scrape_once(state: State) -> None:
    """Scrape every replica's /metrics concurrently, each bounded by scrape_timeout."""

    async def one(endpoint_id: str, address: str) -> None:
        try:
            resp = await state.client.get(f"http://{address}/metrics", timeout=state.settings.scrape_timeout)
            stats = parse_metrics(resp.text)
        except (httpx.HTTPError, ScrapeError):
            return  # stale data ages out; own in-flight counts carry the routing meanwhile
        load = state.loads.get(endpoint_id, Load())
        state.loads[endpoint_id] = Load(load.inflight, stats, time.monotonic())

    endpoints = [
        e
        for eps in state.registry.endpoints.values()
        for e in eps
        if e.ready and not e.id.startswith("remote:")
    ]
    await asyncio.gather(*(one(e.id, e.address) for e in endpoints))


def create_app(
    registry: Registry,
    settings: GatewaySettings | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
    metrics: CollectorRegistry | None = None,
    discover: Callable[[Registry], Coroutine[Any, Any, None]] | None = None,
    keys: KeyStore | None = None,
    ready: Callable[[], bool] | None = None,
) -> Starlette:
    """The ASGI app. `transport` replaces the network (tests use an in-memory one); `discover`, if
    given, runs for the app's lifetime and keeps the registry current (Kubernetes discovery)."""
    settings = settings or GatewaySettings()
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=256, keepalive_expiry=60)
    timeout = httpx.Timeout(settings.read_timeout, connect=settings.connect_timeout)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with httpx.AsyncClient(transport=transport, limits=limits, timeout=timeout) as client:
            state = State(
                registry=registry, settings=settings, client=client, metrics=metrics or CollectorRegistry(),
                keys=keys or KeyStore(),
            )  # fmt: skip
            app.state.gw = state

            async def scraper() -> None:
                while True:
                    await scrape_once(state)
                    await asyncio.sleep(settings.scrape_interval)

            tasks = [asyncio.create_task(scraper())]
            if discover is not None:
                tasks.append(asyncio.create_task(discover(registry)))
            try:
                yield
            finally:
                for task in tasks:
                    task.cancel()

    routes = [
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/admin/models", admin_models, methods=["GET"]),
        Route("/v1/admin/usage", admin_usage, methods=["GET"]),
        Route("/v1/{path:path}", proxy, methods=["POST"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.ready = ready
    return app
