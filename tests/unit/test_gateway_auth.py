"""API keys: authentication, allow-lists, per-minute limits, and the ledger per key."""

from __future__ import annotations

import httpx
import pytest
from starlette.testclient import TestClient

from kubeinfer.gateway.app import GatewaySettings, create_app
from kubeinfer.gateway.auth import ANONYMOUS, ApiKey, Denied, KeyStore, api_key_from_secret, digest
from kubeinfer.gateway.registry import ModelEntry, Registry, load_static_keys
from kubeinfer.gateway.routing import Endpoint
from tests.cases import FIXTURES
from tests.httpx_upstream import mock_upstream

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def test_anonymous_mode_without_keys():
    assert KeyStore().authenticate(None).name == ANONYMOUS


def test_authenticate_and_limits():
    store = KeyStore(
        [ApiKey("team-a", digest("sk-a"), frozenset({"m"}), requests_per_minute=2, tokens_per_minute=100)]
    )
    key = store.authenticate("Bearer sk-a")
    assert key.name == "team-a"
    for bad in (None, "", "Bearer sk-b", "sk-b"):
        with pytest.raises(Denied) as info:
            store.authenticate(bad)
        assert info.value.status == 401
    with pytest.raises(Denied) as info:
        store.admit(key, "other-model", now=0)
    assert info.value.status == 403 and info.value.code == "model_not_allowed"
    store.admit(key, "m", now=0)
    store.admit(key, "m", now=1)
    with pytest.raises(Denied) as info:
        store.admit(key, "m", now=10)
    assert info.value.status == 429 and 49 <= info.value.retry_after <= 50
    store.admit(key, "m", now=61)  # the first request left the window
    store.spend(key, 150, now=62)
    with pytest.raises(Denied, match="tokens per minute"):
        store.admit(key, "m", now=63)
    with pytest.raises(Denied) as info:
        store.admit(ApiKey("x", digest("y")), "m", now=0, remote=True)
    assert info.value.code == "remote_not_allowed"


