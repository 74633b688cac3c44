"""Token usage from responses, for the usage ledger. Pure: bytes in, numbers out.

Non-streamed responses carry `usage` in their JSON. Streams carry it in one event: OpenAI chat and
completions streams only when the request asked (`stream_options.include_usage`), so the gateway asks
for it on every stream and, when the client did not ask, drops that usage-only chunk on the way back;
the Responses API reports it in `response.completed`, Anthropic's Messages API in `message_start`
(input) and `message_delta` (output).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

USAGE_PATHS = ("chat/completions", "completions")


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0


def _count(value: Any) -> int:
    """A token count read off an upstream's JSON; 0 for what is not a number (never worth a crash)."""
    try:
        return int(value or 0)
    except (TypeError, ValueError, OverflowError):  # a list, "many", Infinity, NaN...
        return 0


def _get(obj: Any, key: str) -> Any:
    return obj.get(key) if isinstance(obj, dict) else None


def usage_from_dict(u: Any) -> Usage | None:
    if not isinstance(u, dict):
        return None
    prompt = u.get("prompt_tokens", u.get("input_tokens"))
    completion = u.get("completion_tokens", u.get("output_tokens"))
    if prompt is None and completion is None:
        return None
    return Usage(_count(prompt), _count(completion))


_USAGE_KEY = re.compile(rb'"usage"\s*:\s*')
_DECODER = json.JSONDecoder()
_MISSED = object()


def usage_from_json(raw: bytes) -> Usage | None:
    """The usage of a JSON answer: its top-level `usage` object's counts, or None."""
    found = _usage_member(raw)
    if found is not _MISSED:
        return usage_from_dict(found)
    try:
        body = json.loads(raw)
    except ValueError:
        return None
    return usage_from_dict(body.get("usage")) if isinstance(body, dict) else None


def _usage_member(raw: bytes) -> Any:
    """The value of `usage` read without parsing the whole answer, or _MISSED (then parse it all).

    Engines put `usage` near the end, after the generated text, so the last `"usage":` is decoded
    alone, and what follows it must be the rest of the one top-level object (a few more members, then
    its closing brace): that proves the member is at the top, not inside a nested object. The bytes
    before it are not checked, so a broken prefix still yields the counts a whole parse would refuse.
    An unescaped quote before `usage` starts a key: a quote inside a JSON string is always escaped
    (a key such as `a"usage` is found escaped and left to the whole parse). In the running gateway the
    whole parse cost 25 µs per answer, most of it the completion's text."""
    at = raw.rfind(b'"usage"')
    if at < 0:
        return _MISSED
    key = _USAGE_KEY.match(raw, at)
    if key is None or raw[at - 1 : at] == b"\\":  # in valid JSON a key's quote never follows one
        return _MISSED
    try:
        tail = raw[key.end() :].decode()  # it starts at an ASCII byte: no character is cut
        value, end = _DECODER.raw_decode(tail)
        rest = tail[end:].lstrip()
        if rest.startswith(","):
            others = json.loads("{" + rest[1:])  # the remaining members and the closing brace, only
            if not isinstance(others, dict) or "usage" in others:
                return _MISSED
        elif rest.rstrip() != "}":
            return _MISSED
    except (ValueError, RecursionError):
        return _MISSED
    return value


