"""Fixtures for the `k8s` tier: a real local control plane (etcd, kube-apiserver,
kube-controller-manager, kube-scheduler and kwok with one fake GPU node).

The binaries are built from Go module sources on first use and cached under
${XDG_CACHE_HOME:-~/.cache}/kubeinfer/bin (see hack/build-control-plane.sh); a cold build takes
tens of minutes on 2 cores, later runs start the control plane in seconds. If they cannot be built,
the fixture errors: this tier never silently skips.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from kubernetes_asyncio import client, config

from kubeinfer_devkit.devcluster.build import BuildError, ensure_binaries
from kubeinfer_devkit.devcluster.controlplane import ControlPlane

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


@pytest.fixture
async def namespace(k8s_api: client.ApiClient) -> AsyncIterator[str]:
    """A fresh namespace whose `default` ServiceAccount exists (so pods are admitted)."""
    core = client.CoreV1Api(k8s_api)
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
