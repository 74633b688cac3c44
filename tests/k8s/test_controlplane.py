"""Smoke tests of the local control plane itself: if these fail, every other k8s-tier test would."""

from __future__ import annotations

import ipaddress
import subprocess
import uuid
from collections.abc import Awaitable, Callable

from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from kubeinfer_devkit.devcluster.build import HELM_VERSION, KUBERNETES_VERSION
from kubeinfer_devkit.devcluster.controlplane import ControlPlane

WaitFor = Callable[..., Awaitable[object]]


async def test_apiserver_reports_pinned_version(
    control_plane: ControlPlane, k8s_api: client.ApiClient
) -> None:
    info = await client.VersionApi(k8s_api).get_code()
    assert info.git_version == KUBERNETES_VERSION
    assert (info.major, info.minor) == tuple(KUBERNETES_VERSION.lstrip("v").split(".")[:2])

    out = subprocess.run(
        [control_plane.bin["kube-apiserver"], "--version"], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == f"Kubernetes {KUBERNETES_VERSION}"


def test_cli_binaries(control_plane: ControlPlane) -> None:
    nodes = control_plane.kubectl("get", "nodes", "-o", "name").stdout.split()
    assert f"node/{control_plane.node_name}" in nodes

    client_version = control_plane.kubectl("version", "--client", "-o", "json").stdout
    assert KUBERNETES_VERSION in client_version

    helm = subprocess.run(
        [control_plane.bin["helm"], "version", "--short"], capture_output=True, text=True, check=True
    ).stdout
    assert helm.startswith(HELM_VERSION)


async def test_create_namespace(k8s_api: client.ApiClient) -> None:
    core = client.CoreV1Api(k8s_api)
    name = f"smoke-{uuid.uuid4().hex[:8]}"
    await core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    try:
        ns = await core.read_namespace(name)
        assert ns.status.phase == "Active"
    finally:
        await core.delete_namespace(name)


async def test_fake_gpu_node(control_plane: ControlPlane, k8s_api: client.ApiClient) -> None:
    node = await client.CoreV1Api(k8s_api).read_node(control_plane.node_name)
    assert node.status.allocatable["nvidia.com/gpu"] == "8"
    assert node.status.allocatable["cpu"] == "32"
    assert node.status.allocatable["memory"] == "256Gi"
    ready = [c for c in node.status.conditions if c.type == "Ready"]
    assert ready and ready[0].status == "True"


async def test_gpu_pod_is_scheduled_and_running(
    control_plane: ControlPlane, k8s_api: client.ApiClient, namespace: str, wait_for: WaitFor
) -> None:
    core = client.CoreV1Api(k8s_api)
    pod = client.V1Pod(
        metadata=client.V1ObjectMeta(name="gpu-pod"),
        spec=client.V1PodSpec(
            node_selector={"kubernetes.io/hostname": control_plane.node_name},
            containers=[
                client.V1Container(
                    name="main",
                    image="example.invalid/never-pulled:1",  # kwok runs nothing
                    resources=client.V1ResourceRequirements(limits={"nvidia.com/gpu": "1"}),
                )
            ],
        ),
    )
    await core.create_namespaced_pod(namespace, pod)

    async def running() -> client.V1Pod | None:
        p = await core.read_namespaced_pod("gpu-pod", namespace)
        return p if p.status.phase == "Running" and p.status.pod_ip else None

    p = await wait_for(running, timeout=60, what="gpu-pod Running with an IP")
    assert isinstance(p, client.V1Pod)
    assert p.spec.node_name == control_plane.node_name
    assert ipaddress.ip_address(p.status.pod_ip) in ipaddress.ip_network(control_plane.pod_cidr)
    assert all(c.ready for c in p.status.container_statuses)


async def test_garbage_collector_deletes_dependents(
    k8s_api: client.ApiClient, namespace: str, wait_for: WaitFor
) -> None:
    core = client.CoreV1Api(k8s_api)
    owner = await core.create_namespaced_config_map(
        namespace, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="owner"), data={"a": "1"})
    )
    ref = client.V1OwnerReference(api_version="v1", kind="ConfigMap", name="owner", uid=owner.metadata.uid)
    await core.create_namespaced_config_map(
        namespace,
        client.V1ConfigMap(
            metadata=client.V1ObjectMeta(name="child", owner_references=[ref]), data={"b": "2"}
        ),
    )
    await core.delete_namespaced_config_map("owner", namespace)

    async def child_gone() -> bool:
        try:
            await core.read_namespaced_config_map("child", namespace)
        except ApiException as exc:
            if exc.status == 404:
                return True
            raise
        return False

    await wait_for(child_gone, timeout=60, what="the garbage collector to delete the child ConfigMap")
