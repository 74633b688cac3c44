"""Responses API and Anthropic Messages API on top of a Chat Completions backend. Pure: dicts and bytes.

vLLM and llama-server serve `/v1/responses` and `/v1/messages` themselves, so the gateway passes those
through. A `remote` backend may only serve `/v1/chat/completions`; for it the gateway translates the
request here, sends it as a chat completion, and translates the answer (a JSON body, or an SSE stream
fed through `ChatToResponsesStream` / `ChatToMessagesStream`) back.

Only what maps faithfully is translated: text and image input, text output, sampling settings, stop
sequences, usage. Anything that needs a feature a chat backend lacks (stored responses, tools,
background runs, extended thinking...) raises `TranslationError`, which the gateway answers with a 400:
a clear refusal beats a silently different answer. Unknown fields are refused for the same reason.

Shapes follow the real captures in tests/fixtures (vLLM 0.32 and llama-server serve both APIs
natively), so a client sees the same events whether its model is local or remote.
"""

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

# Fields a client may send with their default (or null) value but whose other values need a feature
# the chat backend lacks. `None` is always accepted: some clients serialize every field.
_RESPONSES_DEFAULT_ONLY: dict[str, tuple[Any, ...]] = {
    "tools": ([],),
    "tool_choice": ("none", "auto"),
    "previous_response_id": (),
    "conversation": (),
    "prompt": (),
    "background": (False,),
    "include": ([],),
    "truncation": ("disabled",),
    "top_logprobs": (0,),
}
# Fields that only matter to OpenAI's own bookkeeping (storage, billing, caching hints): dropped.
_RESPONSES_IGNORED = {
    "metadata", "store", "service_tier", "prompt_cache_key", "prompt_cache_retention",
    "safety_identifier", "parallel_tool_calls", "max_tool_calls", "stream_options",
}  # fmt: skip
_RESPONSES_COPIED = ("model", "temperature", "top_p", "presence_penalty", "frequency_penalty", "user", "stop")
_RESPONSES_HANDLED = {"input", "instructions", "max_output_tokens", "stream", "text", "reasoning"}

_MESSAGES_DEFAULT_ONLY: dict[str, tuple[Any, ...]] = {
    "tools": ([],),
    "tool_choice": ({"type": "auto"}, {"type": "none"}),
    "thinking": ({"type": "disabled"},),
    "container": (),
    "mcp_servers": ([],),
    "context_management": (),
}
_MESSAGES_IGNORED = {"service_tier"}
# top_k is not an OpenAI parameter, but most OpenAI-compatible servers take it; the backend decides.
_MESSAGES_COPIED = ("model", "max_tokens", "temperature", "top_p", "top_k")
_MESSAGES_HANDLED = {"messages", "system", "stop_sequences", "stream", "metadata"}


def _check_fields(body: JSON, default_only: dict[str, tuple[Any, ...]], known: set[str], api: str) -> None:
    for key, value in body.items():
        if value is None or key in known:
            continue
        if key not in default_only:
            raise TranslationError(key, f"unknown {api} API parameter `{key}`")
        if value not in default_only[key]:
            raise TranslationError(key, f"`{key}` is not supported for this model")


def _dict(value: Any) -> JSON:
    """`value` if it is an object, else empty: malformed optional fields must not crash the gateway."""
    return value if isinstance(value, dict) else {}


def _text_or_parts(parts: list[JSON]) -> str | list[JSON]:
    """Plain text when there is no image: system and assistant turns must be text on many servers."""
    if all(p["type"] == "text" for p in parts):
        return "\n".join(p["text"] for p in parts)
    return parts


def _stream_fields(chat: JSON, stream: Any) -> None:
    if stream:
        # The answer's usage (for the client and the ledger) only comes in a stream when asked.
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}


