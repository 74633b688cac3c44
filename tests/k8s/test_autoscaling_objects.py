"""autoscaling.mode hpa / keda on a real kube-apiserver: the objects the reconciler applies are accepted,
read back unchanged, target the LLMModel through its scale subresource, and go when the mode changes.

The reconciler (kubeinfer.operator.reconcile.reconcile) runs in-process against the apiserver, the
same call the operator makes on every pass, so these tests need no operator process. The
kube-controller-manager of the test control plane runs the HPA controller: it proves that an
HorizontalPodAutoscaler aimed at an LLMModel can read its scale subresource (no metrics adapter runs,
so it then fails to read the external metric, which is expected).

KEDA itself is not run: its ScaledObject CRD (from KEDA's Go module, see keda_crd in
kubeinfer_devkit.devcluster.build) is installed to check that the rendered ScaledObject is
schema-valid. Before that CRD is installed, a keda model must report that KEDA is missing.
"""

from __future__ import annotations

import asyncio
import copy
import json
from typing import Any

import pytest
import yaml
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from kubeinfer import contract, kube
from kubeinfer.operator.reconcile import LAST_HANDLED, drifted, parse_body, reconcile
from kubeinfer.render.config import load_config
from kubeinfer.render.manifests import render
from kubeinfer_devkit.devcluster.build import BuildError, keda_crd
from tests.cases import ROOT, load_example
from tests.k8s_support import install_crd

CONFIG = load_config()
KEDA_CRD = "scaledobjects.keda.sh"
G, V, P = contract.GROUP, contract.VERSION, contract.PLURAL


def _doc(name: str, namespace: str, **autoscaling: Any) -> dict[str, Any]:
    # A tiny CPU model (it fits any node); its pods need not start for these tests.
    doc = load_example(ROOT / "examples" / "tiny-vllm-cpu.yaml")
    doc["metadata"] = {"name": name, "namespace": namespace}
    doc["spec"]["autoscaling"] = {
        "minReplicas": 1, "maxReplicas": 3, "targetInflightPerReplica": 4, "scaleDownDelay": "90s",
        **autoscaling,
    }  # fmt: skip
    return doc


async def _create(api: client.ApiClient, doc: dict[str, Any]) -> dict[str, Any]:
    await install_crd(api)
    await kube.create_model(api, doc["metadata"]["namespace"], doc)
    body = await kube.get_model(api, doc["metadata"]["namespace"], doc["metadata"]["name"])
    assert body is not None
    return body


async def _set_mode(api: client.ApiClient, body: dict[str, Any], mode: str, **more: Any) -> dict[str, Any]:
    """Change autoscaling.mode, and return the new body as kopf hands it to the handler: annotated
    with the spec it handled last (the old mode), which is how a pass knows what may be stale."""
    meta = body["metadata"]
    await client.CustomObjectsApi(api).patch_namespaced_custom_object(
        G, V, meta["namespace"], P, meta["name"], {"spec": {"autoscaling": {"mode": mode, **more}}},
        _content_type="application/merge-patch+json",
    )  # fmt: skip
    new = await kube.get_model(api, meta["namespace"], meta["name"])
    assert new is not None
    new["metadata"].setdefault("annotations", {})[LAST_HANDLED] = json.dumps({"spec": body["spec"]})
    return new


def _condition(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in status.get("conditions") or [] if c["type"] == type_), {})


def _no_child_problem(status: dict[str, Any]) -> None:
    """Every child was applied (the pods may still fail later: they are not the point here)."""
    degraded = _condition(status, "Degraded")
    assert degraded.get("reason") not in ("ApplyFailed", "APINotServed", "ChildConflict"), degraded


# --- HorizontalPodAutoscaler ---------------------------------------------------------------------------


