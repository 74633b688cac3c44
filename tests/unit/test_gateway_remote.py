"""Remote models: forwarded to their base URL with their own model id and key, behind allowRemote."""

from __future__ import annotations

import json

import httpx
from starlette.testclient import TestClient

from kubeinfer.gateway.app import GatewaySettings, create_app
from kubeinfer.gateway.auth import ApiKey, KeyStore, digest
from kubeinfer.gateway.discovery import entry_from_model
from kubeinfer.gateway.registry import load_static
from tests.cases import FIXTURES
from tests.httpx_upstream import mock_upstream

CHAT = {"model": "remote/large", "messages": [{"role": "user", "content": "hi"}]}


def _setup(tmp_path, monkeypatch, keys=None):
    monkeypatch.setenv("REMOTE_KEY", "sk-upstream")
    f = tmp_path / "gw.yaml"
    f.write_text(
        "models:\n- name: large\n  servedName: remote/large\n"
        "  remote: {baseURL: 'https://api.example.com/v1', model: large-latest, apiKeyEnv: REMOTE_KEY}\n"
    )
    seen = []

    def upstream(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"object": "chat.completion", "choices": [],
                                         "usage": {"prompt_tokens": 3, "completion_tokens": 2}})  # fmt: skip

    settings = GatewaySettings(scrape_interval=0.05)  # scrapes run often: the remote must not be one of them
    app = create_app(load_static(f), settings, upstream=mock_upstream(upstream), keys=keys)
    return TestClient(app), seen


def test_remote_request_is_rewritten_for_the_upstream(tmp_path, monkeypatch):
    client, seen = _setup(tmp_path, monkeypatch)
    with client:
        r = client.post("/v1/chat/completions", json=CHAT, headers={"authorization": "Bearer client-key"})
        models = {m["id"] for m in client.get("/v1/models").json()["data"]}
    assert r.status_code == 200
    (req,) = [s for s in seen if s.url.path.endswith("/chat/completions")]
    assert str(req.url) == "https://api.example.com/v1/chat/completions"
    assert req.headers["authorization"] == "Bearer sk-upstream"
    assert json.loads(req.content)["model"] == "large-latest"
    assert not [s for s in seen if s.url.path.endswith("/metrics")]  # remote APIs are not scraped
    assert "remote/large" in models


def test_keys_need_allow_remote(tmp_path, monkeypatch):
    keys = KeyStore(
        [ApiKey("cheap", digest("sk-cheap")), ApiKey("paid", digest("sk-paid"), allow_remote=True)]
    )
    client, _ = _setup(tmp_path, monkeypatch, keys)
    with client:
        denied = client.post("/v1/chat/completions", json=CHAT, headers={"authorization": "Bearer sk-cheap"})
        allowed = client.post("/v1/chat/completions", json=CHAT, headers={"authorization": "Bearer sk-paid"})
    assert denied.status_code == 403 and denied.json()["error"]["code"] == "remote_not_allowed"
    assert allowed.status_code == 200


def test_remote_entry_from_llmmodel():
    remote = {"baseURL": "https://api.example.com/v1", "model": "large-latest"}
    body = {"metadata": {"name": "r", "namespace": "ml"},
            "spec": {"model": {"servedName": "remote/large"}, "remote": remote}}  # fmt: skip
    entry = entry_from_model(body, remote_key="sk-x")
    assert (
        entry.remote is not None and entry.remote.model == "large-latest" and entry.remote.api_key == "sk-x"
    )


def _capture(path):
    """A captured JSON body (the capture ends with a line naming the HTTP status)."""
    return json.loads(path.read_text().rsplit("\nHTTP ", 1)[0])


def _chat_only_remote(tmp_path, native: str = ""):
    """A remote that serves only /chat/completions (the real vLLM captures as its answers)."""
    vllm = FIXTURES / "vllm-0.32.0"
    f = tmp_path / "gw.yaml"
    f.write_text(
        "models:\n- name: large\n  servedName: remote/large\n"
        f"  remote: {{baseURL: 'https://api.example.com/v1', model: large-latest{native}}}\n"
    )
    seen: list[tuple[str, dict]] = []

    def upstream(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else {}
        seen.append((request.url.path, body))
        if request.url.path == "/v1/responses":
            return httpx.Response(200, json=_capture(vllm / "responses.json"))
        if request.url.path != "/v1/chat/completions":
            return httpx.Response(404, json={"detail": "Not Found"})
        if body.get("stream"):
            return httpx.Response(200, headers={"content-type": "text/event-stream"},
                                  content=(vllm / "chat_completion_stream.txt").read_bytes())  # fmt: skip
        return httpx.Response(200, content=(vllm / "chat_completion.json").read_bytes(),
                              headers={"content-type": "application/json"})  # fmt: skip

    app = create_app(load_static(f), GatewaySettings(scrape_interval=3600), upstream=mock_upstream(upstream))
    return TestClient(app), seen


def test_responses_and_messages_are_translated_for_a_chat_only_remote(tmp_path):
    client, seen = _chat_only_remote(tmp_path)
    chat = json.loads((FIXTURES / "vllm-0.32.0" / "chat_completion.json").read_text())
    text = chat["choices"][0]["message"]["content"]
    with client:
        resp = client.post(
            "/v1/responses", json={"model": "remote/large", "input": "hi", "max_output_tokens": 8}
        )
        msg = client.post("/v1/messages", json={"model": "remote/large", "max_tokens": 8,
                                                "messages": [{"role": "user", "content": "hi"}]})  # fmt: skip
        streamed = client.post("/v1/responses", json={"model": "remote/large", "input": "hi", "stream": True})
        msgs = {"model": "remote/large", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
        msg_stream = client.post("/v1/messages", json={**msgs, "stream": True})
        refused = client.post("/v1/responses", json={"model": "remote/large", "input": "hi",
                                                      "previous_response_id": "resp_1"})  # fmt: skip
        ledger = client.get("/v1/admin/usage").json()["data"]
    assert [p for p, _ in seen] == ["/v1/chat/completions"] * 4  # the refused one never left
    assert seen[0][1]["model"] == "large-latest" and seen[0][1]["max_tokens"] == 8
    assert resp.status_code == 200 and resp.json()["object"] == "response"
    assert resp.json()["output"][0]["content"][0]["text"] == text
    assert resp.json()["model"] == "remote/large"  # the name the client used
    assert msg.status_code == 200 and msg.json()["type"] == "message"
    assert msg.json()["content"][0]["text"] == text
    events = [line.split(": ", 1)[1] for line in streamed.text.splitlines() if line.startswith("event: ")]
    assert events[0] == "response.created" and events[-1] == "response.completed"
    assert streamed.headers["content-type"].startswith("text/event-stream")
    msg_events = [
        line.split(": ", 1)[1] for line in msg_stream.text.splitlines() if line.startswith("event: ")
    ]
    assert msg_events[0] == "message_start" and msg_events[-1] == "message_stop"
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "previous_response_id"
    (row,) = ledger
    assert row["requests"] == 4 and row["completionTokens"] > 0 and row["promptTokens"] > 0


def test_native_responses_remote_is_passed_through(tmp_path):
    client, seen = _chat_only_remote(tmp_path, native=", nativeAPIs: [chat/completions, responses]")
    with client:
        r = client.post("/v1/responses", json={"model": "remote/large", "input": "hi"})
    assert r.status_code == 200 and [p for p, _ in seen] == ["/v1/responses"]
    assert r.json() == _capture(FIXTURES / "vllm-0.32.0" / "responses.json")
