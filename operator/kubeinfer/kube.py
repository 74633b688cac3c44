"""Every Kubernetes API call kubeinfer makes, in one place (kubernetes_asyncio).

The rest of the code passes plain dicts in and gets plain dicts back, so the reconcile logic stays
testable without a cluster and the client library could be swapped here alone.

Children are written with server-side apply under one field manager: the apiserver merges only the
fields we set, a no-op apply writes nothing (so watching our own children cannot loop), and
`force=True` takes fields back from anyone who edited them, which is how drift is repaired.

This file is over 500 lines because it is the one door to the API on purpose: short functions, one
per call, grouped by what they touch (children, models and their scale, events, watches).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException

from kubeinfer import contract

_log = logging.getLogger("kubeinfer.kube")

FIELD_MANAGER = "kubeinfer-operator"
APPLY = "application/apply-patch+yaml"
MERGE = "application/merge-patch+json"


async def load_client_config(kubeconfig: str | None = None) -> client.Configuration:
    """In-cluster config inside a pod, else the kubeconfig (KUBECONFIG or the given path)."""
    cfg = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
    except config.ConfigException:
        await config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
    return cfg


@contextlib.asynccontextmanager
async def api_client(cfg: client.Configuration | None = None) -> AsyncIterator[client.ApiClient]:
    async with client.ApiClient(configuration=cfg or await load_client_config()) as api:
        # kubernetes_asyncio's aiohttp session trusts the environment, which makes aiohttp look up
        # ~/.netrc in a worker thread on every request: measurable under load, useless in a pod.
        session = getattr(api.rest_client, "pool_manager", None)
        if session is not None and hasattr(session, "_trust_env"):
            session._trust_env = False
        yield api


# Responses are read as plain JSON: the client's model (de)serialization costs more CPU than the
# request itself, and the rest of kubeinfer works on dicts anyway.
RAW: dict[str, Any] = {"_preload_content": False}


async def _json(resp: Any) -> dict[str, Any]:
    """Body of a raw aiohttp response (what `_preload_content=False` returns).

    The client skips its status check for raw responses, so it is done here, raising the same
    ApiException (status, reason, body) callers already handle.
    """
    async with resp:
        raw = await resp.read()
    if not 200 <= resp.status <= 299:
        exc = ApiException(status=resp.status, reason=resp.reason)
        exc.body = raw.decode(errors="replace")
        exc.headers = resp.headers
        raise exc
    data: dict[str, Any] = json.loads(raw)
    return data


# KEDA's ScaledObject (autoscaling.mode keda): a custom resource, served only where KEDA is installed.
KEDA_GROUP, KEDA_VERSION, KEDA_PLURAL = "keda.sh", "v1alpha1", "scaledobjects"
KEDA_NOT_INSTALLED = (
    "KEDA is not installed on this cluster: the apiserver does not serve keda.sh/v1alpha1 ScaledObjects "
    "(the CRD scaledobjects.keda.sh is missing). autoscaling.mode keda needs KEDA "
    "(https://keda.sh/docs/latest/deploy/); or use mode hpa or builtin."
)


def api_not_served(exc: ApiException) -> bool:
    """A 404 for the resource type itself (no CRD, API group not installed), not for one object.

    A missing object (or namespace) is a Status that names it in `details`; an API group nobody serves
    is the plain text "404 page not found", and a missing resource of a served group a Status that
    names nothing."""
    if exc.status != 404:
        return False
    try:
        status = json.loads(exc.body or "")
    except ValueError:
        return True
    return not isinstance(status, dict) or not (status.get("details") or {}).get("name")


async def apply(api: client.ApiClient, obj: dict[str, Any]) -> dict[str, Any]:
    """Server-side apply one namespaced child (Deployment, Service, PodDisruptionBudget,
    HorizontalPodAutoscaler or KEDA ScaledObject).

    A ScaledObject on a cluster without KEDA fails with a 404 whose message says so."""
    name, ns, kind = obj["metadata"]["name"], obj["metadata"]["namespace"], obj["kind"]
    kw: dict[str, Any] = {"field_manager": FIELD_MANAGER, "force": True, "_content_type": APPLY, **RAW}
    out: Any
    if kind == "Deployment":
        out = await client.AppsV1Api(api).patch_namespaced_deployment(name, ns, obj, **kw)
    elif kind == "Service":
        out = await client.CoreV1Api(api).patch_namespaced_service(name, ns, obj, **kw)
    elif kind == "PodDisruptionBudget":
        out = await client.PolicyV1Api(api).patch_namespaced_pod_disruption_budget(name, ns, obj, **kw)
    elif kind == "HorizontalPodAutoscaler":
        hpa = client.AutoscalingV2Api(api)
        out = await hpa.patch_namespaced_horizontal_pod_autoscaler(name, ns, obj, **kw)
    elif kind == "ScaledObject":
        try:
            return await _json(
                await client.CustomObjectsApi(api).patch_namespaced_custom_object(
                    KEDA_GROUP, KEDA_VERSION, ns, KEDA_PLURAL, name, obj, **kw
                )
            )
        except ApiException as exc:
            if api_not_served(exc):
                exc.body = json.dumps({"kind": "Status", "code": 404, "message": KEDA_NOT_INSTALLED}).encode()
            raise
    else:
        raise ValueError(f"kubeinfer does not apply {kind}")
    return await _json(out)


def _keda_call(method: Callable[..., Any]) -> Callable[..., Any]:
    """A CustomObjectsApi method for ScaledObjects, called like the typed ones: (name, namespace, ...)."""

    def call(name: str, namespace: str, **kw: Any) -> Any:
        return method(KEDA_GROUP, KEDA_VERSION, namespace, KEDA_PLURAL, name, **kw)

    return call


async def get_child(api: client.ApiClient, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
    """A child of any kind kubeinfer applies, or None if it does not exist."""
    calls = {
        "Deployment": client.AppsV1Api(api).read_namespaced_deployment,
        "Service": client.CoreV1Api(api).read_namespaced_service,
        "PodDisruptionBudget": client.PolicyV1Api(api).read_namespaced_pod_disruption_budget,
        "HorizontalPodAutoscaler": client.AutoscalingV2Api(api).read_namespaced_horizontal_pod_autoscaler,
        "ScaledObject": _keda_call(client.CustomObjectsApi(api).get_namespaced_custom_object),
    }
    try:
        return await _json(await calls[kind](name, namespace, **RAW))
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def api_error_message(exc: ApiException) -> str:
    """The apiserver's own words for a refused request (its Status message), else the reason."""
    try:
        message = json.loads(exc.body or "{}").get("message")
    except (ValueError, AttributeError):
        message = None
    return str(message or exc.reason or exc.status)


