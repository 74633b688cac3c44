"""The generated CRD on a real kube-apiserver: accepted, Established, and enforcing its own rules.

Every invalid manifest of tests/cases.py is sent to the apiserver, which must refuse it with the same
message kubeinfer's offline validation gives; every example must be accepted under strict field
validation.
"""

from __future__ import annotations

import copy
import json
import uuid

import pytest
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from kubeinfer import contract
from kubeinfer.crdgen import crd
from tests.cases import EXAMPLES, FULL_LLAMA, FULL_VLLM, INVALID, load_example, manifest

NS = "crd-tests"
MERGE = "application/merge-patch+json"  # the client would send a dict as json-patch


@pytest.fixture(scope="session")
async def installed(control_plane):
    """Install the CRD once, wait until Established, and create the test namespace."""
    from kubernetes_asyncio import config

    cfg = client.Configuration()
    await config.load_kube_config(config_file=str(control_plane.kubeconfig), client_configuration=cfg)
    async with client.ApiClient(configuration=cfg) as api:
        ext = client.ApiextensionsV1Api(api)
        body = crd()
        try:
            await ext.create_custom_resource_definition(body)
        except ApiException as exc:
            if exc.status != 409:
                raise
        import asyncio

        for _ in range(240):
            obj = await ext.read_custom_resource_definition(body["metadata"]["name"])
            conds = {c.type: c.status for c in (obj.status.conditions or [])}
            if conds.get("Established") == "True":
                break
            await asyncio.sleep(0.25)
        else:
            pytest.fail(f"CRD not Established: {obj.status}")
        try:
            await client.CoreV1Api(api).create_namespace({"metadata": {"name": NS}})
        except ApiException as exc:
            if exc.status != 409:
                raise
        # Discovery of a new CRD can lag Established by a moment.
        objs = client.CustomObjectsApi(api)
        for _ in range(120):
            try:
                await objs.list_namespaced_custom_object(
                    contract.GROUP, contract.VERSION, NS, contract.PLURAL
                )
                break
            except ApiException:
                await asyncio.sleep(0.25)
    return body


@pytest.fixture
async def objects(installed, k8s_api):
    return client.CustomObjectsApi(k8s_api)


async def _create(objects, body, dry_run=True):
    kwargs = {"field_validation": "Strict"}
    if dry_run:
        kwargs["dry_run"] = "All"
    return await objects.create_namespaced_custom_object(
        contract.GROUP, contract.VERSION, NS, contract.PLURAL, body, **kwargs
    )


def _unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:6]}"


async def test_crd_is_established(installed, k8s_api):
    obj = await client.ApiextensionsV1Api(k8s_api).read_custom_resource_definition(
        f"{contract.PLURAL}.{contract.GROUP}"
    )
    assert obj.spec.names.short_names == ["llm"]
    assert obj.spec.versions[0].subresources.scale.spec_replicas_path == ".spec.replicas"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
async def test_examples_are_accepted(objects, path):
    doc = load_example(path)
    created = await _create(objects, doc)
    assert created["metadata"]["name"] == doc["metadata"]["name"]


@pytest.mark.parametrize("spec", [FULL_VLLM, FULL_LLAMA], ids=["full-vllm", "full-llama"])
async def test_every_field_is_declared(objects, spec):
    # Strict field validation fails on any field the schema does not declare.
    await _create(objects, manifest(_unique("full"), spec))


@pytest.mark.parametrize(("case", "spec", "expected"), INVALID, ids=[c[0] for c in INVALID])
async def test_apiserver_refuses_invalid_manifests(objects, case, spec, expected):
    with pytest.raises(ApiException) as info:
        await _create(objects, manifest(_unique("bad"), spec))
    assert info.value.status == 422, info.value.body
    message = json.loads(info.value.body)["message"]
    assert expected.lower() in message.lower(), message


async def test_unknown_field_is_refused(objects):
    with pytest.raises(ApiException) as info:
        await _create(objects, manifest(_unique("bad"), {**FULL_VLLM, "maxModelLength": 1}))
    assert 'unknown field "spec.maxModelLength"' in json.loads(info.value.body)["message"]


