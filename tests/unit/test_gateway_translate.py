"""Responses and Messages APIs over a chat-completions backend (gateway/translate/).

The inputs are real Chat Completions captures (vLLM 0.32 and llama-server); the outputs are checked
against real native /v1/responses and /v1/messages captures of the same engines, and, where the SDKs
are installed, parsed by the `openai` and `anthropic` clients themselves.
"""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path
from typing import Any

import pytest

from kubeinfer.gateway.translate.common import TranslationError
from kubeinfer.gateway.translate.messages import (
    ChatToMessagesStream,
    anthropic_error,
    chat_to_messages,
    messages_to_chat,
)
from kubeinfer.gateway.translate.responses import ChatToResponsesStream, chat_to_responses, responses_to_chat
from kubeinfer.gateway.usage import SSEUsage, Usage
from tests.cases import FIXTURES

ENGINES = ["vllm-0.32.0", "llama-server"]
VLLM = FIXTURES / "vllm-0.32.0"
LLAMA = FIXTURES / "llama-server"


def load_json(path: Path) -> dict[str, Any]:
    """A JSON capture; some end with an `HTTP 200` line after the body."""
    body, _ = json.JSONDecoder().raw_decode(path.read_text())
    return dict(body)


def events(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    """(event name, data) of every SSE event; `data: [DONE]` has no name and is skipped."""
    out = []
    for block in raw.decode().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "event" in fields:
            out.append((fields["event"], json.loads(fields["data"])))
    return out


def collapse(names: list[str]) -> list[str]:
    """Event names with runs of the same event (the deltas) counted once: captures differ in length."""
    return [n for i, n in enumerate(names) if i == 0 or names[i - 1] != n]


def chat_text(stream: bytes) -> str:
    """The text a chat completions stream carries."""
    text = ""
    for line in stream.decode().splitlines():
        if line.startswith("data: {"):
            for choice in json.loads(line[6:])["choices"]:
                text += choice["delta"].get("content") or ""
    return text


def translate(cls: type[ChatToResponsesStream | ChatToMessagesStream], data: bytes, cuts: list[int]) -> bytes:
    """Feed `data` cut at `cuts`, then close."""
    stream = cls({"model": "tiny"})
    bounds = [0, *cuts, len(data)]
    return b"".join(stream.feed(data[a:b]) for a, b in itertools.pairwise(bounds)) + stream.close()


def random_cuts(data: bytes, seed: int) -> list[int]:
    rng = random.Random(seed)
    return sorted(rng.sample(range(1, len(data)), rng.randint(1, 40)))


# ---------------------------------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------------------------------


def test_responses_request_realistic():
    body = {
        "model": "tiny",
        "instructions": "Answer briefly.",
        "input": [
            {"role": "developer", "content": "Use metric units."},
            {
                "type": "message",
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "What is in this picture?"},
                    {"type": "input_image", "image_url": "https://example.com/a.png", "detail": "low"},
                ],
            },
            {
                "type": "message", "id": "msg_1", "status": "completed", "role": "assistant",
                "content": [{"type": "output_text", "text": "A cat.", "annotations": []}],
            },
            {"role": "user", "content": "How big?"},
        ],
        "max_output_tokens": 64,
        "temperature": 0.2,
        "top_p": 0.9,
        "stream": True,
        "user": "alice",
        "metadata": {"team": "search"},
        "store": False,
        "tools": [],
        "tool_choice": "auto",
        "previous_response_id": None,
        "text": {
            "format": {"type": "json_schema", "name": "size", "schema": {"type": "object"}, "strict": True}
        },
        "reasoning": {"effort": "low"},
    }  # fmt: skip
    assert responses_to_chat(body) == {
        "model": "tiny",
        "messages": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "system", "content": "Use metric units."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is in this picture?"},
                    {"type": "image_url", "image_url": {"url": "https://example.com/a.png", "detail": "low"}},
                ],
            },
            {"role": "assistant", "content": "A cat."},
            {"role": "user", "content": "How big?"},
        ],
        "max_tokens": 64,
        "temperature": 0.2,
        "top_p": 0.9,
        "user": "alice",
        "stream": True,
        "stream_options": {"include_usage": True},
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "size", "schema": {"type": "object"}, "strict": True},
        },
        "reasoning_effort": "low",
    }