async def delete_children(
    api: client.ApiClient, namespace: str, name: str, kinds: tuple[str, ...]
) -> list[str]:
    """Delete the named children of the given kinds if they exist; returns the kinds deleted."""
    deleted = []
    calls = {
        "Deployment": client.AppsV1Api(api).delete_namespaced_deployment,
        "Service": client.CoreV1Api(api).delete_namespaced_service,
        "PodDisruptionBudget": client.PolicyV1Api(api).delete_namespaced_pod_disruption_budget,
        "HorizontalPodAutoscaler": client.AutoscalingV2Api(api).delete_namespaced_horizontal_pod_autoscaler,
        "ScaledObject": _keda_call(client.CustomObjectsApi(api).delete_namespaced_custom_object),
    }
    for kind in kinds:
        try:
            await calls[kind](name, namespace, propagation_policy="Background")
            deleted.append(kind)
        except ApiException as exc:
            if exc.status != 404:
                raise
    return deleted


async def get_deployment(api: client.ApiClient, namespace: str, name: str) -> dict[str, Any] | None:
    try:
        return await _json(await client.AppsV1Api(api).read_namespaced_deployment(name, namespace, **RAW))
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


async def list_model_pods(api: client.ApiClient, namespace: str, model: str) -> list[dict[str, Any]]:
    selector = ",".join(f"{k}={v}" for k, v in contract.selector_labels(model).items())
    pods = await client.CoreV1Api(api).list_namespaced_pod(namespace, label_selector=selector, **RAW)
    return list((await _json(pods)).get("items", []))