def responses_to_chat(body: JSON) -> JSON:
    """A Responses API request as a Chat Completions request."""
    known = _RESPONSES_IGNORED | _RESPONSES_HANDLED | set(_RESPONSES_COPIED)
    _check_fields(body, _RESPONSES_DEFAULT_ONLY, known, "Responses")
    chat: JSON = {k: body[k] for k in _RESPONSES_COPIED if body.get(k) is not None}

    messages: list[JSON] = []
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise TranslationError("instructions", "only string instructions are supported for this model")
        messages.append({"role": "system", "content": instructions})
    source = body.get("input")
    if isinstance(source, str):
        messages.append({"role": "user", "content": source})
    elif isinstance(source, list):
        messages.extend(_responses_item(item, f"input[{i}]") for i, item in enumerate(source))
    else:
        raise TranslationError("input", "`input` must be a string or a list of messages")
    chat["messages"] = messages

    if body.get("max_output_tokens") is not None:
        chat["max_tokens"] = body["max_output_tokens"]
    text_format = _dict(_dict(body.get("text")).get("format"))
    kind = text_format.get("type", "text")
    if kind == "json_object":
        chat["response_format"] = {"type": "json_object"}
    elif kind == "json_schema":  # Responses flattens what chat nests under `json_schema`
        schema = {k: v for k, v in text_format.items() if k != "type"}
        chat["response_format"] = {"type": "json_schema", "json_schema": schema}
    elif kind != "text":
        raise TranslationError("text.format", f"text format `{kind}` is not supported for this model")
    reasoning = _dict(body.get("reasoning"))
    if reasoning.get("effort") is not None:
        chat["reasoning_effort"] = reasoning["effort"]
    if any(v is not None for k, v in reasoning.items() if k != "effort"):
        raise TranslationError("reasoning", "only `reasoning.effort` is supported for this model")
    _stream_fields(chat, body.get("stream"))
    return chat


def _responses_item(item: Any, param: str) -> JSON:
    """One input item (a message; `type` may be left out) as a chat message."""
    if not isinstance(item, dict) or item.get("type", "message") != "message":
        kind = item.get("type") if isinstance(item, dict) else type(item).__name__
        raise TranslationError(param, f"input items of type `{kind}` are not supported for this model")
    role = item.get("role")
    if role not in ("user", "assistant", "system", "developer"):
        raise TranslationError(f"{param}.role", f"unknown role `{role}`")
    # Not every OpenAI-compatible server knows the `developer` role; `system` means the same there.
    role = "system" if role == "developer" else role
    content = item.get("content")
    if isinstance(content, str):
        return {"role": role, "content": content}
    if not isinstance(content, list):
        raise TranslationError(f"{param}.content", "`content` must be a string or a list of parts")
    parts = [_responses_part(part, f"{param}.content[{j}]") for j, part in enumerate(content)]
    if role != "user" and any(p["type"] != "text" for p in parts):
        raise TranslationError(f"{param}.content", "images are only supported in user messages")
    return {"role": role, "content": _text_or_parts(parts)}


def _responses_part(part: Any, param: str) -> JSON:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind in ("input_text", "output_text"):  # output_text: an assistant turn sent back as history
        return {"type": "text", "text": part.get("text", "")}
    if kind == "input_image":
        if part.get("file_id") is not None or not part.get("image_url"):
            raise TranslationError(f"{param}.image_url", "images must be given as a URL or data URL")
        image: JSON = {"url": part["image_url"]}
        if part.get("detail") in ("low", "high", "auto"):
            image["detail"] = part["detail"]
        return {"type": "image_url", "image_url": image}
    raise TranslationError(f"{param}.type", f"content of type `{kind}` is not supported for this model")


def messages_to_chat(body: JSON) -> JSON:
    """An Anthropic Messages API request as a Chat Completions request."""
    known = _MESSAGES_IGNORED | _MESSAGES_HANDLED | set(_MESSAGES_COPIED)
    _check_fields(body, _MESSAGES_DEFAULT_ONLY, known, "Messages")
    chat: JSON = {k: body[k] for k in _MESSAGES_COPIED if body.get(k) is not None}

    messages: list[JSON] = []
    system = body.get("system")
    if isinstance(system, str):
        messages.append({"role": "system", "content": system})
    elif isinstance(system, list):
        blocks = [_messages_block(b, f"system[{i}]") for i, b in enumerate(system)]
        if any(b["type"] != "text" for b in blocks):
            raise TranslationError("system", "`system` may only hold text blocks")
        messages.append({"role": "system", "content": _text_or_parts(blocks)})
    elif system is not None:
        raise TranslationError("system", "`system` must be a string or a list of text blocks")
    turns = body.get("messages")
    if not isinstance(turns, list):
        raise TranslationError("messages", "`messages` must be a list")
    for i, turn in enumerate(turns):
        param = f"messages[{i}]"
        role = turn.get("role") if isinstance(turn, dict) else None
        if role not in ("user", "assistant"):
            raise TranslationError(f"{param}.role", f"role must be `user` or `assistant`, not `{role}`")
        content = turn.get("content")
        if isinstance(content, str):
            messages.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise TranslationError(f"{param}.content", "`content` must be a string or a list of blocks")
        blocks = [_messages_block(b, f"{param}.content[{j}]") for j, b in enumerate(content)]
        if role == "assistant" and any(b["type"] != "text" for b in blocks):
            raise TranslationError(f"{param}.content", "images are only supported in user messages")
        messages.append({"role": role, "content": _text_or_parts(blocks)})
    chat["messages"] = messages

    if body.get("stop_sequences"):
        chat["stop"] = body["stop_sequences"]
    user = _dict(body.get("metadata")).get("user_id")
    if user is not None:
        chat["user"] = user
    _stream_fields(chat, body.get("stream"))
    return chat


