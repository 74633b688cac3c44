"""OpenAI Responses API <-> Chat Completions: the request there, the answer (JSON or SSE) back."""

from __future__ import annotations

import time
from typing import Any

from kubeinfer.gateway.translate.common import (
    JSON,
    ChatStream,
    TranslationError,
    as_dict,
    as_int,
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

# Fields a client may send with their default (or null) value but whose other values need a feature
# the chat backend lacks. `None` is always accepted: some clients serialize every field.
_DEFAULT_ONLY: dict[str, tuple[Any, ...]] = {
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
_IGNORED = {
    "metadata", "store", "service_tier", "prompt_cache_key", "prompt_cache_retention",
    "safety_identifier", "parallel_tool_calls", "max_tool_calls", "stream_options",
}  # fmt: skip
_COPIED = ("model", "temperature", "top_p", "presence_penalty", "frequency_penalty", "user", "stop")
_HANDLED = {"input", "instructions", "max_output_tokens", "stream", "text", "reasoning"}


def responses_to_chat(body: JSON) -> JSON:
    """A Responses API request as a Chat Completions request."""
    known = _IGNORED | _HANDLED | set(_COPIED)
    check_fields(body, _DEFAULT_ONLY, known, "Responses")
    chat: JSON = {k: body[k] for k in _COPIED if body.get(k) is not None}

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
        messages.extend(_item(item, f"input[{i}]") for i, item in enumerate(source))
    else:
        raise TranslationError("input", "`input` must be a string or a list of messages")
    chat["messages"] = messages

    if body.get("max_output_tokens") is not None:
        chat["max_tokens"] = body["max_output_tokens"]
    text_format = as_dict(as_dict(body.get("text")).get("format"))
    kind = text_format.get("type", "text")
    if kind == "json_object":
        chat["response_format"] = {"type": "json_object"}
    elif kind == "json_schema":  # Responses flattens what chat nests under `json_schema`
        schema = {k: v for k, v in text_format.items() if k != "type"}
        chat["response_format"] = {"type": "json_schema", "json_schema": schema}
    elif kind != "text":
        raise TranslationError("text.format", f"text format `{kind}` is not supported for this model")
    reasoning = as_dict(body.get("reasoning"))
    if reasoning.get("effort") is not None:
        chat["reasoning_effort"] = reasoning["effort"]
    if any(v is not None for k, v in reasoning.items() if k != "effort"):
        raise TranslationError("reasoning", "only `reasoning.effort` is supported for this model")
    stream_fields(chat, body.get("stream"))
    return chat


def _item(item: Any, param: str) -> JSON:
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
    parts = [_part(part, f"{param}.content[{j}]") for j, part in enumerate(content)]
    if role != "user" and any(p["type"] != "text" for p in parts):
        raise TranslationError(f"{param}.content", "images are only supported in user messages")
    return {"role": role, "content": text_or_parts(parts)}


def _part(part: Any, param: str) -> JSON:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind in ("input_text", "output_text"):  # output_text: an assistant turn sent back as history
        text = part.get("text", "")
        if not isinstance(text, str):
            raise TranslationError(f"{param}.text", "`text` must be a string")
        return {"type": "text", "text": text}
    if kind == "input_image":
        if part.get("file_id") is not None or not part.get("image_url"):
            raise TranslationError(f"{param}.image_url", "images must be given as a URL or data URL")
        image: JSON = {"url": part["image_url"]}
        if part.get("detail") in ("low", "high", "auto"):
            image["detail"] = part["detail"]
        return {"type": "image_url", "image_url": image}
    raise TranslationError(f"{param}.type", f"content of type `{kind}` is not supported for this model")


# ---------------------------------------------------------------------------------------------------
# Answers (non-streamed)
# ---------------------------------------------------------------------------------------------------


def _usage(usage: Any) -> JSON | None:
    counts = token_counts(usage)
    if counts is None:
        return None
    prompt, completion, cached = counts
    reasoning = as_dict(usage.get("completion_tokens_details")).get("reasoning_tokens") or 0
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},  # chat has no such count
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": prompt + completion,
    }


def _incomplete_reason(finish_reason: Any) -> str | None:
    if not isinstance(finish_reason, str):  # (an upstream's list or object is no reason either)
        return None
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
    choice = first_choice(chat)
    message = as_dict(choice.get("message"))
    reason = _incomplete_reason(choice.get("finish_reason"))
    if message.get("refusal"):
        part: JSON = {"type": "refusal", "refusal": message["refusal"]}
    else:
        part = _output_text(message.get("content") or "")
    suffix = id_suffix(chat.get("id"))
    item = _message_item(f"msg_{suffix}", "incomplete" if reason else "completed", [part])
    return _response_object(
        suffix, as_int(chat.get("created")) or int(time.time()), request, chat.get("model"), [item],
        "incomplete" if reason else "completed", _usage(chat.get("usage")), reason,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# Streams
# ---------------------------------------------------------------------------------------------------


class ChatToResponsesStream(ChatStream):
    """Chat Completions SSE bytes in, Responses API events out (the event order vLLM uses)."""

    def __init__(self, request: JSON) -> None:
        super().__init__(request)
        self._sequence = 0

    def _emit(self, kind: str, **fields: Any) -> bytes:
        data = {"type": kind, **fields, "sequence_number": self._sequence}
        self._sequence += 1
        return sse(kind, data)

    def _response(self, status: str, output: list[JSON], **extra: Any) -> JSON:
        usage = _usage(self._chat_usage) if status != "in_progress" else None
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