# --- the weight cache: its claim, download Jobs and their logs ---------------------------------------


async def create_claim_if_missing(api: client.ApiClient, claim: dict[str, Any]) -> bool:
    """Create the cache's PersistentVolumeClaim unless it exists (never changed or deleted after:
    its size and class are the storage admin's once it is bound). True if created."""
    core = client.CoreV1Api(api)
    name, ns = claim["metadata"]["name"], claim["metadata"]["namespace"]
    try:
        await _json(await core.read_namespaced_persistent_volume_claim(name, ns, **RAW))
        return False
    except ApiException as exc:
        if exc.status != 404:
            raise
    try:
        body: Any = claim
        await _json(await core.create_namespaced_persistent_volume_claim(ns, body, **RAW))
        return True
    except ApiException as exc:
        if exc.status == 409:  # another model's pass created it first
            return False
        raise


async def get_job(api: client.ApiClient, namespace: str, name: str) -> dict[str, Any] | None:
    try:
        return await _json(await client.BatchV1Api(api).read_namespaced_job(name, namespace, **RAW))
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


async def create_job(api: client.ApiClient, job: dict[str, Any]) -> dict[str, Any]:
    """Create a Job; if another pass created it first, the existing one."""
    ns, name = job["metadata"]["namespace"], job["metadata"]["name"]
    try:
        body: Any = job
        return await _json(await client.BatchV1Api(api).create_namespaced_job(ns, body, **RAW))
    except ApiException as exc:
        if exc.status != 409:
            raise
    existing = await get_job(api, ns, name)
    if existing is None:
        raise RuntimeError(f"Job {ns}/{name} conflicted on create and is gone")
    return existing


async def delete_job(api: client.ApiClient, namespace: str, name: str) -> None:
    """Delete a Job and its pods (a failed download, to run again after the user fixed the cause)."""
    try:
        await client.BatchV1Api(api).delete_namespaced_job(name, namespace, propagation_policy="Foreground")
    except ApiException as exc:
        if exc.status != 404:
            raise


async def job_log_tail(
    api: client.ApiClient, namespace: str, job: str, container: str, lines: int = 50
) -> tuple[list[str], str | None]:
    """The last log lines of a Job's newest pod, and a terminated container's message.

    The log may be gone (pod deleted, node down); the termination message is the fallback."""
    core = client.CoreV1Api(api)
    listed = await _json(await core.list_namespaced_pod(namespace, label_selector=f"job-name={job}", **RAW))
    pods = sorted(
        listed.get("items", []), key=lambda p: str((p.get("metadata") or {}).get("creationTimestamp") or "")
    )
    if not pods:
        return [], None
    pod = pods[-1]
    message = None
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        terminated = (cs.get("state") or {}).get("terminated") or {}
        if cs.get("name") == container and terminated.get("message"):
            message = str(terminated["message"])
    try:
        resp: Any = await core.read_namespaced_pod_log(
            pod["metadata"]["name"], namespace, container=container, tail_lines=lines, **RAW
        )
        async with resp:
            raw = await resp.read()
        text = raw.decode(errors="replace") if 200 <= resp.status <= 299 else ""
    except (ApiException, OSError):
        text = ""
    return text.splitlines(), message


async def secret_exists(api: client.ApiClient, namespace: str, name: str, key: str | None = None) -> bool:
    try:
        secret = await client.CoreV1Api(api).read_namespaced_secret(name, namespace)
    except ApiException as exc:
        if exc.status == 404:
            return False
        raise
    return key is None or key in (secret.data or {}) or key in (secret.string_data or {})


async def read_secret_value(api: client.ApiClient, namespace: str, name: str, key: str) -> str | None:
    """One value of a Secret, decoded; None if the Secret or the key is missing."""
    import base64

    try:
        secret = await _json(await client.CoreV1Api(api).read_namespaced_secret(name, namespace, **RAW))
    except ApiException as exc:
        if exc.status in (403, 404):
            return None
        raise
    value = (secret.get("data") or {}).get(key)
    return base64.b64decode(value).decode() if value is not None else None