def _messages_block(block: Any, param: str) -> JSON:
    kind = block.get("type") if isinstance(block, dict) else None
    if kind == "text":
        return {"type": "text", "text": block.get("text", "")}
    if kind == "image":
        source = _dict(block.get("source"))
        if source.get("type") == "base64":
            url = f"data:{source.get('media_type')};base64,{source.get('data')}"
        elif source.get("type") == "url" and isinstance(source.get("url"), str):
            url = source["url"]
        else:
            raise TranslationError(f"{param}.source", "images must have a base64 or URL source")
        return {"type": "image_url", "image_url": {"url": url}}
    raise TranslationError(f"{param}.type", f"`{kind}` blocks are not supported for this model")


# ---------------------------------------------------------------------------------------------------
# Responses (non-streamed)
# ---------------------------------------------------------------------------------------------------


def _id_suffix(chat_id: Any) -> str:
    """The upstream id without its `chatcmpl-` prefix, so translated ids still point at upstream logs."""
    if isinstance(chat_id, str) and chat_id:
        return chat_id.removeprefix("chatcmpl-")
    return uuid.uuid4().hex


def _first_choice(chat: JSON) -> JSON:
    choices = chat.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise ValueError("upstream answer is not a chat completion (no choices)")
    return choices[0]


def _token_counts(usage: Any) -> tuple[int, int, int] | None:
    """(prompt, completion, cached prompt) tokens of a chat `usage` object."""
    if not isinstance(usage, dict):
        return None
    cached = _dict(usage.get("prompt_tokens_details")).get("cached_tokens") or 0
    return int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0), int(cached)


def _responses_usage(usage: Any) -> JSON | None:
    counts = _token_counts(usage)
    if counts is None:
        return None
    prompt, completion, cached = counts
    reasoning = _dict(usage.get("completion_tokens_details")).get("reasoning_tokens") or 0
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},  # chat has no such count
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": prompt + completion,
    }


def _incomplete_reason(finish_reason: Any) -> str | None:
    return {"length": "max_output_tokens", "content_filter": "content_filter"}.get(finish_reason)


def _output_text(text: str) -> JSON:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _message_item(item_id: str, status: str, content: list[JSON]) -> JSON:
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": content}


def _response_object(
    suffix: str,
    created_at: int,
    request: JSON,
    model: Any,
    output: list[JSON],
    status: str,
    usage: JSON | None,
    incomplete_reason: str | None = None,
    error: JSON | None = None,
) -> JSON:
    """A Response object; request settings are echoed back as OpenAI and vLLM do."""
    return {
        "id": f"resp_{suffix}",
        "object": "response",
        "created_at": created_at,
        "status": status,
        "completed_at": int(time.time()) if status == "completed" else None,
        "error": error,
        "incomplete_details": {"reason": incomplete_reason} if incomplete_reason else None,
        "instructions": request.get("instructions"),
        "max_output_tokens": request.get("max_output_tokens"),
        "model": request.get("model") or model,  # the name the client asked for, not the remote's id
        "output": output,
        "parallel_tool_calls": request.get("parallel_tool_calls", True),
        "previous_response_id": None,
        "reasoning": request.get("reasoning"),
        "temperature": request.get("temperature"),
        "text": request.get("text") or {"format": {"type": "text"}},
        "tool_choice": request.get("tool_choice") or "auto",
        "tools": [],
        "top_p": request.get("top_p"),
        "truncation": "disabled",
        "usage": usage,
        "user": request.get("user"),
        "metadata": request.get("metadata") or {},
        "background": False,
        "max_tool_calls": None,
        "prompt": None,
        "service_tier": None,
        "top_logprobs": None,
    }


