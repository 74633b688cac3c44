"""LLMModel -> Kubernetes objects, as plain dicts. Pure: no API calls, no clock, no randomness.

A model becomes a Deployment of identical engine pods, a ClusterIP Service over them, a
PodDisruptionBudget when it has more than one replica, and, with `autoscaling.mode` hpa or keda, a
HorizontalPodAutoscaler or a KEDA ScaledObject that scales the LLMModel itself (its scale
subresource). A Deployment (not a StatefulSet) because replicas are interchangeable and hold no
state of their own: the gateway routes to pod IPs, weights come from a hub or a read-only claim, and
a rolling update with maxUnavailable 0 keeps the old replicas serving until the new ones pass their
readiness probe.

The spec hash covers everything that shapes the pod, so a spec change is a new pod template (and a
rollout) while a change of `replicas` or `routing` is not.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from typing import Any

from kubeinfer import contract
from kubeinfer.api.fields import duration_seconds
from kubeinfer.api.v1alpha1 import Autoscaling, LLMModel
from kubeinfer.render.config import RenderConfig
from kubeinfer.render.engines import engine_args, engine_command, served_names
from kubeinfer.render.source import parse_source
from kubeinfer.render.weights import cache_of

Manifest = dict[str, Any]

# Fields of the spec that do not shape the pods: changing them must not restart anything.
_NON_POD_FIELDS = ("replicas", "autoscaling", "routing")


def spec_hash(model: LLMModel) -> str:
    data = model.spec.model_dump(mode="json", by_alias=True, exclude_none=True, exclude=set(_NON_POD_FIELDS))
    data["__name"] = model.name  # the served name defaults to it
    if model.spec.engine == "vllm" and "adapters" in data:
        # vLLM loads and unloads adapters at run time (operator/adapters.py): only whether there are
        # any (--enable-lora) shapes the pods. llama-server loads its list at start.
        data["adapters"] = True
    if model.spec.engine == "llama-server":
        # llama-server's --threads-http follows the routing's in-flight target: that part of routing
        # shapes its pods (render/engines.py), so a change of it is a rollout with a new hash.
        target = model.spec.routing.target_inflight if model.spec.routing else None
        data["__inflightTarget"] = contract.target_inflight(target, model.spec.max_num_seqs)
    blob = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:10]


def _labels(model: LLMModel) -> dict[str, str]:
    return {
        contract.LABEL_NAME: "kubeinfer",
        contract.LABEL_MANAGED_BY: contract.MANAGED_BY,
        **contract.selector_labels(model.name),
        contract.LABEL_ENGINE: model.spec.engine,
    }


def _owner(model: LLMModel) -> list[dict[str, Any]]:
    if not model.metadata.uid:
        return []
    return [
        {
            "apiVersion": contract.API_VERSION,
            "kind": contract.KIND,
            "name": model.name,
            "uid": model.metadata.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]


def _meta(model: LLMModel, labels: dict[str, str]) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": contract.child_name(model.name),
        "namespace": model.namespace,
        "labels": labels,
    }
    owners = _owner(model)
    if owners:
        meta["ownerReferences"] = owners
    return meta


def _env(model: LLMModel) -> list[dict[str, Any]]:
    spec = model.spec
    env: list[dict[str, Any]] = []
    if spec.engine == "vllm":
        env += [
            {"name": "HF_HOME", "value": f"{contract.CACHE_MOUNT}/huggingface"},
            {"name": "VLLM_NO_USAGE_STATS", "value": "1"},
            {"name": "DO_NOT_TRACK", "value": "1"},
        ]
        if spec.adapters:  # enables /v1/load_lora_adapter and /v1/unload_lora_adapter
            env.append({"name": "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "value": "True"})
    else:
        env += [{"name": "LLAMA_CACHE", "value": f"{contract.CACHE_MOUNT}/llama.cpp"}]
    ref = spec.model.token_secret_ref
    if ref:
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}})
    for var in spec.env or []:
        env.append(var.model_dump(by_alias=True, exclude_none=True))
    return env


def _pvc_claims(model: LLMModel) -> list[str]:
    spec = model.spec
    sources = [spec.model.source]
    if spec.speculative and spec.speculative.model:
        sources.append(spec.speculative.model)
    if spec.multimodal and spec.multimodal.mmproj and spec.multimodal.mmproj != "auto":
        sources.append(spec.multimodal.mmproj)
    sources += [a.source for a in spec.adapters or []]
    claims: list[str] = []
    for text in sources:
        if text and text.startswith("pvc://"):
            claim = parse_source(text).claim
            if claim not in claims:
                claims.append(claim)
    return claims


def _shm_size(model: LLMModel) -> str:
    r = model.spec.resources
    if r.shm_size:
        return r.shm_size
    p = model.spec.parallelism
    return "8Gi" if p and (p.tensor > 1 or p.pipeline > 1) else "2Gi"


def _resources(model: LLMModel) -> dict[str, Any]:
    r = model.spec.resources
    requests: dict[str, Any] = {}
    limits: dict[str, Any] = {}
    if r.cpu:
        requests["cpu"] = limits["cpu"] = r.cpu
    if r.memory:
        requests["memory"] = limits["memory"] = r.memory
    if r.gpus > 0:
        # Extended resources must be set in limits; requests default to them.
        limits[r.gpu_resource_name] = str(r.gpus)
    out: dict[str, Any] = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def _probe(path: str, period: int, failures: int, timeout: int = 5) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": contract.ENGINE_PORT_NAME},
        "periodSeconds": period,
        "timeoutSeconds": timeout,
        "failureThreshold": failures,
    }


def _container(model: LLMModel, config: RenderConfig) -> dict[str, Any]:
    spec = model.spec
    mounts: list[dict[str, Any]] = [
        {"name": "dshm", "mountPath": "/dev/shm"},
        {"name": "model-cache", "mountPath": contract.CACHE_MOUNT},
    ]
    for claim in _pvc_claims(model):
        mounts.append(
            {"name": f"pvc-{claim}", "mountPath": f"{contract.PVC_MOUNT_ROOT}/{claim}", "readOnly": True}
        )
    if cache_of(model) is not None:
        mounts.append({"name": "weights", "mountPath": contract.WEIGHTS_MOUNT, "readOnly": True})
    startup_period = 10
    container: dict[str, Any] = {
        "name": contract.ENGINE_CONTAINER,
        "image": spec.image or config.image_for(spec.engine),
        "imagePullPolicy": config.image_pull_policy,
        "command": engine_command(model),
        "args": engine_args(model),
        "ports": [
            {"name": contract.ENGINE_PORT_NAME, "containerPort": contract.ENGINE_PORT, "protocol": "TCP"}
        ],
        "env": _env(model),
        "resources": _resources(model),
        "volumeMounts": mounts,
        # Loading (and downloading) weights can take long: the startup probe holds liveness off
        # until /health first answers; after that a hung engine is restarted within ~30 s.
        "startupProbe": _probe(
            contract.HEALTH_PATH, startup_period, max(1, config.startup_timeout_seconds // startup_period)
        ),
        "readinessProbe": _probe(contract.HEALTH_PATH, 5, 2),
        "livenessProbe": _probe(contract.HEALTH_PATH, 10, 3),
        # The gateway drops a replica as soon as it is not Ready; the sleep lets that propagate before
        # the engine gets SIGTERM, and both engines finish in-flight requests on SIGTERM.
        "lifecycle": {"preStop": {"sleep": {"seconds": config.pre_stop_sleep_seconds}}},
    }
    if not container["resources"]:
        del container["resources"]
    return container


def _pod_spec(model: LLMModel, config: RenderConfig) -> dict[str, Any]:
    spec = model.spec
    volumes: list[dict[str, Any]] = [
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": _shm_size(model)}},
        {"name": "model-cache", "emptyDir": {"sizeLimit": config.model_cache_size_limit}},
    ]
    for claim in _pvc_claims(model):
        volumes.append(
            {"name": f"pvc-{claim}", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}
        )
    cache = cache_of(model)
    if cache is not None:
        volumes.append(
            {"name": "weights", "persistentVolumeClaim": {"claimName": cache.claim_name, "readOnly": True}}
        )
    pod: dict[str, Any] = {
        "containers": [_container(model, config)],
        "volumes": volumes,
        "terminationGracePeriodSeconds": config.termination_grace_period_seconds,
        "enableServiceLinks": False,
    }
    s = spec.scheduling
    if s:
        if s.node_selector:
            pod["nodeSelector"] = dict(s.node_selector)
        if s.tolerations:
            pod["tolerations"] = [dict(t) for t in s.tolerations]
        if s.affinity:
            pod["affinity"] = copy.deepcopy(dict(s.affinity))
        if s.priority_class_name:
            pod["priorityClassName"] = s.priority_class_name
        if s.runtime_class_name:
            pod["runtimeClassName"] = s.runtime_class_name
    return pod


def pod_annotations(model: LLMModel) -> dict[str, str]:
    out = {
        contract.ANNOTATION_SERVED_NAME: model.served_name,
        contract.ANNOTATION_ALIASES: json.dumps(served_names(model)[1:]),
        contract.ANNOTATION_MODALITIES: json.dumps(list(model.spec.modalities)),
        contract.ANNOTATION_PORT: str(contract.ENGINE_PORT),
        contract.ANNOTATION_METRICS_PATH: contract.METRICS_PATH,
    }
    if model.spec.engine == "llama-server" and model.spec.adapters:
        # The adapters this pod loads, by llama-server's id (their order on the command line). vLLM
        # pods carry none: their adapters change at run time, and the gateway reads /v1/models.
        out[contract.ANNOTATION_ADAPTERS] = json.dumps(
            [{"name": a.name, "id": i, "scale": a.scale if a.scale is not None else 1.0}
             for i, a in enumerate(model.spec.adapters)],
            separators=(",", ":"),
        )  # fmt: skip
    return out


def merge_overlay(base: Any, overlay: Any) -> Any:
    """Deep-merge `overlay` onto `base`: maps merge, lists of named objects merge by name."""
    if isinstance(base, dict) and isinstance(overlay, dict):
        out = dict(base)
        for key, value in overlay.items():
            out[key] = merge_overlay(base[key], value) if key in base else copy.deepcopy(value)
        return out
    if (
        isinstance(base, list)
        and isinstance(overlay, list)
        and all(isinstance(x, dict) and "name" in x for x in base + overlay)
    ):
        merged = [copy.deepcopy(x) for x in base]
        index = {x["name"]: i for i, x in enumerate(merged)}
        for item in overlay:
            if item["name"] in index:
                merged[index[item["name"]]] = merge_overlay(merged[index[item["name"]]], item)
            else:
                merged.append(copy.deepcopy(item))
        return merged
    return copy.deepcopy(overlay)


def deployment(model: LLMModel, config: RenderConfig, replicas: int | None = None) -> Manifest:
    labels = _labels(model)
    h = spec_hash(model)
    template: dict[str, Any] = {
        "metadata": {
            "labels": {**labels, contract.LABEL_SPEC_HASH: h},
            "annotations": pod_annotations(model),
        },
        "spec": _pod_spec(model, config),
    }
    if model.spec.pod_template:
        template = merge_overlay(template, dict(model.spec.pod_template))
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {**_meta(model, labels), "annotations": {contract.LABEL_SPEC_HASH: h}},
        "spec": {
            "replicas": model.spec.replicas if replicas is None else replicas,
            "selector": {"matchLabels": contract.selector_labels(model.name)},
            # Surge one new replica at a time and never drop below the desired count: old replicas keep
            # serving until the new one is Ready. (Needs one spare GPU slot during a rollout.)
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "revisionHistoryLimit": 3,
            # Model loading is slow; report a stuck rollout only after the startup budget.
            "progressDeadlineSeconds": config.startup_timeout_seconds + 600,
            "template": template,
        },
    }


def service(model: LLMModel) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(model, _labels(model)),
        "spec": {
            "type": "ClusterIP",
            "selector": contract.selector_labels(model.name),
            "ports": [
                {
                    "name": contract.ENGINE_PORT_NAME,
                    "port": contract.ENGINE_PORT,
                    "targetPort": contract.ENGINE_PORT_NAME,
                    "protocol": "TCP",
                }
            ],
        },
    }


def pod_disruption_budget(model: LLMModel) -> Manifest:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _meta(model, _labels(model)),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": contract.selector_labels(model.name)}},
    }


# The gateways' gauge the ecosystem autoscalers read: requests in flight plus queued, per model and
# gateway replica (each gateway reports its own; the model's load is the sum over gateways).
LOAD_METRIC = "kubeinfer_gateway_model_load"
# The HorizontalPodAutoscaler API caps a stabilization window at one hour.
_MAX_STABILIZATION_SECONDS = 3600


def _scale_down_seconds(spec: Autoscaling) -> int:
    return math.ceil(duration_seconds(spec.scale_down_delay))


def _hpa_behavior(spec: Autoscaling) -> dict[str, Any]:
    """Scale up at once (doubling, or four more replicas, per minute); scale down only after load has
    stayed low for scaleDownDelay, then straight to what the load needs: the builtin rules."""
    return {
        "scaleUp": {
            "stabilizationWindowSeconds": 0,
            "selectPolicy": "Max",
            "policies": [
                {"type": "Percent", "value": 100, "periodSeconds": 60},
                {"type": "Pods", "value": 4, "periodSeconds": 60},
            ],
        },
        "scaleDown": {
            "stabilizationWindowSeconds": min(_scale_down_seconds(spec), _MAX_STABILIZATION_SECONDS),
            "selectPolicy": "Max",
            "policies": [{"type": "Percent", "value": 100, "periodSeconds": 15}],
        },
    }


def _scale_target(model: LLMModel) -> dict[str, str]:
    # The LLMModel itself, through its scale subresource: the operator rolls spec.replicas into the
    # Deployment, so the autoscaler and a user's `kubectl scale` meet in one place.
    return {"apiVersion": contract.API_VERSION, "kind": contract.KIND, "name": model.name}


def _load_labels(model: LLMModel) -> dict[str, str]:
    # The gateway labels kubeinfer_gateway_model_load with the model's own namespace and name.
    return {"model_namespace": model.metadata.namespace or "", "model": model.name}


def horizontal_pod_autoscaler(model: LLMModel) -> Manifest:
    """autoscaling.mode hpa: desired = ceil(sum of the gateways' load / targetInflightPerReplica), read
    as an External metric (a prometheus-adapter externalRule serves it; docs/operator.md)."""
    spec = model.spec.autoscaling or Autoscaling()
    target = str(spec.target_inflight_per_replica)  # a quantity
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": _meta(model, _labels(model)),
        "spec": {
            "scaleTargetRef": _scale_target(model),
            "minReplicas": spec.min_replicas,
            "maxReplicas": spec.max_replicas,
            "metrics": [
                {
                    "type": "External",
                    "external": {
                        "metric": {"name": LOAD_METRIC, "selector": {"matchLabels": _load_labels(model)}},
                        "target": {"type": "AverageValue", "averageValue": target},
                    },
                }
            ],
            "behavior": _hpa_behavior(spec),
        },
    }


def scaled_object(model: LLMModel, config: RenderConfig) -> Manifest:
    """autoscaling.mode keda: the same rule through KEDA's Prometheus scaler (which can also scale to
    and from zero: cooldownPeriod is how long the load must be zero before the last replica goes)."""
    spec = model.spec.autoscaling or Autoscaling()
    return {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": _meta(model, _labels(model)),
        "spec": {
            "scaleTargetRef": _scale_target(model),
            "minReplicaCount": spec.min_replicas,
            "maxReplicaCount": spec.max_replicas,
            "cooldownPeriod": _scale_down_seconds(spec),
            "advanced": {"horizontalPodAutoscalerConfig": {"behavior": _hpa_behavior(spec)}},
            "triggers": [
                {
                    "type": "prometheus",
                    "metricType": "AverageValue",
                    "metadata": {
                        "serverAddress": config.prometheus_address,
                        "query": f'sum({LOAD_METRIC}{{model_namespace="{model.metadata.namespace or ""}",'
                        f'model="{model.name}"}})',
                        "threshold": str(spec.target_inflight_per_replica),
                    },
                }
            ],
        },
    }


def endpoint(model: LLMModel) -> str:
    return f"http://{contract.child_name(model.name)}.{model.namespace}.svc:{contract.ENGINE_PORT}"


def render(model: LLMModel, config: RenderConfig) -> list[Manifest]:
    """Every object the operator keeps for this model (none for remote models)."""
    if model.spec.remote is not None:
        return []
    out = [deployment(model, config), service(model)]
    if model.spec.replicas > 1:
        out.append(pod_disruption_budget(model))
    mode = model.spec.autoscaling.mode if model.spec.autoscaling else None
    if mode == "hpa":
        out.append(horizontal_pod_autoscaler(model))
    elif mode == "keda":
        out.append(scaled_object(model, config))
    return out