async def get_model(api: client.ApiClient, namespace: str, name: str) -> dict[str, Any] | None:
    try:
        obj = await client.CustomObjectsApi(api).get_namespaced_custom_object(
            contract.GROUP, contract.VERSION, namespace, contract.PLURAL, name
        )
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise
    return dict(obj)


async def list_models(api: client.ApiClient, namespaces: list[str]) -> list[dict[str, Any]]:
    objs = client.CustomObjectsApi(api)
    if not namespaces:
        out = await objs.list_cluster_custom_object(contract.GROUP, contract.VERSION, contract.PLURAL)
        return list(out.get("items", []))
    items: list[dict[str, Any]] = []
    for ns in namespaces:
        out = await objs.list_namespaced_custom_object(contract.GROUP, contract.VERSION, ns, contract.PLURAL)
        items += out.get("items", [])
    return items


async def patch_model_status(
    api: client.ApiClient, namespace: str, name: str, status: dict[str, Any]
) -> None:
    """JSON merge patch of the status subresource: keys set to None are removed."""
    await client.CustomObjectsApi(api).patch_namespaced_custom_object_status(
        contract.GROUP, contract.VERSION, namespace, contract.PLURAL, name, {"status": status},
        _content_type=MERGE,  # type: ignore[call-arg]  # the client would send a dict as json-patch
    )  # fmt: skip


async def scale_model(api: client.ApiClient, namespace: str, name: str, replicas: int) -> None:
    """Set spec.replicas through the scale subresource, as `kubectl scale` and an HPA do."""
    await client.CustomObjectsApi(api).patch_namespaced_custom_object_scale(
        contract.GROUP, contract.VERSION, namespace, contract.PLURAL, name, {"spec": {"replicas": replicas}},
        _content_type=MERGE,  # type: ignore[call-arg]
    )  # fmt: skip


async def scale_from_zero(api: client.ApiClient, namespace: str, name: str, attempts: int = 5) -> bool:
    """Set replicas to 1 if they are 0 (the gateway, for a request to a scaled-to-zero model); False
    when they were not 0. Conditional on the Scale's resourceVersion, read again after a conflict:
    the model's resourceVersion also moves with every status write, so a 409 says only that something
    changed; a model someone scaled meanwhile is then seen at its new count and left alone. (A Scale
    at zero has no spec.replicas at all, so a JSON-patch `test` of that path cannot be the condition.)"""
    objs = client.CustomObjectsApi(api)
    for _ in range(attempts):
        scale = await objs.get_namespaced_custom_object_scale(
            contract.GROUP, contract.VERSION, namespace, contract.PLURAL, name
        )
        if int((scale.get("spec") or {}).get("replicas") or 0) != 0:
            return False
        version = scale["metadata"]["resourceVersion"]
        patch = {"metadata": {"resourceVersion": version}, "spec": {"replicas": 1}}
        try:
            await objs.patch_namespaced_custom_object_scale(
                contract.GROUP, contract.VERSION, namespace, contract.PLURAL, name, patch,
                _content_type=MERGE,  # type: ignore[call-arg]
            )  # fmt: skip
        except ApiException as exc:
            if exc.status == 409:  # changed since the read (a status write, or a scale): look again
                continue
            raise
        return True
    return False  # changing under us every time: the next request (or the autoscaler) tries again


async def ready_pod_ips(api: client.ApiClient, namespace: str | None, selector: str) -> list[str]:
    """IPs of the ready pods matching a label selector (the gateways, for the autoscaler)."""
    core = client.CoreV1Api(api)
    if namespace:
        listed = await core.list_namespaced_pod(namespace, label_selector=selector, **RAW)
    else:
        listed = await core.list_pod_for_all_namespaces(label_selector=selector, **RAW)
    ips = []
    for pod in (await _json(listed)).get("items", []):
        st = pod.get("status") or {}
        ready = any(
            c.get("type") == "Ready" and c.get("status") == "True" for c in st.get("conditions") or []
        )
        if ready and st.get("podIP") and not pod.get("metadata", {}).get("deletionTimestamp"):
            ips.append(str(st["podIP"]))
    return ips


