"""The local stack's dynamic volume provisioner: a claim of the default StorageClass gets a directory.

What a real cluster's local-path provisioner does, for the node agent's one node: the stack installs
a default StorageClass (:data:`STORAGE_CLASS`, provisioner :data:`PROVISIONER`, ``Immediate``
binding, reclaim policy ``Delete``), and :class:`LocalPathProvisioner` watches the claims of every
namespace. kube-controller-manager's PV controller does the matching: for an unbound claim of a class
whose provisioner is not built in, it finds no volume and marks the claim with
``volume.kubernetes.io/storage-provisioner: <provisioner>`` (the "waiting for an external
provisioner" step). On claims so marked with ours, the provisioner makes a directory under the
stack's volumes directory (``pvc-<claim uid>_<namespace>_<claim>``, as rancher's local-path names
them) and creates a hostPath PersistentVolume for it: the claim's size and access modes, a
``claimRef`` to the claim (with its uid), node affinity to the node, and
``pv.kubernetes.io/provisioned-by``. The PV controller then binds the two, and the node agent mounts
the claim by that hostPath, as it mounts every claim.

Reclaim: when a claim is deleted, the PV controller marks its volume ``Released`` and, the volume
being an external provisioner's, leaves the deletion to it; the provisioner removes the directory
(only ever one under its own root) and deletes the PersistentVolume. ``Delete`` because that is what
local-path and the clouds' default classes do, so the stack behaves like the clusters users deploy to
(the weight cache's claim, which the operator never owns, keeps its files exactly as long as the claim
exists), and because test namespaces come and go: with ``Retain`` every one would leave a Released
volume and a directory behind.

Claims with ``storageClassName: ""`` (the hand-bound ones of
:func:`~kubeinfer_devkit.devcluster.supervisor.ensure_claim`) are never marked by the PV controller
and so never touched. Claims with a selector, a data source or ``volumeMode: Block`` are refused with
a ``ProvisioningFailed`` Event, as local-path refuses them.

Credentials: the node agent's identity (``system:node:<name>``) may not create PersistentVolumes (the
Node authorizer), so the provisioner runs as a user of its own (:data:`USER`, a static token of the
control plane) bound to the bootstrap ClusterRole ``system:persistent-volume-provisioner`` (what
Kubernetes ships for external provisioners). It runs inside the node agent's process (a task beside
the pod watch) because its directories are the node's disk, as a local-path provisioner's are: it
comes and goes, and is restarted, with the node.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from kubeinfer import kube
from kubeinfer_devkit.devcluster.node import api_body
from kubeinfer_devkit.devcluster.podplan import NODE_NAME

_log = logging.getLogger("kubeinfer.provisioner")

PROVISIONER = "kubeinfer.io/local-path"
STORAGE_CLASS = "local-path"
USER = "kubeinfer:local-path-provisioner"  # the control plane's static-token user it runs as
PROVISIONER_ROLE = "system:persistent-volume-provisioner"  # bootstrap ClusterRole
ANN_DEFAULT_CLASS = "storageclass.kubernetes.io/is-default-class"
# Set on a claim by the PV controller when it waits for an external provisioner (both spellings).
ANN_STORAGE_PROVISIONER = (
    "volume.kubernetes.io/storage-provisioner",
    "volume.beta.kubernetes.io/storage-provisioner",
)
ANN_PROVISIONED_BY = "pv.kubernetes.io/provisioned-by"
RETRY_SECONDS = 5.0
_RAW: dict[str, Any] = dict(kube.RAW)


def storage_class() -> dict[str, Any]:
    """The stack's default StorageClass."""
    return {
        "apiVersion": "storage.k8s.io/v1",
        "kind": "StorageClass",
        "metadata": {"name": STORAGE_CLASS, "annotations": {ANN_DEFAULT_CLASS: "true"}},
        "provisioner": PROVISIONER,
        "reclaimPolicy": "Delete",
        "volumeBindingMode": "Immediate",
    }


def role_binding() -> dict[str, Any]:
    """Binds :data:`USER` to the bootstrap provisioner ClusterRole."""
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {"name": USER},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": PROVISIONER_ROLE},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": USER}],
    }


async def install(api: client.ApiClient) -> None:
    """Create (or keep) the default StorageClass and the provisioner's RBAC binding (as an admin)."""
    calls: tuple[tuple[Any, dict[str, Any]], ...] = (
        (client.StorageV1Api(api).create_storage_class, storage_class()),
        (client.RbacAuthorizationV1Api(api).create_cluster_role_binding, role_binding()),
    )
    for create, body in calls:
        try:
            await api_body(await create(body, **_RAW))
        except ApiException as exc:
            if exc.status != 409:
                raise


