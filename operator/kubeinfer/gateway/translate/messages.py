"""Anthropic Messages API <-> Chat Completions: the request there, the answer (JSON or SSE) back."""

from __future__ import annotations

from typing import Any

from kubeinfer.gateway.translate.common import (
    JSON,
    ChatStream,
    TranslationError,
    as_dict,
    check_fields,
    first_choice,
    id_suffix,
    sse,
    stream_fields,
    text_or_parts,
    token_counts,
)

# ---------------------------------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------------------------------

# As for Responses: accepted only with their default (or null) value.
_DEFAULT_ONLY: dict[str, tuple[Any, ...]] = {
    "tools": ([],),
    "tool_choice": ({"type": "auto"}, {"type": "none"}),
    "thinking": ({"type": "disabled"},),
    "container": (),
    "mcp_servers": ([],),
    "context_management": (),
}
_IGNORED = {"service_tier"}
# top_k is not an OpenAI parameter, but most OpenAI-compatible servers take it; the backend decides.
_COPIED = ("model", "max_tokens", "temperature", "top_p", "top_k")
_HANDLED = {"messages", "system", "stop_sequences", "stream", "metadata"}


def messages_to_chat(body: JSON) -> JSON:
    """An Anthropic Messages API request as a Chat Completions request."""
    known = _IGNORED | _HANDLED | set(_COPIED)
    check_fields(body, _DEFAULT_ONLY, known, "Messages")
    chat: JSON = {k: body[k] for k in _COPIED if body.get(k) is not None}

    messages: list[JSON] = []
    system = body.get("system")
    if isinstance(system, str):
        messages.append({"role": "system", "content": system})
    elif isinstance(system, list):
        blocks = [_block(b, f"system[{i}]") for i, b in enumerate(system)]
        if any(b["type"] != "text" for b in blocks):
            raise TranslationError("system", "`system` may only hold text blocks")
        messages.append({"role": "system", "content": text_or_parts(blocks)})
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
        blocks = [_block(b, f"{param}.content[{j}]") for j, b in enumerate(content)]
        if role == "assistant" and any(b["type"] != "text" for b in blocks):
            raise TranslationError(f"{param}.content", "images are only supported in user messages")
        messages.append({"role": role, "content": text_or_parts(blocks)})
    chat["messages"] = messages

    if body.get("stop_sequences"):
        chat["stop"] = body["stop_sequences"]
    user = as_dict(body.get("metadata")).get("user_id")
    if user is not None:
        chat["user"] = user
    stream_fields(chat, body.get("stream"))
    return chat


def _block(block: Any, param: str) -> JSON:
    kind = block.get("type") if isinstance(block, dict) else None
    if kind == "text":
        text = block.get("text", "")
        if not isinstance(text, str):
            raise TranslationError(f"{param}.text", "`text` must be a string")
        return {"type": "text", "text": text}
    if kind == "image":
        source = as_dict(block.get("source"))
        if source.get("type") == "base64":
            url = f"data:{source.get('media_type')};base64,{source.get('data')}"
        elif source.get("type") == "url" and isinstance(source.get("url"), str):
            url = source["url"]
        else:
            raise TranslationError(f"{param}.source", "images must have a base64 or URL source")
        return {"type": "image_url", "image_url": {"url": url}}
    raise TranslationError(f"{param}.type", f"`{kind}` blocks are not supported for this model")


# ---------------------------------------------------------------------------------------------------
# Answers (non-streamed) and errors
# ---------------------------------------------------------------------------------------------------


def _usage(usage: Any) -> JSON | None:
    counts = token_counts(usage)
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
    choice = first_choice(chat)
    stop_reason, stop_sequence = _stop_reason(choice.get("finish_reason"), choice.get("stop_reason"), request)
    return {
        "id": f"msg_{id_suffix(chat.get('id'))}",
        "type": "message",
        "role": "assistant",
        "model": request.get("model") or chat.get("model"),
        "content": [{"type": "text", "text": as_dict(choice.get("message")).get("content") or ""}],
        "stop_reason": stop_reason,
        "stop_sequence": stop_sequence,
        "usage": _usage(chat.get("usage")) or {"input_tokens": 0, "output_tokens": 0},
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


class ChatToMessagesStream(ChatStream):
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
            sse("message_start", {"type": "message_start", "message": message}),
            sse("content_block_start", {"type": "content_block_start", "index": 0,
                                        "content_block": {"type": "text", "text": ""}}),
            sse("ping", {"type": "ping"}),
        ])  # fmt: skip

    def _on_text(self, text: str) -> bytes:
        delta = {"type": "text_delta", "text": text}
        return sse("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta})

    def _on_end(self) -> bytes:
        stop_reason, stop_sequence = _stop_reason(self._finish_reason, self._matched_stop, self.request)
        usage = _usage(self._chat_usage) or {"output_tokens": 0}
        delta = {"stop_reason": stop_reason, "stop_sequence": stop_sequence}
        return b"".join([
            sse("content_block_stop", {"type": "content_block_stop", "index": 0}),
            sse("message_delta", {"type": "message_delta", "delta": delta, "usage": usage}),
            sse("message_stop", {"type": "message_stop"}),
        ])  # fmt: skip

    def _on_error(self, message: str) -> bytes:
        return sse("error", anthropic_error(500, message))
