"""LoRA adapters in the gateway: listed as models, routed only to replicas that serve them (a
llama-server pod's annotation, a vLLM replica's /v1/models), llama-server's per-request `lora` field,
affinity to replicas already running an adapter, and usage booked per adapter.

In memory: the replicas are httpx.MockTransport answering with the real captures of both engines.
"""

from __future__ import annotations

import asyncio
import json

import httpx
from starlette.testclient import TestClient

from kubeinfer import contract
from kubeinfer.api.v1alpha1 import Routing
from kubeinfer.gateway.app import GatewaySettings, create_app, scrape_once
from kubeinfer.gateway.discovery import endpoint_from_pod, entry_from_model
from kubeinfer.gateway.registry import ModelEntry, Registry
from kubeinfer.gateway.routing import Endpoint, Load, RouteRequest, choose
from kubeinfer.gateway.scrape import loaded_adapters, parse_metrics
from tests.cases import FIXTURES
from tests.httpx_upstream import mock_upstream

LLAMA = FIXTURES / "llama-server"
VLLM = FIXTURES / "vllm-0.32.0"


def _chat(model: str) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


class Engines:
    """Replicas that record each inference body; vLLM ones list `adapters` in /v1/models."""

    def __init__(self, vllm_adapters: dict[str, list[str]] | None = None) -> None:
        self.vllm_adapters = vllm_adapters or {}
        self.bodies: list[tuple[str, dict[str, object]]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        addr = f"{request.url.host}:{request.url.port}"
        if request.url.path == "/metrics":
            src = VLLM / "metrics_idle.txt" if addr in self.vllm_adapters else LLAMA / "metrics_idle.txt"
            return httpx.Response(200, text=src.read_text())
        if request.url.path == "/v1/models":
            data = [{"id": "base", "object": "model", "root": "/m", "parent": None}]
            data += [
                {"id": a, "object": "model", "root": f"/w/{a}", "parent": "base"}
                for a in self.vllm_adapters[addr]
            ]
            return httpx.Response(200, json={"object": "list", "data": data})
        self.bodies.append((addr, json.loads(request.content)))
        return httpx.Response(200, json=json.loads((VLLM / "chat_completion.json").read_text()))


def _app(entry: ModelEntry, endpoints: list[Endpoint], engines: Engines) -> tuple[TestClient, object]:
    reg = Registry()
    reg.set_model(entry, endpoints)
    settings = GatewaySettings(hold_timeout=0.3, scrape_interval=3600)
    app = create_app(reg, settings, upstream=mock_upstream(engines))
    return TestClient(app), app


LLAMA_ADAPTERS = (("pirate", 0, 1.0), ("legal", 1, 0.5))


def test_llama_server_requests_carry_the_pods_own_adapter_id_and_scale() -> None:
    entry = ModelEntry(name="m", served_name="base", engine="llama-server", adapters=("pirate", "legal"))
    eps = [Endpoint(id="p0", address="10.0.0.1:8000", model="m", adapters=LLAMA_ADAPTERS)]
    engines = Engines()
    client, _ = _app(entry, eps, engines)
    with client:
        listed = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
        for model in ("base", "legal", "pirate"):
            assert client.post("/v1/chat/completions", json=_chat(model)).status_code == 200
    assert listed["legal"]["parent"] == "base" and listed["pirate"]["root"] == "base"
    assert "parent" not in listed["base"]
    bodies = [b for _, b in engines.bodies]
    # Every adapter, always: the one named at its scale, the others (all, for the base) at 0.
    assert bodies[0]["lora"] == [{"id": 0, "scale": 0.0}, {"id": 1, "scale": 0.0}]
    assert bodies[1]["lora"] == [{"id": 0, "scale": 0.0}, {"id": 1, "scale": 0.5}]
    assert bodies[2]["lora"] == [{"id": 0, "scale": 1.0}, {"id": 1, "scale": 0.0}]
    assert bodies[2]["model"] == "pirate"  # the client's name is kept (llama-server ignores it)


def test_usage_is_booked_under_the_adapters_name() -> None:
    entry = ModelEntry(name="m", served_name="base", engine="llama-server", adapters=("pirate",))
    eps = [Endpoint(id="p0", address="10.0.0.1:8000", model="m", adapters=LLAMA_ADAPTERS[:1])]
    client, app = _app(entry, eps, Engines())
    with client:
        client.post("/v1/chat/completions", json=_chat("pirate"))
        client.post("/v1/chat/completions", json=_chat("pirate"))
        client.post("/v1/chat/completions", json=_chat("base"))
    ledger = app.state.gw.ledger  # type: ignore[attr-defined]
    assert ledger[("anonymous", "pirate")]["requests"] == 2
    assert ledger[("anonymous", "m")]["requests"] == 1
    assert ledger[("anonymous", "pirate")]["completionTokens"] > 0


def test_vllm_adapters_route_only_to_replicas_that_loaded_them() -> None:
    entry = ModelEntry(name="m", served_name="base", engine="vllm", adapters=("sql", "chat"))
    eps = [Endpoint(id=f"v{i}", address=f"10.0.0.{i}:8000", model="m") for i in (1, 2)]
    engines = Engines({"10.0.0.1:8000": ["sql"], "10.0.0.2:8000": []})
    client, app = _app(entry, eps, engines)
    with client:
        asyncio.run(scrape_once(app.state.gw))  # type: ignore[attr-defined]
        for _ in range(4):
            assert client.post("/v1/chat/completions", json=_chat("sql")).status_code == 200
        # Ready replicas, none of which loaded it: 503 at once, not a wait in the model's queue.
        r = client.post("/v1/chat/completions", json=_chat("chat"))
        assert r.status_code == 503 and r.json()["error"]["code"] == "adapter_not_loaded"
        assert r.headers["retry-after"] == "2"
        base = [client.post("/v1/chat/completions", json=_chat("base")) for _ in range(4)]
    assert {a for a, b in engines.bodies if b["model"] == "sql"} == {"10.0.0.1:8000"}
    assert all(r.status_code == 200 for r in base)
    assert {a for a, b in engines.bodies if b["model"] == "base"} == {"10.0.0.1:8000", "10.0.0.2:8000"}
    assert all("lora" not in b for _, b in engines.bodies)  # vLLM takes the adapter by its name


def test_an_unknown_adapter_name_is_an_unknown_model() -> None:
    entry = ModelEntry(name="m", served_name="base", engine="vllm", adapters=("sql",))
    client, _ = _app(
        entry, [Endpoint(id="v1", address="10.0.0.1:8000", model="m")], Engines({"10.0.0.1:8000": []})
    )
    with client:
        r = client.post("/v1/chat/completions", json=_chat("sql-v2"))
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_affinity_prefers_a_replica_running_the_adapter_within_the_load_bound() -> None:
    metrics = (VLLM / "metrics-lora.txt").read_text()
    running = parse_metrics(metrics)
    assert running.running_adapters  # the capture was taken while an adapter's request ran
    adapter = sorted(running.running_adapters)[0]
    idle = parse_metrics((VLLM / "metrics_idle.txt").read_text())
    loaded = frozenset({adapter})
    eps = [Endpoint(id=i, address=f"{i}:1", model="m") for i in ("a", "b", "c")]
    loads = {
        "a": Load(0, _with(idle, loaded), 0.0),
        "b": Load(2, _with(running, loaded), 0.0),
        "c": Load(0, _with(idle, loaded), 0.0),
    }
    req = RouteRequest(model="m", adapter=adapter)
    kw = {"now": 0.0, "scrape_interval": 1.0, "rr_counter": 0, "target_inflight": 8}
    d = choose("least-load", eps, loads, req, **kw)  # type: ignore[arg-type]
    assert d is not None and (d.endpoint_id, d.reason) == ("b", "adapter-affinity")
    # Past the bound the load wins: affinity never piles requests onto one replica.
    loads["b"] = Load(20, _with(running, loaded), 0.0)
    d = choose("least-load", eps, loads, req, **kw)  # type: ignore[arg-type]
    assert d is not None and d.endpoint_id != "b" and d.reason == "least-load"
    # A replica that has not loaded the adapter is never a candidate.
    loads["a"] = Load(0, _with(idle, frozenset()), 0.0)
    loads["c"] = Load(0, idle, 0.0)  # never read its /v1/models
    d = choose("least-load", eps, loads, req, **kw)  # type: ignore[arg-type]
    assert d is not None and d.endpoint_id == "b"


def _with(stats, loaded):  # type: ignore[no-untyped-def]
    import dataclasses

    return dataclasses.replace(stats, loaded_adapters=loaded)


def test_lora_requests_info_reads_the_newest_series() -> None:
    text = (
        "# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running 0\n"
        "# TYPE vllm:num_requests_waiting gauge\nvllm:num_requests_waiting 0\n"
        "# TYPE vllm:lora_requests_info gauge\n"
        + "".join(
            f'vllm:lora_requests_info{{max_lora="2",running_lora_adapters="{r}",'
            f'waiting_lora_adapters=""}} {t}\n'
            for r, t in (("a,b", "100.0"), ("", "200.0"), ("c", "150.0"))
        )
    )
    assert parse_metrics(text).running_adapters == frozenset()  # the newest: nothing running now
    assert parse_metrics(text.replace("200.0", "50.0")).running_adapters == {"c"}


def test_vllm_models_list_gives_the_loaded_adapters() -> None:
    captured = json.loads((VLLM / "models-lora.json").read_text())
    base = next(m["id"] for m in captured["data"] if not m.get("parent"))
    names = loaded_adapters(captured, base)
    assert names and base not in names
    assert loaded_adapters(captured, "another-model") == frozenset()
    assert loaded_adapters({"data": "nonsense"}) == frozenset()


def test_discovery_reads_adapters_from_the_model_and_the_pod() -> None:
    entry = entry_from_model(
        {"metadata": {"name": "m", "namespace": "ml"},
         "spec": {"engine": "llama-server", "model": {"source": "org/r:Q4_K_M"},
                  "adapters": [{"name": "x", "source": "pvc://l/x.gguf"}]}}
    )  # fmt: skip
    assert entry.adapters == ("x",)
    pod = {
        "metadata": {"name": "p", "labels": {contract.LABEL_MODEL: "m"},
                     "annotations": {contract.ANNOTATION_ADAPTERS: '[{"name":"x","id":0,"scale":0.5}]'}},
        "status": {"podIP": "10.0.0.9", "conditions": [{"type": "Ready", "status": "True"}]},
    }  # fmt: skip
    found = endpoint_from_pod(pod)
    assert found is not None and found[1].adapters == (("x", 0, 0.5),)
    pod["metadata"]["annotations"][contract.ANNOTATION_ADAPTERS] = "not json"  # type: ignore[index]
    found = endpoint_from_pod(pod)
    assert found is not None and found[1].adapters is None  # unusable: treated as serving none


def test_an_adapter_never_shadows_a_model_name() -> None:
    reg = Registry()
    reg.set_model(ModelEntry(name="a", served_name="shared", routing=Routing()), [])
    reg.set_model(ModelEntry(name="b", served_name="b", adapters=("shared", "only-b")), [])
    assert reg.resolve("shared").name == "a" and reg.adapter_for("shared") is None  # type: ignore[union-attr]
    assert reg.resolve("only-b").name == "b" and reg.adapter_for("only-b") == "only-b"  # type: ignore[union-attr]


def test_discovery_keeps_what_the_pod_says_about_its_adapters_and_stage() -> None:
    """The watch path (Discovery.on_pod), not only the parser: it once rebuilt each replica without
    its adapters, and every llama-server adapter request then waited for a replica that served it."""
    from kubeinfer.gateway.discovery import Discovery

    reg = Registry()
    d = Discovery(api=None, registry=reg)  # type: ignore[arg-type]
    d.on_model(
        "ADDED",
        {"metadata": {"name": "m", "namespace": "ml"},
         "spec": {"engine": "llama-server", "model": {"source": "org/r:Q4_K_M", "servedName": "base"},
                  "adapters": [{"name": "x", "source": "pvc://l/x.gguf"}]}},
    )  # fmt: skip
    ready = {
        "metadata": {"name": "p", "namespace": "ml", "labels": {contract.LABEL_MODEL: "m"},
                     "annotations": {contract.ANNOTATION_ADAPTERS: '[{"name":"x","id":0,"scale":1.0}]'}},
        "status": {"podIP": "10.0.0.9", "conditions": [{"type": "Ready", "status": "True"}]},
    }  # fmt: skip
    d.on_pod("ADDED", ready)
    (ep,) = reg.ready_endpoints("ml/m")
    assert ep.adapters == (("x", 0, 1.0),) and ep.model == "ml/m"
    assert reg.resolve("x") is not None and reg.adapter_for("x") == "x"
    starting = {**ready, "metadata": {**ready["metadata"], "name": "q"},
                "status": {"podIP": "10.0.0.8", "phase": "Pending",
                           "conditions": [{"type": "PodScheduled", "status": "True"}],
                           "containerStatuses": [{"state": {"running": {}}}]}}  # fmt: skip
    d.on_pod("ADDED", starting)
    assert next(e for e in reg.endpoints["ml/m"] if e.id == "q").phase == "engine loading the weights"
