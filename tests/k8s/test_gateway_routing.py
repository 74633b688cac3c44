"""The gateway with Kubernetes discovery routes to real llama-servers behind real Pod objects.

Pods are created on the real apiserver, bound to a node nobody runs (so their status is ours to
write), and given Ready status with loopback pod IPs where two real llama-servers listen on one port,
as replicas do on their pod IPs. API keys are labelled Secrets. `kubeinfer gateway` runs as its own
process with the control plane's kubeconfig, exactly as in a cluster but without a kubelet.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from kubernetes_asyncio import client

from kubeinfer import contract
from kubeinfer_devkit.devcluster.build import BuildError
from kubeinfer_devkit.engines.llamacpp import ensure_llama_server, vocab_gguf
from kubeinfer_devkit.engines.tinymodels import make_tiny_gguf
from tests.k8s_support import ensure_namespace, install_crd

NS = "gw-routing"
HOSTS = ("127.0.0.31", "127.0.0.32")  # pod IPs
MERGE = "application/merge-patch+json"


def _free_port_on(hosts: tuple[str, ...]) -> int:
    for _ in range(50):
        with socket.socket() as s:
            s.bind((hosts[0], 0))
            port = int(s.getsockname()[1])
        try:
            for host in hosts[1:]:
                with socket.socket() as s:
                    s.bind((host, port))
        except OSError:
            continue
        return port
    raise RuntimeError("no common free port")


def _wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{proc.args} exited:\n{log.read_text()[-2000:]}", pytrace=False)
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=1).status_code == 200:
                return
        time.sleep(0.2)
    pytest.fail(f"{url} not ready after {timeout}s:\n{log.read_text()[-2000:]}", pytrace=False)


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """Two real llama-servers on HOSTS, one port; yields the port."""
    try:
        binary = ensure_llama_server()
    except (BuildError, OSError) as exc:
        pytest.fail(f"cannot build llama-server (make llama-server): {exc}", pytrace=False)
    tmp = tmp_path_factory.mktemp("engines")
    gguf = make_tiny_gguf(tmp / "tiny.gguf", vocab_gguf(), seed=0)
    port = _free_port_on(HOSTS)
    procs = []
    try:
        for host in HOSTS:
            log = tmp / f"{host}.log"
            with log.open("wb") as out:
                procs.append(subprocess.Popen(
                    [str(binary), "-m", str(gguf), "--host", host, "--port", str(port), "--metrics",
                     "-c", "2048", "-np", "4"],
                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                ))  # fmt: skip
            _wait_http(f"http://{host}:{port}/health", procs[-1], log)
        yield port
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def _pod(name: str, port: int) -> dict:
    return {
        "metadata": {"name": name, "labels": {contract.LABEL_MODEL: "tiny",
                                              contract.LABEL_COMPONENT: contract.COMPONENT_MODEL_SERVER},
                     "annotations": {contract.ANNOTATION_PORT: str(port)}},
        "spec": {"nodeName": "no-such-node", "containers": [{"name": "engine", "image": "engine:test"}]},
    }  # fmt: skip


async def _set_ready(core: client.CoreV1Api, name: str, ip: str, ready: bool) -> None:
    condition = {"type": "Ready", "status": "True" if ready else "False"}
    status = {"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "conditions": [condition]}}
    await core.patch_namespaced_pod_status(name, NS, status)


def _key_secret(name: str, key: str, **annotations: str) -> dict:
    notes = {f"{contract.GROUP}/{k.replace('_', '-')}": v for k, v in annotations.items()}
    return {
        "metadata": {"name": name, "labels": {contract.LABEL_API_KEY: "true"}, "annotations": notes},
        "data": {contract.API_KEY_DATA: base64.b64encode(key.encode()).decode()},
    }  # fmt: skip


async def test_gateway_routes_discovered_pods_to_real_engines(k8s_api, control_plane, engines, tmp_path):
    await install_crd(k8s_api)
    await ensure_namespace(k8s_api, NS)
    objs, core = client.CustomObjectsApi(k8s_api), client.CoreV1Api(k8s_api)
    body = {"apiVersion": contract.API_VERSION, "kind": contract.KIND, "metadata": {"name": "tiny"},
            "spec": {"engine": "llama-server", "model": {"source": "o/m:Q8_0", "servedName": "tiny"},
                     "resources": {"gpus": 0}, "routing": {"strategy": "least-load"},
                     "pricing": {"promptPer1M": 1.0, "completionPer1M": 2.0}}}  # fmt: skip
    await objs.create_namespaced_custom_object(contract.GROUP, contract.VERSION, NS, contract.PLURAL, body)
    for i, host in enumerate(HOSTS):
        await core.create_namespaced_pod(NS, _pod(f"tiny-{i}", engines))
        await _set_ready(core, f"tiny-{i}", host, True)
    await core.create_namespaced_secret(
        NS, _key_secret("team-a", "sk-team-a", key_name="team-a", models="tiny")
    )
    await core.create_namespaced_secret(NS, _key_secret("ops", "sk-ops", admin="true"))

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path / "gateway.log"
    env = {**os.environ, "KUBECONFIG": str(control_plane.kubeconfig)}
    with log.open("wb") as out:
        gw = subprocess.Popen(
            [sys.executable, "-m", "kubeinfer.cli", "gateway", "--namespace", NS, "--keys-namespace", NS,
             "--auth", "keys", "--host", "127.0.0.1", "--port", str(port), "--scrape-interval", "0.5"],
            stdout=out, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_http(f"{url}/readyz", gw, log, timeout=30)
        chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20,
                "ignore_eos": True}  # fmt: skip
        auth = {"authorization": "Bearer sk-team-a"}
        async with httpx.AsyncClient(base_url=f"{url}/v1", timeout=60) as http:
            assert (await http.post("/chat/completions", json=chat)).status_code == 401
            results = await asyncio.gather(*(http.post("/chat/completions", json=chat, headers=auth)
                                             for _ in range(12)))  # fmt: skip
            assert [r.status_code for r in results] == [200] * 12, results[0].text
            spread = Counter(r.headers["x-kubeinfer-replica"] for r in results)
            assert set(spread) == {"tiny-0", "tiny-1"}, spread

            # A replica that turns unready stops getting requests within a second.
            await _set_ready(core, "tiny-1", HOSTS[1], False)
            await asyncio.sleep(1.0)
            after = await asyncio.gather(*(http.post("/chat/completions", json=chat, headers=auth)
                                           for _ in range(6)))  # fmt: skip
            assert {r.headers["x-kubeinfer-replica"] for r in after} == {"tiny-0"}

            # Key rotation: the Secret's new key works at once, the old one no longer does.
            patch = {"data": {contract.API_KEY_DATA: base64.b64encode(b"sk-rotated").decode()}}
            await core.patch_namespaced_secret("team-a", NS, patch)
            deadline = time.monotonic() + 5
            # Until the gateway's Secret watch has the change, the old key is served (and booked).
            before_rotation = 0
            while (old := await http.post("/chat/completions", json=chat, headers=auth)).status_code != 401:
                before_rotation += old.status_code == 200
                assert time.monotonic() < deadline, "the old key still works after rotation"
                await asyncio.sleep(0.1)
            rotated = await http.post(
                "/chat/completions", json=chat, headers={"authorization": "Bearer sk-rotated"}
            )
            assert rotated.status_code == 200

            rotated_auth = {"authorization": "Bearer sk-rotated"}
            assert (await http.get("/admin/usage", headers=rotated_auth)).status_code == 403  # not admin
            ops = {"authorization": "Bearer sk-ops"}
            usage = (await http.get("/admin/usage", headers=ops)).json()["data"]
            admin = {m["name"]: m for m in (await http.get("/admin/models", headers=ops)).json()["data"]}
        (row,) = [r for r in usage if r["key"] == "team-a"]
        assert row["requests"] == 12 + 6 + before_rotation + 1
        assert row["completionTokens"] == 20 * row["requests"]
        want_cost = (row["promptTokens"] * 1.0 + row["completionTokens"] * 2.0) / 1e6
        assert row["estimatedCost"] == pytest.approx(want_cost)
        model = admin[f"{NS}/tiny"] if f"{NS}/tiny" in admin else admin["tiny"]
        assert model["replicas"] == {"ready": 1, "total": 2}
        ready_stats = [r for r in model["replicaStats"] if r["ready"]]
        assert ready_stats[0]["running"] is not None  # the real /metrics was scraped
    finally:
        gw.terminate()
        gw.wait(timeout=10)
        await objs.delete_namespaced_custom_object(
            contract.GROUP, contract.VERSION, NS, contract.PLURAL, "tiny"
        )
        for i in range(len(HOSTS)):
            await core.delete_namespaced_pod(f"tiny-{i}", NS, grace_period_seconds=0)
        await core.delete_namespaced_secret("team-a", NS)
        await core.delete_namespaced_secret("ops", NS)
