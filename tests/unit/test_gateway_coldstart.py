"""Scale from zero, seen from the gateway: a request for a model at zero replicas asks for one at once,
waits for it within queueTimeout, and a streaming client hears how the start goes; the autoscalers'
load gauge; /v1/models keeps listing the model."""

from __future__ import annotations

import asyncio
import json

import httpx

from kubeinfer.api.v1alpha1 import Routing
from kubeinfer.gateway.app import GatewaySettings, create_app
from kubeinfer.gateway.discovery import entry_from_model, pod_phase
from kubeinfer.gateway.registry import ModelEntry, Registry
from kubeinfer.gateway.routing import Endpoint
from tests.cases import FIXTURES
from tests.httpx_upstream import mock_upstream

STREAM = (FIXTURES / "llama-server" / "chat_completion_stream.txt").read_text()
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}


def _engine(request: httpx.Request) -> httpx.Response:
    body = json.loads(request.content)
    if body.get("stream"):
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=STREAM.encode())
    return httpx.Response(200, json={"object": "chat.completion", "choices": [], "usage": None})


def _cold_registry(queue_timeout="10s") -> tuple[Registry, list[ModelEntry]]:
    reg = Registry()
    entry = ModelEntry(name="tiny", served_name="tiny", namespace="ml", replicas=0, scale_from_zero=True,
                       routing=Routing(queue_timeout=queue_timeout))  # fmt: skip
    reg.set_model(entry, [])
    woken: list[ModelEntry] = []
    reg.waker = woken.append
    return reg, woken


async def _bring_up(reg: Registry, after: float) -> None:
    """What discovery does as the operator scales the model up: a pod appears, starts, gets ready."""
    entry = reg.models["tiny"]
    await asyncio.sleep(after / 3)
    starting = Endpoint(
        id="tiny-0", address="10.0.0.9:8080", model="tiny", ready=False, phase="pulling the image"
    )
    reg.set_model(ModelEntry(**{**entry.__dict__, "replicas": 1}), [starting])
    await asyncio.sleep(after / 3)
    loading = Endpoint(id="tiny-0", address="10.0.0.9:8080", model="tiny", ready=False,
                       phase="engine loading the weights")  # fmt: skip
    reg.set_model(reg.models["tiny"], [loading])
    await asyncio.sleep(after / 3)
    reg.set_model(reg.models["tiny"], [Endpoint(id="tiny-0", address="10.0.0.9:8080", model="tiny")])


async def _client(app):
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw", timeout=30)


async def _with_app(reg, settings=None):
    app = create_app(reg, settings or GatewaySettings(scrape_interval=3600), upstream=mock_upstream(_engine))
    return app


async def test_a_request_at_zero_wakes_the_model_and_is_served_when_a_replica_is_ready():
    reg, woken = _cold_registry()
    app = await _with_app(reg)
    async with app.router.router.lifespan_context(app.router), await _client(app) as c:
        up = asyncio.create_task(_bring_up(reg, 0.6))
        r = await c.post("/v1/chat/completions", json=CHAT)
        await up
    assert r.status_code == 200
    assert [e.name for e in woken] == ["tiny"]  # asked at once, once
    assert float(r.headers["x-kubeinfer-queue-wait-ms"]) >= 500  # it waited for the replica


async def test_a_held_stream_gets_progress_comments_then_the_tokens():
    reg, _ = _cold_registry()
    app = await _with_app(reg)
    async with app.router.router.lifespan_context(app.router), await _client(app) as c:
        up = asyncio.create_task(_bring_up(reg, 3.0))
        async with c.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as r:
            assert r.status_code == 200 and r.headers["x-kubeinfer-cold-start"] == "1"
            text = "".join([chunk async for chunk in r.aiter_text()])
        await up
    comments = [line for line in text.splitlines() if line.startswith(": kubeinfer:")]
    assert comments[0].endswith("scale-up requested"), comments
    assert any("pulling the image" in c for c in comments), comments
    assert any("engine loading the weights" in c for c in comments), comments
    data = [line for line in text.splitlines() if line.startswith("data: ")]
    assert data and data[-1] == "data: [DONE]"
    assert text.index(": kubeinfer:") < text.index("data: ")  # progress first, then the stream


async def test_a_held_stream_that_times_out_gets_the_error_in_band():
    reg, _ = _cold_registry(queue_timeout="1500ms")
    app = await _with_app(reg)
    async with (
        app.router.router.lifespan_context(app.router),
        await _client(app) as c,
        c.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as r,
    ):
        assert r.status_code == 200
        text = "".join([chunk async for chunk in r.aiter_text()])
    events = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
    assert events[-1]["error"]["code"] == "no_replica"
    assert "scale-up requested" in events[-1]["error"]["message"]
    assert text.rstrip().endswith("data: [DONE]")


