"""Sending a prepared request to a replica and relaying the answer as it arrives.

`forward` picks a replica (taking one of its in-flight slots, or waiting in the model's queue) and
sends the request; connection errors and 502/503/504 before the first byte are retried on another
replica. `respond` relays the upstream response to the client; a replica that fails mid-stream ends
an SSE stream with an error event, since the status line is sent.

One watcher task waits for the client's `http.disconnect` and cancels the relay, which closes the
upstream response so the engine stops generating too (Starlette's per-response task group, which
does the same, cost more CPU than the whole relay: docs/gateway.md).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.responses import JSONResponse

from kubeinfer.gateway.accounting import (
    PlainJSON,
    PlainSSE,
    Relay,
    Trace,
    TranslatedJSON,
    TranslatedSSE,
    account,
)
from kubeinfer.gateway.admission import ModelQueue, QueueFull, QueueTimeout
from kubeinfer.gateway.registry import ModelEntry
from kubeinfer.gateway.request import DROP_HEADERS, Prepared, error, parse_duration, with_lora
from kubeinfer.gateway.routing import Endpoint, RouteRequest, choose
from kubeinfer.gateway.state import State
from kubeinfer.gateway.upstream import UpstreamError, UpstreamResponse

# The ASGI interface.
Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

RETRY_STATUSES = {502, 503, 504}
_NONE: frozenset[str] = frozenset()
_DROP_WITH_TYPE = DROP_HEADERS | {"content-type"}  # a translated body has its own content type
# A JSON body passed through unchanged keeps the replica's length: the server then writes the head and
# the body in one write instead of chunks (two more writes per request).
_DROP_KEEP_LENGTH = frozenset(DROP_HEADERS - {"content-length"})


def _try_pick(state: State, entry: ModelEntry, route: RouteRequest, tried: frozenset[str]) -> Endpoint | None:
    """A replica with room (own in-flight below the model's target), its slot taken; or None."""
    endpoints = state.registry.ready_endpoints(entry.name)
    loads, target = state.loads, entry.target_inflight
    full = [e.id for e in endpoints if (load := loads.get(e.id)) is not None and load.inflight >= target]
    cached = state.prefix_index.match(route.prefix, (e.id for e in endpoints)) if route.prefix else None
    decision = choose(
        entry.routing.strategy, endpoints, loads, route, now=time.monotonic(),
        scrape_interval=state.settings.scrape_interval, rr_counter=state.rr.get(entry.name, 0),
        target_inflight=target, cached=cached, exclude=tried.union(full) if full else tried,
    )  # fmt: skip
    if decision is None:
        return None
    state.rr[entry.name] = state.rr.get(entry.name, 0) + 1
    state.inflight(decision.endpoint_id, +1)  # taken here, so a concurrent request sees it at once
    if route.prefix:
        state.prefix_index.record(route.prefix, decision.endpoint_id)
    return next(e for e in endpoints if e.id == decision.endpoint_id)


def _adapter_served(state: State, entry: ModelEntry, adapter: str) -> bool:
    """Whether a ready replica serves `adapter`, or no replica is ready (a cold start: wait for one)."""
    ready = state.registry.ready_endpoints(entry.name)
    return not ready or any(e.serves_adapter(adapter, state.loads.get(e.id)) for e in ready)


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


async def forward(
    state: State, req: Prepared, arrived: float
) -> JSONResponse | tuple[Trace, UpstreamResponse, Relay]:
    """Admission to a replica and the upstream request: an error to answer, or an upstream to relay."""
    entry, route, model = req.entry, req.route, req.model
    tried: frozenset[str] = frozenset()
    last_error = "no ready replica"
    queue = state.queues.get(entry.name)
    if queue is None:
        queue = state.queues[entry.name] = ModelQueue()
    timeout = state.settings.hold_timeout or parse_duration(entry.routing.queue_timeout)
    queue_wait = 0.0
    if req.adapter and not _adapter_served(state, entry, req.adapter):
        # Ready replicas that do not serve the adapter (a vLLM replica that has not loaded it, or failed
        # to): answer now rather than hold the model's queue, where it would block the base's requests.
        state.errors.labels(entry.name, "adapter_not_loaded").inc()
        what = f"adapter `{model}` is not loaded on a ready replica of `{entry.served_name}` yet"
        return error(
            503, what, "service_unavailable", code="adapter_not_loaded", headers={"Retry-After": "2"}
        )
    if not state.registry.has_ready(entry.name):
        state.registry.wake(entry)  # at zero replicas: ask for one now; this request waits for it
    for attempt in range(state.settings.retries + 1):
        if attempt == 0:
            try:
                # What admit() tries first, without its coroutine: nobody waits and a replica has room.
                picked = _try_pick(state, entry, route, _NONE) if not queue.waiting else None
                endpoint = picked or await queue.admit(
                    lambda: _try_pick(state, entry, route, _NONE),
                    lambda: state.registry.has_ready(entry.name),
                    entry.routing.max_queue, timeout,
                )  # fmt: skip
            except QueueFull:
                state.errors.labels(entry.name, "queue_full").inc()
                return error(429, f"too many requests queued for `{model}`", "rate_limit_error",
                             code="queue_full", headers={"Retry-After": "1"})  # fmt: skip
            except QueueTimeout as exc:
                kind = "queue_timeout" if exc.had_replicas else "no_replica"
                state.errors.labels(entry.name, kind).inc()
                what = "free replica" if exc.had_replicas else "ready replica"
                where = "" if exc.had_replicas else f" ({state.registry.progress(entry.name)})"
                return error(503, f"no {what} of `{model}` within {exc.waited:.0f}s{where}",
                             "service_unavailable", code=kind, headers={"Retry-After": "5"})  # fmt: skip
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
            url = f"{entry.remote.base_url.rstrip('/')}/{req.upstream_path}"
        else:
            url = f"http://{endpoint.address}/v1/{req.path}"
        started = time.monotonic()
        try:
            raw = with_lora(req.raw, req.adapter, endpoint) if endpoint.adapters else req.raw
            upstream = await state.upstream.post(url, req.headers, raw)
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
        trace = Trace(
            entry, endpoint.id, req.key, req.path, arrived, queue_wait, attempt, adapter=req.adapter
        )
        is_sse = any(
            v.startswith("text/event-stream") and k.lower() == "content-type" for k, v in upstream.headers
        )
        relay: Relay
        translate = req.translate
        if translate is not None and upstream.status == 200:
            relay = TranslatedSSE(translate, req.body) if is_sse else TranslatedJSON(translate, req.body)
        elif is_sse:
            relay = PlainSSE(req.strip_usage)
        else:
            relay = PlainJSON()
        return trace, upstream, relay

    state.errors.labels(entry.name, "upstream").inc()
    return error(502, f"upstream failure: {last_error}", "upstream_error", code="bad_gateway")


def _sse_error(exc: Exception) -> bytes:
    err = {
        "error": {
            "message": f"replica failed mid-stream: {exc}", "type": "upstream_error", "param": None,
            "code": "stream_interrupted",
        }
    }  # fmt: skip
    return f"data: {json.dumps(err)}\n\n".encode()


async def respond(
    state: State,
    trace: Trace,
    upstream: UpstreamResponse,
    relay: Relay,
    receive: Receive,
    send: Send,
    head_sent: bool = False,
) -> None:
    """Relay the upstream response to the client, then release the slot and account for it.
    `head_sent`: the status line went out already (a stream held through a cold start)."""
    model, replica = trace.model.name, trace.replica
    drop: frozenset[str] | set[str] = DROP_HEADERS
    if relay.content_type:
        drop = _DROP_WITH_TYPE
    elif type(relay) is PlainJSON and not head_sent:
        drop = _DROP_KEEP_LENGTH
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
    watcher: asyncio.Future[MutableMapping[str, Any]] | None = None
    if not getattr(upstream, "whole", False):
        # (A body already all in is written without waiting on anything: nothing to cancel.)
        watcher = asyncio.ensure_future(receive())

        def on_disconnect(done: asyncio.Future[MutableMapping[str, Any]]) -> None:
            if relaying and main is not None and not done.cancelled() and done.exception() is None:
                main.cancel()

        watcher.add_done_callback(on_disconnect)
    outcome = "ok"
    started = False
    try:
        if not head_sent:
            await send({"type": "http.response.start", "status": upstream.status, "headers": headers})
        started = True
        try:
            feed = relay.feed
            pump: Any = getattr(upstream, "pump", None)
            client: Any = getattr(send, "__self__", None)  # the server's request, when it is ours
            write = getattr(client, "write_body", None) if pump is not None else None
            if write is not None:
                # Our server and our client: each chunk goes from the replica's socket callback to the
                # client's socket, with no ASGI message and no task wake-up (docs/gateway.md).
                def sink(chunk: bytes) -> bool:
                    out = feed(chunk)
                    if not out:
                        return False
                    if trace.first_chunk is None:
                        trace.first_chunk = time.monotonic()
                        state.ttft_for(model, replica).observe(trace.first_chunk - trace.arrived)
                    return bool(write(out))

                client.on_drain = getattr(upstream, "resume", None)
                await pump(sink)
            else:
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
        if relaying and watcher is not None and watcher.done() and not watcher.cancelled():
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
        if watcher is not None:
            watcher.cancel()
        state.release(model, replica)
        await upstream.close()
        account(state, trace, upstream.status, outcome, relay)