async def post_event(
    api: client.ApiClient, obj: dict[str, Any], type_: str, reason: str, message: str
) -> None:
    """A core/v1 Event about `obj`, for loops that run outside kopf's handlers (kopf.event needs the
    handler's context)."""
    meta = obj.get("metadata") or {}
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    body: Any = {
        "metadata": {"generateName": f"{meta.get('name')}.", "namespace": meta.get("namespace")},
        "involvedObject": {
            "apiVersion": obj.get("apiVersion", contract.API_VERSION), "kind": obj.get("kind", contract.KIND),
            "name": meta.get("name"), "namespace": meta.get("namespace"), "uid": meta.get("uid"),
        },
        "type": type_, "reason": reason, "message": message[:1024],
        "firstTimestamp": now, "lastTimestamp": now, "count": 1,
        "source": {"component": "kubeinfer"}, "reportingComponent": "kubeinfer",
    }  # fmt: skip
    await client.CoreV1Api(api).create_namespaced_event(str(meta.get("namespace")), body)


async def install_crd(api: client.ApiClient, body: Any, timeout: float = 60) -> None:
    """Create or update the CRD and wait until it is Established and its API is served."""
    ext = client.ApiextensionsV1Api(api)
    name = body["metadata"]["name"]
    try:
        await ext.create_custom_resource_definition(body)
    except ApiException as exc:
        if exc.status != 409:
            raise
        await ext.patch_custom_resource_definition(
            name,
            body,
            field_manager=FIELD_MANAGER,
            force=True,
            _content_type=APPLY,  # type: ignore[call-arg]
        )
    deadline = time.monotonic() + timeout
    while True:
        obj = await ext.read_custom_resource_definition(name)
        if any(c.type == "Established" and c.status == "True" for c in obj.status.conditions or []):
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"CRD {name} not Established: {obj.status}")
        await asyncio.sleep(0.25)
    objs = client.CustomObjectsApi(api)
    while True:  # discovery can lag Established by a moment
        try:
            await objs.list_cluster_custom_object(contract.GROUP, contract.VERSION, contract.PLURAL)
            return
        except ApiException:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.25)


async def ensure_namespace(api: client.ApiClient, name: str) -> None:
    try:
        body: Any = {"metadata": {"name": name}}
        await client.CoreV1Api(api).create_namespace(body)
    except ApiException as exc:
        if exc.status != 409:
            raise