def test_responses_request_string_input_and_stop():
    assert responses_to_chat({"model": "tiny", "input": "Hello", "stop": ["\n"]}) == {
        "model": "tiny",
        "stop": ["\n"],
        "messages": [{"role": "user", "content": "Hello"}],
    }
    assert responses_to_chat({"model": "tiny", "input": "x", "text": {"format": {"type": "json_object"}}})[
        "response_format"
    ] == {"type": "json_object"}


def test_messages_request_realistic():
    body = {
        "model": "tiny",
        "max_tokens": 128,
        "system": [
            {"type": "text", "text": "You are terse."},
            {"type": "text", "text": "Reply in English.", "cache_control": {"type": "ephemeral"}},
        ],
        "messages": [
            {
                "role": "user",
                "content": [
                    {
                        "type": "image",
                        "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0K"},
                    },
                    {"type": "image", "source": {"type": "url", "url": "https://example.com/b.jpg"}},
                    {"type": "text", "text": "Compare these."},
                ],
            },
            {"role": "assistant", "content": [{"type": "text", "text": "The first is darker."}]},
            {"role": "user", "content": "Why?"},
        ],
        "stop_sequences": ["###"],
        "temperature": 0.5,
        "top_p": 0.95,
        "top_k": 40,
        "metadata": {"user_id": "u-42"},
        "stream": True,
        "tools": [],
        "thinking": {"type": "disabled"},
    }  # fmt: skip
    assert messages_to_chat(body) == {
        "model": "tiny",
        "max_tokens": 128,
        "temperature": 0.5,
        "top_p": 0.95,
        "top_k": 40,
        "messages": [
            {"role": "system", "content": "You are terse.\nReply in English."},
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0K"}},
                    {"type": "image_url", "image_url": {"url": "https://example.com/b.jpg"}},
                    {"type": "text", "text": "Compare these."},
                ],
            },
            {"role": "assistant", "content": "The first is darker."},
            {"role": "user", "content": "Why?"},
        ],
        "stop": ["###"],
        "user": "u-42",
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def test_translated_requests_are_valid_chat_requests():
    """The chat request we build is one the openai SDK's own request types accept."""
    openai = pytest.importorskip("openai")
    pydantic = pytest.importorskip("pydantic")
    params = pydantic.TypeAdapter(openai.types.chat.completion_create_params.CompletionCreateParamsBase)
    params.validate_python(responses_to_chat({"model": "m", "input": [{"role": "user", "content": "hi"}]}))
    params.validate_python(
        messages_to_chat({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]})
    )


def user_parts(*parts: dict[str, Any]) -> dict[str, Any]:
    return {"input": [{"role": "user", "content": list(parts)}]}


def turn(role: str, *blocks: dict[str, Any]) -> dict[str, Any]:
    return {"messages": [{"role": role, "content": list(blocks)}]}


def test_defaults_and_nulls_of_unsupported_fields_are_accepted():
    """Some clients send every field; defaults ask for nothing a chat backend lacks."""
    defaults = {
        "tools": [], "tool_choice": "none", "background": False, "include": [], "truncation": "disabled",
        "top_logprobs": 0, "previous_response_id": None, "conversation": None, "store": True,
        "parallel_tool_calls": True, "service_tier": "auto", "temperature": None,
    }  # fmt: skip
    assert responses_to_chat({"model": "m", "input": "hi", **defaults}) == {
        "model": "m", "messages": [{"role": "user", "content": "hi"}],
    }  # fmt: skip
    defaults = {"tools": [], "tool_choice": {"type": "auto"}, "thinking": {"type": "disabled"},
                "service_tier": "auto", "system": None, "stream": False}  # fmt: skip
    hello = [{"role": "user", "content": "hi"}]
    assert messages_to_chat({"model": "m", "max_tokens": 4, "messages": hello, **defaults}) == {
        "model": "m", "max_tokens": 4, "messages": hello,
    }  # fmt: skip