# --- Pure: which claims, which volumes -------------------------------------------------------------


def wants_volume(claim: dict[str, Any], provisioner: str = PROVISIONER) -> bool:
    """An unbound, live claim that the PV controller handed to `provisioner`."""
    meta, spec = claim.get("metadata") or {}, claim.get("spec") or {}
    ann = meta.get("annotations") or {}
    return (
        not spec.get("volumeName")
        and not meta.get("deletionTimestamp")
        and any(ann.get(a) == provisioner for a in ANN_STORAGE_PROVISIONER)
    )


def refusal(claim: dict[str, Any]) -> str | None:
    """Why a claim cannot get a directory here (None: it can)."""
    spec = claim.get("spec") or {}
    if spec.get("selector"):
        return "claim.spec.selector is not supported"
    if spec.get("dataSource") or spec.get("dataSourceRef"):
        return "claim.spec.dataSource is not supported"
    if (spec.get("volumeMode") or "Filesystem") != "Filesystem":
        return f"volumeMode {spec['volumeMode']} is not supported (only Filesystem)"
    if not ((spec.get("resources") or {}).get("requests") or {}).get("storage"):
        return "claim.spec.resources.requests.storage is not set"
    return None


def volume_name(claim: dict[str, Any]) -> str:
    return f"pvc-{claim['metadata']['uid']}"


def volume_dir(root: Path, claim: dict[str, Any]) -> Path:
    """`<root>/pvc-<uid>_<namespace>_<claim>`: '_' never occurs in names, so never two claims' one."""
    meta = claim["metadata"]
    return root / f"{volume_name(claim)}_{meta['namespace']}_{meta['name']}"


def volume_for(
    claim: dict[str, Any], klass: dict[str, Any], path: Path, node: str = NODE_NAME
) -> dict[str, Any]:
    """The hostPath PersistentVolume of `claim` (of StorageClass `klass`), pre-bound to it."""
    meta, spec = claim["metadata"], claim.get("spec") or {}
    claim_ref = {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "namespace": meta["namespace"],
                 "name": meta["name"], "uid": meta["uid"]}  # fmt: skip
    if meta.get("resourceVersion"):
        claim_ref["resourceVersion"] = meta["resourceVersion"]
    hostname = {"key": "kubernetes.io/hostname", "operator": "In", "values": [node]}
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": volume_name(claim), "annotations": {ANN_PROVISIONED_BY: klass["provisioner"]}},
        "spec": {
            "capacity": {"storage": spec["resources"]["requests"]["storage"]},
            "accessModes": list(spec.get("accessModes") or ["ReadWriteOnce"]),
            "persistentVolumeReclaimPolicy": klass.get("reclaimPolicy") or "Delete",
            "storageClassName": klass["metadata"]["name"],
            "volumeMode": "Filesystem",
            "mountOptions": list(klass.get("mountOptions") or []),
            "hostPath": {"path": str(path), "type": "DirectoryOrCreate"},
            "claimRef": claim_ref,
            "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [hostname]}]}},
        },
    }


def reclaimable(volume: dict[str, Any], provisioner: str = PROVISIONER) -> bool:
    """One of our volumes whose claim is gone, under the Delete policy."""
    meta, spec = volume.get("metadata") or {}, volume.get("spec") or {}
    return (
        (meta.get("annotations") or {}).get(ANN_PROVISIONED_BY) == provisioner
        and (volume.get("status") or {}).get("phase") == "Released"
        and spec.get("persistentVolumeReclaimPolicy") == "Delete"
        and not meta.get("deletionTimestamp")
    )


def inside(root: Path, path: str) -> bool:
    """Whether `path` is a directory strictly below `root` (what the provisioner may remove)."""
    p, r = Path(path).resolve(), root.resolve()
    return p != r and p.is_relative_to(r)


# --- The controller --------------------------------------------------------------------------------