def chat_to_responses(chat: JSON, request: JSON) -> JSON:
    """A chat completion (JSON body) as a Responses API response to `request` (the client's body).

    ValueError if `chat` is not a chat completion (an upstream fault).
    """
    choice = _first_choice(chat)
    message = choice.get("message") or {}
    reason = _incomplete_reason(choice.get("finish_reason"))
    if message.get("refusal"):
        part: JSON = {"type": "refusal", "refusal": message["refusal"]}
    else:
        part = _output_text(message.get("content") or "")
    suffix = _id_suffix(chat.get("id"))
    item = _message_item(f"msg_{suffix}", "incomplete" if reason else "completed", [part])
    return _response_object(
        suffix, int(chat.get("created") or time.time()), request, chat.get("model"), [item],
        "incomplete" if reason else "completed", _responses_usage(chat.get("usage")), reason,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# Messages (non-streamed) and errors
# ---------------------------------------------------------------------------------------------------


def _messages_usage(usage: Any) -> JSON | None:
    counts = _token_counts(usage)
    if counts is None:
        return None
    prompt, completion, cached = counts
    # Anthropic counts cache reads apart from input_tokens; chat's prompt_tokens includes them.
    out: JSON = {"input_tokens": prompt - cached, "output_tokens": completion}
    if cached:
        out["cache_read_input_tokens"] = cached
    return out


def _stop_reason(finish_reason: Any, matched: Any, request: JSON) -> tuple[str, str | None]:
    """(stop_reason, stop_sequence). vLLM names the stop string it hit in `stop_reason`; a backend
    that does not cannot be told apart from a natural end, so that is reported as `end_turn`."""
    if finish_reason == "length":
        return "max_tokens", None
    if finish_reason == "content_filter":
        return "refusal", None
    if isinstance(matched, str) and matched in (request.get("stop_sequences") or []):
        return "stop_sequence", matched
    return "end_turn", None


def chat_to_messages(chat: JSON, request: JSON) -> JSON:
    """A chat completion (JSON body) as an Anthropic Messages response to `request` (the client's body).

    ValueError if `chat` is not a chat completion (an upstream fault).
    """
    choice = _first_choice(chat)
    stop_reason, stop_sequence = _stop_reason(choice.get("finish_reason"), choice.get("stop_reason"), request)
    return {
        "id": f"msg_{_id_suffix(chat.get('id'))}",
        "type": "message",
        "role": "assistant",
        "model": request.get("model") or chat.get("model"),
        "content": [{"type": "text", "text": (choice.get("message") or {}).get("content") or ""}],
        "stop_reason": stop_reason,
        "stop_sequence": stop_sequence,
        "usage": _messages_usage(chat.get("usage")) or {"input_tokens": 0, "output_tokens": 0},
    }


_ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
    503: "overloaded_error",  # the gateway's "no replica in time"; Anthropic itself says 529
    504: "timeout_error",
    529: "overloaded_error",
}


