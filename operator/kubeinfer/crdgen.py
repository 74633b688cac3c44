"""Generate the LLMModel CustomResourceDefinition from the pydantic API models.

Pydantic emits JSON Schema 2020-12; a CRD needs a *structural* OpenAPI v3.0 schema. This module
inlines `$ref`s, turns `Optional[X]` into "X, not required", maps quantities to int-or-string, and
converts the few keywords that differ between the two dialects. CEL rules travel in
`x-kubernetes-validations` unchanged.
"""

from __future__ import annotations

import copy
from typing import Any

import yaml

from kubeinfer import contract
from kubeinfer.api.fields import QUANTITY_RE
from kubeinfer.api.v1alpha1 import LLMModelSpec, LLMModelStatus

Schema = dict[str, Any]


def _resolve(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, list):
        return [_resolve(n, defs) for n in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = copy.deepcopy(defs[node["$ref"].split("/")[-1]])
        extra = {k: v for k, v in node.items() if k != "$ref"}
        # A field's own description/default wins over the referenced class's docstring.
        target.update(extra)
        return _resolve(target, defs)
    return {k: _resolve(v, defs) for k, v in node.items()}


def _structural(node: Any) -> Any:
    if isinstance(node, list):
        return [_structural(n) for n in node]
    if not isinstance(node, dict):
        return node
    node = dict(node)
    node.pop("title", None)
    if isinstance(node.get("description"), str):
        node["description"] = " ".join(node["description"].split())
    if "anyOf" in node:
        variants = [v for v in node["anyOf"] if v.get("type") != "null"]
        if len(variants) == 1:
            merged = dict(variants[0])
            for k, v in node.items():
                if k != "anyOf":
                    merged.setdefault(k, v)
            node = merged
            node.pop("title", None)
            if isinstance(node.get("description"), str):
                node["description"] = " ".join(node["description"].split())
    if node.get("default", 0) is None:
        del node["default"]
    if "const" in node:
        node["enum"] = [node.pop("const")]
    for key in ("exclusiveMinimum", "exclusiveMaximum"):
        if isinstance(node.get(key), int | float) and not isinstance(node.get(key), bool):
            bound = node.pop(key)
            node["minimum" if key == "exclusiveMinimum" else "maximum"] = bound
            node[key] = True
    if node.get("additionalProperties") is False:
        # Closed objects are the structural default; unknown fields are pruned or rejected by
        # kubectl's field validation.
        del node["additionalProperties"]
    if node.get("additionalProperties") is True:
        del node["additionalProperties"]
    if node.get("x-kubernetes-preserve-unknown-fields"):
        node["type"] = "object"
    if node.get("x-kubernetes-int-or-string"):
        node.pop("type", None)
        node.pop("pattern", None)
        node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
        node.setdefault("x-kubernetes-validations", []).append(
            {
                "rule": f"string(self).matches(r'{QUANTITY_RE}')",
                "message": "must be a Kubernetes quantity such as 4, 500m, 16Gi",
            }
        )
    out: Schema = {}
    for k, v in node.items():
        if k in ("properties",):
            out[k] = {name: _structural(sub) for name, sub in v.items()}
        elif k in ("items", "additionalProperties"):
            out[k] = _structural(v)
        else:
            out[k] = v
    return out


def _openapi(model: type[Any]) -> Schema:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs = raw.pop("$defs", {})
    schema = _structural(_resolve(raw, defs))
    schema.pop("description", None)
    return dict(schema)


def _printer_columns() -> list[dict[str, Any]]:
    return [
        {"name": "Engine", "type": "string", "jsonPath": ".spec.engine"},
        {"name": "Served", "type": "string", "jsonPath": ".status.servedName"},
        {"name": "Replicas", "type": "integer", "jsonPath": ".spec.replicas"},
        {"name": "Ready", "type": "integer", "jsonPath": ".status.readyReplicas"},
        {"name": "Fits", "type": "boolean", "jsonPath": ".status.estimate.fits"},
        {"name": "Status", "type": "string", "jsonPath": '.status.conditions[?(@.type=="Ready")].reason'},
        # Empty unless model.cache is set: the download's progress, then Ready.
        {"name": "Weights", "type": "string", "jsonPath": ".status.weights.summary"},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ]


def status_schema() -> Schema:
    schema = _openapi(LLMModelStatus)
    conditions = schema["properties"]["conditions"]
    conditions["x-kubernetes-list-type"] = "map"
    conditions["x-kubernetes-list-map-keys"] = ["type"]
    conditions["items"]["required"] = ["type", "status"]
    return schema


def spec_schema() -> Schema:
    return _openapi(LLMModelSpec)


def crd() -> dict[str, Any]:
    """The CustomResourceDefinition of LLMModel as a plain dict."""
    root: Schema = {
        "type": "object",
        "description": "An LLM served on the cluster through the kubeinfer gateway.",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec_schema(),
            "status": status_schema(),
        },
        "x-kubernetes-validations": [
            {
                "rule": f"self.metadata.name.size() <= {contract.MAX_MODEL_NAME_LENGTH}",
                "message": f"metadata.name must be at most {contract.MAX_MODEL_NAME_LENGTH} characters "
                "(room for the names of the model's Deployment and pods)",
            }
        ],
    }
    root["properties"]["spec"]["description"] = "Desired state of the model."
    root["properties"]["status"]["description"] = "Observed state, written by the operator."
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{contract.PLURAL}.{contract.GROUP}",
            "labels": {contract.LABEL_MANAGED_BY: contract.MANAGED_BY},
        },
        "spec": {
            "group": contract.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": contract.KIND,
                "plural": contract.PLURAL,
                "singular": contract.SINGULAR,
                "shortNames": list(contract.SHORT_NAMES),
                "categories": ["kubeinfer", "all"],
            },
            "versions": [
                {
                    "name": contract.VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": root},
                    "subresources": {
                        "status": {},
                        "scale": {
                            "specReplicasPath": ".spec.replicas",
                            "statusReplicasPath": ".status.replicas",
                            "labelSelectorPath": ".status.selector",
                        },
                    },
                    "additionalPrinterColumns": _printer_columns(),
                }
            ],
        },
    }


def crd_yaml() -> str:
    header = "# Generated by `kubeinfer crd` from operator/kubeinfer/api/v1alpha1.py. Do not edit.\n"
    return header + yaml.safe_dump(crd(), sort_keys=False, width=120)
