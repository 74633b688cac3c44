"""vLLM 0.32's OpenAI-compatible API as the simulator speaks it: requests in, response bodies out.

Pure: request parsing and validation with vLLM's error envelopes (:class:`HTTPError`), whole response
bodies, usage objects, /v1/models, and the text around each SSE chunk (:class:`StreamFrame`).
Bodies, errors and field order follow real vLLM 0.32 captures (tests/fixtures/vllm-0.32.0). The
HTTP layer and the engine loop that fill them in are :mod:`kubeinfer_devkit.sim.server`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from json.encoder import encode_basestring  # the C string quoter
from typing import Any

from kubeinfer_devkit.sim.model import Request
from kubeinfer_devkit.sim.tokens import chat_pieces

DEFAULT_MAX_TOKENS = 16
"""Output length when a request sets no max_tokens (vLLM would fill the context: too slow to be useful)."""

SYSTEM_FINGERPRINT = "kubeinfer-sim"

DONE = "data: [DONE]\n\n"
# What follows a stream chunk's text (chat, completion), as vLLM renders it: (more to come, last chunk).
_CHOICE_TAILS = {
    True: (
        '},"logprobs":null,"finish_reason":null,"token_ids":null}]',
        '},"logprobs":null,"finish_reason":"length","stop_reason":null,"token_ids":null}]',
    ),
    False: (
        ',"logprobs":null,"finish_reason":null,"stop_reason":null,"prompt_token_ids":null,"token_ids":null}]',
        ',"logprobs":null,"finish_reason":"length","stop_reason":null,"prompt_token_ids":null,"token_ids":null}]',
    ),
}
# A chat stream's first chunk: the role, sent with the first token.
_ROLE_CHOICES = (
    '[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}],'
    '"prompt_token_ids":null,"prompt_text":null}'
)


def dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


class HTTPError(Exception):
    def __init__(self, status: int, body: Mapping[str, Any]) -> None:
        self.status, self.body = status, body


def error(
    status: int, message: str, kind: str = "BadRequestError", param: str | None = None, value: Any = None
) -> HTTPError:
    """vLLM's error envelope; `value`: a parameter check's, which vLLM appends to the message."""
    if value is not None:
        message += f" (parameter={param}, value={value})"
    return HTTPError(status, {"error": {"message": message, "type": kind, "param": param, "code": status}})


# --- requests -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Parsed:
    chat: bool
    pieces: list[str]
    max_tokens: int
    """As requested (the engine may get fewer, to fit the context)."""
    stream: bool
    include_usage: bool


def parse_request(raw: bytes, chat: bool, model: str, max_model_len: int) -> Parsed:
    """A chat or completion request body, checked as vLLM checks it (raises HTTPError)."""
    try:
        body = json.loads(raw)
    except ValueError as e:
        pos = getattr(e, "pos", 0)
        msg = getattr(e, "msg", str(e))
        detail = (
            f"{{'type': 'json_invalid', 'loc': 'body.{pos}', 'msg': 'JSON decode error', "
            f"'input': '<dict of 0 items>', 'ctx': {{'error': '{msg}'}}}}"
        )
        raise error(400, f"1 validation error:\n  {detail}", "Bad Request", f"body.{pos}") from None
    if not isinstance(body, dict):
        raise error(400, "the request body must be a JSON object", param="body")
    requested = body.get("model")
    if requested is not None and requested != model:
        raise error(
            404,
            f"The model `{requested}` does not exist. Valid aliases: {model}.",
            "NotFoundError",
            "model",
        )
    if body.get("n") not in (None, 1):
        raise error(400, "the simulator supports n=1 only", param="n")
    pieces = chat_pieces(_messages(body.get("messages"))) if chat else [_prompt(body.get("prompt"))]
    name = "max_tokens"
    if chat and body.get("max_completion_tokens") is not None:
        name = "max_completion_tokens"
    value = body.get(name)
    if value is None:
        value = DEFAULT_MAX_TOKENS
    elif not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise error(400, f"{name} must be an integer >= 1, got {value!r}", param=name)
    elif value > max_model_len:
        raise error(
            400,
            f"{name}={value} cannot be greater than max_model_len={max_model_len}. "
            f"Please request fewer output tokens.",
            param=name,
            value=value,
        )
    options = body.get("stream_options")
    include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
    return Parsed(chat, pieces, value, body.get("stream") is True, include_usage)


def fit_max_tokens(requested: int, prompt_tokens: int, max_model_len: int) -> int:
    """The output length the engine gets: the request's, shortened to fit the context, as vLLM does."""
    if prompt_tokens >= max_model_len:
        raise error(
            400,
            f"This model's maximum context length is {max_model_len} tokens. However, your prompt contains "
            f"{prompt_tokens} input tokens, which exceeds this limit even without any output tokens. "
            f"Please reduce the length of the input prompt.",
            param="input_tokens",
            value=prompt_tokens,
        )
    return min(requested, max_model_len - prompt_tokens)


