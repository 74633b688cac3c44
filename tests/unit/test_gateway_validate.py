"""Bad input gets a clear 4xx from the gateway itself: the body's shape (gateway/validate.py), deeply
nested JSON, wrong methods and unknown paths; and /openapi.json describes what the app serves."""

from __future__ import annotations

import json
import logging

import httpx
import pytest
from starlette.routing import Route
from starlette.testclient import TestClient

from kubeinfer.gateway.app import GatewaySettings, create_app
from kubeinfer.gateway.openapi import DOCUMENT
from kubeinfer.gateway.proxy import PROXIED
from kubeinfer.gateway.registry import ModelEntry, Registry
from kubeinfer.gateway.routing import Endpoint
from kubeinfer.gateway.validate import MAX_DEPTH
from tests.cases import FIXTURES
from tests.httpx_upstream import mock_upstream

VLLM = FIXTURES / "vllm-0.32.0"
USER = {"role": "user", "content": "hi"}
CHAT = {"model": "tiny", "messages": [USER]}
ANSWERS = {
    "chat/completions": "chat_completion.json",
    "completions": "completion.json",
    "responses": "responses.json",
    "messages": "messages.json",
}


def _engine(request: httpx.Request) -> httpx.Response:
    path = request.url.path.removeprefix("/v1/")
    if path == "embeddings":
        return httpx.Response(200, json={"object": "list", "data": [{"embedding": [0.1], "index": 0}]})
    return httpx.Response(200, content=(VLLM / ANSWERS[path]).read_bytes(),
                          headers={"content-type": "application/json"})  # fmt: skip


@pytest.fixture(scope="module")
def client():
    reg = Registry()
    reg.set_model(
        ModelEntry(name="tiny", served_name="tiny", modalities=("text", "image")),
        [Endpoint(id="r0", address="10.0.0.1:8000", model="tiny")],
    )
    app = create_app(
        reg, GatewaySettings(scrape_interval=3600, hold_timeout=0.2), upstream=mock_upstream(_engine)
    )
    with TestClient(app) as c:
        yield c


def _is_envelope(body: object) -> bool:
    return (
        isinstance(body, dict)
        and isinstance(body.get("error"), dict)
        and set(body["error"]) == {"message", "type", "param", "code"}
        and isinstance(body["error"]["message"], str)
    )


def _invalid(r: httpx.Response, param: str | None) -> None:
    assert r.status_code == 400, r.text
    body = r.json()
    assert _is_envelope(body), body
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["param"] == param, body


# --- the rules, one by one: (API, body, offending param or None when valid) --------------------------

_PART = {"type": "image_url", "image_url": {"url": "http://x/a.png"}}
_CALL = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
_TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}

C = "chat/completions"


def _msgs(*messages: object) -> dict:
    return {**CHAT, "messages": list(messages)}


