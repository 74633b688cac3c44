"""The local stack end to end: `kubectl apply` -> a real engine answering through the gateway, then
scaling, a rolling update, a killed replica, restarts of every kubeinfer process, and `down`/`up`.

The tests run in file order on one stack (the package fixture) and each sets up the replicas it
needs. Load runs through the gateway with no client retries, so every failed request shows.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from typing import Any

import httpx

from kubeinfer import contract
from kubeinfer_devkit.devcluster import procs
from tests.e2e.conftest import start_stack
from tests.e2e.support import (
    EXAMPLES,
    TIMINGS,
    Load,
    LocalStack,
    engine_pid,
    is_ready,
    stream_chat,
    wait_for,
)

GGUF, VLLM = "tiny-gguf", "tiny-vllm"
HELLO = [{"role": "user", "content": "Hello"}]
to_thread = asyncio.to_thread  # blocking calls (kubectl, API polls) off the loop the load runs on


def first_token(stack: LocalStack, model: str, t0: float, timeout: float) -> float:
    """Seconds from t0 until a streamed chat completion through the gateway yields content (openai
    SDK). Before that the gateway answers 404 (model not yet known), or holds the stream while the
    replica starts and, past queueTimeout, ends it with an error event (APIError)."""
    import openai

    client = stack.openai()
    last: Exception | None = None
    while time.monotonic() - t0 < timeout:
        try:
            for chunk in client.chat.completions.create(
                model=model, messages=HELLO, max_tokens=8, stream=True
            ):
                if chunk.choices and chunk.choices[0].delta.content:
                    return time.monotonic() - t0
        except openai.APIError as exc:  # 404, 503, a held stream's error event, a refused connection
            last = exc
        time.sleep(0.2)
    raise AssertionError(f"no token from {model} within {timeout:.0f}s (last: {last!r})")


def ensure_gguf(stack: LocalStack, replicas: int) -> list[dict[str, Any]]:
    """tiny-gguf applied (if it is not there) and scaled to `replicas` serving pods."""
    if stack.model(GGUF) is None:
        stack.kubectl("apply", "-f", str(EXAMPLES / "tiny-gguf-cpu.yaml"))
    stack.scale(GGUF, replicas)
    pods: list[dict[str, Any]] = stack.wait_serving(GGUF, replicas, timeout=120)
    wait_for(
        lambda: sum(r["ready"] for r in stack.gateway_replicas(GGUF)) == replicas,
        10,
        "the gateway's replicas",
    )
    return pods


def test_apply_to_first_token_llama_server(stack: LocalStack) -> None:
    t0 = time.monotonic()
    stack.kubectl("apply", "-f", str(EXAMPLES / "tiny-gguf-cpu.yaml"))
    took = first_token(stack, GGUF, t0, timeout=120)
    TIMINGS["apply -> first token, llama-server"] = took
    # The operator writes Ready when it sees the Deployment's ready count, which can trail the
    # gateway's pod watch by a moment on a busy machine.
    wait_for(lambda: stack.condition(GGUF, "Ready")["status"] == "True", 30, "Ready=True")
    raw = stack.openai().chat.completions.with_raw_response.create(model=GGUF, messages=HELLO, max_tokens=8)
    assert raw.headers["x-kubeinfer-replica"].startswith(f"{contract.child_name(GGUF)}-")
    assert raw.parse().choices[0].message.content
    assert took <= 30, f"apply -> first token took {took:.1f}s (goal: 30 s)"


def test_apply_to_first_token_vllm(stack: LocalStack) -> None:
    t0 = time.monotonic()
    stack.kubectl("apply", "-f", str(EXAMPLES / "tiny-vllm-cpu.yaml"))
    try:
        took = first_token(stack, VLLM, t0, timeout=420)
        TIMINGS["apply -> first token, vLLM"] = took
        pod = stack.serving(VLLM)[0]
        env = pod["spec"]["containers"][0].get("env") or []
        assert "VLLM_CPU_KVCACHE_SPACE" not in {e["name"] for e in env}  # it would override the cache size
        out = stack.openai().chat.completions.create(model=VLLM, messages=HELLO, max_tokens=8)
        assert out.choices[0].message.content and out.model == VLLM
    finally:
        stack.kubectl("delete", "llm", VLLM, "--wait=false")
        wait_for(lambda: not stack.pods(VLLM), 120, "the vLLM pod gone (preStop sleep + shutdown)")


async def test_scale_out_spreads_traffic(stack: LocalStack) -> None:
    names = {p["metadata"]["name"] for p in await to_thread(ensure_gguf, stack, 3)}
    seen: Counter[str] = Counter()
    body = {"model": GGUF, "messages": HELLO, "max_tokens": 16}
    async with httpx.AsyncClient(timeout=60) as http:

        async def worker() -> None:
            for _ in range(10):
                r = await http.post(f"{stack.gateway}/v1/chat/completions", json=body)
                assert r.status_code == 200, r.text
                seen[r.headers["x-kubeinfer-replica"]] += 1

        await asyncio.gather(*(worker() for _ in range(6)))
    assert set(seen) == names, seen


async def test_scale_in_under_load(stack: LocalStack) -> None:
    await to_thread(ensure_gguf, stack, 3)
    async with Load(stack.gateway, GGUF, workers=4) as load:
        await load.wait_requests(20)
        t0 = time.monotonic()
        await to_thread(stack.scale, GGUF, 1)
        await to_thread(stack.wait_serving, GGUF, 1, 90)
        TIMINGS["scale 3 -> 1 under load (old pods gone)"] = time.monotonic() - t0
        await load.wait_requests(20)
    assert not load.failures(), load.failures()[:5]
    assert len(load.succeeded(after=t0)) >= 20


async def test_rolling_update_under_load(stack: LocalStack) -> None:
    before = await to_thread(ensure_gguf, stack, 2)
    old = {p["metadata"]["name"] for p in before}
    old_hash = before[0]["metadata"]["labels"][contract.LABEL_SPEC_HASH]

    def rolled() -> list[dict[str, Any]] | None:
        pods = stack.pods(GGUF)
        new = [p for p in pods if p["metadata"]["labels"][contract.LABEL_SPEC_HASH] != old_hash]
        done = len(pods) == 2 and len(new) == 2 and all(is_ready(p) for p in new)
        return new if done else None

    async with Load(stack.gateway, GGUF, workers=4) as load:
        await load.wait_requests(20)
        t0 = time.monotonic()
        patch = json.dumps({"spec": {"maxModelLen": 1024}})
        await to_thread(stack.kubectl, "patch", "llm", GGUF, "--type", "merge", "-p", patch)
        new = await to_thread(wait_for, rolled, 180, "the rollout to two new pods (old ones gone)")
        TIMINGS["rolling update of 2 replicas under load"] = time.monotonic() - t0
        await load.wait_requests(20)
    assert not load.failures(), load.failures()[:5]
    served = {o.replica for o in load.succeeded(after=t0)}
    assert {p["metadata"]["name"] for p in new} <= served and served & old
    args = new[0]["spec"]["containers"][0]["args"]
    assert args[args.index("-c") + 1] == "4096"  # maxModelLen 1024 x 4 slots
    wait_for(
        lambda: stack.condition(GGUF, "Progressing").get("reason") == "Complete", 30, "Progressing=Complete"
    )


async def test_killed_replica_under_load(stack: LocalStack) -> None:
    pods = await to_thread(ensure_gguf, stack, 2)
    victim, killed_at = "", 0.0

    async with Load(stack.gateway, GGUF, workers=2) as load:
        await load.wait_requests(20)
        # The tiny model can produce all 400 tokens before the first chunk reaches us, and then the
        # kill lands after the stream is complete: that round tests nothing, so it is tried again
        # (at most 3 times) once the killed replica is back.
        for _attempt in range(3):
            pods = await to_thread(stack.serving, GGUF)
            pids = {p["metadata"]["name"]: engine_pid(p) for p in pods}
            restarts = {
                p["metadata"]["name"]: p["status"]["containerStatuses"][0]["restartCount"] for p in pods
            }

            def kill_its_replica(replica: str | None, pids: dict[str, int] = pids) -> None:
                # The first chunk of the stream has arrived: the replica serving it dies now, mid-stream.
                nonlocal victim, killed_at
                assert replica in pids, replica
                os.kill(pids[replica], signal.SIGKILL)
                victim, killed_at = replica, time.monotonic()

            async with httpx.AsyncClient(timeout=60) as http:
                cut = await stream_chat(http, stack.gateway, GGUF, 400, on_first=kill_its_replica)
                after = await stream_chat(http, stack.gateway, GGUF, 16)  # the next one is served

            def back(restarts: dict[str, int] = restarts) -> bool:
                pod = next((p for p in stack.pods(GGUF) if p["metadata"]["name"] == victim), None)
                cs = (pod or {}).get("status", {}).get("containerStatuses") or [{}]
                return bool(pod and is_ready(pod) and cs[0].get("restartCount") == restarts[victim] + 1)

            await to_thread(
                wait_for, back, 60, f"{victim} Ready again with restartCount {restarts[victim] + 1}"
            )
            TIMINGS["killed replica Ready again"] = time.monotonic() - killed_at
            await load.wait_requests(20)
            if not cut.done:
                break
    assert cut.replica == victim and cut.status == 200
    assert cut.error is not None and cut.error.get("code") == "stream_interrupted" and not cut.done, cut
    assert after.done and after.error is None, after
    assert not load.failures(), load.failures()[:5]
    pod = next(p for p in stack.pods(GGUF) if p["metadata"]["name"] == victim)
    last = pod["status"]["containerStatuses"][0]["lastState"]["terminated"]
    assert last["exitCode"] == 137 and engine_pid(pod) != pids[victim]
    # kubectl logs reaches the node agent's log files through the apiserver, as for a kubelet.
    ip = pod["status"]["podIP"]
    assert f"listening on http://{ip}:8000" in stack.kubectl("logs", victim).stdout
    assert "llama_server" in stack.kubectl("logs", victim, "--previous").stdout


def _snapshot(stack: LocalStack) -> dict[str, Any]:
    deploy = stack.api(f"/apis/apps/v1/namespaces/default/deployments/{contract.child_name(GGUF)}")
    sets = stack.api("/apis/apps/v1/namespaces/default/replicasets")["items"]
    return {
        "deployment": (deploy["metadata"]["uid"], deploy["metadata"]["generation"]),
        "replicasets": sorted(
            r["metadata"]["name"] for r in sets if r["metadata"]["name"].startswith("llm-")
        ),
        "pods": sorted(p["metadata"]["uid"] for p in stack.pods(GGUF)),
        "deployments": len(stack.api("/apis/apps/v1/namespaces/default/deployments")["items"]),
    }


async def test_operator_then_gateway_restart_under_load(stack: LocalStack) -> None:
    await to_thread(ensure_gguf, stack, 2)
    before = await to_thread(_snapshot, stack)

    def restarted(component: str, old: int) -> bool:
        p = stack.info["processes"].get(component) or {}
        return bool(p) and p["pid"] != old and procs.alive(p["pid"], p.get("ticks"))

    async with Load(stack.gateway, GGUF, workers=3) as load:
        await load.wait_requests(20)
        t0 = time.monotonic()
        old = stack.pid("operator")
        os.kill(old, signal.SIGTERM)
        await to_thread(wait_for, lambda: restarted("operator", old), 60, "the operator restarted")
        await asyncio.sleep(3)  # it resumes every model on start (kopf on.resume)
        await load.wait_requests(20)
        assert not load.failures(), load.failures()[:5]  # the operator is not on the request path

        old = stack.pid("gateway")
        gateway_down = time.monotonic()
        os.kill(old, signal.SIGTERM)
        await to_thread(wait_for, lambda: restarted("gateway", old), 60, "the gateway restarted")
        await to_thread(
            wait_for, lambda: httpx.get(f"{stack.gateway}/readyz", timeout=2).status_code == 200, 60, "readyz"
        )
        gateway_back = time.monotonic()
        await load.wait_requests(30)
    TIMINGS["gateway restart: requests refused for"] = gateway_back - gateway_down
    late = load.failures(after=gateway_back)
    assert not late, late[:5]  # service resumed
    assert not load.failures(before=gateway_down), load.failures(before=gateway_down)[:5]
    assert len(load.succeeded(after=gateway_back)) >= 30
    after = await to_thread(_snapshot, stack)
    assert after == before  # nothing re-created, duplicated or rolled
    replicas = await to_thread(stack.gateway_replicas, GGUF)
    assert sorted(r["id"] for r in replicas) == sorted(p["metadata"]["name"] for p in stack.pods(GGUF))
    assert time.monotonic() - t0 < 120


CANNOT_RUN = """
apiVersion: kubeinfer.io/v1alpha1
kind: LLMModel
metadata: {name: needs-gpu}
spec:
  engine: llama-server
  model: {source: "pvc://kubeinfer-models/tiny-llama.gguf", parameters: 4M}
  maxModelLen: 512
  resources: {gpus: 1}
