"""The gateway's request path over an in-memory network: fake engines answer with the real captures.

No sockets: httpx.MockTransport plays the replicas, Starlette's TestClient drives the ASGI app.
"""

from __future__ import annotations

import json

import httpx
import pytest
from starlette.testclient import TestClient

from kubeinfer.api.v1alpha1 import Routing
from kubeinfer.gateway.app import GatewaySettings, create_app, scrape_once
from kubeinfer.gateway.registry import ModelEntry, Registry, load_static
from kubeinfer.gateway.routing import Endpoint
from tests.cases import FIXTURES
from tests.httpx_upstream import mock_upstream

LLAMA = FIXTURES / "llama-server"
VLLM = FIXTURES / "vllm-0.32.0"
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


class FakeEngines:
    """Replicas by address: 'ok', 'down' (connection refused), '503', 'cut' (dies mid-stream)."""

    def __init__(self, behaviour: dict[str, str]):
        self.behaviour = behaviour
        self.hits: dict[str, int] = {}

    def __call__(self, request: httpx.Request) -> httpx.Response:
        addr = f"{request.url.host}:{request.url.port}"
        mode = self.behaviour[addr]
        if mode == "down":
            raise httpx.ConnectError("connection refused", request=request)
        if request.url.path == "/metrics":
            return httpx.Response(200, text=(LLAMA / "metrics_under_load.txt").read_text())
        self.hits[addr] = self.hits.get(addr, 0) + 1  # inference requests only
        if mode == "503":
            return httpx.Response(503, json={"error": {"message": "loading", "type": "unavailable"}})
        body = json.loads(request.content)
        if body.get("stream"):
            text = (LLAMA / "chat_completion_stream.txt").read_text()
            if mode == "cut":
                return httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=_Cut(text))
            return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=text.encode())
        return httpx.Response(200, json=json.loads((VLLM / "chat_completion.json").read_text()))


class _Cut(httpx.AsyncByteStream):
    def __init__(self, text: str):
        self.first = text.split("\n\n")[0] + "\n\n"

    async def __aiter__(self):
        yield self.first.encode()
        raise httpx.ReadError("connection reset")


def _client(behaviour, modalities=("text",), strategy="round-robin", hold=0.2):
    reg = Registry()
    eps = [Endpoint(id=f"r{i}", address=a, model="tiny") for i, a in enumerate(behaviour)]
    reg.set_model(
        ModelEntry(name="tiny", served_name="tiny", aliases=("tiny-alias",), modalities=modalities,
                   routing=Routing(strategy=strategy)),
        eps,
    )  # fmt: skip
    engines = FakeEngines(behaviour)
    settings = GatewaySettings(hold_timeout=hold, max_body_bytes=64 * 1024, scrape_interval=3600)
    app = create_app(reg, settings, upstream=mock_upstream(engines))
    return TestClient(app), engines, app


def test_chat_completion_is_proxied_and_names_the_replica():
    client, engines, _ = _client({"10.0.0.1:8000": "ok"})
    with client:
        r = client.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 200
    assert r.json()["object"] == "chat.completion"
    assert r.headers["x-kubeinfer-replica"] == "r0"
    assert engines.hits["10.0.0.1:8000"] == 1


def test_alias_routes_to_the_model():
    client, _, _ = _client({"10.0.0.1:8000": "ok"})
    with client:
        r = client.post("/v1/chat/completions", json={**CHAT, "model": "tiny-alias"})
    assert r.status_code == 200


def test_streaming_passes_events_through_unchanged():
    client, _, _ = _client({"10.0.0.1:8000": "ok"})
    with client:
        r = client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.text == (LLAMA / "chat_completion_stream.txt").read_text()
    assert r.text.rstrip().endswith("data: [DONE]")


