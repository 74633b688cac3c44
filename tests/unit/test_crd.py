"""The generated CRD is structural, declares all status fields and carries the CEL rules."""

from __future__ import annotations

from kubeinfer.api.rules import SPEC_RULES
from kubeinfer.api.v1alpha1 import LLMModelStatus
from kubeinfer.crdgen import crd


def _walk(node, path="$"):
    yield path, node
    for k, v in node.get("properties", {}).items():
        yield from _walk(v, f"{path}.{k}")
    if "items" in node:
        yield from _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _walk(node["additionalProperties"], f"{path}{{}}")


def test_structural_schema():
    schema = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for path, node in _walk(schema):
        assert "$ref" not in node and "allOf" not in node and "title" not in node, path
        if node.get("x-kubernetes-int-or-string"):
            assert "type" not in node, path
        else:
            assert "type" in node, f"{path} has no type"
        if "anyOf" in node:
            assert node.get("x-kubernetes-int-or-string"), path
        if node.get("type") == "object" and "properties" not in node and path != "$.metadata":
            assert "additionalProperties" in node or node.get("x-kubernetes-preserve-unknown-fields"), path


def test_every_status_field_is_declared():
    status = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    for name, field in LLMModelStatus.model_fields.items():
        assert (field.alias or name) in status
    est = status["estimate"]["properties"]
    assert {
        "weightsGiB",
        "kvCacheGiB",
        "overheadGiB",
        "totalGiB",
        "perGpuGiB",
        "gpuMemoryGiB",
        "fits",
    } <= set(est)
    assert status["conditions"]["x-kubernetes-list-map-keys"] == ["type"]


def test_subresources_columns_and_rules():
    version = crd()["spec"]["versions"][0]
    assert version["subresources"]["scale"]["specReplicasPath"] == ".spec.replicas"
    assert version["subresources"]["scale"]["labelSelectorPath"] == ".status.selector"
    assert "status" in version["subresources"]
    cols = {c["name"] for c in version["additionalPrinterColumns"]}
    assert {"Engine", "Served", "Replicas", "Ready", "Fits", "Age"} <= cols
    spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    rules = [v["rule"] for v in spec["x-kubernetes-validations"]]
    assert rules == [r for r, _ in SPEC_RULES]
    assert spec["properties"]["engine"]["x-kubernetes-validations"][0]["rule"] == "self == oldSelf"
    assert spec["properties"]["engine"]["default"] == "vllm"
    assert "description" in spec["properties"]["maxModelLen"]