RESPONSES_REJECTED = [
    ({"tools": [{"type": "web_search"}]}, "tools"),
    # Function tools too: the answer would need tool calls translated back, which is not done.
    ({"tools": [{"type": "function", "name": "f", "parameters": {}}]}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"previous_response_id": "resp_1"}, "previous_response_id"),
    ({"background": True}, "background"),
    ({"conversation": "conv_1"}, "conversation"),
    ({"prompt": {"id": "pmpt_1"}}, "prompt"),
    ({"include": ["reasoning.encrypted_content"]}, "include"),
    ({"truncation": "auto"}, "truncation"),
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"seed": 1}, "seed"),  # unknown to the Responses API
    ({"instructions": [{"role": "system", "content": "x"}]}, "instructions"),
    ({"input": None}, "input"),
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": "1"}]}, "input[0]"),
    ({"input": [{"type": "reasoning", "summary": []}]}, "input[0]"),
    ({"input": [{"role": "tool", "content": "x"}]}, "input[0].role"),
    ({"input": [{"role": "user", "content": 5}]}, "input[0].content"),
    (user_parts({"type": "input_file", "file_id": "f"}), "input[0].content[0].type"),
    (user_parts({"type": "input_image", "file_id": "f"}), "input[0].content[0].image_url"),
    ({"input": [{"role": "system", "content": [{"type": "input_image", "image_url": "u"}]}]},
     "input[0].content"),
    ({"text": {"format": {"type": "grammar"}}}, "text.format"),
    ({"reasoning": {"effort": "low", "summary": "auto"}}, "reasoning"),
]  # fmt: skip


@pytest.mark.parametrize(("extra", "param"), RESPONSES_REJECTED)
def test_responses_request_rejected(extra: dict[str, Any], param: str):
    with pytest.raises(TranslationError) as caught:
        responses_to_chat({"model": "tiny", "input": "hi", **extra})
    assert caught.value.param == param
    assert caught.value.message and param in str(caught.value)


BLOCK = "messages[0].content[0]"
MESSAGES_REJECTED = [
    ({"tools": [{"name": "f", "input_schema": {"type": "object"}}]}, "tools"),
    ({"tool_choice": {"type": "any"}}, "tool_choice"),
    ({"thinking": {"type": "enabled", "budget_tokens": 1024}}, "thinking"),
    ({"mcp_servers": [{"type": "url", "url": "https://x", "name": "x"}]}, "mcp_servers"),
    ({"frequency_penalty": 1}, "frequency_penalty"),  # an OpenAI name, unknown to the Messages API
    ({"system": 5}, "system"),
    ({"system": [{"type": "image", "source": {"type": "url", "url": "u"}}]}, "system"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "system", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": None}]}, "messages[0].content"),
    (turn("assistant", {"type": "tool_use", "id": "t", "name": "f", "input": {}}), f"{BLOCK}.type"),
    (turn("user", {"type": "tool_result", "tool_use_id": "t", "content": "1"}), f"{BLOCK}.type"),
    (turn("user", {"type": "document", "source": {}}), f"{BLOCK}.type"),
    (turn("user", {"type": "image", "source": {"type": "file", "file_id": "f"}}), f"{BLOCK}.source"),
    (turn("assistant", {"type": "image", "source": {"type": "url", "url": "u"}}), "messages[0].content"),
]  # fmt: skip


@pytest.mark.parametrize(("extra", "param"), MESSAGES_REJECTED)
def test_messages_request_rejected(extra: dict[str, Any], param: str):
    body = {"model": "tiny", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}], **extra}
    with pytest.raises(TranslationError) as caught:
        messages_to_chat(body)
    assert caught.value.param == param