RULES = [
    # chat completions
    (C, CHAT, None),
    (C, {**CHAT, "some_engine_param": {"x": [1]}}, None),  # unknown fields pass
    (C, {**CHAT, "temperature": None, "n": None, "stream": None}, None),  # null = absent
    (C, {"model": "tiny"}, "messages"),
    (C, {**CHAT, "messages": []}, "messages"),
    (C, {**CHAT, "messages": {"role": "user"}}, "messages"),
    (C, _msgs("hi"), "messages[0]"),
    (C, _msgs(USER, {"role": "robot", "content": "x"}), "messages[1].role"),
    (C, _msgs({"content": "x"}), "messages[0].role"),
    *[(C, _msgs({"role": r, "content": "x"}), None)
      for r in ("system", "developer", "user", "assistant", "tool", "function")],
    (C, _msgs({"role": "user"}), "messages[0].content"),
    (C, _msgs({"role": "user", "content": None}), "messages[0].content"),
    (C, _msgs({"role": "assistant", "content": None}), "messages[0].content"),
    (C, _msgs(USER, {"role": "assistant", "content": None, "tool_calls": [_CALL]}),
     None),
    (C, _msgs({"role": "user", "content": 7}), "messages[0].content"),
    (C, _msgs({"role": "user", "content": [{"type": "text", "text": "a"}, _PART]}),
     None),
    *[(C, _msgs({"role": "user", "content": [{"type": t}]}), None)
      for t in ("input_audio", "file", "refusal", "video_url", "audio_url")],
    (C, _msgs({"role": "user", "content": ["a"]}), "messages[0].content[0]"),
    (C, _msgs({"role": "user", "content": [{"type": "gif"}]}),
     "messages[0].content[0].type"),
    (C, _msgs({"role": "user", "content": [{"type": "text"}]}),
     "messages[0].content[0].text"),
    (C, {**CHAT, "n": 1, "max_tokens": 1, "max_completion_tokens": 5}, None),
    (C, {**CHAT, "n": 128}, None),
    (C, {**CHAT, "n": 0}, "n"),
    (C, {**CHAT, "n": 129}, "n"),
    (C, {**CHAT, "n": 1.5}, "n"),
    (C, {**CHAT, "n": True}, "n"),
    (C, {**CHAT, "max_tokens": 0}, "max_tokens"),
    (C, {**CHAT, "max_tokens": "8"}, "max_tokens"),
    (C, {**CHAT, "max_completion_tokens": -1}, "max_completion_tokens"),
    (C, {**CHAT, "temperature": 0, "top_p": 1}, None),
    (C, {**CHAT, "temperature": 2.0, "top_p": 0.0}, None),
    (C, {**CHAT, "temperature": 2.01}, "temperature"),
    (C, {**CHAT, "temperature": -0.1}, "temperature"),
    (C, {**CHAT, "temperature": "hot"}, "temperature"),
    (C, {**CHAT, "top_p": 1.5}, "top_p"),
    (C, {**CHAT, "tools": [_TOOL]}, None),
    (C, {**CHAT, "tools": [{"type": "custom", "custom": {"name": "g"}}]}, None),
    (C, {**CHAT, "tools": _TOOL}, "tools"),
    (C, {**CHAT, "tools": [{"type": "retrieval"}]}, "tools[0].type"),
    (C, {**CHAT, "tools": [{"type": "function"}]}, "tools[0].function"),
    (C, {**CHAT, "tools": [_TOOL, {"type": "function", "function": {"name": 3}}]},
     "tools[1].function.name"),
    (C, {**CHAT, "stream": True}, None),
    (C, {**CHAT, "stream": "yes"}, "stream"),
    (C, {**CHAT, "model": ["tiny"]}, "model"),
    # completions
    *[("completions", {"model": "tiny", "prompt": p}, None)
      for p in ("hi", "", ["a", "b"], [1, 2, 3], [[1, 2], [3]])],
    ("completions", {"model": "tiny", "prompt_embeds": "AAAA"}, None),  # vLLM's alternative
    ("completions", {"model": "tiny"}, "prompt"),
    ("completions", {"model": "tiny", "prompt": 5}, "prompt"),
    ("completions", {"model": "tiny", "prompt": []}, "prompt"),
    ("completions", {"model": "tiny", "prompt": [{"text": "a"}]}, "prompt[0]"),
    ("completions", {"model": "tiny", "prompt": [[1], []]}, "prompt[1]"),
    ("completions", {"model": "tiny", "prompt": [[1], [-2]]}, "prompt[1]"),
    ("completions", {"model": "tiny", "prompt": "a", "temperature": 3}, "temperature"),
    ("completions", {"model": "tiny", "prompt": "a", "n": 0}, "n"),
    ("completions", {"model": "tiny", "prompt": "a", "max_tokens": 0}, "max_tokens"),
    # embeddings
    *[("embeddings", {"model": "tiny", "input": i}, None) for i in ("hi", ["a", "b"], [1, 2], [[1], [2, 3]])],
    ("embeddings", {"model": "tiny", "messages": [USER]}, None),  # vLLM's chat-style embeddings
    ("embeddings", {"model": "tiny"}, "input"),
    ("embeddings", {"model": "tiny", "input": {"text": "hi"}}, "input"),
    ("embeddings", {"model": "tiny", "input": [True]}, "input[0]"),
    # responses: the types of the obvious fields
    ("responses", {"model": "tiny", "input": "hi"}, None),
    ("responses", {"model": "tiny", "input": [USER], "max_output_tokens": 8}, None),
    ("responses", {"model": "tiny", "input": 3}, "input"),
    ("responses", {"model": "tiny", "input": ["hi"]}, "input[0]"),
    ("responses", {"model": "tiny", "input": "hi", "instructions": 1}, "instructions"),
    ("responses", {"model": "tiny", "input": "hi", "max_output_tokens": 0}, "max_output_tokens"),
    ("responses", {"model": "tiny", "input": "hi", "temperature": 9}, "temperature"),
    ("responses", {"model": "tiny", "input": "hi", "tools": {}}, "tools"),
    # messages (Anthropic)
    ("messages", {"model": "tiny", "max_tokens": 8, "messages": [USER]}, None),
    ("messages", {"model": "tiny", "max_tokens": 8, "system": [{"type": "text", "text": "be brief"}],
                  "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}, None),
    ("messages", {"model": "tiny", "max_tokens": 8}, "messages"),
    # Unhashable values where a name is expected (found by the fuzz test: a set lookup raised).
    ("messages", {"model": "tiny", "messages": [{"role": [], "content": "x"}]}, "messages[0].role"),
    ("chat/completions", {"model": "tiny", "messages": [{"role": [], "content": "x"}]}, "messages[0].role"),
    ("chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": [{"type": {}}]}]},
     "messages[0].content[0].type"),
    ("chat/completions", {"model": "tiny", "messages": [USER], "tools": [{"type": ["function"]}]},
     "tools[0].type"),
    ("messages", {"model": "tiny", "messages": [{"role": "system", "content": "x"}]}, "messages[0].role"),
    ("messages", {"model": "tiny", "messages": [{"role": "user", "content": 1}]}, "messages[0].content"),
    ("messages", {"model": "tiny", "messages": [{"role": "user", "content": [{"text": "a"}]}]},
     "messages[0].content[0]"),
    ("messages", {"model": "tiny", "messages": [USER], "system": 1}, "system"),
    # Anthropic's temperature is in [0, 1]
    ("messages", {"model": "tiny", "messages": [USER], "temperature": 1.5}, "temperature"),
    ("messages", {"model": "tiny", "messages": [USER], "max_tokens": 0}, "max_tokens"),
    ("messages", {"model": "tiny", "messages": [USER], "stop_sequences": "END"}, "stop_sequences"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("api", "body", "param"), RULES, ids=[f"{a}-{i}" for i, (a, _, _) in enumerate(RULES)]
)
def test_rule(client, api, body, param):
    r = client.post(f"/v1/{api}", json=body)
    if param is None:
        assert r.status_code == 200, r.text
    else:
        _invalid(r, param)