async def test_a_plain_request_that_times_out_is_a_503_with_retry_after():
    reg, _ = _cold_registry(queue_timeout="500ms")
    app = await _with_app(reg)
    async with app.router.router.lifespan_context(app.router), await _client(app) as c:
        r = await c.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 503 and r.headers["retry-after"]
    assert r.json()["error"]["code"] == "no_replica"
    assert "scale-up requested" in r.json()["error"]["message"]


async def test_a_stream_refused_at_once_keeps_its_status_code():
    reg, _ = _cold_registry()
    reg.models["tiny"] = ModelEntry(**{**reg.models["tiny"].__dict__, "routing": Routing(max_queue=0)})
    app = await _with_app(reg)
    async with app.router.router.lifespan_context(app.router), await _client(app) as c:
        r = await c.post("/v1/chat/completions", json={**CHAT, "stream": True})
    assert r.status_code == 429


async def test_a_model_that_cannot_scale_from_zero_is_not_woken():
    reg, woken = _cold_registry(queue_timeout="200ms")
    reg.models["tiny"] = ModelEntry(**{**reg.models["tiny"].__dict__, "scale_from_zero": False})
    app = await _with_app(reg)
    async with app.router.router.lifespan_context(app.router), await _client(app) as c:
        r = await c.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 503 and woken == []


async def test_models_lists_a_scaled_to_zero_model_with_its_state_and_the_load_gauge():
    reg, _ = _cold_registry(queue_timeout="3s")
    app = await _with_app(reg)
    async with app.router.router.lifespan_context(app.router), await _client(app) as c:
        listed = (await c.get("/v1/models")).json()["data"]
        assert [(m["id"], m["state"]) for m in listed] == [("tiny", "scaled-to-zero")]
        waiting = [asyncio.create_task(c.post("/v1/chat/completions", json=CHAT)) for _ in range(3)]
        await asyncio.sleep(0.3)
        metrics = (await c.get("/metrics")).text
        assert 'kubeinfer_gateway_model_load{model="tiny",model_namespace="ml"} 3.0' in metrics
        await _bring_up(reg, 0.3)
        assert {(await w).status_code for w in waiting} == {200}
        metrics = (await c.get("/metrics")).text
        assert 'kubeinfer_gateway_model_load{model="tiny",model_namespace="ml"} 0.0' in metrics
        listed = (await c.get("/v1/models")).json()["data"]
        assert [(m["id"], m["state"]) for m in listed] == [("tiny", "ready")]


def test_discovery_reads_scale_from_zero_and_pod_phases():
    def model(autoscaling):
        spec = {"engine": "llama-server", "replicas": 0, "model": {"source": "o/r:Q8_0"}}
        if autoscaling is not None:
            spec["autoscaling"] = autoscaling
        return {"metadata": {"name": "m", "namespace": "ml"}, "spec": spec}

    entry = entry_from_model(model({"minReplicas": 0, "maxReplicas": 2}))
    assert (entry.namespace, entry.replicas, entry.scale_from_zero) == ("ml", 0, True)
    assert not entry_from_model(model({"minReplicas": 1, "maxReplicas": 2})).scale_from_zero
    assert not entry_from_model(model({"mode": "keda", "minReplicas": 0, "maxReplicas": 2})).scale_from_zero
    assert not entry_from_model(model(None)).scale_from_zero

    no_gpu = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
              "message": "0/3 nodes have a free GPU"}  # fmt: skip
    unscheduled = {"status": {"conditions": [no_gpu]}}
    assert pod_phase(unscheduled) == "waiting to be scheduled: 0/3 nodes have a free GPU"
    scheduled = {"type": "PodScheduled", "status": "True"}

    def waiting(reason):
        return {
            "status": {
                "conditions": [scheduled],
                "containerStatuses": [{"state": {"waiting": {"reason": reason}}}],
            }
        }

    pulling = waiting("ContainerCreating")
    assert pod_phase(pulling) == "pulling the image"
    running = {"status": {"conditions": [scheduled], "containerStatuses": [{"state": {"running": {}}}]}}
    assert pod_phase(running) == "engine loading the weights"
    crashing = waiting("CrashLoopBackOff")
    assert pod_phase(crashing) == "CrashLoopBackOff"