# ---------------------------------------------------------------------------------------------------
# Non-streamed answers
# ---------------------------------------------------------------------------------------------------

# Fields of the Response object in OpenAI's API; vLLM adds its own (kv_transfer_params...) on top.
OPENAI_RESPONSE_FIELDS = {
    "id", "object", "created_at", "status", "completed_at", "error", "incomplete_details", "instructions",
    "max_output_tokens", "model", "output", "parallel_tool_calls", "previous_response_id", "reasoning",
    "temperature", "text", "tool_choice", "tools", "top_p", "truncation", "usage", "user", "metadata",
    "background", "service_tier", "max_tool_calls", "prompt", "top_logprobs",
}  # fmt: skip


def native_response_keys() -> set[str]:
    """Top-level keys both engines' native /v1/responses answers have, limited to OpenAI's fields."""
    llama, vllm = load_json(LLAMA / "responses.json"), load_json(VLLM / "responses.json")
    return set(llama) | (set(vllm) & OPENAI_RESPONSE_FIELDS)


@pytest.mark.parametrize("engine", ENGINES)
def test_chat_to_responses_matches_native_shape(engine: str):
    chat = load_json(FIXTURES / engine / "chat_completion.json")
    native = load_json(FIXTURES / engine / "responses.json")
    out = chat_to_responses(chat, {"model": "tiny", "max_output_tokens": 16})

    assert native_response_keys() <= set(out)
    assert set(native["output"][0]) - {"phase"} <= set(out["output"][0])  # vLLM's null `phase` is optional
    assert set(native["output"][0]["content"][0]) <= set(out["output"][0]["content"][0])
    assert set(native["usage"]) <= set(out["usage"])
    assert out["id"].startswith("resp_") and out["output"][0]["id"].startswith("msg_")
    assert out["object"] == "response" and out["model"] == "tiny" and out["max_output_tokens"] == 16

    # Text and usage survive; the captures stopped on max_tokens, as vLLM's native one did.
    assert out["output"][0]["content"][0]["text"] == chat["choices"][0]["message"]["content"]
    usage = chat["usage"]
    assert (out["usage"]["input_tokens"], out["usage"]["output_tokens"], out["usage"]["total_tokens"]) == (
        usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"],
    )  # fmt: skip
    assert out["status"] == "incomplete"
    assert out["incomplete_details"] == load_json(VLLM / "responses.json")["incomplete_details"]


def test_chat_to_responses_completed_cached_and_refusal():
    chat = load_json(LLAMA / "chat_completion.json")
    chat["choices"][0]["finish_reason"] = "stop"
    chat["usage"]["prompt_tokens_details"]["cached_tokens"] = 10
    out = chat_to_responses(chat, {"model": "tiny"})
    assert out["status"] == "completed" and out["incomplete_details"] is None
    assert isinstance(out["completed_at"], int) and out["output"][0]["status"] == "completed"
    assert out["usage"]["input_tokens_details"]["cached_tokens"] == 10

    chat["choices"][0]["message"] = {"role": "assistant", "content": None, "refusal": "I can't help."}
    refusal = chat_to_responses(chat, {})["output"][0]["content"]
    assert refusal == [{"type": "refusal", "refusal": "I can't help."}]


def test_not_a_chat_completion_is_an_upstream_fault():
    """A ValueError (the gateway's 502), deliberately not a TranslationError (the client's 400)."""
    assert not issubclass(TranslationError, ValueError)
    for translate_answer in (chat_to_responses, chat_to_messages):
        with pytest.raises(ValueError, match="no choices"):
            translate_answer({"object": "error", "message": "x"}, {})


