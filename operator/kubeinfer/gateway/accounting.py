"""What a proxied response counts for: usage read off the body as it passes (translated on the way
for a chat-only remote), then, once it has ended, the ledger, the key's token budget, the metrics and
one access-log line.

The `Relay` implementations sit on the per-chunk path: keep `feed` to a bound method with no work
beyond what the usage scan or the translation needs (docs/benchmarks.md).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any, Protocol

from kubeinfer.gateway.auth import ApiKey
from kubeinfer.gateway.registry import ModelEntry
from kubeinfer.gateway.state import State
from kubeinfer.gateway.translate.messages import ChatToMessagesStream, chat_to_messages
from kubeinfer.gateway.translate.responses import ChatToResponsesStream, chat_to_responses
from kubeinfer.gateway.usage import SSEUsage, Usage, usage_from_dict, usage_from_json

USAGE_BODY_LIMIT = 1 << 20  # JSON bodies longer than this are passed on without reading their usage

_access_log = logging.getLogger("kubeinfer.gateway.access")


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
    adapter: str | None = None
    """The LoRA adapter asked for: its usage is booked under its own name."""


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
        self._stream: ChatToResponsesStream | ChatToMessagesStream = (
            ChatToResponsesStream(request) if api == "responses" else ChatToMessagesStream(request)
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
        convert = chat_to_responses if self._api == "responses" else chat_to_messages
        self._usage = usage_from_dict(chat.get("usage")) if isinstance(chat, dict) else None
        return json.dumps(convert(chat, self._request)).encode()

    def usage(self) -> Usage | None:
        return self._usage


def account(state: State, trace: Trace, status: int, outcome: str, relay: Relay) -> None:
    """The request has ended (its slot is released): ledger and token budget, then metrics and log."""
    usage = None
    if status == 200:
        usage = relay.usage()
        state.record_usage(trace.model, usage, trace.key.name, trace.adapter)
        if usage is not None:
            state.keys.spend(trace.key, usage.prompt_tokens + usage.completion_tokens, time.monotonic())
    _finish(state, trace, status, outcome, usage)


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
