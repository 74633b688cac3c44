"""The request path: `POST /v1/{chat/completions,completions,embeddings,responses,messages}`.

Read the body (bounded), check it just enough to answer bad requests ourselves, admit it (API key,
limits, the model's queue), pick a replica (`routing.choose`), and relay the upstream response as it
arrives, reading its usage on the way. In three steps:

- `request.prepare`: reading, checking and translating the request (the errors the gateway answers);
- `relay.forward` and `relay.respond`: replica, retries before the first byte, streaming to the client;
- `accounting`: usage read off the body, then the ledger, metrics and the access log.

This is a raw ASGI handler, not a Starlette endpoint: Starlette's StreamingResponse runs an anyio task
group per response to notice disconnects, which cost more CPU than the whole relay.
"""

from __future__ import annotations

import asyncio
import json
import time

from starlette.requests import Request
from starlette.responses import JSONResponse

from kubeinfer.gateway.relay import Receive, Scope, Send, forward, respond
from kubeinfer.gateway.request import Prepared, error, prepare
from kubeinfer.gateway.state import State
from kubeinfer.gateway.usage import Usage

PROXIED = ("chat/completions", "completions", "embeddings", "responses", "messages")


async def proxy(state: State, scope: Scope, receive: Receive, send: Send) -> None:
    request = Request(scope, receive)
    arrived = time.monotonic()
    path = scope["path"].removeprefix("/v1/")
    if path not in PROXIED:
        resp = error(404, f"unknown endpoint /v1/{path}", "invalid_request_error", code="not_found")
        return await resp(scope, receive, send)
    prepared = await prepare(state, request, path)
    if isinstance(prepared, JSONResponse):
        return await prepared(scope, receive, send)
    slots, client = state.client_slots, ""
    if slots is not None:  # maxConcurrentPerClient: per key, per address when anonymous
        client = prepared.key.key_sha256 or (scope["client"] or ("",))[0]
        if not slots.take(client):
            state.errors.labels(prepared.entry.name, "concurrency_limit_exceeded").inc()
            resp = error(429, f"over {slots.limit} requests in flight for this client", "rate_limit_error",
                         code="concurrency_limit_exceeded", headers={"Retry-After": "1"})  # fmt: skip
            return await resp(scope, receive, send)
    try:
        if prepared.body.get("stream") is True and not state.registry.has_ready(prepared.entry.name):
            return await held_stream(state, prepared, arrived, receive, send, scope)
        outcome = await forward(state, prepared, arrived)
        if isinstance(outcome, JSONResponse):
            return await outcome(scope, receive, send)
        trace, upstream, relay = outcome
        await respond(state, trace, upstream, relay, receive, send)
    finally:  # answered, failed, streamed to its end or cut by the client: the slot is free again
        if slots is not None:
            slots.give_back(client)


# A streaming request held for a replica (a cold start) gets its status line after this long, then SSE
# comment lines with the progress: proxies keep the connection, and a person sees what is happening.
# Refusals that come at once (full queue, unknown key...) still get their own status codes.
HOLD_BEFORE_PROGRESS = 0.5
PROGRESS_POLL = 0.25  # how often a held stream looks for news (one timer per held request)
KEEPALIVE_EVERY = 10.0  # a comment line at least this often, news or not


class _ErrorAsSSE:
    """An upstream answer that is not an SSE stream, on a stream whose 200 is already sent: its body
    becomes one `data:` event (an error envelope), as a mid-stream failure is told."""

    is_sse = True
    content_type: str | None = None

    def __init__(self, status: int) -> None:
        self._status, self._body = status, bytearray()

    def feed(self, chunk: bytes) -> bytes:
        if len(self._body) < 1 << 16:
            self._body += chunk
        return b""

    def end(self) -> bytes:
        try:
            body = json.loads(self._body)
        except ValueError:
            body = None
        if not (isinstance(body, dict) and isinstance(body.get("error"), dict)):
            text = self._body.decode(errors="replace")[:1000]
            body = {"error": {"message": f"replica answered {self._status}: {text}", "type": "upstream_error",
                              "param": None, "code": None}}  # fmt: skip
        return f"data: {json.dumps(body)}\n\ndata: [DONE]\n\n".encode()

    def usage(self) -> Usage | None:
        return None


async def held_stream(
    state: State, prepared: Prepared, arrived: float, receive: Receive, send: Send, scope: Scope
) -> None:
    """A streaming request for a model with no ready replica (scaled to zero, or starting): wait for
    one as any request does, telling the client how the start goes."""
    task = asyncio.ensure_future(forward(state, prepared, arrived))
    done, _ = await asyncio.wait({task}, timeout=HOLD_BEFORE_PROGRESS)
    if done:  # a replica came, or a refusal with its own status code
        outcome = task.result()
        if isinstance(outcome, JSONResponse):
            return await outcome(scope, receive, send)
        trace, upstream, relay = outcome
        return await respond(state, trace, upstream, relay, receive, send)

    name = prepared.entry.name
    headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"),
               (b"x-kubeinfer-cold-start", b"1")]  # fmt: skip
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    # The body has been read: receive() now returns only when the client leaves.
    left = asyncio.ensure_future(receive())
    said, last = "", 0.0
    try:
        while not task.done():
            now = time.monotonic()
            phase = state.registry.progress(name)
            if phase != said or now - last >= KEEPALIVE_EVERY:  # news, or a keep-alive line
                line = f": kubeinfer: starting {name} ({now - arrived:.0f}s): {phase}\n\n"
                await send({"type": "http.response.body", "body": line.encode(), "more_body": True})
                said, last = phase, now
            await asyncio.wait({task, left}, timeout=PROGRESS_POLL, return_when=asyncio.FIRST_COMPLETED)
            if left.done() and not task.done():  # the client left while waiting: stop waiting
                task.cancel()
                return
        outcome = task.result()
    except BaseException:
        task.cancel()
        raise
    finally:
        left.cancel()  # respond() watches for the client's departure itself
    if isinstance(outcome, JSONResponse):  # e.g. no replica within queueTimeout: told in-band
        body = b"data: " + bytes(outcome.body) + b"\n\ndata: [DONE]\n\n"
        await send({"type": "http.response.body", "body": body, "more_body": False})
        return
    trace, upstream, relay = outcome
    if upstream.status != 200 or not relay.is_sse:
        relay = _ErrorAsSSE(upstream.status)
    await respond(state, trace, upstream, relay, receive, send, head_sent=True)