async def test_hpa_is_applied_read_back_and_reads_the_models_scale(
    k8s_api, namespace, control_plane, wait_for
):
    body = await _create(k8s_api, _doc("hpa-model", namespace, mode="hpa"))
    result = await reconcile(k8s_api, body, CONFIG)
    assert "HorizontalPodAutoscaler" in result.applied, result
    _no_child_problem(result.status)

    child = contract.child_name("hpa-model")
    hpa = await kube.get_child(k8s_api, "HorizontalPodAutoscaler", namespace, child)
    assert hpa is not None
    desired = next(o for o in render(parse_body(body), CONFIG) if o["kind"] == "HorizontalPodAutoscaler")
    assert not drifted(desired, hpa), f"the apiserver changed our HPA:\n{yaml.safe_dump(hpa['spec'])}"
    spec = hpa["spec"]
    assert spec["scaleTargetRef"] == {
        "apiVersion": "kubeinfer.io/v1alpha1",
        "kind": "LLMModel",
        "name": "hpa-model",
    }
    assert (spec["minReplicas"], spec["maxReplicas"]) == (1, 3)
    assert spec["metrics"][0]["external"]["target"] == {"type": "AverageValue", "averageValue": "4"}
    selector = spec["metrics"][0]["external"]["metric"]["selector"]
    assert selector == {"matchLabels": {"model_namespace": namespace, "model": "hpa-model"}}
    assert spec["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 90
    owner = hpa["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["uid"], owner["controller"]) == ("LLMModel", body["metadata"]["uid"], True)
    # Schema-exact too: a strict dry-run apply reports no unknown or duplicate field.
    await client.AutoscalingV2Api(k8s_api).patch_namespaced_horizontal_pod_autoscaler(
        child, namespace, desired, field_manager=kube.FIELD_MANAGER, force=True, dry_run="All",
        field_validation="Strict", _content_type=kube.APPLY,
    )  # fmt: skip
    # A second pass applies the same object again, unchanged.
    await reconcile(k8s_api, await kube.get_model(k8s_api, namespace, "hpa-model"), CONFIG)
    again = await kube.get_child(k8s_api, "HorizontalPodAutoscaler", namespace, child)
    assert again is not None and again["spec"] == hpa["spec"]

    # The HPA controller (kube-controller-manager) resolves scaleTargetRef through the LLMModel's scale
    # subresource: AbleToScale True. With no external-metrics adapter it cannot read the load, so
    # ScalingActive is False, and it leaves spec.replicas alone.
    disabled = set(control_plane.disabled_controllers)
    if {"horizontalpodautoscaling", "-horizontalpodautoscaling"} & disabled:
        pytest.skip("the test control plane runs kube-controller-manager without the HPA controller")

    async def conditions() -> dict[str, dict[str, Any]] | None:
        obj = await kube.get_child(k8s_api, "HorizontalPodAutoscaler", namespace, child)
        conds = {c["type"]: c for c in ((obj or {}).get("status") or {}).get("conditions") or []}
        # The controller's REST mapper may not know the new CRD on its first sync (FailedGetScale).
        return conds if conds.get("AbleToScale", {}).get("status") == "True" else None

    # The HPA controller syncs every 15 s; its discovery of a new CRD refreshes every 30 s.
    conds: Any = await wait_for(
        conditions, timeout=120, interval=1, what="the HPA controller's AbleToScale True"
    )
    assert conds["AbleToScale"]["reason"] == "SucceededGetScale", conds
    active = conds.get("ScalingActive", {})
    assert active.get("status") == "False", conds
    assert active.get("reason") == "FailedGetExternalMetric", conds
    assert "kubeinfer_gateway_model_load" in active.get("message", ""), conds
    model = await kube.get_model(k8s_api, namespace, "hpa-model")
    assert model and model["spec"]["replicas"] == 1


async def test_hpa_goes_when_the_mode_changes(k8s_api, namespace, wait_for):
    body = await _create(k8s_api, _doc("hpa-off", namespace, mode="hpa"))
    assert "HorizontalPodAutoscaler" in (await reconcile(k8s_api, body, CONFIG)).applied
    child = contract.child_name("hpa-off")
    assert await kube.get_child(k8s_api, "HorizontalPodAutoscaler", namespace, child)

    body = await _set_mode(k8s_api, body, "builtin")
    result = await reconcile(k8s_api, body, CONFIG)
    assert "HorizontalPodAutoscaler" not in result.applied

    async def gone() -> bool:
        return await kube.get_child(k8s_api, "HorizontalPodAutoscaler", namespace, child) is None

    await wait_for(gone, timeout=30, what="the HorizontalPodAutoscaler deleted")
    # The Deployment and Service stay.
    assert await kube.get_child(k8s_api, "Deployment", namespace, child)
    assert await kube.get_child(k8s_api, "Service", namespace, child)


# --- KEDA ScaledObject ----------------------------------------------------------------------------------


async def _crd_gone(api: client.ApiClient, name: str, timeout: float = 60) -> None:
    ext = client.ApiextensionsV1Api(api)
    try:
        await ext.delete_custom_resource_definition(name)
    except ApiException as exc:
        if exc.status != 404:
            raise
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            await ext.read_custom_resource_definition(name)
        except ApiException as exc:
            if exc.status == 404:
                break
            raise
        if loop.time() > deadline:
            pytest.fail(f"CRD {name} still there {timeout:.0f}s after its deletion")
        await asyncio.sleep(0.5)
    while True:  # and the apiserver has stopped serving it
        try:
            await client.CustomObjectsApi(api).list_cluster_custom_object(
                kube.KEDA_GROUP, kube.KEDA_VERSION, kube.KEDA_PLURAL
            )
        except ApiException as exc:
            if exc.status == 404:
                return
            raise
        if loop.time() > deadline:
            pytest.fail(f"{name} still served {timeout:.0f}s after its deletion")
        await asyncio.sleep(0.5)


async def test_keda_model_without_keda_says_keda_is_not_installed(k8s_api, namespace):
    await _crd_gone(k8s_api, KEDA_CRD)  # in case an earlier test in this session left it
    body = await _create(k8s_api, _doc("keda-missing", namespace, mode="keda", minReplicas=0))
    result = await reconcile(k8s_api, body, CONFIG)  # must not raise
    assert "ScaledObject" not in result.applied
    assert {"Deployment", "Service"} <= set(result.applied), result
    degraded = _condition(result.status, "Degraded")
    assert (degraded.get("status"), degraded.get("reason")) == ("True", "APINotServed"), result.status
    assert "KEDA is not installed" in degraded["message"], degraded
    assert f"ScaledObject {namespace}/{contract.child_name('keda-missing')}" in degraded["message"]
    # Written to the model's status, where `kubectl describe` shows it.
    model = await kube.get_model(k8s_api, namespace, "keda-missing")
    assert model is not None
    assert "KEDA is not installed" in _condition(model.get("status") or {}, "Degraded").get("message", "")
    # Leaving keda mode deletes nothing that is not there (a 404 on a missing API is no error).
    body = await _set_mode(k8s_api, model, "off")
    result = await reconcile(k8s_api, body, CONFIG)
    degraded = _condition(result.status, "Degraded")
    assert degraded.get("reason") != "APINotServed" and "KEDA" not in degraded.get("message", ""), degraded


@pytest.fixture
async def keda_installed(k8s_api):
    """KEDA's ScaledObject CRD, from KEDA's Go module through the module proxy; removed afterwards."""
    try:
        path = keda_crd()
    except (BuildError, OSError) as exc:
        pytest.skip(f"KEDA's ScaledObject CRD could not be had from the Go module proxy: {exc}")
    body = yaml.safe_load(path.read_text())
    ext = client.ApiextensionsV1Api(k8s_api)
    try:
        await ext.create_custom_resource_definition(body)
    except ApiException as exc:
        if exc.status != 409:
            raise
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60
    while True:  # Established, then served (discovery lags a moment)
        try:
            await client.CustomObjectsApi(k8s_api).list_cluster_custom_object(
                kube.KEDA_GROUP, kube.KEDA_VERSION, kube.KEDA_PLURAL
            )
            break
        except ApiException:
            if loop.time() > deadline:
                pytest.fail(f"{KEDA_CRD} not served 60s after it was created")
            await asyncio.sleep(0.25)
    yield body
    await _crd_gone(k8s_api, KEDA_CRD)


async def test_scaled_object_is_schema_valid_and_read_back(k8s_api, namespace, keda_installed, wait_for):
    body = await _create(k8s_api, _doc("keda-model", namespace, mode="keda", minReplicas=0))
    result = await reconcile(k8s_api, body, CONFIG)
    assert "ScaledObject" in result.applied, result
    _no_child_problem(result.status)

    desired = next(o for o in render(parse_body(body), CONFIG) if o["kind"] == "ScaledObject")
    child = contract.child_name("keda-model")
    so = await kube.get_child(k8s_api, "ScaledObject", namespace, child)
    assert so is not None
    # Nothing pruned by KEDA's structural schema, nothing changed.
    assert not drifted(desired, so), f"the apiserver changed our ScaledObject:\n{yaml.safe_dump(so['spec'])}"
    spec = so["spec"]
    assert spec["scaleTargetRef"] == {
        "apiVersion": "kubeinfer.io/v1alpha1",
        "kind": "LLMModel",
        "name": "keda-model",
    }
    assert (spec["minReplicaCount"], spec["maxReplicaCount"], spec["cooldownPeriod"]) == (0, 3, 90)
    trigger = spec["triggers"][0]
    assert trigger["metadata"] == {
        "serverAddress": CONFIG.prometheus_address,
        "query": f'sum(kubeinfer_gateway_model_load{{model_namespace="{namespace}",model="keda-model"}})',
        "threshold": "4",
    }
    owner = so["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["uid"]) == ("LLMModel", body["metadata"]["uid"])
    # Strict field validation: every field we set is in KEDA's schema.
    strict = copy.deepcopy(desired)
    await client.CustomObjectsApi(k8s_api).patch_namespaced_custom_object(
        kube.KEDA_GROUP, kube.KEDA_VERSION, namespace, kube.KEDA_PLURAL, child, strict,
        field_manager=kube.FIELD_MANAGER, force=True, dry_run="All", field_validation="Strict",
        _content_type=kube.APPLY,
    )  # fmt: skip

    # keda -> hpa: the ScaledObject goes, an HPA comes.
    body = await _set_mode(k8s_api, body, "hpa", minReplicas=1)  # the CRD refuses hpa with 0
    result = await reconcile(k8s_api, body, CONFIG)
    assert "HorizontalPodAutoscaler" in result.applied, result

    async def gone() -> bool:
        return await kube.get_child(k8s_api, "ScaledObject", namespace, child) is None

    await wait_for(gone, timeout=30, what="the ScaledObject deleted")
    assert await kube.get_child(k8s_api, "HorizontalPodAutoscaler", namespace, child)
