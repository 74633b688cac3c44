"""Helpers for the k8s tier that several test modules share (fixtures stay in tests/k8s)."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from kubeinfer import kube
from kubeinfer.crdgen import crd
from kubeinfer_devkit.devcluster import procs
from kubeinfer_devkit.devcluster.controlplane import ControlPlane
from kubeinfer_devkit.devcluster.local import OperatorProcess  # noqa: F401  (re-exported for tests)

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class LocalNode:
    cp: ControlPlane
    agent: procs.Child
    volumes: Path


async def install_crd(api: client.ApiClient, timeout: float = 60) -> dict[str, Any]:
    """Create (or keep) the LLMModel CRD and wait until it is Established and served."""
    body = crd()
    await kube.install_crd(api, body, timeout)
    return body


async def ensure_namespace(api: client.ApiClient, name: str) -> None:
    await kube.ensure_namespace(api, name)


def chart_operator_rules(helm: Path) -> list[dict[str, Any]]:
    """The rules of the Helm chart's operator ClusterRole, as `helm template` renders them."""
    out = subprocess.run(
        [str(helm), "template", "kubeinfer", str(ROOT / "charts" / "kubeinfer")],
        check=True, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    roles = [
        d for d in yaml.safe_load_all(out.stdout)
        if d and d.get("kind") == "ClusterRole" and "operator" in d["metadata"]["name"]
    ]  # fmt: skip
    if len(roles) != 1:
        raise AssertionError(f"expected one operator ClusterRole in the chart, found {len(roles)}")
    rules: list[dict[str, Any]] = roles[0]["rules"]
    return rules


async def service_account_kubeconfig(
    api: client.ApiClient, admin_kubeconfig: Path, rules: list[dict[str, Any]], name: str, path: Path
) -> Path:
    """A kubeconfig that authenticates as a fresh ServiceAccount bound to exactly `rules`."""
    ns = "kube-system"
    core, rbac = client.CoreV1Api(api), client.RbacAuthorizationV1Api(api)
    for call, body in ((core.create_namespaced_service_account, {"metadata": {"name": name}}),):
        try:
            await call(ns, body)
        except ApiException as exc:
            if exc.status != 409:
                raise
    for call, body in (
        (rbac.create_cluster_role, {"metadata": {"name": name}, "rules": rules}),
        (
            rbac.create_cluster_role_binding,
            {
                "metadata": {"name": name},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
                "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": ns}],
            },
        ),
    ):
        try:
            await call(body)
        except ApiException as exc:
            if exc.status != 409:
                raise
    token = await core.create_namespaced_service_account_token(
        name, ns, {"spec": {"expirationSeconds": 86400}}
    )
    config = yaml.safe_load(admin_kubeconfig.read_text())
    config["users"] = [{"name": name, "user": {"token": token.status.token}}]
    for ctx in config["contexts"]:
        ctx["context"]["user"] = name
    path.write_text(yaml.safe_dump(config))
    return path
