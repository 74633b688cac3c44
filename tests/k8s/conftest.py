"""Fixtures for the `k8s` tier: a real local control plane (etcd, kube-apiserver,
kube-controller-manager, kube-scheduler and kwok with one fake GPU node).

The binaries are built from Go module sources on first use and cached under
${XDG_CACHE_HOME:-~/.cache}/kubeinfer/bin (see hack/build-control-plane.sh); a cold build takes
tens of minutes on 2 cores, later runs start the control plane in seconds. If they cannot be built,
the fixture errors: this tier never silently skips.
"""

from __future__ import annotations

import asyncio
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from kubernetes_asyncio import client, config

from kubeinfer import kube
from kubeinfer_devkit.devcluster import procs, provisioner
from kubeinfer_devkit.devcluster.build import CONTROL_PLANE_COMPONENTS, BuildError, ensure_binaries
from kubeinfer_devkit.devcluster.controlplane import ControlPlane
from kubeinfer_devkit.devcluster.podplan import NODE_NAME
from kubeinfer_devkit.devcluster.supervisor import DISABLED_CONTROLLERS
from tests.k8s_support import LocalNode

_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # This hook sees every collected item of the session, not only ours: mark just tests/k8s.
    for item in items:
        if item.path.resolve().is_relative_to(_HERE):
            item.add_marker(pytest.mark.k8s)


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """The running control plane: `.kubeconfig`, `.server`, `.token`, `.bin` {name: Path}, `.node_name`."""
    try:
        binaries = ensure_binaries()  # all of them: tests may use kubectl and helm too
    except (BuildError, OSError) as exc:
        pytest.fail(
            f"cannot build the control-plane binaries (hack/build-control-plane.sh): {exc}", pytrace=False
        )
    cp = ControlPlane(tmp_path_factory.mktemp("controlplane"), binaries=binaries)
    cp.start()  # raises with the failing component's log tail; logs stay in the state dir
    try:
        yield cp
    finally:
        cp.stop()


@pytest.fixture
async def k8s_api(control_plane: ControlPlane) -> AsyncIterator[client.ApiClient]:
    """A kubernetes_asyncio ApiClient (admin) for the control plane, one per test."""
    cfg = client.Configuration()
    await config.load_kube_config(config_file=str(control_plane.kubeconfig), client_configuration=cfg)
    async with client.ApiClient(configuration=cfg) as api:
        yield api


async def _wait_for(
    predicate: Callable[[], Awaitable[object]],
    timeout: float = 60.0,
    interval: float = 0.25,
    what: str = "condition",
) -> object:
    """Poll an async predicate until it returns something truthy; fail the test after `timeout`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = await predicate()
        if result:
            return result
        if loop.time() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(interval)


@pytest.fixture
def wait_for() -> Callable[..., Awaitable[object]]:
    """`await wait_for(async_predicate, timeout=60, what="...")` -> the first truthy result.

    A fixture rather than an import: tests/k8s is not a package, so conftest is not importable.
    """
    return _wait_for


async def _fresh_namespace(api: client.ApiClient) -> AsyncIterator[str]:
    """A fresh namespace whose `default` ServiceAccount exists (so pods are admitted), deleted after."""
    core = client.CoreV1Api(api)
    name = f"t-{uuid.uuid4().hex[:10]}"
    await core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))

    async def has_default_sa() -> bool:
        sas = await core.list_namespaced_service_account(name)
        return any(sa.metadata.name == "default" for sa in sas.items)

    await _wait_for(has_default_sa, what=f"ServiceAccount {name}/default")
    try:
        yield name
    finally:
        await core.delete_namespace(name)


@pytest.fixture
async def namespace(k8s_api: client.ApiClient) -> AsyncIterator[str]:
    """A fresh namespace on the shared control plane (with kwok)."""
    async for name in _fresh_namespace(k8s_api):
        yield name


# --- the local stack's node: a control plane without kwok, the node agent and its provisioner ----------
# (tests/k8s/test_local_node.py, test_weight_cache.py): pods really run, as in `kubeinfer up`.


def _node_ready(cp: ControlPlane) -> bool:
    node = cp.get(f"/api/v1/nodes/{NODE_NAME}") or {}
    ready = any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in (node.get("status") or {}).get("conditions") or []
    )
    taints = (node.get("spec") or {}).get("taints") or []
    return ready and not any(t.get("key", "").startswith("node.kubernetes.io/") for t in taints)


async def _install(cp: ControlPlane) -> None:
    async with kube.api_client(await kube.load_client_config(str(cp.kubeconfig))) as api:
        await provisioner.install(api)


@pytest.fixture(scope="module")
def local_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalNode]:
    try:
        binaries = ensure_binaries([c for c in CONTROL_PLANE_COMPONENTS if c != "kwok"] + ["kubectl"])
    except (BuildError, OSError) as exc:
        pytest.fail(f"cannot build the control-plane binaries: {exc}", pytrace=False)
    root = tmp_path_factory.mktemp("localnode")
    cp = ControlPlane(
        root / "controlplane", binaries=binaries, with_kwok=False, node_users=[NODE_NAME],
        users=[provisioner.USER], disabled_controllers=DISABLED_CONTROLLERS,
    )  # fmt: skip
    cp.start()
    node: LocalNode | None = None
    try:
        asyncio.run(_install(cp))
        argv = [
            sys.executable, "-m", "kubeinfer_devkit.devcluster.nodeagent",
            "--kubeconfig", str(cp.node_kubeconfig(NODE_NAME)), "--state-dir", str(root / "node"),
            "--provisioner-kubeconfig", str(cp.user_kubeconfig(provisioner.USER)),
            "--volumes-dir", str(root / "volumes"),
        ]  # fmt: skip
        node = LocalNode(
            cp, procs.Child("node-agent", argv, root / "node-agent.log", watchdog=True), root / "volumes"
        )
        node.agent.start()
        procs.wait_until(f"node {NODE_NAME} Ready", lambda: _node_ready(cp), 120, child=node.agent)
        yield node
    finally:
        if node is not None:
            node.agent.stop(grace=30)  # the agent of the moment: a test may have restarted it
        cp.stop()


@pytest.fixture
async def node_api(local_node: LocalNode) -> AsyncIterator[client.ApiClient]:
    async with kube.api_client(await kube.load_client_config(str(local_node.cp.kubeconfig))) as api:
        yield api


@pytest.fixture
async def node_ns(node_api: client.ApiClient) -> AsyncIterator[str]:
    """A fresh namespace on the local node's control plane."""
    async for name in _fresh_namespace(node_api):
        yield name
