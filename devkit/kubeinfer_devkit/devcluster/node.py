"""The node agent's side of the apiserver: the Node, its Lease, the pods bound to it.

:class:`NodeAgent` registers the Node (capacity from this machine, ``nvidia.com/gpu: 0``), renews
its Lease in ``kube-node-lease`` and posts node status, authenticated as ``system:node:<name>`` so
the Node authorizer and NodeRestriction admission hold it to a kubelet's permissions. It lists and
watches the pods bound to the node and keeps one :class:`~kubeinfer_devkit.devcluster.pods.PodWorker`
per pod; for them it writes pod status, Events and the final delete, and resolves what a pod spec
names in the API (a claim's hostPath volume, Secret and ConfigMap keys, the downward API).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import platform
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
from kubernetes_asyncio import client, watch
from kubernetes_asyncio.client.exceptions import ApiException

from kubeinfer import kube
from kubeinfer_devkit.devcluster import procs
from kubeinfer_devkit.devcluster.containers import now
from kubeinfer_devkit.devcluster.podplan import GPU_RESOURCE, NODE_NAME, Runtime, Unrunnable, expand
from kubeinfer_devkit.devcluster.pods import LoopbackPool, PodWorker

_log = logging.getLogger("kubeinfer.nodeagent")

AGENT = "kubeinfer-node-agent"
LEASE_NAMESPACE = "kube-node-lease"
LOCALHOST = "127.0.0.1"  # the node's address: the apiserver reaches the log server here
LEASE_SECONDS = 40
LEASE_RENEW_SECONDS = 10.0
NODE_STATUS_SECONDS = 60.0
# Keyword arguments of the client calls: raw JSON responses, and the patch flavours (the client would
# send a dict as a JSON patch). Typed Any: the client's stubs name one model class per body.
_RAW: dict[str, Any] = dict(kube.RAW)
_STRATEGIC: dict[str, Any] = {"_content_type": "application/strategic-merge-patch+json", **kube.RAW}
_MERGE: dict[str, Any] = {"_content_type": kube.MERGE, **kube.RAW}


def micro_now() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e6):06d}Z"


def machine_capacity(state_dir: Path) -> dict[str, str]:
    mem_kib = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    disk = shutil.disk_usage(state_dir).total
    return {
        "cpu": str(os.cpu_count() or 1),
        "memory": f"{mem_kib}Ki",
        "pods": "110",
        "ephemeral-storage": str(disk),
        GPU_RESOURCE: "0",
    }


def _read(path: str, default: str = "") -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return default


def node_object(
    name: str, capacity: dict[str, str], kubelet_port: int, kubelet_version: str
) -> dict[str, Any]:
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
    os_image = next(
        (
            line.split("=", 1)[1].strip('"')
            for line in _read("/etc/os-release").splitlines()
            if line.startswith("PRETTY_NAME=")
        ),
        "Linux",
    )
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": arch,
                "kubeinfer.io/local-node": "true",
            },
        },
        "spec": {},
        "status": {
            "capacity": capacity,
            "allocatable": capacity,
            "conditions": node_conditions(),
            "addresses": [
                {"type": "InternalIP", "address": LOCALHOST},
                {"type": "Hostname", "address": name},
            ],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": kubelet_port}},
            "nodeInfo": {
                "machineID": _read("/etc/machine-id"),
                "systemUUID": _read("/sys/class/dmi/id/product_uuid"),
                "bootID": _read("/proc/sys/kernel/random/boot_id"),
                "kernelVersion": platform.release(),
                "osImage": os_image,
                "containerRuntimeVersion": f"{AGENT}://local-processes",
                "kubeletVersion": kubelet_version,
                "kubeProxyVersion": "",
                "operatingSystem": "linux",
                "architecture": arch,
            },
        },
    }


def node_conditions(ready: bool = True) -> list[dict[str, Any]]:
    t = now()
    rows = [
        ("MemoryPressure", "False", "KubeletHasSufficientMemory", "enough memory"),
        ("DiskPressure", "False", "KubeletHasNoDiskPressure", "no disk pressure"),
        ("PIDPressure", "False", "KubeletHasSufficientPID", "enough PIDs"),
        (
            "Ready",
            "True" if ready else "False",
            "KubeletReady" if ready else "KubeletNotReady",
            f"{AGENT} is posting ready status" if ready else f"{AGENT} stopped",
        ),
    ]
    return [
        {"type": k, "status": s, "reason": r, "message": m, "lastHeartbeatTime": t, "lastTransitionTime": t}
        for k, s, r, m in rows
    ]


async def api_body(resp: Any) -> Any:
    """JSON of a raw (`_preload_content=False`) response; ApiException on an error status."""
    async with resp:
        raw = await resp.read()
    if not 200 <= resp.status <= 299:
        exc = ApiException(status=resp.status, reason=resp.reason)
        exc.body = raw.decode(errors="replace")
        raise exc
    return json.loads(raw) if raw else None


class NodeAgent:
    def __init__(
        self,
        api: client.ApiClient,
        state_dir: Path,
        runtime: Runtime,
        name: str = NODE_NAME,
        kubelet_version: str = "v0.0.0",
    ) -> None:
        self.api, self.state_dir, self.runtime, self.name = api, state_dir, runtime, name
        self.kubelet_version = kubelet_version
        self.core = client.CoreV1Api(api)
        self.ips = LoopbackPool()
        self.workers: dict[str, PodWorker] = {}
        self.http = httpx.AsyncClient(trust_env=False)
        self.kubelet_port = 0
        self._events: dict[tuple[str, str, str], float] = {}
        self._claims: dict[tuple[str, str], str] = {}

    # -- node ---------------------------------------------------------------------------------------

    async def register(self) -> None:
        body: Any = node_object(
            self.name, machine_capacity(self.state_dir), self.kubelet_port, self.kubelet_version
        )
        try:
            await api_body(await self.core.create_node(body, **_RAW))
            _log.info("registered node %s", self.name)
        except ApiException as exc:
            if exc.status != 409:
                raise
            await self.post_node_status(body["status"])
            _log.info("node %s exists; status updated", self.name)

    async def post_node_status(self, status: dict[str, Any] | None = None) -> None:
        if status is None:
            status = {"conditions": node_conditions()}
        await api_body(await self.core.patch_node_status(self.name, {"status": status}, **_STRATEGIC))

    async def renew_lease(self) -> None:
        coord = client.CoordinationV1Api(self.api)
        spec = {"holderIdentity": self.name, "leaseDurationSeconds": LEASE_SECONDS, "renewTime": micro_now()}
        try:
            await api_body(
                await coord.patch_namespaced_lease(self.name, LEASE_NAMESPACE, {"spec": spec}, **_MERGE)
            )
        except ApiException as exc:
            if exc.status != 404:
                raise
            body: Any = {"metadata": {"name": self.name, "namespace": LEASE_NAMESPACE}, "spec": spec}
            await api_body(await coord.create_namespaced_lease(LEASE_NAMESPACE, body, **_RAW))

    async def heartbeat(self) -> None:
        last_status = time.monotonic()
        while True:
            try:
                await self.renew_lease()
                if time.monotonic() - last_status >= NODE_STATUS_SECONDS:
                    await self.post_node_status()
                    last_status = time.monotonic()
            except (ApiException, OSError, TimeoutError) as exc:
                _log.warning("heartbeat failed: %s", exc)
            await asyncio.sleep(LEASE_RENEW_SECONDS)

    # -- pods ---------------------------------------------------------------------------------------

    def on_pod(self, pod: dict[str, Any]) -> None:
        uid = pod["metadata"]["uid"]
        worker = self.workers.get(uid)
        if worker is not None:
            worker.update(pod)
            return
        phase = (pod.get("status") or {}).get("phase")
        if phase in ("Succeeded", "Failed") and not pod["metadata"].get("deletionTimestamp"):
            return  # finished before we saw it; nothing to run
        self.workers[uid] = PodWorker(self, pod)

    def on_gone(self, uid: str) -> None:
        worker = self.workers.get(uid)
        if worker is not None:
            worker.gone()

    def forget(self, worker: PodWorker) -> None:
        if self.workers.get(worker.uid) is worker:
            del self.workers[worker.uid]

    async def watch_pods(self) -> None:
        """List then watch the pods bound to this node (the only pods the Node authorizer lets a
        node list); a re-list also finds pods deleted while the watch was down."""
        selector = f"spec.nodeName={self.name}"
        while True:
            try:
                data = await api_body(
                    await self.core.list_pod_for_all_namespaces(field_selector=selector, **_RAW)
                )
                listed = {p["metadata"]["uid"] for p in data["items"]}
                for uid in [u for u in self.workers if u not in listed]:
                    self.on_gone(uid)
                for pod in data["items"]:
                    self.on_pod(pod)
                version = data["metadata"]["resourceVersion"]
                async with watch.Watch().stream(
                    self.core.list_pod_for_all_namespaces, field_selector=selector,
                    resource_version=version, timeout_seconds=300,
                ) as events:  # fmt: skip
                    async for event in events:
                        obj = event.get("raw_object") or {}
                        if event["type"] == "DELETED":
                            self.on_gone(obj["metadata"]["uid"])
                        elif event["type"] in ("ADDED", "MODIFIED"):
                            self.on_pod(obj)
            except asyncio.CancelledError:
                raise
            except (ApiException, OSError, ValueError, KeyError, TimeoutError) as exc:
                _log.warning("pod watch restarts after %s", exc)
                await asyncio.sleep(1)

    async def patch_pod_status(self, worker: PodWorker, status: dict[str, Any]) -> None:
        await api_body(
            await self.core.patch_namespaced_pod_status(
                worker.name, worker.namespace, {"status": status}, **_STRATEGIC
            )
        )

    async def delete_pod(self, worker: PodWorker) -> None:
        """The kubelet's last word on a pod it stopped: delete it now, if it is still that pod."""
        body: Any = {"gracePeriodSeconds": 0, "preconditions": {"uid": worker.uid}}
        try:
            await api_body(
                await self.core.delete_namespaced_pod(worker.name, worker.namespace, body=body, **_RAW)
            )
        except ApiException as exc:
            if exc.status not in (404, 409):
                _log.warning("pod %s/%s: delete failed: %s", worker.namespace, worker.name, exc.reason)

    async def event(
        self,
        worker: PodWorker,
        type_: str,
        reason: str,
        message: str,
        container: str | None = None,
        once: bool = False,
    ) -> None:
        key = (worker.uid, reason, message)
        last = self._events.get(key)
        if last is not None and (once or time.monotonic() - last < 60):
            return  # the same news again: not worth an apiserver write
        self._events[key] = time.monotonic()
        _log.info("pod %s/%s: %s %s: %s", worker.namespace, worker.name, type_, reason, message)
        obj = {"kind": "Pod", "apiVersion": "v1", "namespace": worker.namespace, "name": worker.name,
               "uid": worker.uid}  # fmt: skip
        if container:
            obj["fieldPath"] = f"spec.containers{{{container}}}"
        t = now()
        body: Any = {
            "metadata": {"name": f"{worker.name}.{uuid.uuid4().hex[:16]}", "namespace": worker.namespace},
            "involvedObject": obj, "reason": reason, "message": message[:1024], "type": type_,
            "source": {"component": AGENT, "host": self.name}, "firstTimestamp": t, "lastTimestamp": t,
            "count": 1, "reportingComponent": AGENT, "reportingInstance": self.name,
        }  # fmt: skip
        with contextlib.suppress(ApiException, OSError, TimeoutError):
            await api_body(await self.core.create_namespaced_event(worker.namespace, body, **_RAW))

    # -- volumes and env ----------------------------------------------------------------------------

    async def resolve_volumes(self, worker: PodWorker) -> dict[str, str]:
        out: dict[str, str] = {}
        for vol in worker.pod["spec"].get("volumes") or []:
            name = vol["name"]
            if "persistentVolumeClaim" in vol:
                out[name] = await self._claim_path(
                    worker.namespace, vol["persistentVolumeClaim"]["claimName"]
                )
            elif "hostPath" in vol:
                out[name] = vol["hostPath"]["path"]
            elif {"emptyDir", "projected", "configMap", "secret", "downwardAPI"} & set(vol):
                # Scratch space (and, empty, what the engines never read: the service-account token).
                path = worker.dir / "volumes" / name
                path.mkdir(parents=True, exist_ok=True)
                out[name] = str(path)
            else:
                kind = next((k for k in vol if k != "name"), "?")
                raise Unrunnable(
                    "CreateContainerConfigError", f"volume {name!r}: {kind} is not supported here"
                )
        return out

    async def _claim_path(self, namespace: str, claim: str) -> str:
        """A claim's local directory: the hostPath of the PersistentVolume it is bound to."""
        key = (namespace, claim)
        if key not in self._claims:
            try:
                pvc = await api_body(
                    await self.core.read_namespaced_persistent_volume_claim(claim, namespace, **_RAW)
                )
                pv_name = (pvc.get("spec") or {}).get("volumeName")
                if not pv_name:
                    raise Unrunnable(
                        "CreateContainerConfigError", f"claim {claim!r} is not bound to a volume"
                    )
                pv = await api_body(await self.core.read_persistent_volume(pv_name, **_RAW))
            except ApiException as exc:
                raise Unrunnable(
                    "CreateContainerConfigError", f"claim {claim!r}: {exc.status} {exc.reason}"
                ) from None
            path = ((pv.get("spec") or {}).get("hostPath") or {}).get("path")
            if not path:
                raise Unrunnable(
                    "CreateContainerConfigError",
                    f"claim {claim!r} is bound to {pv_name}, which is not a hostPath volume",
                )
            self._claims[key] = path
        path = self._claims[key]
        if not Path(path).is_dir():
            del self._claims[key]
            raise Unrunnable("CreateContainerConfigError", f"claim {claim!r}: {path} does not exist here")
        return path

    async def resolve_env(self, worker: PodWorker, container: dict[str, Any]) -> dict[str, str]:
        env: dict[str, str] = {}
        if container.get("envFrom"):
            raise Unrunnable("CreateContainerConfigError", "envFrom is not supported here")
        fields = {
            "metadata.name": worker.name, "metadata.namespace": worker.namespace, "metadata.uid": worker.uid,
            "spec.nodeName": self.name, "status.podIP": worker.ip, "status.hostIP": "127.0.0.1",
        }  # fmt: skip
        for var in container.get("env") or []:
            name = var["name"]
            if "valueFrom" not in var:
                env[name] = expand(var.get("value", ""), env)
                continue
            src = var["valueFrom"]
            if "fieldRef" in src and src["fieldRef"].get("fieldPath") in fields:
                env[name] = fields[src["fieldRef"]["fieldPath"]]
            elif "secretKeyRef" in src or "configMapKeyRef" in src:
                ref = src.get("secretKeyRef") or src["configMapKeyRef"]
                value = await self._key_ref(worker.namespace, "secretKeyRef" in src, ref)
                if value is not None:
                    env[name] = value
            else:
                raise Unrunnable(
                    "CreateContainerConfigError", f"env {name}: this valueFrom is not supported here"
                )
        return env

    async def _key_ref(self, namespace: str, secret: bool, ref: dict[str, Any]) -> str | None:
        kind = "secret" if secret else "configmap"
        try:
            if secret:
                obj = await api_body(await self.core.read_namespaced_secret(ref["name"], namespace, **_RAW))
            else:
                config_map = await self.core.read_namespaced_config_map(ref["name"], namespace, **_RAW)
                obj = await api_body(config_map)
        except ApiException as exc:
            if ref.get("optional"):
                return None
            raise Unrunnable(
                "CreateContainerConfigError", f'{kind} "{ref["name"]}" not found ({exc.status})'
            ) from None
        data = obj.get("data") or {}
        if ref["key"] not in data:
            if ref.get("optional"):
                return None
            raise Unrunnable(
                "CreateContainerConfigError",
                f"couldn't find key {ref['key']} in {kind.title()} {ref['name']}",
            )
        value = data[ref["key"]]
        return base64.b64decode(value).decode() if secret else str(value)

    # -- start and stop -----------------------------------------------------------------------------

    def clean_leftovers(self) -> None:
        """Kill processes an earlier agent left (its watchdogs normally got them already)."""
        for record in (self.state_dir / "pods").glob("*/record.json"):
            with contextlib.suppress(OSError, ValueError, KeyError):
                data = json.loads(record.read_text())
                for c in data["containers"].values():
                    if procs.alive(c["pid"], c.get("ticks")):
                        _log.info(
                            "killing leftover process %s of pod %s/%s",
                            c["pid"],
                            data["namespace"],
                            data["name"],
                        )
                        procs.kill_group(c["pid"])
            record.unlink(missing_ok=True)

    async def shutdown(self) -> None:
        workers = list(self.workers.values())
        for w in workers:
            for r in w.runners:
                r.stopping.set()
        await asyncio.gather(*(r.terminate(5.0, pre_stop=False) for w in workers for r in w.runners))
        await asyncio.gather(*(w.flush_not_ready() for w in workers))
        for w in workers:
            w.task.cancel()
        await self.http.aclose()