@pytest.mark.parametrize("engine", ENGINES)
def test_chat_to_messages_matches_native_shape(engine: str):
    chat = load_json(FIXTURES / engine / "chat_completion.json")
    out = chat_to_messages(chat, {"model": "tiny", "max_tokens": 16})
    # llama-server's native answer has every key Anthropic sends; vLLM's leaves out stop_sequence.
    assert set(out) == set(load_json(LLAMA / "messages.json"))
    assert set(load_json(VLLM / "messages.json")) <= set(out)
    assert out["id"].startswith("msg_") and out["type"] == "message" and out["model"] == "tiny"
    assert out["content"] == [{"type": "text", "text": chat["choices"][0]["message"]["content"]}]
    assert out["stop_reason"] == load_json(FIXTURES / engine / "messages.json")["stop_reason"] == "max_tokens"
    assert out["usage"] == {
        "input_tokens": chat["usage"]["prompt_tokens"],
        "output_tokens": chat["usage"]["completion_tokens"],
    }


def test_chat_to_messages_stop_reasons_and_cache():
    chat = load_json(VLLM / "chat_completion.json")
    choice = chat["choices"][0]
    choice["finish_reason"], choice["stop_reason"] = "stop", "###"  # vLLM names the stop string it hit
    out = chat_to_messages(chat, {"stop_sequences": ["###"]})
    assert (out["stop_reason"], out["stop_sequence"]) == ("stop_sequence", "###")
    choice["stop_reason"] = None  # EOS
    assert (chat_to_messages(chat, {})["stop_reason"], chat_to_messages(chat, {})["stop_sequence"]) == (
        "end_turn", None,
    )  # fmt: skip
    choice["finish_reason"] = "content_filter"
    assert chat_to_messages(chat, {})["stop_reason"] == "refusal"

    llama = load_json(LLAMA / "chat_completion.json")
    llama["usage"]["prompt_tokens_details"]["cached_tokens"] = 13
    # Anthropic counts cache reads apart, as llama-server's native messages.json does.
    assert chat_to_messages(llama, {})["usage"] == {
        "input_tokens": 1, "output_tokens": 12, "cache_read_input_tokens": 13,
    }  # fmt: skip


@pytest.mark.parametrize("engine", ENGINES)
def test_sdks_parse_non_streamed_answers(engine: str):
    openai = pytest.importorskip("openai")
    anthropic = pytest.importorskip("anthropic")
    chat = load_json(FIXTURES / engine / "chat_completion.json")
    response = openai.types.responses.Response.model_validate(chat_to_responses(chat, {"model": "tiny"}))
    assert response.output_text == chat["choices"][0]["message"]["content"]
    message = anthropic.types.Message.model_validate(chat_to_messages(chat, {"model": "tiny"}))
    assert message.content[0].text == chat["choices"][0]["message"]["content"]


@pytest.mark.parametrize(
    ("status", "kind"),
    [(400, "invalid_request_error"), (401, "authentication_error"), (403, "permission_error"),
     (404, "not_found_error"), (422, "invalid_request_error"), (429, "rate_limit_error"), (500, "api_error"),
     (502, "api_error"), (503, "overloaded_error"), (504, "timeout_error"), (529, "overloaded_error")],
)  # fmt: skip
def test_anthropic_error(status: int, kind: str):
    body = anthropic_error(status, "nope")
    assert body == {"type": "error", "error": {"type": kind, "message": "nope"}}
    anthropic = pytest.importorskip("anthropic")
    anthropic.types.ErrorResponse.model_validate(body)


# ---------------------------------------------------------------------------------------------------
# Streams
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ENGINES)
def test_responses_stream_at_every_byte_boundary(engine: str):
    """Any split of the upstream bytes (even inside a UTF-8 character) gives the same events."""
    data = (FIXTURES / engine / "chat_completion_stream.txt").read_bytes()
    whole = translate(ChatToResponsesStream, data, [])
    for cut in range(1, len(data)):
        assert translate(ChatToResponsesStream, data, [cut]) == whole, cut
    assert translate(ChatToResponsesStream, data, list(range(1, len(data)))) == whole
    for seed in range(30):
        assert translate(ChatToResponsesStream, data, random_cuts(data, seed)) == whole


