"""Discovery's pure parts: LLMModel -> model entry, pod -> replica, and the registry updates."""

from __future__ import annotations

import copy

from kubeinfer import contract
from kubeinfer.gateway.discovery import Discovery, endpoint_from_pod, entry_from_model
from kubeinfer.gateway.registry import Registry

MODEL = {
    "metadata": {"name": "llama", "namespace": "ml"},
    "spec": {"engine": "vllm", "model": {"source": "hf://o/m", "servedName": "meta/llama", "aliases": ["l8"]},
             "modalities": ["text", "image"], "maxNumSeqs": 16, "routing": {"strategy": "prefix-aware"}},
}  # fmt: skip


def pod(name, ip="10.1.0.5", ready=True, model="llama", deleting=False):
    p = {
        "metadata": {"name": name, "namespace": "ml", "labels": {contract.LABEL_MODEL: model},
                     "annotations": {contract.ANNOTATION_PORT: "8000"}},
        "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]},
    }  # fmt: skip
    if deleting:
        p["metadata"]["deletionTimestamp"] = "2026-11-22T00:00:00Z"
    return p


def test_entry_from_model():
    e = entry_from_model(MODEL)
    assert (e.name, e.served_name, e.aliases, e.engine) == ("llama", "meta/llama", ("l8",), "vllm")
    assert e.accepts_images and e.routing.strategy == "prefix-aware" and e.target_inflight == 16


def test_endpoint_from_pod_readiness():
    assert endpoint_from_pod(pod("p1"))[1].ready
    assert endpoint_from_pod(pod("p1"))[1].address == "10.1.0.5:8000"
    assert not endpoint_from_pod(pod("p1", ready=False))[1].ready
    assert not endpoint_from_pod(pod("p1", ip=None))[1].ready
    assert not endpoint_from_pod(pod("p1", deleting=True))[1].ready
    assert endpoint_from_pod(pod("p1", ip="fd00::5"))[1].address == "[fd00::5]:8000"
    assert endpoint_from_pod({"metadata": {"name": "x", "labels": {}}}) is None


def test_registry_follows_events():
    reg = Registry()
    d = Discovery(api=None, registry=reg)  # type: ignore[arg-type]
    d.on_pod("ADDED", pod("p1"))  # a pod may arrive before its model
    assert reg.resolve("meta/llama") is None
    d.on_model("ADDED", MODEL)
    assert reg.resolve("l8").name == "ml/llama"
    assert [e.id for e in reg.ready_endpoints("ml/llama")] == ["p1"]
    d.on_pod("ADDED", pod("p2", ip="10.1.0.6"))
    d.on_pod("MODIFIED", pod("p1", ready=False))
    assert [e.id for e in reg.ready_endpoints("ml/llama")] == ["p2"]
    d.on_pod("DELETED", pod("p2", ip="10.1.0.6"))
    assert reg.ready_endpoints("ml/llama") == [] and reg.listed() == []
    renamed = copy.deepcopy(MODEL)
    renamed["spec"]["model"]["servedName"] = "meta/llama-v2"
    d.on_model("MODIFIED", renamed)
    assert reg.resolve("meta/llama") is None and reg.resolve("meta/llama-v2") is not None
    d.on_model("DELETED", renamed)
    assert reg.resolve("meta/llama-v2") is None


def test_entry_carries_pricing_remote_apis_and_fit_estimate():
    from kubeinfer.gateway.discovery import entry_from_model

    body = {
        "metadata": {"name": "r"},
        "spec": {"model": {"servedName": "r"}, "pricing": {"promptPer1M": 1, "completionPer1M": 3},
                 "remote": {"baseURL": "https://x/v1", "model": "m",
                            "nativeAPIs": ["chat/completions", "responses"]}},
        "status": {"estimate": {"totalGiB": 11.9, "fits": True}},
    }  # fmt: skip
    entry = entry_from_model(body)
    assert entry.cost(1_000_000, 1_000_000) == 4.0
    assert entry.remote is not None and entry.remote.native_apis == frozenset(
        {"chat/completions", "responses"}
    )
    assert entry.estimate == {"totalGiB": 11.9, "fits": True}
    assert entry_from_model({"metadata": {"name": "p"}, "spec": {"model": {}}}).estimate is None