def prepare_stream_request(path: str, body: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """(body to send, whether to strip the usage chunk on the way back)."""
    if path not in USAGE_PATHS or not body.get("stream"):
        return body, False
    options = body.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage"):
        return body, False
    return {
        **body,
        "stream_options": {**(options if isinstance(options, dict) else {}), "include_usage": True},
    }, True


def stream_request_bytes(raw: bytes, body: dict[str, Any], sent: dict[str, Any]) -> bytes:
    """`sent` (prepare_stream_request of `body`, parsed from `raw`) as the bytes to send upstream.

    When it only added `stream_options`, that is spliced onto the client's own bytes: re-serializing
    a long prompt costs more CPU than the rest of the request. The value and key order are the same,
    the spacing and escaping the client's. A body json.loads took that is not UTF-8 starting with `{`
    (UTF-16/32, a BOM) is re-serialized as before.
    """
    if "stream_options" not in body and raw[:1] == b"{" and raw[1:2] != b"\x00":
        end = len(raw)
        while raw[end - 1] in b" \t\n\r":  # JSON's whitespace
            end -= 1
        if raw[end - 1] == ord("}"):  # one copy of the body, not three
            return b"".join((memoryview(raw)[: end - 1], b',"stream_options":{"include_usage":true}}'))
    return json.dumps(sent).encode()


class SSEUsage:
    """Feed upstream SSE bytes, get back the bytes to send on; usage is collected on the way.

    Whole events are passed on as soon as they are complete (an event never waits for the next
    one), so streaming stays streaming; only the usage-only chunk is held back when `strip` is set.
    """

    def __init__(self, strip: bool) -> None:
        self.strip = strip
        self.usage: Usage | None = None
        self._input_tokens = 0
        self._buffer = b""

    def feed(self, chunk: bytes) -> bytes:
        buf = self._buffer + chunk if self._buffer else chunk
        start, cut = 0, buf.find(b"\n\n")
        pieces: list[bytes] | None = None  # what is sent on, once an event has been held back
        kept_from = 0
        while cut >= 0:
            end = cut + 2
            if not self._keep(buf, start, end):
                if pieces is None:
                    pieces = []
                pieces.append(buf[kept_from:start])
                kept_from = end
            start, cut = end, buf.find(b"\n\n", end)
        self._buffer = buf[start:]
        if pieces is None:
            return buf[:start]  # the usual case: all whole events as one slice (or `chunk` itself)
        pieces.append(buf[kept_from:start])
        return b"".join(pieces)

    def flush(self) -> bytes:
        rest, self._buffer = self._buffer, b""
        return rest

    def _keep(self, buf: bytes, start: int, end: int) -> bool:
        """`_inspect` of the event buf[start:end], skipped (no copy, no JSON) when the raw bytes show
        it cannot matter: no "usage" at all, or only `"usage":null` outside typed events (OpenAI's
        chunks carry that on every token). With two data lines, their joining could make a "usage"."""
        n = buf.count(b"usage", start, end)
        if n and (
            n != buf.count(b'"usage":null', start, end) + buf.count(b'"usage": null', start, end)
            or buf.find(b'"type"', start, end) >= 0
        ):
            return self._inspect(buf[start:end])
        return buf.count(b"data:", start, end) < 2 or self._inspect(buf[start:end])

    def _inspect(self, event: bytes) -> bool:
        """Record usage from one event; False if the event must not reach the client."""
        data = b"".join(
            line[5:].strip() for line in event.split(b"\n") if line.startswith(b"data:")
        )  # fmt: skip
        if not data or data == b"[DONE]" or b"usage" not in data:
            return True
        try:
            obj = json.loads(data)
        except ValueError:
            return True
        if not isinstance(obj, dict):
            return True
        kind = obj.get("type")
        if kind == "response.completed":  # Responses API
            self.usage = usage_from_dict(_get(obj.get("response"), "usage")) or self.usage
            return True
        if kind == "message_start":  # Anthropic Messages: input tokens first ...
            self._input_tokens = _count(_get(_get(obj.get("message"), "usage"), "input_tokens"))
            return True
        if kind == "message_delta":  # ... output tokens at the end
            out = _count(_get(obj.get("usage"), "output_tokens"))
            self.usage = Usage(self._input_tokens, out)
            return True
        usage = usage_from_dict(obj.get("usage"))
        if usage is not None:
            self.usage = usage
            # The usage-only chunk (no choices) the gateway asked for on the client's behalf.
            if self.strip and not obj.get("choices"):
                return False
        return True