async def test_apiserver_defaults_match_the_api_models(objects):
    created = await _create(objects, manifest(_unique("defaults"), {"model": {"source": "hf://o/m"}}))
    spec = created["spec"]
    assert spec["engine"] == "vllm"
    assert spec["replicas"] == 1
    assert spec["modalities"] == ["text"]
    assert spec["resources"] == {"gpus": 1, "gpuResourceName": "nvidia.com/gpu", "skipFitCheck": False}


async def test_engine_is_immutable_and_status_and_scale_work(objects):
    name = _unique("life")
    await _create(objects, manifest(name, {"model": {"source": "hf://o/m"}}), dry_run=False)
    try:
        # Transition rule: engine cannot change.
        with pytest.raises(ApiException) as info:
            await objects.patch_namespaced_custom_object(
                contract.GROUP, contract.VERSION, NS, contract.PLURAL, name,
                {"spec": {"engine": "llama-server", "model": {"source": "o/m:Q4_K_M"}}}, _content_type=MERGE
            )  # fmt: skip
        assert "engine is immutable" in json.loads(info.value.body)["message"]

        # Every status field the operator writes survives (an undeclared one would be pruned).
        status = {
            "conditions": [
                {"type": "Ready", "status": "False", "reason": "Progressing", "message": "0/1 ready",
                 "lastTransitionTime": "2026-11-22T00:00:00Z", "observedGeneration": 1},
            ],
            "observedGeneration": 1, "replicas": 1, "readyReplicas": 0, "updatedReplicas": 1,
            "selector": "kubeinfer.io/model=" + name, "servedName": name, "endpoint": "http://x:8000",
            "specHash": "abc", "estimate": {"weightsGiB": 1.5, "kvCacheGiB": 0.5, "overheadGiB": 1.0,
                                            "totalGiB": 3.0, "perGpuGiB": 3.0, "gpuMemoryGiB": 22.5,
                                            "gpus": 1, "fits": True, "message": "fits"},
        }  # fmt: skip
        await objects.patch_namespaced_custom_object_status(
            contract.GROUP,
            contract.VERSION,
            NS,
            contract.PLURAL,
            name,
            {"status": copy.deepcopy(status)},
            _content_type=MERGE,
        )
        got = await objects.get_namespaced_custom_object(
            contract.GROUP, contract.VERSION, NS, contract.PLURAL, name
        )
        assert got["status"] == status

        # The scale subresource reads and writes spec.replicas.
        scale = await objects.get_namespaced_custom_object_scale(
            contract.GROUP, contract.VERSION, NS, contract.PLURAL, name
        )
        assert scale["spec"]["replicas"] == 1 and scale["status"]["selector"] == status["selector"]
        await objects.patch_namespaced_custom_object_scale(
            contract.GROUP,
            contract.VERSION,
            NS,
            contract.PLURAL,
            name,
            {"spec": {"replicas": 3}},
            _content_type=MERGE,
        )
        got = await objects.get_namespaced_custom_object(
            contract.GROUP, contract.VERSION, NS, contract.PLURAL, name
        )
        assert got["spec"]["replicas"] == 3
    finally:
        await objects.delete_namespaced_custom_object(
            contract.GROUP, contract.VERSION, NS, contract.PLURAL, name
        )


async def test_rendered_children_pass_server_side_validation(installed, k8s_api):
    """Every object the renderer makes for the examples is accepted by the apiserver (dry run)."""
    from kubeinfer.render.config import load_config
    from kubeinfer.render.manifests import render
    from kubeinfer.validation import parse_model

    apps = client.AppsV1Api(k8s_api)
    core = client.CoreV1Api(k8s_api)
    policy = client.PolicyV1Api(k8s_api)
    cfg = load_config()
    count = 0
    for path in EXAMPLES:
        doc = copy.deepcopy(load_example(path))
        doc["metadata"]["namespace"] = NS
        for obj in render(parse_model(doc), cfg):
            kw = {"dry_run": "All", "field_validation": "Strict"}
            if obj["kind"] == "Deployment":
                await apps.create_namespaced_deployment(NS, obj, **kw)
            elif obj["kind"] == "Service":
                await core.create_namespaced_service(NS, obj, **kw)
            elif obj["kind"] == "PodDisruptionBudget":
                await policy.create_namespaced_pod_disruption_budget(NS, obj, **kw)
            count += 1
    assert count >= 12