def test_validation_is_before_routing_and_the_same_for_every_engine():
    """No replica is asked: the same 400 whatever the model's engine (here: none is reachable)."""
    asked = []

    def engine(request: httpx.Request) -> httpx.Response:
        if request.url.path != "/metrics":
            asked.append(request)
        return httpx.Response(500)

    for engine_name in ("vllm", "llama-server"):
        reg = Registry()
        reg.set_model(
            ModelEntry(name="m", served_name="m", engine=engine_name),
            [Endpoint(id="r", address="a:1", model="m")],
        )
        app = create_app(reg, GatewaySettings(scrape_interval=3600), upstream=mock_upstream(engine))
        with TestClient(app) as c:
            _invalid(
                c.post("/v1/chat/completions", json={"model": "m", "messages": [USER], "top_p": 2}), "top_p"
            )
    assert asked == []


# --- deeply nested bodies ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b"[" * 1000 + b"]" * 1000,
        b'{"model": "tiny", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
        b'{"model": "tiny", "x": ' + b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1) + b"}",
        b'{"model": "tiny", "x": ' + b"[" * 100_000,  # not even closed
    ],
    ids=["array-1000", "array-100k", "object-100k", "just-over-the-limit", "unclosed"],
)
@pytest.mark.parametrize("api", PROXIED)
def test_deeply_nested_bodies_are_a_400_without_a_traceback(client, api, raw, caplog):
    caplog.set_level(logging.DEBUG)
    r = client.post(f"/v1/{api}", content=raw, headers={"content-type": "application/json"})
    _invalid(r, None)
    assert "Traceback" not in caplog.text and not any(rec.exc_info for rec in caplog.records)


