"""Usage accounting: reading token counts off responses and streams (real captures)."""

from __future__ import annotations

import json
import logging

import httpx
import pytest
from starlette.testclient import TestClient

from kubeinfer.gateway.app import GatewaySettings, create_app
from kubeinfer.gateway.logs import JSONFormatter
from kubeinfer.gateway.registry import ModelEntry, Registry
from kubeinfer.gateway.routing import Endpoint
from kubeinfer.gateway.usage import (
    SSEUsage,
    Usage,
    prepare_stream_request,
    stream_request_bytes,
    usage_from_json,
)
from tests.cases import FIXTURES
from tests.httpx_upstream import mock_upstream

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


def test_usage_read_whatever_the_raw_bytes_look_like():
    """The parser skips events by their raw bytes; these are the ones it must still read."""
    events = [
        b'data: {"choices":[{"delta":{"content":"a"}}],"usage":null}\n\n',  # OpenAI: null on every chunk
        b'data: {"choices":[],"us\ndata: age":{"prompt_tokens":3,"completion_tokens":4}}\n\n',  # split
        b'data: {"choices":[{"delta":{"content":"\\"usage\\":null"}}]}\n\n',
    ]
    parser = SSEUsage(strip=True)
    out = _feed_in_pieces(parser, b"".join(events), size=5)
    assert parser.usage == Usage(3, 4)
    assert out == events[0] + events[2]  # the usage-only chunk was held back, the rest passed whole
    # A typed event's null usage still counts (Anthropic: message_delta with no tokens yet).
    parser = SSEUsage(strip=False)
    parser.feed(b'data: {"type":"message_start","message":{"usage":{"input_tokens":9}}}\n\n')
    parser.feed(b'data: {"type":"message_delta","usage":null}\n\n')
    assert parser.usage == Usage(9, 0)


def test_stream_request_bytes_splices_or_reencodes():
    def check(raw: bytes) -> bytes:
        body = json.loads(raw)
        sent, _ = prepare_stream_request("chat/completions", body)
        out = stream_request_bytes(raw, body, sent)
        assert json.loads(out) == sent and list(json.loads(out)) == list(sent)
        return out

    raw = '{"model": "m", "stream": true, "messages": [{"content": "é"}]} \n'.encode()
    assert check(raw).startswith(raw.rstrip()[:-1])  # the client's bytes, the option added at the end
    assert check(b'{"model":"m","stream":true,"stream_options":{"x":1}}').startswith(b'{"model": "m"')
    check(json.dumps({"model": "m", "stream": True}).encode("utf-16"))  # json.loads reads it: re-encoded
    check(b'\xef\xbb\xbf{"model":"m","stream":true}')  # a UTF-8 BOM


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
    app = create_app(reg, GatewaySettings(scrape_interval=3600), upstream=mock_upstream(engine))
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


def test_ledger_estimates_cost_from_pricing():
    from kubeinfer.api.v1alpha1 import Pricing

    priced = ModelEntry(name="m", served_name="m", pricing=Pricing(prompt_per1_m=2.0, completion_per1_m=8.0))
    assert priced.cost(1_000_000, 500_000) == pytest.approx(6.0)
    assert ModelEntry(name="free", served_name="free").cost(10**9, 10**9) == 0.0

    def engine(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=(VLLM / "chat_completion.json").read_bytes(),
                              headers={"content-type": "application/json"})  # fmt: skip

    reg = Registry()
    reg.set_model(priced, [Endpoint(id="r0", address="10.0.0.1:8000", model="m")])
    app = create_app(reg, GatewaySettings(scrape_interval=3600), upstream=mock_upstream(engine))
    with TestClient(app) as client:
        for _ in range(3):
            client.post(
                "/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "hi"}]}
            )
        (row,) = client.get("/v1/admin/usage").json()["data"]
        metrics = client.get("/metrics").text
    usage = json.loads((VLLM / "chat_completion.json").read_text())["usage"]
    want = 3 * (usage["prompt_tokens"] * 2.0 + usage["completion_tokens"] * 8.0) / 1e6
    assert row["estimatedCost"] == pytest.approx(want)
    assert 'kubeinfer_gateway_estimated_cost_total{key="anonymous",model="m"}' in metrics


def test_request_metrics_headers_and_access_log(caplog):
    client, _ = _gateway()
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    with caplog.at_level(logging.INFO, logger="kubeinfer.gateway.access"), client:
        r = client.post("/v1/chat/completions", json=chat, headers={"authorization": "Bearer sk-secret"})
        metrics = client.get("/metrics").text
    assert r.status_code == 200
    assert r.headers["x-kubeinfer-replica"] == "r0"
    assert float(r.headers["x-kubeinfer-queue-wait-ms"]) >= 0
    for name in (
        'kubeinfer_gateway_queue_wait_seconds_count{model="m"} 1.0',
        'kubeinfer_gateway_time_to_first_token_seconds_count{model="m",replica="r0"} 1.0',
        'kubeinfer_gateway_request_duration_seconds_count{model="m",replica="r0"} 1.0',
        'kubeinfer_gateway_output_tokens_per_second_count{model="m"} 1.0',
    ):
        assert name in metrics
    (record,) = [r for r in caplog.records if r.name == "kubeinfer.gateway.access"]
    line = json.loads(JSONFormatter().format(record))
    assert (line["model"], line["replica"], line["status"], line["outcome"]) == ("m", "r0", 200, "ok")
    assert line["completion_tokens"] == 5 and line["prompt_tokens"] == 25
    assert line["duration_ms"] >= line["ttft_ms"] >= 0
    assert "sk-secret" not in json.dumps(line) and "hi" not in str(line.get("msg"))


def test_readyz_waits_for_discovery():
    synced = {"done": False}
    app = create_app(Registry(), GatewaySettings(scrape_interval=3600), ready=lambda: synced["done"])
    with TestClient(app) as client:
        assert client.get("/readyz").status_code == 503
        assert client.get("/healthz").status_code == 200
        synced["done"] = True
        assert client.get("/readyz").status_code == 200