---
apiVersion: kubeinfer.io/v1alpha1
kind: LLMModel
metadata: {name: custom-image}
spec:
  engine: llama-server
  image: example.invalid/custom-engine:1
  model: {source: "pvc://kubeinfer-models/tiny-llama.gguf", parameters: 4M}
  maxModelLen: 512
  resources: {gpus: 0, cpu: 50m}
---
apiVersion: kubeinfer.io/v1alpha1
kind: LLMModel
metadata: {name: marlin-on-cpu}
spec:
  model: {source: "pvc://kubeinfer-models/tiny-llama-hf", parameters: 5M}
  quantization: {method: awq_marlin}
  maxModelLen: 512
  resources: {gpus: 0, cpu: 50m}
"""


BOUND_GPU_POD = """
apiVersion: v1
kind: Pod
metadata: {name: bound-gpu}
spec:
  nodeName: kubeinfer-local
  containers:
  - {name: engine, image: "kubeinfer/llama-server:b11434-cuda", resources: {limits: {nvidia.com/gpu: "1"}}}
"""


def test_pods_that_cannot_run_here_say_why(stack: LocalStack) -> None:
    stack.kubectl("apply", "-f", "-", input=CANNOT_RUN + "---" + BOUND_GPU_POD)
    try:

        def pod_of(model: str) -> dict[str, Any] | None:
            pods = stack.pods(model)
            return pods[0] if pods else None

        def waiting(model: str, reason: str) -> dict[str, Any] | None:
            pod = pod_of(model)
            for cs in ((pod or {}).get("status") or {}).get("containerStatuses") or []:
                w = cs["state"].get("waiting") or {}
                if w.get("reason") == reason:
                    return dict(w)
            return None

        # Asks for a GPU: the scheduler keeps it Pending (the node has nvidia.com/gpu: 0).
        def unschedulable() -> str | None:
            conds = ((pod_of("needs-gpu") or {}).get("status") or {}).get("conditions") or []
            c = next((c for c in conds if c["type"] == "PodScheduled"), {})
            return c.get("message") if c.get("reason") == "Unschedulable" else None

        message = wait_for(unschedulable, 60, "needs-gpu Unschedulable")
        assert "Insufficient nvidia.com/gpu" in message
        # Bound to the node by name, past the scheduler: rejected as the kubelet would.
        bound = wait_for(lambda: (p := stack.api("/api/v1/namespaces/default/pods/bound-gpu"))
                         and p["status"].get("phase") == "Failed" and p, 30, "bound-gpu Failed")  # fmt: skip
        assert bound["status"]["reason"] == "OutOfnvidia.com/gpu"
        # An image the node agent has no local program for, and a GPU-only vLLM quantization.
        image = wait_for(lambda: waiting("custom-image", "CreateContainerError"), 60, "custom-image waiting")
        assert (
            "example.invalid/custom-engine:1" in image["message"]
            and "no container runtime" in image["message"]
        )
        marlin = wait_for(
            lambda: waiting("marlin-on-cpu", "CreateContainerError"), 60, "marlin-on-cpu waiting"
        )
        assert "awq_marlin" in marlin["message"] and "GPU kernels only" in marlin["message"]
        # Each says so in a Warning Event (kubectl describe pod) and in the model's Degraded condition.
        for model, text in (("custom-image", "no container runtime"), ("marlin-on-cpu", "GPU kernels only")):
            pod_name = pod_of(model)["metadata"]["name"]  # type: ignore[index]

            def warned(pod: str = pod_name, text: str = text) -> list[dict[str, Any]]:
                return [e for e in stack.events() if e["involvedObject"]["name"] == pod
                        and e["type"] == "Warning" and text in e["message"]]  # fmt: skip

            # The node agent writes the Event and the pod's status separately, at about the same time:
            # the waiting state seen above does not mean the Event is there yet.
            wait_for(warned, 30, f"a Warning event for {pod_name}")
            described = stack.kubectl("describe", "pod", pod_name).stdout
            assert "CreateContainerError" in described and text in described
        for model, text in (
            ("needs-gpu", "Insufficient nvidia.com/gpu"),
            ("custom-image", "CreateContainerError"),
        ):
            degraded = wait_for(
                lambda m=model, t=text: (c := stack.condition(m, "Degraded")).get("status") == "True"
                and t in c.get("message", "") and c,
                40, f"{model} Degraded",
            )  # fmt: skip
            assert degraded["reason"] == "ReplicasFailing"
    finally:
        stack.kubectl("delete", "-f", "-", "--wait=false", input=CANNOT_RUN + "---" + BOUND_GPU_POD)


def test_deleted_model_is_gone_from_the_gateway_within_2s(stack: LocalStack) -> None:
    pods = ensure_gguf(stack, 1)
    pid = engine_pid(pods[0])
    body = {"model": GGUF, "messages": HELLO, "max_tokens": 4}
    with httpx.Client(timeout=30) as http:
        assert http.post(f"{stack.gateway}/v1/chat/completions", json=body).status_code == 200
        t0 = time.monotonic()
        stack.kubectl("delete", "llm", GGUF, "--wait=false")
        while True:
            r = http.post(f"{stack.gateway}/v1/chat/completions", json=body)
            if r.status_code == 404:
                break
            assert time.monotonic() - t0 < 5, "the gateway still serves a deleted model"
            time.sleep(0.05)
    took = time.monotonic() - t0
    TIMINGS["model deleted -> gateway 404"] = took
    assert r.json()["error"]["code"] == "model_not_found"
    assert took <= 2.0, f"404 only {took:.2f}s after the delete"
    wait_for(lambda: not stack.pods(GGUF), 60, "the model's pods deleted")
    assert not procs.alive(pid, None), "the engine process outlived its pod"


def test_node_agent_restart_restarts_its_pods(stack: LocalStack) -> None:
    pod = ensure_gguf(stack, 1)[0]
    pid, name = engine_pid(pod), pod["metadata"]["name"]
    restarts = pod["status"]["containerStatuses"][0]["restartCount"]
    t0 = time.monotonic()
    os.kill(stack.pid("node-agent"), signal.SIGKILL)
    wait_for(lambda: not procs.alive(pid, None), 10, "the engine died with its node agent")

    def running_again() -> bool:
        p = next((p for p in stack.pods(GGUF) if p["metadata"]["name"] == name), None)
        cs = ((p or {}).get("status") or {}).get("containerStatuses") or [{}]
        return bool(p and is_ready(p) and cs[0].get("restartCount") == restarts + 1)

    wait_for(running_again, 90, f"{name} running again with restartCount {restarts + 1}")
    TIMINGS["node agent killed -> its pod Ready again"] = time.monotonic() - t0
    first_token(stack, GGUF, time.monotonic(), timeout=30)


def _kubeinfer(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kubeinfer.cli", *args], capture_output=True, text=True, timeout=900
    )


def test_up_again_then_down_then_up(stack: LocalStack) -> None:
    ensure_gguf(stack, 1)
    again = _kubeinfer("up", "--state-dir", str(stack.root), "-f", str(EXAMPLES / "tiny-gguf-cpu.yaml"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already running" in again.stderr
    assert f"{GGUF} (replica " in again.stdout and "apply -> first token" in again.stdout

    recorded = dict(stack.info["processes"])
    engines = [engine_pid(p) for p in stack.pods(GGUF)]
    t0 = time.monotonic()
    down = _kubeinfer("down", "--state-dir", str(stack.root))
    TIMINGS["kubeinfer down"] = time.monotonic() - t0
    assert down.returncode == 0, down.stderr[-3000:]
    still = [n for n, p in recorded.items() if procs.alive(p["pid"], p["ticks"])]
    still += [f"engine {pid}" for pid in engines if procs.alive(pid, None)]
    assert not still, f"left running after down: {still}"
    assert stack.info["status"] == "stopped"

    t0 = time.monotonic()
    out, watchdog = start_stack(stack.root)
    if stack.watchdog is not None:
        stack.watchdog.kill()
        stack.watchdog.wait()
    stack.watchdog = watchdog
    assert out.returncode == 0, out.stderr[-6000:]
    TIMINGS["kubeinfer up (warm: state and binaries kept)"] = time.monotonic() - t0
    stack._load_kubeconfig()
    # The model applied before `down` is still there (etcd kept) and serves again.
    took = first_token(stack, GGUF, time.monotonic(), timeout=120)
    TIMINGS["after up: first token of the kept model"] = took
    wait_for(lambda: stack.condition(GGUF, "Ready")["status"] == "True", 30, "Ready=True")