def test_nesting_up_to_the_limit_is_accepted(client):
    deep = {
        "model": "tiny",
        "messages": [USER],
        "x": json.loads("[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1)),
    }
    assert client.post("/v1/chat/completions", json=deep).status_code == 200


def test_brackets_inside_strings_do_not_count(client):
    body = {**CHAT, "messages": [{"role": "user", "content": "[{" * 5000}]}
    assert client.post("/v1/chat/completions", json=body).status_code == 200


# --- methods and paths -----------------------------------------------------------------------------


@pytest.mark.parametrize("api", PROXIED)
@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH"])
def test_wrong_method_on_a_proxied_route_is_405(client, api, method):
    r = client.request(method, f"/v1/{api}")
    assert r.status_code == 405
    assert r.headers["allow"] == "POST"
    assert _is_envelope(r.json()) and r.json()["error"]["code"] == "method_not_allowed"


@pytest.mark.parametrize("path", ["/v1/models", "/v1/admin/models", "/v1/admin/usage", "/healthz", "/readyz",
                                  "/metrics", "/openapi.json"])  # fmt: skip
def test_post_on_a_get_route_is_405(client, path):
    r = client.post(path, json=CHAT)
    assert r.status_code == 405
    assert r.headers["allow"] == "GET, HEAD"
    assert _is_envelope(r.json())
    assert client.get(path).status_code == 200


UNKNOWN = [("GET", "/nope"), ("POST", "/v1/nope"), ("GET", "/v1/admin/nope"), ("POST", "/v1/admin/keys"),
           ("DELETE", "/v1")]  # fmt: skip


@pytest.mark.parametrize(("method", "path"), UNKNOWN)
def test_unknown_paths_are_404_in_the_envelope(client, method, path):
    r = client.request(method, path)
    assert r.status_code == 404
    assert _is_envelope(r.json()) and r.json()["error"]["code"] == "not_found"


# --- /openapi.json -------------------------------------------------------------------------------------


def test_openapi_document_lists_exactly_the_routes_the_app_serves(client):
    doc = client.get("/openapi.json").json()
    assert doc == json.loads(json.dumps(DOCUMENT))
    assert doc["openapi"].startswith("3.")
    served = {(f"/v1/{p}", "post") for p in PROXIED}
    served |= {(r.path, "get") for r in client.app.router.routes if isinstance(r, Route)}
    documented = {(path, method) for path, ops in doc["paths"].items() for method in ops}
    assert documented == served
    assert doc["components"]["securitySchemes"]["bearer"] == {
        "type": "http", "scheme": "bearer", "description": "An API key"}  # fmt: skip
    for path, ops in doc["paths"].items():
        for op in ops.values():
            for status, resp in op["responses"].items():
                if status.startswith(("4", "5")) and path.startswith("/v1/"):
                    assert resp["content"]["application/json"]["schema"] == {
                        "$ref": "#/components/schemas/Error"
                    }


def test_openapi_request_schemas_accept_the_valid_examples_and_refuse_the_invalid():
    """The document says what validate.py checks: every rule's example is judged alike by both."""
    jsonschema = pytest.importorskip("jsonschema")
    names = {f"/v1/{p}": DOCUMENT["paths"][f"/v1/{p}"]["post"]["requestBody"]["content"]["application/json"]
             ["schema"]["$ref"].rsplit("/", 1)[1] for p in PROXIED}  # fmt: skip
    for api, body, param in RULES:
        schema = {**DOCUMENT["components"]["schemas"][names[f"/v1/{api}"]],
                  "components": DOCUMENT["components"]}  # fmt: skip
        validator = jsonschema.Draft202012Validator(schema)
        ok = validator.is_valid(body)
        if api == "completions" and "prompt_embeds" in body:
            continue  # vLLM's alternative to `prompt`, not in the document
        if api == "embeddings" and "messages" in body:
            continue  # likewise vLLM's chat-style embeddings
        assert ok == (param is None), (api, body, param)
