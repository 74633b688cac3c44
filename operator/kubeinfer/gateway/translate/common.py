"""What both translations share: the refusal error, request helpers, and the chat-stream reader."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

JSON = dict[str, Any]


class TranslationError(Exception):
    """The request uses something the chat-completions backend cannot do; the gateway answers 400.

    Not a ValueError on purpose: a malformed *upstream* answer raises ValueError (a 502, not a 400).
    """

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param  # the offending field, as a path: "input[0].content[1].file_id"
        self.message = message


# ---------------------------------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------------------------------


def check_fields(body: JSON, default_only: dict[str, tuple[Any, ...]], known: set[str], api: str) -> None:
    for key, value in body.items():
        if value is None or key in known:
            continue
        if key not in default_only:
            raise TranslationError(key, f"unknown {api} API parameter `{key}`")
        if value not in default_only[key]:
            raise TranslationError(key, f"`{key}` is not supported for this model")


def as_dict(value: Any) -> JSON:
    """`value` if it is an object, else empty: malformed optional fields must not crash the gateway."""
    return value if isinstance(value, dict) else {}


def as_int(value: Any) -> int:
    """A count off the upstream's JSON; 0 for what is not a number (never worth failing an answer over)."""
    try:
        return int(value or 0)
    except (TypeError, ValueError, OverflowError):  # a list, "many", Infinity, NaN...
        return 0


def text_or_parts(parts: list[JSON]) -> str | list[JSON]:
    """Plain text when there is no image: system and assistant turns must be text on many servers."""
    if all(p["type"] == "text" for p in parts):
        return "\n".join(p["text"] for p in parts)
    return parts


def stream_fields(chat: JSON, stream: Any) -> None:
    if stream:
        # The answer's usage (for the client and the ledger) only comes in a stream when asked.
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}


# ---------------------------------------------------------------------------------------------------
# Answers
# ---------------------------------------------------------------------------------------------------


def id_suffix(chat_id: Any) -> str:
    """The upstream id without its `chatcmpl-` prefix, so translated ids still point at upstream logs."""
    if isinstance(chat_id, str) and chat_id:
        return chat_id.removeprefix("chatcmpl-")
    return uuid.uuid4().hex


def first_choice(chat: JSON) -> JSON:
    choices = chat.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise ValueError("upstream answer is not a chat completion (no choices)")
    return choices[0]


def token_counts(usage: Any) -> tuple[int, int, int] | None:
    """(prompt, completion, cached prompt) tokens of a chat `usage` object."""
    if not isinstance(usage, dict):
        return None
    cached = as_dict(usage.get("prompt_tokens_details")).get("cached_tokens")
    return as_int(usage.get("prompt_tokens")), as_int(usage.get("completion_tokens")), as_int(cached)


# ---------------------------------------------------------------------------------------------------
# Streams
# ---------------------------------------------------------------------------------------------------


def sse(event: str, data: JSON) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n".encode()


def _error_message(obj: JSON) -> str:
    error = obj.get("error", obj)  # `{"error": {...}}`, or older vLLM's bare `{"object": "error", ...}`
    if isinstance(error, dict) and error.get("message"):
        return str(error["message"])
    return str(error) if isinstance(error, str) and error else "upstream error"


class ChatStream:
    """Reads a Chat Completions SSE stream; subclasses write the target API's events.

    Chunks may split anywhere, even inside a UTF-8 character: bytes are buffered up to a newline
    (a byte that never occurs inside a multi-byte character) and only whole events are decoded.
    The subclass hooks `_on_start`, `_on_text`, `_on_end` and `_on_error` return the bytes to send.
    """

    def __init__(self, request: JSON) -> None:
        self.request = request
        self.usage: tuple[int, int] | None = None  # (prompt, completion) tokens, once upstream said
        self._chat_usage: JSON | None = None
        self._buffer = b""
        self._data: list[bytes] = []  # `data:` lines of the event being read
        self._started = False
        self._done = False  # after [DONE] or an error: nothing more is sent
        self._suffix = ""
        self._created = 0
        self._model: Any = None
        self._text: list[str] = []
        self._finish_reason: str | None = None
        self._matched_stop: Any = None

    def feed(self, chunk: bytes) -> bytes:
        """Upstream bytes in, bytes for the client out (possibly none yet)."""
        if b"\n" not in chunk:  # mid-line: don't re-split a growing buffer on every small chunk
            self._buffer += chunk
            return b""
        *lines, self._buffer = (self._buffer + chunk).split(b"\n")
        return b"".join([self._line(line) for line in lines])

    def close(self) -> bytes:
        """Upstream ended: the last events. A stream cut before its end becomes an error event."""
        out = self._line(self._buffer) if self._buffer else b""
        self._buffer = b""
        out += self._dispatch()  # a last event without its blank line
        if self._done:
            return out
        if self._finish_reason is not None:  # finished, only `data: [DONE]` is missing
            return out + self._end()
        return out + self._error("upstream stream ended before the response was complete")

    def _line(self, line: bytes) -> bytes:
        line = line.rstrip(b"\r")
        if not line:
            return self._dispatch()
        if line.startswith(b"data:"):
            self._data.append(line[6:] if line.startswith(b"data: ") else line[5:])
        return b""  # `event:`, `id:`, `retry:` and comments carry nothing a chat stream needs

    def _dispatch(self) -> bytes:
        data, self._data = b"\n".join(self._data), []
        if self._done or not data:
            return b""
        if data.strip() == b"[DONE]":
            return self._end()
        try:
            obj = json.loads(data)
        except ValueError:
            return b""  # not JSON: nothing to translate
        if not isinstance(obj, dict):
            return b""
        if obj.get("error") is not None or obj.get("object") == "error":
            return self._error(_error_message(obj))
        return self._chunk(obj)

    def _chunk(self, chunk: JSON) -> bytes:
        out = b""
        if not self._started:
            self._started = True
            self._suffix = id_suffix(chunk.get("id"))
            self._created = as_int(chunk.get("created")) or int(time.time())
            self._model = self.request.get("model") or chunk.get("model")
            out += self._on_start()
        counts = token_counts(chunk.get("usage"))
        if counts is not None:
            self._chat_usage = chunk["usage"]
            self.usage = counts[:2]
        for choice in chunk.get("choices") or []:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue  # the translated request never asks for n > 1
            text = as_dict(choice.get("delta")).get("content")
            if isinstance(text, str) and text:
                self._text.append(text)
                out += self._on_text(text)
            if choice.get("finish_reason"):
                self._finish_reason = choice["finish_reason"]
                self._matched_stop = choice.get("stop_reason")
        return out

    def _end(self) -> bytes:
        if not self._started:
            return self._error("upstream sent no completion")
        self._done = True
        return self._on_end()

    def _error(self, message: str) -> bytes:
        self._done = True
        return self._on_error(message)

    def _on_start(self) -> bytes:
        raise NotImplementedError

    def _on_text(self, text: str) -> bytes:
        raise NotImplementedError

    def _on_end(self) -> bytes:
        raise NotImplementedError

    def _on_error(self, message: str) -> bytes:
        raise NotImplementedError
