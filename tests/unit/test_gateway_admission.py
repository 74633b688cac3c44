"""Admission: per-replica in-flight target, FIFO queue, 429 when full, 503 on timeout."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from kubeinfer.api.v1alpha1 import Routing
from kubeinfer.gateway.admission import ModelQueue, QueueFull, QueueTimeout
from kubeinfer.gateway.app import GatewaySettings, create_app, parse_duration
from kubeinfer.gateway.registry import ModelEntry, Registry
from kubeinfer.gateway.routing import Endpoint
from tests.httpx_upstream import mock_upstream

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


async def test_queue_is_fifo_and_wakes_on_release():
    q: ModelQueue[str] = ModelQueue()
    slots = {"free": 0}

    def try_admit():
        if slots["free"] > 0:
            slots["free"] -= 1
            return "replica"
        return None

    order = []

    async def waiter(i):
        await q.admit(try_admit, lambda: True, max_queue=10, timeout=5)
        order.append(i)

    tasks = [asyncio.create_task(waiter(i)) for i in range(3)]
    await asyncio.sleep(0.05)
    assert q.waiting == 3
    for _ in range(3):
        slots["free"] += 1
        q.wake()
        await asyncio.sleep(0.02)
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2]
    assert q.waiting == 0


async def test_queue_full_and_timeout():
    q: ModelQueue[str] = ModelQueue()
    blocked = asyncio.create_task(q.admit(lambda: None, lambda: True, max_queue=1, timeout=0.3))
    await asyncio.sleep(0.02)
    with pytest.raises(QueueFull):
        await q.admit(lambda: "x", lambda: True, max_queue=1, timeout=1)  # waiters first, even if free
    with pytest.raises(QueueTimeout) as info:
        await blocked
    assert info.value.had_replicas is True and info.value.waited >= 0.3


def test_parse_duration():
    assert parse_duration("30s") == 30 and parse_duration("1h30m") == 5400 and parse_duration("250ms") == 0.25


def _app(target_inflight: int, max_queue: int, delay: float, ready: bool = True, queue_timeout: str = "5s"):
    reg = Registry()
    reg.set_model(
        ModelEntry(
            name="m", served_name="m",
            routing=Routing(targetInflight=target_inflight, maxQueue=max_queue, queueTimeout=queue_timeout),
        ),
        [Endpoint(id="r0", address="10.0.0.1:8000", model="m", ready=ready)],
    )  # fmt: skip
    active = {"now": 0, "max": 0}

    async def engine(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/metrics":
            return httpx.Response(404)
        active["now"] += 1
        active["max"] = max(active["max"], active["now"])
        await asyncio.sleep(delay)
        active["now"] -= 1
        return httpx.Response(200, json={"object": "chat.completion", "choices": []})

    app = create_app(reg, GatewaySettings(scrape_interval=3600), upstream=mock_upstream(engine))
    return app, active


async def _post_many(app, n):
    async with app.router.router.lifespan_context(app.router):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
            return await asyncio.gather(*(c.post("/v1/chat/completions", json=CHAT) for _ in range(n)))


async def test_target_inflight_queues_the_rest_and_serves_all():
    app, active = _app(target_inflight=2, max_queue=10, delay=0.1)
    started = time.monotonic()
    responses = await _post_many(app, 6)
    assert [r.status_code for r in responses] == [200] * 6
    assert active["max"] == 2  # never more than the target on the replica
    assert time.monotonic() - started >= 0.29  # three waves of two


async def test_full_queue_is_429_with_retry_after():
    app, _ = _app(target_inflight=1, max_queue=1, delay=0.2)
    responses = await _post_many(app, 4)
    codes = sorted(r.status_code for r in responses)
    assert codes == [200, 200, 429, 429]
    refused = next(r for r in responses if r.status_code == 429)
    assert refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["code"] == "queue_full"


async def test_no_ready_replica_is_503_after_queue_timeout():
    app, _ = _app(target_inflight=1, max_queue=5, delay=0, ready=False, queue_timeout="300ms")
    started = time.monotonic()
    (r,) = await _post_many(app, 1)
    assert r.status_code == 503 and r.json()["error"]["code"] == "no_replica"
    assert 0.29 <= time.monotonic() - started < 2


async def test_busy_replicas_time_out_as_queue_timeout():
    app, _ = _app(target_inflight=1, max_queue=5, delay=0.5, queue_timeout="200ms")
    responses = await _post_many(app, 2)
    codes = sorted(r.status_code for r in responses)
    assert codes == [200, 503]
    assert next(r for r in responses if r.status_code == 503).json()["error"]["code"] == "queue_timeout"


async def test_retry_waits_for_a_busy_survivor_instead_of_failing():
    """Two replicas, one dead, targetInflight 1: a request bounced off the dead one waits for the
    survivor's slot (within its deadline) rather than answering 502."""
    reg = Registry()
    reg.set_model(
        ModelEntry(
            name="m", served_name="m", routing=Routing(targetInflight=1, maxQueue=10, queueTimeout="5s")
        ),
        [Endpoint(id="dead", address="10.0.0.9:8000", model="m"),
         Endpoint(id="live", address="10.0.0.1:8000", model="m")],
    )  # fmt: skip

    async def engine(request: httpx.Request) -> httpx.Response:
        if request.url.host == "10.0.0.9":
            raise httpx.ConnectError("refused", request=request)
        if request.url.path == "/metrics":
            return httpx.Response(404)
        await asyncio.sleep(0.1)
        return httpx.Response(200, json={"object": "chat.completion", "choices": []})

    app = create_app(reg, GatewaySettings(scrape_interval=3600), upstream=mock_upstream(engine))
    responses = await _post_many(app, 4)
    assert [r.status_code for r in responses] == [200] * 4, [r.text for r in responses]
    assert {r.headers["x-kubeinfer-replica"] for r in responses} == {"live"}