@pytest.mark.parametrize("engine", ENGINES)
def test_messages_stream_at_every_byte_boundary(engine: str):
    data = (FIXTURES / engine / "chat_completion_stream.txt").read_bytes()
    whole = translate(ChatToMessagesStream, data, [])
    for cut in range(1, len(data)):
        assert translate(ChatToMessagesStream, data, [cut]) == whole, cut
    assert translate(ChatToMessagesStream, data, list(range(1, len(data)))) == whole
    for seed in range(30):
        assert translate(ChatToMessagesStream, data, random_cuts(data, seed)) == whole


@pytest.mark.parametrize("engine", ENGINES)
def test_responses_stream_matches_native_events(engine: str):
    data = (FIXTURES / engine / "chat_completion_stream.txt").read_bytes()
    out = events(translate(ChatToResponsesStream, data, random_cuts(data, 1)))
    names = [name for name, _ in out]
    # Same events in the same order as both engines' native streams.
    for native_engine in ENGINES:
        native = events((FIXTURES / native_engine / "responses_stream.txt").read_bytes())
        assert collapse(names) == collapse([name for name, _ in native])
    # Each event has at least the fields vLLM's native event of that type has.
    vllm_native = dict(events((VLLM / "responses_stream.txt").read_bytes()))
    for name, payload in out:
        assert payload["type"] == name
        assert set(vllm_native[name]) <= set(payload), name
    assert [p["sequence_number"] for _, p in out] == list(range(len(out)))

    deltas = "".join(p["delta"] for n, p in out if n == "response.output_text.delta")
    assert deltas == chat_text(data) == out[-4][1]["text"]  # response.output_text.done
    final = out[-1][1]["response"]
    assert final["output"][0]["content"][0]["text"] == chat_text(data)
    assert native_response_keys() <= set(final)
    assert final["status"] == "incomplete" and final["incomplete_details"] == {"reason": "max_output_tokens"}
    assert out[0][1]["response"]["status"] == "in_progress" and out[0][1]["response"]["id"] == final["id"]


def test_responses_stream_usage():
    """vLLM's capture ends with a usage chunk (include_usage): it reaches response.completed and the
    ledger; llama-server's capture was made without include_usage, so there is none."""
    data = (VLLM / "chat_completion_stream.txt").read_bytes()
    stream = ChatToResponsesStream({"model": "tiny"})
    out = stream.feed(data) + stream.close()
    assert stream.usage == (25, 5)
    assert events(out)[-1][1]["response"]["usage"]["total_tokens"] == 30
    ledger = SSEUsage(strip=False)  # what the gateway's usage reader makes of the translated stream
    ledger.feed(out)
    assert ledger.usage == Usage(25, 5)

    llama = ChatToResponsesStream({"model": "tiny"})
    out = llama.feed((LLAMA / "chat_completion_stream.txt").read_bytes()) + llama.close()
    assert llama.usage is None and events(out)[-1][1]["response"]["usage"] is None


@pytest.mark.parametrize("engine", ENGINES)
def test_messages_stream_events(engine: str):
    data = (FIXTURES / engine / "chat_completion_stream.txt").read_bytes()
    stream = ChatToMessagesStream({"model": "tiny"})
    out = events(stream.feed(data) + stream.close())
    # No native Messages stream was captured; this is the order Anthropic documents.
    assert collapse([n for n, _ in out]) == [
        "message_start", "content_block_start", "ping", "content_block_delta", "content_block_stop",
        "message_delta", "message_stop",
    ]  # fmt: skip
    assert all(payload["type"] == name for name, payload in out)
    assert "".join(p["delta"]["text"] for n, p in out if n == "content_block_delta") == chat_text(data)
    start, delta = out[0][1]["message"], out[-2][1]
    assert set(start) == set(load_json(LLAMA / "messages.json"))
    assert start["id"].startswith("msg_") and start["model"] == "tiny"
    assert delta["delta"] == {"stop_reason": "max_tokens", "stop_sequence": None}
    if engine == "vllm-0.32.0":
        assert stream.usage == (25, 5) and delta["usage"] == {"input_tokens": 25, "output_tokens": 5}