async def create_model(api: client.ApiClient, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
    out = await client.CustomObjectsApi(api).create_namespaced_custom_object(
        contract.GROUP, contract.VERSION, namespace, contract.PLURAL, body
    )
    return dict(out)


async def apply_model(api: client.ApiClient, body: dict[str, Any]) -> None:
    """Server-side apply an LLMModel, as `kubectl apply --server-side` would."""
    meta = body["metadata"]
    await client.CustomObjectsApi(api).patch_namespaced_custom_object(
        contract.GROUP, contract.VERSION, meta["namespace"], contract.PLURAL, meta["name"], body,
        field_manager="kubeinfer-cli", force=True, _content_type=APPLY,  # type: ignore[call-arg]
    )  # fmt: skip


async def ensure_local_claim(api: client.ApiClient, namespace: str, claim: str, size: str = "1Gi") -> None:
    """A PersistentVolumeClaim pre-bound to a hostPath volume, for pvc:// models on a local cluster."""
    core = client.CoreV1Api(api)
    pv_name = f"kubeinfer-{namespace}-{claim}"
    pv: Any = {
        "metadata": {"name": pv_name},
        "spec": {
            "capacity": {"storage": size}, "accessModes": ["ReadOnlyMany", "ReadWriteOnce"],
            "storageClassName": "", "hostPath": {"path": f"/var/lib/kubeinfer/{claim}"},
            "claimRef": {"namespace": namespace, "name": claim},
        },
    }  # fmt: skip
    pvc: Any = {
        "metadata": {"name": claim},
        "spec": {"accessModes": ["ReadOnlyMany"], "storageClassName": "", "volumeName": pv_name,
                 "resources": {"requests": {"storage": size}}},
    }  # fmt: skip
    for call in (
        lambda: core.create_persistent_volume(pv),
        lambda: core.create_namespaced_persistent_volume_claim(namespace, pvc),
    ):
        try:
            await call()
        except ApiException as exc:
            if exc.status != 409:
                raise


async def watch_deployment_names(api: client.ApiClient, namespace: str, seen: dict[str, float]) -> None:
    """Record, by name, when each Deployment in `namespace` is first seen (for benchmarks)."""
    from kubernetes_asyncio import watch

    apps = client.AppsV1Api(api)
    while True:
        w = watch.Watch()
        async for event in w.stream(apps.list_namespaced_deployment, namespace, timeout_seconds=300):
            name = event["object"].metadata.name
            seen.setdefault(name, time.monotonic())


Handler = Callable[[str, dict[str, Any]], None]


async def list_then_watch(
    what: str,
    lister: Any,
    args: tuple[Any, ...],
    kw: dict[str, Any],
    handle: Handler,
    on_synced: Callable[[], None],
) -> None:
    """List, hand every item to `handle` as ADDED, then watch from the list's resourceVersion; on any
    error (including an expired version) start over. Runs until cancelled."""
    from kubernetes_asyncio import watch

    while True:
        try:
            listed = await lister(*args, **kw, **RAW)
            data = await _json(listed)
            for item in data.get("items", []):
                handle("ADDED", item)
            on_synced()
            version = data["metadata"]["resourceVersion"]
            async with watch.Watch().stream(
                lister, *args, **kw, resource_version=version, timeout_seconds=300
            ) as events:
                async for event in events:
                    if event["type"] in ("ADDED", "MODIFIED", "DELETED"):
                        handle(event["type"], event.get("raw_object") or event["object"])
        except asyncio.CancelledError:
            raise
        except (ApiException, OSError, ValueError, KeyError) as exc:
            _log.warning("%s watch restarts after %s", what, exc)
            await asyncio.sleep(1)


async def watch_models(
    api: client.ApiClient, namespace: str | None, handle: Handler, on_synced: Callable[[], None]
) -> None:
    objs = client.CustomObjectsApi(api)
    if namespace:
        lister: Any = objs.list_namespaced_custom_object
        args: tuple[Any, ...] = (contract.GROUP, contract.VERSION, namespace, contract.PLURAL)
    else:
        lister = objs.list_cluster_custom_object
        args = (contract.GROUP, contract.VERSION, contract.PLURAL)
    await list_then_watch("LLMModel", lister, args, {}, handle, on_synced)


async def _watch_core(
    api: client.ApiClient,
    kind: str,
    namespace: str | None,
    selector: str,
    handle: Handler,
    on_synced: Callable[[], None],
) -> None:
    """List-then-watch core-API objects of `kind` ("pod", "secret") with a label selector."""
    core = client.CoreV1Api(api)
    if namespace:
        lister: Any = getattr(core, f"list_namespaced_{kind}")
        args: tuple[Any, ...] = (namespace,)
    else:
        lister = getattr(core, f"list_{kind}_for_all_namespaces")
        args = ()
    await list_then_watch(kind, lister, args, {"label_selector": selector}, handle, on_synced)


async def watch_pods(
    api: client.ApiClient,
    namespace: str | None,
    selector: str,
    handle: Handler,
    on_synced: Callable[[], None],
) -> None:
    await _watch_core(api, "pod", namespace, selector, handle, on_synced)


async def watch_secrets(
    api: client.ApiClient,
    namespace: str | None,
    selector: str,
    handle: Handler,
    on_synced: Callable[[], None],
) -> None:
    await _watch_core(api, "secret", namespace, selector, handle, on_synced)
