"""Helpers for the k8s tier that several test modules share (fixtures stay in tests/k8s)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from kubeinfer import contract
from kubeinfer.crdgen import crd

ROOT = Path(__file__).resolve().parent.parent


async def install_crd(api: client.ApiClient, timeout: float = 60) -> dict[str, Any]:
    """Create (or keep) the LLMModel CRD and wait until it is Established and served."""
    ext = client.ApiextensionsV1Api(api)
    body = crd()
    try:
        await ext.create_custom_resource_definition(body)
    except ApiException as exc:
        if exc.status != 409:
            raise
    deadline = time.monotonic() + timeout
    while True:
        obj = await ext.read_custom_resource_definition(body["metadata"]["name"])
        if any(c.type == "Established" and c.status == "True" for c in obj.status.conditions or []):
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"CRD not Established: {obj.status}")
        await asyncio.sleep(0.25)
    objs = client.CustomObjectsApi(api)
    while True:  # discovery can lag Established by a moment
        try:
            await objs.list_cluster_custom_object(contract.GROUP, contract.VERSION, contract.PLURAL)
            return body
        except ApiException:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.25)


async def ensure_namespace(api: client.ApiClient, name: str) -> None:
    try:
        await client.CoreV1Api(api).create_namespace({"metadata": {"name": name}})
    except ApiException as exc:
        if exc.status != 409:
            raise


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


class OperatorProcess:
    """`kubeinfer operator` as a child process, with its own kubeconfig and log file."""

    def __init__(self, kubeconfig: Path, log: Path, port: int, refresh_seconds: float = 2.0):
        self.kubeconfig, self.log, self.port, self.refresh = kubeconfig, log, port, refresh_seconds
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60) -> None:
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig)}
        cmd = [
            sys.executable, "-m", "kubeinfer.cli", "operator", "--liveness-host", "127.0.0.1",
            "--liveness-port", str(self.port), "--refresh-seconds", str(self.refresh),
        ]  # fmt: skip
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"operator exited ({self.proc.returncode}):\n{self.tail()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"operator not live after {timeout}s:\n{self.tail()}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def restart(self) -> None:
        self.stop()
        self.start()

    def tail(self, lines: int = 60) -> str:
        return (
            "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:]) if self.log.exists() else ""
        )
