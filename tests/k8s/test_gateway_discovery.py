"""Gateway discovery against the real apiserver: models and pods are watched, and a replica joins or
leaves the registry within a second of its readiness changing."""

from __future__ import annotations

import asyncio
import time

import pytest
from kubernetes_asyncio import client

from kubeinfer import contract
from kubeinfer.gateway.discovery import Discovery
from kubeinfer.gateway.registry import Registry
from tests.k8s_support import ensure_namespace, install_crd

NS = "gw-discovery"
MERGE = "application/merge-patch+json"  # the client would send a dict as json-patch


def _pod(name: str, model: str) -> dict:
    return {
        "metadata": {"name": name, "labels": {contract.LABEL_MODEL: model,
                                              contract.LABEL_COMPONENT: contract.COMPONENT_MODEL_SERVER},
                     "annotations": {contract.ANNOTATION_PORT: "8000"}},
        # Bound to a node no kubelet (or kwok) manages, so the status is ours to write.
        "spec": {"nodeName": "no-such-node", "containers": [{"name": "engine", "image": "engine:test"}]},
    }  # fmt: skip


async def _set_ready(core, name: str, ready: bool, ip: str = "127.0.0.2") -> float:
    condition = {"type": "Ready", "status": "True" if ready else "False"}
    status = {"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "conditions": [condition]}}
    await core.patch_namespaced_pod_status(name, NS, status)
    return time.monotonic()


async def _until(predicate, timeout: float = 5.0) -> float:
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            pytest.fail("condition not reached")
        await asyncio.sleep(0.01)
    return time.monotonic()


async def test_replicas_follow_pod_readiness(k8s_api):
    await install_crd(k8s_api)
    await ensure_namespace(k8s_api, NS)
    objs, core = client.CustomObjectsApi(k8s_api), client.CoreV1Api(k8s_api)
    model = {"source": "o/m:Q8_0", "servedName": "disc-model", "aliases": ["dm"]}
    body = {"apiVersion": contract.API_VERSION, "kind": contract.KIND, "metadata": {"name": "disc"},
            "spec": {"engine": "llama-server", "model": model, "resources": {"gpus": 0}}}  # fmt: skip
    await objs.create_namespaced_custom_object(contract.GROUP, contract.VERSION, NS, contract.PLURAL, body)
    await core.create_namespaced_pod(NS, _pod("disc-a", "disc"))
    await core.create_namespaced_pod(NS, _pod("disc-b", "disc"))

    reg = Registry()
    disc = Discovery(k8s_api, reg, namespace=NS)
    task = asyncio.create_task(disc.run())
    try:
        await asyncio.wait_for(disc.synced.wait(), 10)
        assert reg.resolve("dm") is not None and reg.ready_endpoints("disc") == []

        changed = await _set_ready(core, "disc-a", True)
        seen = await _until(lambda: [e.id for e in reg.ready_endpoints("disc")] == ["disc-a"])
        assert seen - changed < 1.0
        assert reg.ready_endpoints("disc")[0].address == "127.0.0.2:8000"

        await _set_ready(core, "disc-b", True, ip="127.0.0.3")
        await _until(lambda: len(reg.ready_endpoints("disc")) == 2)

        changed = await _set_ready(core, "disc-a", False)
        seen = await _until(lambda: [e.id for e in reg.ready_endpoints("disc")] == ["disc-b"])
        assert seen - changed < 1.0

        await objs.patch_namespaced_custom_object(
            contract.GROUP, contract.VERSION, NS, contract.PLURAL, "disc",
            {"spec": {"model": {"servedName": "disc-renamed"}}}, _content_type=MERGE,
        )  # fmt: skip
        await _until(lambda: reg.resolve("disc-renamed") is not None and reg.resolve("disc-model") is None)

        deleted = time.monotonic()
        await objs.delete_namespaced_custom_object(
            contract.GROUP, contract.VERSION, NS, contract.PLURAL, "disc"
        )
        gone = await _until(lambda: reg.resolve("disc-renamed") is None)
        assert gone - deleted < 2.0
    finally:
        task.cancel()
        for name in ("disc-a", "disc-b"):
            await core.delete_namespaced_pod(name, NS, grace_period_seconds=0)


async def test_remote_model_gets_its_key_from_the_secret(k8s_api):
    await install_crd(k8s_api)
    await ensure_namespace(k8s_api, NS)
    objs, core = client.CustomObjectsApi(k8s_api), client.CoreV1Api(k8s_api)
    await core.create_namespaced_secret(
        NS, {"metadata": {"name": "upstream"}, "stringData": {"api-key": "sk-up"}}
    )
    remote = {
        "baseURL": "https://api.example.com/v1",
        "model": "large",
        "apiKeySecretRef": {"name": "upstream", "key": "api-key"},
    }
    body = {"apiVersion": contract.API_VERSION, "kind": contract.KIND, "metadata": {"name": "rem"},
            "spec": {"model": {"servedName": "remote/large"}, "remote": remote}}  # fmt: skip
    await objs.create_namespaced_custom_object(contract.GROUP, contract.VERSION, NS, contract.PLURAL, body)
    reg = Registry()
    disc = Discovery(k8s_api, reg, namespace=NS)
    task = asyncio.create_task(disc.run())
    try:
        await _until(lambda: (e := reg.resolve("remote/large")) is not None and e.remote.api_key == "sk-up")
        assert [e.id for e in reg.ready_endpoints("rem")] == ["remote:rem"]
    finally:
        task.cancel()
        await objs.delete_namespaced_custom_object(
            contract.GROUP, contract.VERSION, NS, contract.PLURAL, "rem"
        )