def _messages(messages: Any) -> list[tuple[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise error(400, "messages must be a non-empty list", param="messages")
    out = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise error(400, "each message must be an object with a role", param="messages")
        out.append((m["role"], _text(m.get("content"))))
    return out


def _text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: text as text, anything else as its JSON
        return "\n".join(
            p["text"] if isinstance(p, dict) and isinstance(p.get("text"), str) else dumps(p) for p in content
        )
    raise error(400, "message content must be a string or a list of parts", param="messages")


def _prompt(prompt: Any) -> str:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        return " ".join(map(str, prompt))  # token ids: one token each
    raise error(400, "prompt must be a string, a list of token ids, or a list of one of them", param="prompt")


# --- responses ----------------------------------------------------------------------------------------


def request_id(chat: bool, prefix: str, seq_id: int) -> str:
    return f"{'chatcmpl' if chat else 'cmpl'}-{prefix}{seq_id:08x}"


def usage(seq: Request, *, cached_details: bool, null_details: bool) -> dict[str, Any]:
    """`cached_details`: report prompt_tokens_details.cached_tokens (--enable-prompt-tokens-details)."""
    out: dict[str, Any] = {
        "prompt_tokens": seq.num_prompt,
        "total_tokens": seq.num_prompt + seq.output,
        "completion_tokens": seq.output,
    }
    if cached_details:
        out["prompt_tokens_details"] = {"cached_tokens": seq.cached_tokens or 0}
    elif null_details:
        out["prompt_tokens_details"] = None
    if null_details:
        out["completion_tokens_details"] = None
    return out


def whole_body(
    chat: bool, rid: str, created: int, model: str, text: str, usage: dict[str, Any]
) -> dict[str, Any]:
    """A non-streamed chat completion or completion."""
    if chat:
        message = {"role": "assistant", "content": text, "refusal": None, "annotations": None,
                   "audio": None, "function_call": None, "reasoning": None}  # fmt: skip
        return {
            "id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": "length",
                         "stop_reason": None, "token_ids": None, "routed_experts": None}],
            "service_tier": None, "system_fingerprint": SYSTEM_FINGERPRINT, "usage": usage,
            "prompt_logprobs": None, "prompt_token_ids": None, "prompt_text": None,
            "kv_transfer_params": None, "ec_transfer_params": None, "metrics": None,
        }  # fmt: skip
    return {
        "id": rid, "object": "text_completion", "created": created, "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": "length",
                     "stop_reason": None, "token_ids": None, "prompt_logprobs": None,
                     "prompt_token_ids": None, "routed_experts": None}],
        "service_tier": None, "system_fingerprint": SYSTEM_FINGERPRINT, "usage": usage,
        "kv_transfer_params": None, "ec_transfer_params": None, "metrics": None,
    }  # fmt: skip


@dataclass(frozen=True, slots=True)
class StreamFrame:
    """The JSON around one stream's chunks, rendered once per request: a chunk is `head + text + tail`
    (`last` on the final one), the first chat chunk led by the role chunk."""

    top: str
    head: str
    tail: str
    last: str
    role: str

    @classmethod
    def of(cls, chat: bool, rid: str, created: int, model_json: str, include_usage: bool) -> StreamFrame:
        obj = "chat.completion.chunk" if chat else "text_completion"
        top = f'{{"id":"{rid}","object":"{obj}","created":{created},"model":{model_json},"choices":'
        fingerprint = "" if include_usage else f',"system_fingerprint":"{SYSTEM_FINGERPRINT}"'
        mid, end = _CHOICE_TAILS[chat]
        head = f'data: {top}[{{"index":0,' + ('"delta":{"content":' if chat else '"text":')
        role = f"data: {top}{_ROLE_CHOICES}\n\n" if chat else ""
        return cls(top, head, mid + "}\n\n", end + fingerprint + "}\n\n", role)

    def chunk(self, text: str, first: bool, done: bool) -> str:
        """The event carrying `text` (the tokens since the last chunk)."""
        chunk = (
            self.head + encode_basestring(text if first else " " + text) + (self.last if done else self.tail)
        )
        return self.role + chunk if first else chunk

    def usage_chunk(self, usage: dict[str, Any]) -> str:
        """The extra last chunk of stream_options.include_usage."""
        return f'data: {self.top}[],"usage":{dumps(usage)},"system_fingerprint":"{SYSTEM_FINGERPRINT}"}}\n\n'


def models_body(model: str, id_prefix: str, created: int, max_model_len: int) -> dict[str, Any]:
    """/v1/models: the one served model."""
    permission = {
        "id": f"modelperm-{id_prefix}", "object": "model_permission", "created": created,
        "allow_create_engine": False, "allow_sampling": True, "allow_logprobs": True,
        "allow_search_indices": False, "allow_view": True, "allow_fine_tuning": False,
        "organization": "*", "group": None, "is_blocking": False,
    }  # fmt: skip
    card = {
        "id": model, "object": "model", "created": created, "owned_by": "vllm", "root": model,
        "parent": None, "max_model_len": max_model_len, "permission": [permission],
    }  # fmt: skip
    return {"object": "list", "data": [card]}