class LocalPathProvisioner:
    """Watches claims and volumes; provisions and reclaims one at a time (see the module doc)."""

    def __init__(self, api: client.ApiClient, root: Path, node: str = NODE_NAME) -> None:
        self.core = client.CoreV1Api(api)
        self.storage = client.StorageV1Api(api)
        self.root, self.node = root.resolve(), node
        self.queue: asyncio.Queue[tuple[str, str, str]] = asyncio.Queue()

    async def run(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        core = self.core
        watches = [
            asyncio.create_task(kube.list_then_watch(what, lister, (), {}, handle, lambda: None))
            for what, lister, handle in (
                (
                    "PersistentVolumeClaim",
                    core.list_persistent_volume_claim_for_all_namespaces,
                    self._on_claim,
                ),
                ("PersistentVolume", core.list_persistent_volume, self._on_volume),
            )
        ]
        _log.info("provisioner %s: volumes in %s", PROVISIONER, self.root)
        loop = asyncio.get_running_loop()
        try:
            while True:
                item = await self.queue.get()
                kind, namespace, name = item
                try:
                    if kind == "claim":
                        await self.provision(namespace, name)
                    else:
                        await self.reclaim(name)
                except (ApiException, OSError, TimeoutError) as exc:
                    _log.warning("%s %s/%s: %s; retrying in %.0fs", kind, namespace, name, exc, RETRY_SECONDS)
                    loop.call_later(RETRY_SECONDS, self.queue.put_nowait, item)
        finally:
            for t in watches:
                t.cancel()

    def _on_claim(self, event: str, claim: dict[str, Any]) -> None:
        if event != "DELETED" and wants_volume(claim):
            meta = claim["metadata"]
            self.queue.put_nowait(("claim", meta["namespace"], meta["name"]))

    def _on_volume(self, event: str, volume: dict[str, Any]) -> None:
        if event != "DELETED" and reclaimable(volume):
            self.queue.put_nowait(("volume", "", volume["metadata"]["name"]))

    async def provision(self, namespace: str, name: str) -> None:
        try:
            claim = await api_body(
                await self.core.read_namespaced_persistent_volume_claim(name, namespace, **_RAW)
            )
        except ApiException as exc:
            if exc.status == 404:
                return
            raise
        if not wants_volume(claim):
            return  # bound meanwhile, or deleted
        class_name = (claim.get("spec") or {}).get("storageClassName") or ""
        try:
            klass = await api_body(await self.storage.read_storage_class(class_name, **_RAW))
        except ApiException as exc:
            if exc.status == 404:
                return  # the PV controller would not have handed it to us; nothing to go by
            raise
        if klass.get("provisioner") != PROVISIONER:
            return
        why = refusal(claim)
        if why is not None:
            await self._event(claim, "Warning", "ProvisioningFailed", f"failed to provision volume: {why}")
            return
        path = volume_dir(self.root, claim)
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(0o777)  # as local-path does: whatever user a pod runs as may write
        body: Any = volume_for(claim, klass, path, self.node)
        try:
            await api_body(await self.core.create_persistent_volume(body, **_RAW))
        except ApiException as exc:
            if exc.status != 409:
                raise
            return  # made on an earlier event; the PV controller binds it
        _log.info("claim %s/%s: provisioned %s at %s", namespace, name, body["metadata"]["name"], path)
        await self._event(
            claim,
            "Normal",
            "ProvisioningSucceeded",
            f"Successfully provisioned volume {body['metadata']['name']}",
        )

    async def reclaim(self, name: str) -> None:
        try:
            volume = await api_body(await self.core.read_persistent_volume(name, **_RAW))
        except ApiException as exc:
            if exc.status == 404:
                return
            raise
        if not reclaimable(volume):
            return
        path = ((volume.get("spec") or {}).get("hostPath") or {}).get("path") or ""
        if path and inside(self.root, path):
            await asyncio.to_thread(shutil.rmtree, path, True)
        elif path:
            _log.warning(
                "volume %s: %s is not under %s; deleting the volume, not the directory", name, path, self.root
            )
        delete: Any = {"preconditions": {"uid": volume["metadata"]["uid"]}}
        with contextlib.suppress(ApiException):  # gone already, or a new volume of that name
            await api_body(await self.core.delete_persistent_volume(name, body=delete, **_RAW))
        _log.info("volume %s released: deleted, with %s", name, path)

    async def _event(self, claim: dict[str, Any], type_: str, reason: str, message: str) -> None:
        meta = claim["metadata"]
        t = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        body: Any = {
            "metadata": {"name": f"{meta['name']}.{uuid.uuid4().hex[:16]}", "namespace": meta["namespace"]},
            "involvedObject": {"kind": "PersistentVolumeClaim", "apiVersion": "v1",
                               "namespace": meta["namespace"], "name": meta["name"], "uid": meta["uid"]},
            "reason": reason, "message": message, "type": type_, "source": {"component": PROVISIONER},
            "firstTimestamp": t, "lastTimestamp": t, "count": 1,
            "reportingComponent": PROVISIONER, "reportingInstance": self.node,
        }  # fmt: skip
        with contextlib.suppress(ApiException, OSError, TimeoutError):
            await api_body(await self.core.create_namespaced_event(meta["namespace"], body, **_RAW))