def _client(store: KeyStore):
    forwarded = []

    def engine(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/metrics":
            return httpx.Response(404)
        forwarded.append(dict(request.headers))
        return httpx.Response(200, content=(FIXTURES / "vllm-0.32.0" / "chat_completion.json").read_bytes(),
                              headers={"content-type": "application/json"})  # fmt: skip

    reg = Registry()
    reg.set_model(
        ModelEntry(name="m", served_name="m"), [Endpoint(id="r0", address="10.0.0.1:8000", model="m")]
    )
    app = create_app(reg, GatewaySettings(scrape_interval=3600), upstream=mock_upstream(engine), keys=store)
    return TestClient(app), forwarded


def test_gateway_enforces_keys_and_keeps_them_from_engines():
    store = KeyStore(
        [ApiKey("team-a", digest("sk-a"), requests_per_minute=1), ApiKey("ops", digest("sk-o"), admin=True)]
    )
    client, forwarded = _client(store)
    with client:
        missing = client.post("/v1/chat/completions", json=CHAT)
        wrong = client.post("/v1/chat/completions", json=CHAT, headers={"authorization": "Bearer nope"})
        ok = client.post("/v1/chat/completions", json=CHAT, headers={"authorization": "Bearer sk-a"})
        limited = client.post("/v1/chat/completions", json=CHAT, headers={"authorization": "Bearer sk-a"})
        ledger = client.get("/v1/admin/usage", headers={"authorization": "Bearer sk-o"}).json()["data"]
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"
    assert wrong.status_code == 401
    assert ok.status_code == 200
    assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
    assert len(forwarded) == 1 and "authorization" not in forwarded[0]
    assert forwarded[0]["accept-encoding"] == "identity"
    assert [(r["key"], r["requests"]) for r in ledger] == [("team-a", 1)]
    assert "sk-a" not in str(ledger)


def test_static_file_keys(tmp_path):
    f = tmp_path / "gw.yaml"
    f.write_text(
        f"models: []\napiKeys:\n- name: ci\n  keySha256: {digest('sk-ci')}\n"
        "  models: [m]\n  requestsPerMinute: 5\n"
    )
    store = KeyStore(load_static_keys(f))
    assert store.authenticate("Bearer sk-ci").requests_per_minute == 5


def _secret(data: dict[str, str], annotations: dict[str, str] | None = None, name: str = "team-a"):
    import base64

    return {
        "metadata": {"name": name, "namespace": "gw", "annotations": annotations or {}},
        "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
    }


def test_key_from_secret_with_policy():
    key = api_key_from_secret(
        _secret(
            {"key": "sk-team-a\n"},  # a trailing newline from `echo` must not change the key
            {
                "kubeinfer.io/key-name": "team-a",
                "kubeinfer.io/models": "tiny, big ,",
                "kubeinfer.io/requests-per-minute": "30",
                "kubeinfer.io/tokens-per-minute": "1000",
                "kubeinfer.io/allow-remote": "true",
            },
        )
    )
    assert key == ApiKey("team-a", digest("sk-team-a"), frozenset({"tiny", "big"}), 30, 1000, True)
    store = KeyStore([key])
    assert store.authenticate("Bearer sk-team-a").name == "team-a"


def test_key_from_secret_digest_and_defaults():
    key = api_key_from_secret(_secret({"keySha256": digest("sk-x").upper()}, name="ops"))
    assert (key.name, key.key_sha256, key.models, key.requests_per_minute, key.allow_remote) == (
        "ops", digest("sk-x"), None, None, False,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("data", "annotations", "message"),
    [
        ({}, {}, "no data.key or data.keySha256"),
        ({"key": "  "}, {}, "data.key is empty"),
        ({"keySha256": "abc"}, {}, "not a hex SHA-256"),
        ({"key": "sk"}, {"kubeinfer.io/requests-per-minute": "many"}, "requests-per-minute"),
        ({"key": "sk"}, {"kubeinfer.io/tokens-per-minute": "0"}, "tokens-per-minute"),
    ],
)
def test_bad_key_secrets_are_explained(data, annotations, message):
    with pytest.raises(ValueError, match=message) as err:
        api_key_from_secret(_secret(data, annotations))
    assert "sk" not in str(err.value).replace("SHA-256", "")


def test_not_base64_key_is_refused():
    secret = {"metadata": {"name": "x"}, "data": {"key": "***"}}
    with pytest.raises(ValueError, match="base64"):
        api_key_from_secret(secret)


def test_required_store_refuses_everything_without_keys():
    store = KeyStore(required=True)
    assert not store.anonymous
    with pytest.raises(Denied) as err:
        store.authenticate("Bearer anything")
    assert err.value.status == 401
    assert KeyStore().authenticate(None).name == ANONYMOUS


def test_discovery_tracks_key_secrets():
    from kubeinfer.gateway.discovery import Discovery

    store = KeyStore(required=True)
    found = Discovery(None, Registry(), keys=store)  # type: ignore[arg-type]
    found.on_secret("ADDED", _secret({"key": "sk-1"}, name="one"))
    found.on_secret("ADDED", _secret({"key": "sk-2"}, name="two"))
    found.on_secret("ADDED", _secret({}, name="broken"))  # ignored, others unaffected
    assert store.authenticate("Bearer sk-1").name == "one"
    found.on_secret("MODIFIED", _secret({"key": "sk-1b"}, name="one"))  # rotated
    with pytest.raises(Denied):
        store.authenticate("Bearer sk-1")
    assert store.authenticate("Bearer sk-1b").name == "one"
    found.on_secret("DELETED", _secret({"key": "sk-2"}, name="two"))
    with pytest.raises(Denied):
        store.authenticate("Bearer sk-2")
    found.on_secret("DELETED", _secret({"key": "sk-1b"}, name="one"))
    with pytest.raises(Denied):  # the last key gone: still closed, not anonymous
        store.authenticate(None)


def test_models_and_admin_endpoints_need_keys():
    reg = Registry()
    for name in ("a", "b"):
        reg.set_model(
            ModelEntry(name=name, served_name=name), [Endpoint(id=f"{name}0", address="x:1", model=name)]
        )
    keys = KeyStore([
        ApiKey("user", digest("sk-user"), models=frozenset({"a"})),
        ApiKey("ops", digest("sk-ops"), admin=True),
    ])  # fmt: skip
    app = create_app(reg, GatewaySettings(scrape_interval=3600), keys=keys)
    with TestClient(app) as client:
        assert client.get("/v1/models").status_code == 401
        user = {"authorization": "Bearer sk-user"}
        assert [m["id"] for m in client.get("/v1/models", headers=user).json()["data"]] == ["a"]
        ops = {"authorization": "Bearer sk-ops"}
        assert [m["id"] for m in client.get("/v1/models", headers=ops).json()["data"]] == ["a", "b"]
        for path in ("/v1/admin/models", "/v1/admin/usage"):
            assert client.get(path).status_code == 401
            denied = client.get(path, headers=user)
            assert denied.status_code == 403 and denied.json()["error"]["code"] == "admin_only"
            assert client.get(path, headers=ops).status_code == 200