@pytest.mark.parametrize(
    ("raw", "status", "code", "param"),
    [
        (b"{not json", 400, None, None),
        (b"[1, 2]", 400, None, None),
        (json.dumps({"messages": []}).encode(), 400, None, "model"),
        (json.dumps({**CHAT, "model": "nope"}).encode(), 404, "model_not_found", "model"),
        (json.dumps({**CHAT, "messages": [{"role": "user", "content": [
            {"type": "text", "text": "what is this"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]}).encode(),
         400, "modality_unsupported", "messages"),
        (b'{"model": "tiny", "prompt": "' + b"x" * 70000 + b'"}', 413, "request_too_large", None),
    ],
    ids=["bad-json", "not-an-object", "missing-model", "unknown-model", "image-to-text-model", "too-large"],
)  # fmt: skip
def test_bad_requests_get_openai_errors(raw, status, code, param):
    client, engines, _ = _client({"10.0.0.1:8000": "ok"})
    with client:
        r = client.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
        ok = client.post("/v1/chat/completions", json=CHAT)  # a bad request disturbs nothing
    assert r.status_code == status
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["code"] == code and err["param"] == param
    assert engines.hits.get("10.0.0.1:8000", 0) == 1
    assert ok.status_code == 200


def test_image_goes_through_to_a_vision_model():
    client, _, _ = _client({"10.0.0.1:8000": "ok"}, modalities=("text", "image"))
    body = {**CHAT, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]}  # fmt: skip
    with client:
        assert client.post("/v1/chat/completions", json=body).status_code == 200


def test_connection_error_and_503_are_retried_on_another_replica():
    client, _, _ = _client({"10.0.0.1:8000": "down", "10.0.0.2:8000": "503", "10.0.0.3:8000": "ok"})
    with client:
        for _ in range(3):
            r = client.post("/v1/chat/completions", json=CHAT)
            assert r.status_code == 200
            assert r.headers["x-kubeinfer-replica"] == "r2"


def test_all_replicas_failing_is_a_502():
    client, _, _ = _client({"10.0.0.1:8000": "down", "10.0.0.2:8000": "down"})
    with client:
        r = client.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 502 and r.json()["error"]["code"] == "bad_gateway"


def test_no_ready_replica_is_a_503_after_the_hold_time():
    client, _, app = _client({"10.0.0.1:8000": "ok"}, hold=0.3)
    with client:
        reg = app.state.gw.registry
        reg.set_model(
            reg.models["tiny"], [Endpoint(id="r0", address="10.0.0.1:8000", model="tiny", ready=False)]
        )
        r = client.post("/v1/chat/completions", json=CHAT)
        models = client.get("/v1/models").json()["data"]
    assert r.status_code == 503 and r.json()["error"]["code"] == "no_replica"
    assert models == []  # a model without ready replicas is not listed


def test_replica_dying_mid_stream_ends_with_an_error_event():
    client, _, _ = _client({"10.0.0.1:8000": "cut"})
    with client:
        r = client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    events = [e for e in r.text.split("\n\n") if e.strip()]
    assert events[0].startswith("data: {")
    last = json.loads(events[-1].removeprefix("data: "))
    assert last["error"]["code"] == "stream_interrupted"


def test_round_robin_spreads_and_inflight_returns_to_zero():
    client, engines, app = _client({f"10.0.0.{i}:8000": "ok" for i in range(1, 4)})
    with client:
        for _ in range(9):
            assert client.post("/v1/chat/completions", json=CHAT).status_code == 200
        loads = dict(app.state.gw.loads)
    assert sorted(engines.hits.values()) == [3, 3, 3]
    assert all(load.inflight == 0 for load in loads.values())


def test_prefix_aware_keeps_a_shared_system_prompt_on_one_replica():
    client, _, app = _client({f"10.0.0.{i}:8000": "ok" for i in range(1, 5)}, strategy="prefix-aware")

    def ask(system: str, question: str) -> str:
        body = {"model": "tiny", "max_tokens": 4, "messages": [
            {"role": "system", "content": system}, {"role": "user", "content": question}]}  # fmt: skip
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200
        return r.headers["x-kubeinfer-replica"]

    with client:
        groups = {g: f"You are assistant {g}. " + "Follow the house style. " * 40 for g in "abc"}
        got = {g: {ask(system, f"question {n}") for n in range(5)} for g, system in groups.items()}
        # Prompts sharing nothing route by load: the short ones take turns like round-robin.
        short = [ask("be brief", f"q{n}") for n in range(8)]
        index = app.state.gw.prefix_index
        admin = client.get("/v1/admin/models").json()["data"][0]["replicaStats"]
    # Each group on one replica, and the three groups on three different ones (placed by load).
    assert all(len(replicas) == 1 for replicas in got.values()), got
    assert len(set.union(*got.values())) == 3
    assert sorted(short.count(r) for r in set(short)) == [2, 2, 2, 2]
    assert len(index) == sum(r["prefixBlocksRouted"] for r in admin) > 0


def test_models_lists_served_names_and_aliases():
    client, _, _ = _client({"10.0.0.1:8000": "ok"})
    with client:
        data = client.get("/v1/models").json()["data"]
    assert {m["id"] for m in data} == {"tiny", "tiny-alias"}


def test_scrape_fills_loads_from_real_metrics():
    client, _, app = _client({"10.0.0.1:8000": "ok"})
    with client:
        client.portal.call(scrape_once, app.state.gw)
        load = app.state.gw.loads["r0"]
    assert load.scraped is not None and load.scraped.running == 4 and load.scraped.waiting == 4


def test_gateway_metrics_count_requests_and_errors():
    client, _, _ = _client({"10.0.0.1:8000": "ok"})
    with client:
        client.post("/v1/chat/completions", json=CHAT)
        client.post("/v1/chat/completions", json={**CHAT, "model": "nope"})
        text = client.get("/metrics").text
    assert 'kubeinfer_gateway_requests_total{code="200",model="tiny",replica="r0"} 1.0' in text
    assert 'kubeinfer_gateway_errors_total{model="nope",type="model_not_found"} 1.0' in text
    assert 'kubeinfer_gateway_queued_requests{model="tiny"} 0.0' in text
    assert 'kubeinfer_gateway_inflight_requests{replica="r0"} 0.0' in text


def test_static_discovery_file(tmp_path):
    f = tmp_path / "models.yaml"
    f.write_text(
        "models:\n- name: tiny\n  servedName: tiny-gguf\n  aliases: [t]\n  engine: llama-server\n"
        "  routing: {strategy: prefix-aware}\n  endpoints: ['127.0.0.2:8000', '127.0.0.3:8000']\n"
    )
    reg = load_static(f)
    entry = reg.resolve("t")
    assert entry is not None and entry.served_name == "tiny-gguf" and entry.routing.strategy == "prefix-aware"
    assert [e.address for e in reg.ready_endpoints("tiny")] == ["127.0.0.2:8000", "127.0.0.3:8000"]


def test_admin_models_reports_replicas_and_scrapes():
    client, _, app = _client({"10.0.0.1:8000": "ok", "10.0.0.2:8000": "down"})
    with client:
        client.portal.call(scrape_once, app.state.gw)
        data = client.get("/v1/admin/models").json()["data"]
    (model,) = data
    assert model["servedName"] == "tiny" and model["state"] == "ready"
    assert model["replicas"] == {"ready": 2, "total": 2} and model["queued"] == 0
    by_id = {r["id"]: r for r in model["replicaStats"]}
    assert by_id["r0"]["running"] == 4 and by_id["r0"]["waiting"] == 4  # from the capture
    assert by_id["r1"]["running"] is None  # never scraped: unreachable
