"""Discovery from Kubernetes: LLMModels and their ready pods, watched, into the Registry.

Watches (kubernetes_asyncio): LLMModels give each model's public names, modalities and routing;
model-server pods (selected by the contract's component label) give replicas: a pod is a replica
while it is Ready, has an IP and is not terminating. Each event replaces the affected model's entry,
so a replica joins or leaves as soon as the watch delivers its readiness change. With a KeyStore,
Secrets labelled as API keys are watched too, so a new, rotated or deleted key takes effect at once.

`entry_from_model` and `endpoint_from_pod` are pure and unit-tested; `Discovery` only moves data.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from typing import Any

from kubernetes_asyncio import client

from kubeinfer import contract, kube
from kubeinfer.api.v1alpha1 import Pricing, Routing
from kubeinfer.gateway.auth import ApiKey, KeyStore, api_key_from_secret
from kubeinfer.gateway.registry import ModelEntry, Registry, RemoteTarget, remote_endpoint
from kubeinfer.gateway.routing import Endpoint

_log = logging.getLogger(__name__)


def entry_from_model(body: dict[str, Any], remote_key: str | None = None) -> ModelEntry:
    meta, spec = body.get("metadata") or {}, body.get("spec") or {}
    model = spec.get("model") or {}
    routing = Routing.model_validate(spec.get("routing") or {})
    remote = spec.get("remote")
    pricing = Pricing.model_validate(spec["pricing"]) if spec.get("pricing") else None
    native = frozenset(remote.get("nativeAPIs") or RemoteTarget.native_apis) if remote else frozenset()
    return ModelEntry(
        name=meta["name"],
        served_name=model.get("servedName") or meta["name"],
        aliases=tuple(model.get("aliases") or ()),
        engine=spec.get("engine", "vllm"),
        modalities=tuple(spec.get("modalities") or ("text",)),
        routing=routing,
        max_num_seqs=spec.get("maxNumSeqs"),
        remote=RemoteTarget(remote["baseURL"], remote["model"], remote_key, native) if remote else None,
        pricing=pricing,
        estimate=(body.get("status") or {}).get("estimate"),
        namespace=meta.get("namespace"),
        object_name=meta["name"],
        replicas=spec.get("replicas"),
        scale_from_zero=_scales_from_zero(spec.get("autoscaling")),
        adapters=tuple(
            a["name"] for a in spec.get("adapters") or () if isinstance(a, dict) and a.get("name")
        ),
    )


def _adapters(annotations: dict[str, Any]) -> tuple[tuple[str, int, float], ...] | None:
    """A llama-server pod's adapters from its annotation: (name, engine id, scale); None if absent."""
    raw = annotations.get(contract.ANNOTATION_ADAPTERS)
    if not raw:
        return None
    try:
        items = json.loads(raw)
        return tuple((str(a["name"]), int(a["id"]), float(a.get("scale", 1.0))) for a in items)
    except (ValueError, TypeError, KeyError):
        _log.warning("ignoring malformed %s annotation: %r", contract.ANNOTATION_ADAPTERS, raw[:200])
        return None


def _scales_from_zero(autoscaling: Any) -> bool:
    """Builtin autoscaling down to zero: the gateway asks for the first replica itself."""
    return (
        isinstance(autoscaling, dict)
        and autoscaling.get("mode", "builtin") == "builtin"
        and autoscaling.get("minReplicas", 1) == 0
    )


def pod_phase(pod: dict[str, Any]) -> str:
    """A not-ready pod's stage, as a person waiting for it would put it."""
    status = pod.get("status") or {}
    if (pod.get("metadata") or {}).get("deletionTimestamp"):
        return "stopping"
    scheduled: dict[str, Any] = next(
        (c for c in status.get("conditions") or [] if c.get("type") == "PodScheduled"), {}
    )
    if scheduled.get("status") != "True":
        why = scheduled.get("message") or scheduled.get("reason") or ""
        return f"waiting to be scheduled{': ' + why if why else ''}"[:200]
    for cs in status.get("containerStatuses") or []:
        waiting = (cs.get("state") or {}).get("waiting")
        if waiting:
            reason = waiting.get("reason") or "waiting"
            return "pulling the image" if reason in ("ContainerCreating", "PodInitializing") else reason
        if "running" in (cs.get("state") or {}):  # {"running": {"startedAt": ...}}; may be empty
            return "engine loading the weights"
    return "pod scheduled, starting"


def endpoint_from_pod(pod: dict[str, Any]) -> tuple[str, Endpoint] | None:
    """(model name, replica) for a pod of a model, ready or not; None for anything else."""
    meta, status = pod.get("metadata") or {}, pod.get("status") or {}
    labels = meta.get("labels") or {}
    model = labels.get(contract.LABEL_MODEL)
    if not model:
        return None
    annotations = meta.get("annotations") or {}
    port = annotations.get(contract.ANNOTATION_PORT, str(contract.ENGINE_PORT))
    ip = status.get("podIP")
    ready = (
        bool(ip)
        and not meta.get("deletionTimestamp")
        and any(
            c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or []
        )
    )
    address = f"[{ip}]:{port}" if ip and ":" in ip else f"{ip}:{port}"
    return model, Endpoint(
        id=meta["name"], address=address, model=model, ready=ready, phase="" if ready else pod_phase(pod),
        adapters=_adapters(annotations),
    )  # fmt: skip


