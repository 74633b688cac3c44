"""Autoscaling on the local stack with the real llama-server: the first request scales a model up
from zero (a held stream hears how the start goes), sustained load scales it out, a scale-down under
load loses nothing, and an idle model goes back to zero.

Runs after test_local_stack.py (file order) on the same stack (the package fixture), with its own model. The
stack's operator runs the builtin autoscaler every 2 s over a 10 s window (docs/local-stack.md).
"""

from __future__ import annotations

import asyncio
import time

import httpx

from tests.e2e.support import TIMINGS, Load, LocalStack, wait_for

AUTO = "tiny-auto"
HELLO = [{"role": "user", "content": "Hello"}]
to_thread = asyncio.to_thread


def _apply_auto(stack: LocalStack, **autoscaling: object) -> None:
    settings = {"minReplicas": 0, "maxReplicas": 3, "targetInflightPerReplica": 2, "scaleDownDelay": "8s"}
    model = {"source": "pvc://kubeinfer-models/tiny-llama.gguf", "servedName": AUTO, "parameters": "4M",
             "architecture": {"layers": 2, "kvHeads": 2, "headDim": 16}}  # fmt: skip
    stack.apply(
        "tiny-gguf-cpu.yaml", name=AUTO, replicas=0, autoscaling={**settings, **autoscaling}, model=model
    )


def _replicas(stack: LocalStack) -> int:
    return int((stack.model(AUTO) or {}).get("spec", {}).get("replicas", -1))


def _listed_state(stack: LocalStack) -> str | None:
    data = httpx.get(f"{stack.gateway}/v1/models", timeout=10).json()["data"]
    return next((m["state"] for m in data if m["id"] == AUTO), None)


async def test_first_request_scales_from_zero_and_a_held_stream_hears_progress(stack: LocalStack) -> None:
    await to_thread(_apply_auto, stack)
    await to_thread(wait_for, lambda: _listed_state(stack) == "scaled-to-zero", 30, "listed at zero")
    assert await to_thread(stack.pods, AUTO) == []
    # The operator's status may trail the gateway's listing by a moment (it resumes every model after
    # the previous test's restart of the stack).
    await to_thread(
        wait_for,
        lambda: stack.condition(AUTO, "Ready").get("reason") == "ScaledToZero",
        30,
        "Ready=False ScaledToZero",
    )

    t0 = time.monotonic()
    comments: list[str] = []
    lines: list[str] = []
    first_token = None
    body = {"model": AUTO, "messages": HELLO, "max_tokens": 8, "stream": True}
    async with (
        httpx.AsyncClient(timeout=120, trust_env=False) as http,
        http.stream("POST", f"{stack.gateway}/v1/chat/completions", json=body) as r,
    ):
        assert r.status_code == 200
        async for line in r.aiter_lines():
            lines.append(line)
            if line.startswith(": kubeinfer:"):
                comments.append(line)
            elif line.startswith("data: {") and '"content"' in line and first_token is None:
                first_token = time.monotonic() - t0
    assert first_token is not None, lines[:20]
    TIMINGS["scale from zero: request -> first token, llama-server"] = first_token
    # The first line comes 0.5 s after the request; what it says depends on how far the start got by
    # then (scale-up requested, waiting for a pod, the pod's stage). Every line names the model.
    assert comments, lines[:20]
    assert all(c.startswith(f": kubeinfer: starting default/{AUTO} (") for c in comments), comments
    assert first_token <= 60, f"first token {first_token:.1f}s after the request at zero replicas"
    assert await to_thread(_replicas, stack) == 1


async def test_sustained_load_scales_out_then_a_scale_down_under_load_loses_nothing(
    stack: LocalStack,
) -> None:
    # 8 clients back to back; a replica takes 4 at once (maxNumSeqs), the rest queue: load ~8, target 2.
    async with Load(stack.gateway, AUTO, workers=8, max_tokens=64) as heavy:
        await heavy.wait_requests(10, timeout=120)
        t0 = time.monotonic()
        await to_thread(wait_for, lambda: _replicas(stack) == 3, 60, "scaled out to 3")
        TIMINGS["autoscale 1 -> 3 under load (decision)"] = time.monotonic() - t0
        await to_thread(stack.wait_serving, AUTO, 3, 120)
        await heavy.wait_requests(20, timeout=120)
    assert not heavy.failures(), heavy.failures()[:5]
    # Light load (1 client: load ~1, one replica is enough): the scale-down happens under traffic.
    async with Load(stack.gateway, AUTO, workers=1, max_tokens=32) as light:
        t1 = time.monotonic()
        await to_thread(wait_for, lambda: _replicas(stack) == 1, 120, "scaled in to 1 under light load")
        TIMINGS["autoscale 3 -> 1 after load fell (decision)"] = time.monotonic() - t1
        await to_thread(stack.wait_serving, AUTO, 1, 120)
        await light.wait_requests(5, timeout=60)
    assert not light.failures(), light.failures()[:5]
    assert len(light.succeeded(after=t1)) >= 5
    scaled = [e for e in await to_thread(stack.events) if e.get("reason") == "Scaled"
              and e.get("involvedObject", {}).get("name") == AUTO]  # fmt: skip
    assert any("-> 3" in e["message"] for e in scaled), [e["message"] for e in scaled]


async def test_idle_model_goes_back_to_zero(stack: LocalStack) -> None:
    t0 = time.monotonic()
    await to_thread(wait_for, lambda: _replicas(stack) == 0, 120, "scaled to zero when idle")
    TIMINGS["idle -> zero replicas (scaleDownDelay 8s, window 10s)"] = time.monotonic() - t0
    await to_thread(wait_for, lambda: not stack.pods(AUTO), 120, "every pod of the idle model gone")
    await to_thread(
        wait_for,
        lambda: stack.condition(AUTO, "Ready").get("reason") == "ScaledToZero",
        30,
        "Ready=False ScaledToZero",
    )
    ready = await to_thread(stack.condition, AUTO, "Ready")
    assert ready["status"] == "False", ready
    degraded = await to_thread(stack.condition, AUTO, "Degraded")
    assert degraded["status"] == "False", degraded
    # The gateway's listing follows its own watch of the pods, which may trail the operator's status.
    await to_thread(wait_for, lambda: _listed_state(stack) == "scaled-to-zero", 30, "listed at zero again")
    auto = (await to_thread(stack.model, AUTO))["status"]["autoscaling"]
    assert auto["lastScaleReason"].endswith("-> 0"), auto
    # And back once more, a plain request this time.
    r = await asyncio.to_thread(
        httpx.post, f"{stack.gateway}/v1/chat/completions",
        json={"model": AUTO, "messages": HELLO, "max_tokens": 8}, timeout=120,
    )  # fmt: skip
    assert r.status_code == 200, r.text
    await to_thread(stack.kubectl, "delete", "llm", AUTO, "--wait=false")
