"""Usage accounting: reading token counts off responses and streams (real captures)."""

from __future__ import annotations

import json

import httpx
from starlette.testclient import TestClient

from kubeinfer.gateway.app import GatewaySettings, create_app
from kubeinfer.gateway.registry import ModelEntry, Registry
from kubeinfer.gateway.routing import Endpoint
from kubeinfer.gateway.usage import SSEUsage, Usage, prepare_stream_request, usage_from_json
from tests.cases import FIXTURES

VLLM = FIXTURES / "vllm-0.32.0"


def _feed_in_pieces(parser: SSEUsage, data: bytes, size: int = 7) -> bytes:
    out = b"".join(parser.feed(data[i : i + size]) for i in range(0, len(data), size))
    return out + parser.flush()


def test_json_usage_from_captures():
    assert usage_from_json((VLLM / "chat_completion.json").read_bytes()) is not None
    assert usage_from_json((VLLM / "messages.json").read_bytes()) == Usage(25, 8)
    assert usage_from_json(b"not json") is None


def test_chat_stream_usage_is_read_and_stripped_when_not_asked():
    data = (VLLM / "chat_completion_stream.txt").read_bytes()
    kept = SSEUsage(strip=False)
    assert _feed_in_pieces(kept, data) == data
    assert kept.usage == Usage(25, 5)
    stripped = SSEUsage(strip=True)
    out = _feed_in_pieces(stripped, data)
    assert stripped.usage == Usage(25, 5)
    assert b'"usage"' not in out and out.rstrip().endswith(b"data: [DONE]")
    assert out.count(b"\n\n") == data.count(b"\n\n") - 1


def test_responses_stream_usage():
    parser = SSEUsage(strip=False)
    data = (VLLM / "responses_stream.txt").read_bytes()
    assert _feed_in_pieces(parser, data) == data
    assert parser.usage is not None and parser.usage.completion_tokens > 0


def test_anthropic_stream_usage():
    events = [
        {"type": "message_start", "message": {"usage": {"input_tokens": 12, "output_tokens": 1}}},
        {"type": "content_block_delta", "delta": {"text": "hi"}},
        {"type": "message_delta", "usage": {"output_tokens": 7}},
    ]
    data = b"".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n".encode() for e in events)
    parser = SSEUsage(strip=True)
    assert _feed_in_pieces(parser, data) == data  # Anthropic events are never stripped
    assert parser.usage == Usage(12, 7)


def test_prepare_asks_for_usage_only_on_streams():
    body = {"model": "m", "stream": True}
    sent, strip = prepare_stream_request("chat/completions", body)
    assert sent["stream_options"] == {"include_usage": True} and strip
    asked = {"model": "m", "stream": True, "stream_options": {"include_usage": True}}
    assert prepare_stream_request("chat/completions", asked) == (asked, False)
    assert prepare_stream_request("chat/completions", {"model": "m"}) == ({"model": "m"}, False)
    assert prepare_stream_request("responses", body) == (body, False)


def _gateway():
    seen = []

    def engine(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/metrics":
            return httpx.Response(404)
        body = json.loads(request.content)
        seen.append(body)
        if body.get("stream"):
            return httpx.Response(200, headers={"content-type": "text/event-stream"},
                                  content=(VLLM / "chat_completion_stream.txt").read_bytes())  # fmt: skip
        return httpx.Response(200, content=(VLLM / "chat_completion.json").read_bytes(),
                              headers={"content-type": "application/json"})  # fmt: skip

    reg = Registry()
    reg.set_model(
        ModelEntry(name="m", served_name="m"), [Endpoint(id="r0", address="10.0.0.1:8000", model="m")]
    )
    app = create_app(reg, GatewaySettings(scrape_interval=3600), transport=httpx.MockTransport(engine))
    return TestClient(app), seen


def test_ledger_counts_tokens_and_client_sees_what_it_asked_for():
    client, seen = _gateway()
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    with client:
        plain = client.post("/v1/chat/completions", json=chat)
        streamed = client.post("/v1/chat/completions", json={**chat, "stream": True})
        with_usage = {**chat, "stream": True, "stream_options": {"include_usage": True}}
        asked = client.post("/v1/chat/completions", json=with_usage)
        ledger = client.get("/v1/admin/usage").json()["data"]
        metrics = client.get("/metrics").text
    expected = json.loads((VLLM / "chat_completion.json").read_text())["usage"]
    assert plain.json()["usage"] == expected
    assert seen[1]["stream_options"] == {"include_usage": True}  # asked upstream on the client's behalf
    assert '"usage"' not in streamed.text and streamed.text.rstrip().endswith("data: [DONE]")
    assert '"usage"' in asked.text
    (row,) = ledger
    assert row["requests"] == 3
    assert row["promptTokens"] == expected["prompt_tokens"] + 25 + 25
    assert row["completionTokens"] == expected["completion_tokens"] + 5 + 5
    assert 'kubeinfer_gateway_tokens_total{key="anonymous",kind="completion",model="m"}' in metrics