class Discovery:
    """Keeps `registry` in step with the cluster (all namespaces, or the given ones)."""

    def __init__(
        self,
        api: client.ApiClient,
        registry: Registry,
        namespace: str | None = None,
        keys: KeyStore | None = None,
        keys_namespace: str | None = None,
    ):
        self.api, self.registry, self.namespace = api, registry, namespace
        self.keys, self.keys_namespace = keys, keys_namespace
        registry.waker = self.wake
        self._woken: dict[str, float] = {}  # model -> when this gateway last asked for a replica
        self._wakes: set[asyncio.Task[None]] = set()
        self.api_keys: dict[str, ApiKey] = {}  # namespace/secret name -> key
        self.models: dict[str, ModelEntry] = {}
        self.pods: dict[str, dict[str, Endpoint]] = {}  # model -> pod name -> endpoint
        self.synced = asyncio.Event()
        self.remote_keys: dict[str, str | None] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._synced_parts: set[str] = set()

    def _key(self, ns: str, name: str) -> str:
        # Models are routed by their public names; the key keeps namespaces apart.
        return name if self.namespace else f"{ns}/{name}"

    def _publish(self, key: str) -> None:
        entry = self.models.get(key)
        if entry is None:
            self.registry.remove_model(key)
            return
        if entry.remote is not None:
            self.registry.set_model(entry, [remote_endpoint(key, entry.remote.base_url)])
            return
        endpoints = sorted(self.pods.get(key, {}).values(), key=lambda e: e.id)
        self.registry.set_model(entry, endpoints)

    WAKE_EVERY_SECONDS = 10.0

    def wake(self, entry: ModelEntry) -> None:
        """Scale a model at zero to one replica, at most once per WAKE_EVERY_SECONDS per model: the
        first request of a burst asks, the rest wait in the queue. Other gateways may ask too; setting 1
        twice is harmless, and the operator's autoscaler takes it from there."""
        now = time.monotonic()
        if now - self._woken.get(entry.name, -1e9) < self.WAKE_EVERY_SECONDS or not entry.namespace:
            return
        self._woken[entry.name] = now
        task = asyncio.create_task(self._scale_up(entry.namespace, entry.object_name or entry.name))
        self._wakes.add(task)
        task.add_done_callback(self._wakes.discard)

    async def _scale_up(self, namespace: str, name: str) -> None:
        try:
            if await kube.scale_from_zero(self.api, namespace, name):
                _log.info("scaling %s/%s from zero for a waiting request", namespace, name)
        except Exception as exc:  # the request still waits; it gets a clear 503 if nothing comes
            self._woken.pop(name, None)
            _log.warning("could not scale %s/%s from zero: %s", namespace, name, exc)

    def on_model(self, kind: str, body: dict[str, Any]) -> None:
        meta = body.get("metadata") or {}
        key = self._key(meta.get("namespace", ""), meta["name"])
        if kind == "DELETED":
            self.models.pop(key, None)
        else:
            entry = entry_from_model(body, self.remote_keys.get(key))
            self.models[key] = ModelEntry(**{**entry.__dict__, "name": key})
            ref = ((body.get("spec") or {}).get("remote") or {}).get("apiKeySecretRef")
            if ref and self.api is not None:
                # The key is read from its Secret off the watch path; until then requests go keyless.
                task = asyncio.get_running_loop().create_task(
                    self._load_key(key, meta.get("namespace", ""), ref)
                )
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        self._publish(key)

    async def _load_key(self, key: str, namespace: str, ref: dict[str, Any]) -> None:
        value = await kube.read_secret_value(self.api, namespace, ref["name"], ref.get("key", "token"))
        self.remote_keys[key] = value
        entry = self.models.get(key)
        if entry is not None and entry.remote is not None and value is not None:
            remote = RemoteTarget(entry.remote.base_url, entry.remote.model, value, entry.remote.native_apis)
            self.models[key] = ModelEntry(**{**entry.__dict__, "remote": remote})
            self._publish(key)

    def on_pod(self, kind: str, pod: dict[str, Any]) -> None:
        found = endpoint_from_pod(pod)
        if found is None:
            return
        model, endpoint = found
        key = self._key((pod.get("metadata") or {}).get("namespace", ""), model)
        endpoint = dataclasses.replace(endpoint, model=key)  # everything the pod says, under the model's key
        pods = self.pods.setdefault(key, {})
        if kind == "DELETED":
            pods.pop(endpoint.id, None)
        else:
            pods[endpoint.id] = endpoint
        self._publish(key)

    def on_secret(self, kind: str, secret: dict[str, Any]) -> None:
        meta = secret.get("metadata") or {}
        ref = f"{meta.get('namespace', '')}/{meta.get('name', '')}"
        self.api_keys.pop(ref, None)
        if kind != "DELETED":
            try:
                self.api_keys[ref] = api_key_from_secret(secret)
            except ValueError as exc:  # the message names the field, never the key
                _log.warning("API-key Secret %s ignored: %s", ref, exc)
        if self.keys is not None:
            self.keys.replace(list(self.api_keys.values()))

    async def run(self) -> None:
        parts = {"models", "pods"} | ({"keys"} if self.keys is not None else set())

        def synced(part: str) -> None:
            self._synced_parts.add(part)
            if self._synced_parts >= parts:
                self.synced.set()

        selector = f"{contract.LABEL_COMPONENT}={contract.COMPONENT_MODEL_SERVER}"
        watches = [
            kube.watch_models(self.api, self.namespace, self.on_model, lambda: synced("models")),
            kube.watch_pods(self.api, self.namespace, selector, self.on_pod, lambda: synced("pods")),
        ]
        if self.keys is not None:
            watches.append(
                kube.watch_secrets(
                    self.api, self.keys_namespace, f"{contract.LABEL_API_KEY}=true", self.on_secret,
                    lambda: synced("keys"),
                )
            )  # fmt: skip
        await asyncio.gather(*watches)