def test_messages_stream_stop_sequence():
    """vLLM's last chunk names the stop string it hit."""
    data = (VLLM / "chat_completion_stream.txt").read_bytes()
    last = b'"finish_reason":"length","stop_reason":null'
    data = data.replace(last, b'"finish_reason":"stop","stop_reason":"##"')
    stream = ChatToMessagesStream({"model": "tiny", "stop_sequences": ["##"]})
    delta = events(stream.feed(data) + stream.close())[-2][1]
    assert delta["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": "##"}


@pytest.mark.parametrize("engine", ENGINES)
def test_sdks_parse_streamed_events(engine: str):
    openai = pytest.importorskip("openai")
    anthropic = pytest.importorskip("anthropic")
    pydantic = pytest.importorskip("pydantic")
    data = (FIXTURES / engine / "chat_completion_stream.txt").read_bytes()
    adapter = pydantic.TypeAdapter(openai.types.responses.ResponseStreamEvent)
    for _, payload in events(translate(ChatToResponsesStream, data, [])):
        adapter.validate_python(payload)
    adapter = pydantic.TypeAdapter(anthropic.types.RawMessageStreamEvent)
    for name, payload in events(translate(ChatToMessagesStream, data, [])):
        if name != "ping":  # the SDK skips pings
            adapter.validate_python(payload)


# The gateway side, as a mock transport: the SDK's request is translated, "sent" to a backend that
# answers with the real chat capture, and the answer translated back for the SDK to parse.
def _gateway(httpx: Any, to_chat: Any, to_api: Any, stream_cls: Any) -> Any:
    chat = load_json(VLLM / "chat_completion.json")
    chat_stream = (VLLM / "chat_completion_stream.txt").read_bytes()
    sent: list[dict[str, Any]] = []

    def handle(request: Any) -> Any:
        body = json.loads(request.content)
        sent.append(to_chat(body))
        if sent[-1].get("stream"):
            stream = stream_cls(body)
            return httpx.Response(200, content=stream.feed(chat_stream) + stream.close(),
                                  headers={"content-type": "text/event-stream"})  # fmt: skip
        return httpx.Response(200, json=to_api(chat, body))

    return httpx.Client(transport=httpx.MockTransport(handle)), sent


def test_openai_sdk_end_to_end():
    openai = pytest.importorskip("openai")
    httpx = pytest.importorskip("httpx2")  # the transport this openai release is built on
    http, sent = _gateway(httpx, responses_to_chat, chat_to_responses, ChatToResponsesStream)
    client = openai.OpenAI(api_key="k", base_url="http://gateway/v1", http_client=http, max_retries=0)

    text = load_json(VLLM / "chat_completion.json")["choices"][0]["message"]["content"]
    response = client.responses.create(model="tiny", instructions="Brief.", input="Hi", max_output_tokens=16)
    assert response.output_text == text
    assert response.usage is not None and response.usage.output_tokens == 16
    assert sent[-1]["messages"][0] == {"role": "system", "content": "Brief."}

    with client.responses.stream(model="tiny", input="Hi") as stream:
        for _ in stream:
            pass
        final = stream.get_final_response()
    assert final.output_text == chat_text((VLLM / "chat_completion_stream.txt").read_bytes())
    assert final.usage is not None and (final.usage.input_tokens, final.usage.output_tokens) == (25, 5)
    assert sent[-1]["stream_options"] == {"include_usage": True}


