"""Remote models: forwarded to their base URL with their own model id and key, behind allowRemote."""

from __future__ import annotations

import json

import httpx
from starlette.testclient import TestClient

from kubeinfer.gateway.app import GatewaySettings, create_app
from kubeinfer.gateway.auth import ApiKey, KeyStore, digest
from kubeinfer.gateway.discovery import entry_from_model
from kubeinfer.gateway.registry import load_static

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
    app = create_app(load_static(f), settings, transport=httpx.MockTransport(upstream), keys=keys)
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
