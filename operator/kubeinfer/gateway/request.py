"""A proxied request, read and checked, and made ready to send upstream.

Everything the gateway can refuse on its own is refused here, before a replica is picked: the API key,
the body's size, JSON and shape (gateway/validate.py), the model, image content for a text-only
model, the key's limits, and what a chat-only remote cannot be asked. What passes is a `Prepared`:
the route to pick a replica by, and the exact body and headers to send.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
from dataclasses import dataclass
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse

from kubeinfer.api.fields import duration_seconds
from kubeinfer.gateway import validate
from kubeinfer.gateway.auth import ApiKey, Denied
from kubeinfer.gateway.registry import ModelEntry
from kubeinfer.gateway.routing import Endpoint, RouteRequest, prefix_blocks
from kubeinfer.gateway.state import State
from kubeinfer.gateway.translate.common import TranslationError
from kubeinfer.gateway.translate.messages import messages_to_chat
from kubeinfer.gateway.translate.responses import responses_to_chat
from kubeinfer.gateway.usage import prepare_stream_request, stream_request_bytes

TRANSLATED = ("responses", "messages")  # what the gateway can turn into chat completions for a remote
# Hop-by-hop and length headers are the proxy's own business on each side.
# The client's API key is the gateway's business, never the engine's.
_CLIENT_ONLY = {"accept-encoding", "authorization", "x-api-key"}
DROP_HEADERS = {"host", "content-length", "connection", "keep-alive", "transfer-encoding", "te", "upgrade"}
_NOT_FORWARDED = frozenset(h.encode() for h in DROP_HEADERS | _CLIENT_ONLY)  # as ASGI gives names


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


async def _read_body(state: State, request: Request, path: str) -> bytes | JSONResponse:
    """The body, or the error to answer: 413 over the route's limit (as soon as it is), 408 when it is
    not in within `body_timeout` (BodyDeadlines cancels the read; no timer per request)."""
    settings = state.settings
    limit = settings.max_body_bytes_by_route.get(path, settings.max_body_bytes)
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        return _too_large(limit)
    # What request.stream() does, without an async generator per request.
    receive = request.receive
    chunks, size = [], 0
    deadlines, task = state.body_deadlines, asyncio.current_task()
    assert task is not None  # a request is always served by a task
    deadlines.start(task)
    try:
        while True:
            message = await receive()
            if message["type"] == "http.request":
                chunk = message.get("body", b"")
                if chunk:
                    size += len(chunk)
                    if size > limit:
                        return _too_large(limit)
                    chunks.append(chunk)
                if not message.get("more_body", False):
                    return b"".join(chunks)
            elif message["type"] == "http.disconnect":
                raise ClientDisconnect()
    except asyncio.CancelledError:
        if not deadlines.timed_out(task):
            raise
        state.errors.labels("", "request_timeout").inc()
        # The connection stays open: the server discards the rest of the body without a handler, and a
        # client still sending can read its 408 (a close would reset the connection under it).
        return error(408, f"request body not received within {deadlines.timeout:g}s", "invalid_request_error",
                     code="request_timeout")  # fmt: skip
    finally:
        deadlines.finish(task)


def _too_large(limit: int) -> JSONResponse:
    return error(413, f"request body over {limit} bytes", "invalid_request_error", code="request_too_large")


@functools.lru_cache(maxsize=256)  # called per request with the model's queueTimeout
def parse_duration(text: str) -> float:
    """'30s', '5m', '1h30m', '500ms' -> seconds (the API's Duration format)."""
    return duration_seconds(text)


@dataclass(slots=True)
class Prepared:
    """An admitted request, ready to send to a replica of `entry`."""

    key: ApiKey
    model: str
    """The model as the client named it (a served name or an alias), for error messages."""
    entry: ModelEntry
    path: str
    """The API asked for, without `/v1/`: `chat/completions`, `responses`..."""
    body: dict[str, Any]
    """The client's body (a translated answer echoes its settings)."""
    route: RouteRequest
    upstream_path: str
    """The API the remote is asked (differs from `path` when translated)."""
    translate: str | None
    """The API to translate the remote's chat-completions answer back to, or None."""
    strip_usage: bool
    """Whether the usage chunk was asked for by the gateway and must not reach the client."""
    headers: dict[str, str]
    raw: bytes
    """The body to send."""
    adapter: str | None = None
    """The LoRA adapter the client named as `model`, if any (routing and the usage ledger)."""


def with_lora(raw: bytes, adapter: str | None, endpoint: Endpoint) -> bytes:
    """The body for a llama-server replica that loaded adapters: every one of them by the pod's own
    id, at the scale of the adapter the request names and at 0 for the others (all at 0 for the base
    model). Always explicit: build b11434 reuses a slot's adapter state for a request that sends no
    `lora`, so a base request after an adapter's came back with the adapter applied (measured in the
    e2e tier)."""
    lora = [
        {"id": i, "scale": scale if name == adapter else 0.0} for name, i, scale in endpoint.adapters or ()
    ]
    if not lora:
        return raw
    return json.dumps({**json.loads(raw), "lora": lora}).encode()


async def prepare(state: State, request: Request, path: str) -> JSONResponse | Prepared:
    """The checks the gateway answers itself, then the upstream request: an error, or a `Prepared`."""
    try:
        key = state.keys.authenticate(
            request.headers.get("authorization") or request.headers.get("x-api-key")
        )
    except Denied as denied:
        state.errors.labels("", denied.code).inc()
        return error(denied.status, denied.message, "invalid_request_error", code=denied.code)
    raw = await _read_body(state, request, path)
    if isinstance(raw, JSONResponse):
        return raw
    try:
        body = validate.parse(raw)  # JSON, an object, not nested too deep
        model = body.get("model")
        if not isinstance(model, str) or not model:
            return error(400, "you must provide a model parameter", "invalid_request_error", param="model")
        validate.check(path, body)  # the fields the gateway relies on (gateway/validate.py)
    except validate.Invalid as exc:
        return error(400, exc.message, "invalid_request_error", param=exc.param)
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

    adapter = state.registry.adapter_for(model)
    route = RouteRequest(
        model=entry.name,
        adapter=adapter,
        # Hashed only where it is used: the other strategies route by load alone.
        prefix=prefix_blocks(body) if entry.routing.strategy == "prefix-aware" else (),
        session=request.headers.get(entry.routing.session_header) if entry.routing.session_header else None,
    )  # fmt: skip
    upstream_path, translate = path, None
    body_up = body
    if entry.remote is not None and path in TRANSLATED and path not in entry.remote.native_apis:
        # A remote that only speaks chat completions: send the request as one, answer in the API asked.
        try:
            body_up = responses_to_chat(body) if path == "responses" else messages_to_chat(body)
        except TranslationError as exc:
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
    return Prepared(
        key, model, entry, path, body, route, upstream_path, translate, strip_usage, headers, raw, adapter
    )