def test_anthropic_sdk_end_to_end():
    anthropic = pytest.importorskip("anthropic")
    httpx = pytest.importorskip("httpx2")
    http, _ = _gateway(httpx, messages_to_chat, chat_to_messages, ChatToMessagesStream)
    client = anthropic.Anthropic(api_key="k", base_url="http://gateway", http_client=http, max_retries=0)
    hello = [{"role": "user", "content": "Hi"}]

    message = client.messages.create(model="tiny", max_tokens=16, messages=hello)
    assert message.stop_reason == "max_tokens" and message.usage.output_tokens == 16

    with client.messages.stream(model="tiny", max_tokens=16, messages=hello) as stream:
        final = stream.get_final_message()
    assert final.content[0].text == chat_text((VLLM / "chat_completion_stream.txt").read_bytes())
    assert (final.usage.input_tokens, final.usage.output_tokens) == (25, 5)


# --- upstream errors and broken streams -------------------------------------------------------------

FIRST_CHUNK = (VLLM / "chat_completion_stream.txt").read_bytes().split(b"\n\n")[0] + b"\n\n"
ERROR = b'data: {"error": {"message": "engine died", "type": "InternalServerError", "code": 500}}\n\n'


def test_responses_stream_upstream_error():
    stream = ChatToResponsesStream({"model": "tiny"})
    out = events(stream.feed(FIRST_CHUNK + ERROR + b"data: [DONE]\n\n") + stream.close())
    assert [n for n, _ in out][-2:] == ["error", "response.failed"]
    assert out[-2][1]["message"] == "engine died"
    failed = out[-1][1]["response"]
    assert failed["status"] == "failed"
    assert failed["error"] == {"code": "server_error", "message": "engine died"}
    assert [p["sequence_number"] for _, p in out] == list(range(len(out)))

    # Before anything was announced there is no response to fail: only the error event.
    early = ChatToResponsesStream({"model": "tiny"})
    old_vllm = b'data: {"object": "error", "message": "bad", "type": "BadRequestError", "code": 400}\n\n'
    assert [n for n, _ in events(early.feed(old_vllm) + early.close())] == ["error"]

    openai = pytest.importorskip("openai")
    pydantic = pytest.importorskip("pydantic")
    adapter = pydantic.TypeAdapter(openai.types.responses.ResponseStreamEvent)
    for _, payload in out:
        adapter.validate_python(payload)


def test_messages_stream_upstream_error():
    stream = ChatToMessagesStream({"model": "tiny"})
    out = events(stream.feed(FIRST_CHUNK + ERROR) + stream.feed(b"data: [DONE]\n\n") + stream.close())
    assert out[-1] == ("error", {"type": "error", "error": {"type": "api_error", "message": "engine died"}})
    assert [n for n, _ in out].count("error") == 1  # nothing after the error

    anthropic = pytest.importorskip("anthropic")
    anthropic.types.ErrorResponse.model_validate(out[-1][1])


@pytest.mark.parametrize("cls", [ChatToResponsesStream, ChatToMessagesStream])
def test_stream_cut_short_or_empty(cls: type[ChatToResponsesStream | ChatToMessagesStream]):
    data = (VLLM / "chat_completion_stream.txt").read_bytes()
    # Cut before the finish: the client must learn the answer is broken.
    cut = cls({"model": "tiny"})
    names = [n for n, _ in events(cut.feed(data[: data.index(b'"finish_reason":"length"')]) + cut.close())]
    assert names[-1] in ("error", "response.failed") and "error" in names
    # Finished, but `data: [DONE]` (and the blank line) missing: a normal end.
    done_missing = cls({"model": "tiny"})
    out = done_missing.feed(data[: data.index(b"data: [DONE]") - 1]) + done_missing.close()
    assert events(out)[-1][0] in ("response.completed", "message_stop")
    assert events(out) == events(translate(cls, data, []))
    # Nothing at all.
    empty = cls({"model": "tiny"})
    assert [n for n, _ in events(empty.feed(b"") + empty.close())] == ["error"]
    assert empty.close() == b""  # closing twice sends nothing more