def anthropic_error(status: int, message: str) -> JSON:
    """The Messages API error body for an HTTP status."""
    kind = _ANTHROPIC_ERROR_TYPES.get(status, "invalid_request_error" if 400 <= status < 500 else "api_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


# ---------------------------------------------------------------------------------------------------
# Streams
# ---------------------------------------------------------------------------------------------------


def _sse(event: str, data: JSON) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n".encode()


def _error_message(obj: JSON) -> str:
    error = obj.get("error", obj)  # `{"error": {...}}`, or older vLLM's bare `{"object": "error", ...}`
    if isinstance(error, dict) and error.get("message"):
        return str(error["message"])
    return str(error) if isinstance(error, str) and error else "upstream error"


class _ChatStream:
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
            self._suffix = _id_suffix(chunk.get("id"))
            self._created = int(chunk.get("created") or time.time())
            self._model = self.request.get("model") or chunk.get("model")
            out += self._on_start()
        counts = _token_counts(chunk.get("usage"))
        if counts is not None:
            self._chat_usage = chunk["usage"]
            self.usage = counts[:2]
        for choice in chunk.get("choices") or []:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue  # the translated request never asks for n > 1
            text = (choice.get("delta") or {}).get("content")
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


class ChatToResponsesStream(_ChatStream):
    """Chat Completions SSE bytes in, Responses API events out (the event order vLLM uses)."""

    def __init__(self, request: JSON) -> None:
        super().__init__(request)
        self._sequence = 0

    def _emit(self, kind: str, **fields: Any) -> bytes:
        data = {"type": kind, **fields, "sequence_number": self._sequence}
        self._sequence += 1
        return _sse(kind, data)

    def _response(self, status: str, output: list[JSON], **extra: Any) -> JSON:
        usage = _responses_usage(self._chat_usage) if status != "in_progress" else None
        return _response_object(
            self._suffix, self._created, self.request, self._model, output, status, usage, **extra
        )

    def _on_start(self) -> bytes:
        response = self._response("in_progress", [])
        item = _message_item(f"msg_{self._suffix}", "in_progress", [])
        return b"".join([
            self._emit("response.created", response=response),
            self._emit("response.in_progress", response=response),
            self._emit("response.output_item.added", output_index=0, item=item),
            self._emit("response.content_part.added", item_id=item["id"], output_index=0, content_index=0,
                       part=_output_text("")),
        ])  # fmt: skip

    def _on_text(self, text: str) -> bytes:
        return self._emit("response.output_text.delta", item_id=f"msg_{self._suffix}", output_index=0,
                          content_index=0, delta=text, logprobs=[])  # fmt: skip

    def _on_end(self) -> bytes:
        text = "".join(self._text)
        reason = _incomplete_reason(self._finish_reason)
        status = "incomplete" if reason else "completed"
        item = _message_item(f"msg_{self._suffix}", status, [_output_text(text)])
        where = {"item_id": item["id"], "output_index": 0, "content_index": 0}
        # `response.completed` even when incomplete: what vLLM and llama-server send natively.
        response = self._response(status, [item], incomplete_reason=reason)
        return b"".join([
            self._emit("response.output_text.done", **where, text=text, logprobs=[]),
            self._emit("response.content_part.done", **where, part=_output_text(text)),
            self._emit("response.output_item.done", output_index=0, item=item),
            self._emit("response.completed", response=response),
        ])  # fmt: skip

    def _on_error(self, message: str) -> bytes:
        out = self._emit("error", code="server_error", message=message, param=None)
        if self._started:  # close the response the client was told about
            error = {"code": "server_error", "message": message}
            out += self._emit("response.failed", response=self._response("failed", [], error=error))
        return out


class ChatToMessagesStream(_ChatStream):
    """Chat Completions SSE bytes in, Anthropic Messages events out.

    Chat streams report usage only at the end, so `message_start` carries zero input tokens and the
    real counts come in `message_delta` (input and output); the ledger should read `self.usage`.
    """

    def _on_start(self) -> bytes:
        message = {
            "id": f"msg_{self._suffix}", "type": "message", "role": "assistant", "model": self._model,
            "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0},
        }  # fmt: skip
        return b"".join([
            _sse("message_start", {"type": "message_start", "message": message}),
            _sse("content_block_start", {"type": "content_block_start", "index": 0,
                                         "content_block": {"type": "text", "text": ""}}),
            _sse("ping", {"type": "ping"}),
        ])  # fmt: skip

    def _on_text(self, text: str) -> bytes:
        delta = {"type": "text_delta", "text": text}
        return _sse("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta})

    def _on_end(self) -> bytes:
        stop_reason, stop_sequence = _stop_reason(self._finish_reason, self._matched_stop, self.request)
        usage = _messages_usage(self._chat_usage) or {"output_tokens": 0}
        delta = {"stop_reason": stop_reason, "stop_sequence": stop_sequence}
        return b"".join([
            _sse("content_block_stop", {"type": "content_block_stop", "index": 0}),
            _sse("message_delta", {"type": "message_delta", "delta": delta, "usage": usage}),
            _sse("message_stop", {"type": "message_stop"}),
        ])  # fmt: skip

    def _on_error(self, message: str) -> bytes:
        return _sse("error", anthropic_error(500, message))
