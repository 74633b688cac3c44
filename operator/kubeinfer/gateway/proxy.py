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

import time

from starlette.requests import Request
from starlette.responses import JSONResponse

from kubeinfer.gateway.relay import Receive, Scope, Send, forward, respond
from kubeinfer.gateway.request import error, prepare
from kubeinfer.gateway.state import State

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
            state.errors.labels(prepared.entry.name, "concurrency_limit").inc()
            resp = error(429, f"over {slots.limit} requests in flight for this client", "rate_limit_error",
                         code="concurrency_limit_exceeded", headers={"Retry-After": "1"})  # fmt: skip
            return await resp(scope, receive, send)
    try:
        outcome = await forward(state, prepared, arrived)
        if isinstance(outcome, JSONResponse):
            return await outcome(scope, receive, send)
        trace, upstream, relay = outcome
        await respond(state, trace, upstream, relay, receive, send)
    finally:  # answered, failed, streamed to its end or cut by the client: the slot is free again
        if slots is not None:
            slots.give_back(client)
