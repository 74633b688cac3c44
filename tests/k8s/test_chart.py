"""The Helm chart against the real local kube-apiserver.

* `helm template | kubectl apply --dry-run=server`: the apiserver accepts every object (schema,
  RBAC rules, NetworkPolicy ...), with the defaults and with every optional feature on.
* `helm install` into a fresh namespace creates every object the chart renders (and the kwok node
  runs the pods, so `--wait` sees both Deployments available); `helm uninstall` removes them all but
  keeps the CRD - and so the users' LLMModels.

The Prometheus Operator is not installed here, so there are no monitoring.coreos.com CRDs. Rather
than render the monitors and rules off (and never send them to an apiserver), the module installs
minimal stand-ins for the ServiceMonitor, PodMonitor and PrometheusRule CRDs: right group, kinds and
scope, with a schema that accepts any spec. The apiserver then checks that the objects route and are
well formed; the contents of their specs are checked by tests/unit/test_chart.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubeinfer import contract
from kubeinfer_devkit.devcluster.controlplane import ControlPlane

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "kubeinfer"
CRD_NAME = f"{contract.PLURAL}.{contract.GROUP}"
ALL_FEATURES = [
    "monitoring.serviceMonitor.enabled=true",
    "monitoring.podMonitor.enabled=true",
    "monitoring.grafanaDashboard.enabled=true",
    "monitoring.prometheusRule.enabled=true",
    "networkPolicy.enabled=true",
    "gateway.rbac.secretsNamespaced=true",
]

Helm = Callable[..., subprocess.CompletedProcess[str]]


def _monitoring_crd(kind: str, plural: str) -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.monitoring.coreos.com"},
        "spec": {
            "group": "monitoring.coreos.com",
            "scope": "Namespaced",
            "names": {"kind": kind, "plural": plural, "singular": kind.lower(), "listKind": f"{kind}List"},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "spec": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
                            },
                        }
                    },
                }
            ],
        },
    }


def _kubectl(cp: ControlPlane, *args: str, input: str | None = None, timeout: float = 120) -> str:
    proc = cp.kubectl(*args, input=input, check=False, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"kubectl {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


@pytest.fixture(scope="module")
def monitoring_crds(control_plane: ControlPlane) -> Iterator[None]:
    crds = [
        _monitoring_crd("ServiceMonitor", "servicemonitors"),
        _monitoring_crd("PodMonitor", "podmonitors"),
        _monitoring_crd("PrometheusRule", "prometheusrules"),
    ]
    _kubectl(
        control_plane,
        "apply",
        "-f",
        "-",
        input=json.dumps({"apiVersion": "v1", "kind": "List", "items": crds}),
    )
    names = [f"crd/{c['metadata']['name']}" for c in crds]
    _kubectl(control_plane, "wait", "--for=condition=Established", "--timeout=60s", *names)
    yield
    control_plane.kubectl("delete", "--ignore-not-found", "--wait=false", *names, check=False)


@pytest.fixture(scope="module")
def helm(control_plane: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Helm:
    home = tmp_path_factory.mktemp("helm-home")
    env = {
        **os.environ,
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_DATA_HOME": str(home / "data"),
    }
    env.pop("KUBECONFIG", None)

    def run(*args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        cmd = [str(control_plane.bin["helm"]), "--kubeconfig", str(control_plane.kubeconfig), *args]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
        if check and proc.returncode != 0:
            pytest.fail(f"helm {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    return run


@pytest.fixture
def fresh_namespace(control_plane: ControlPlane) -> Iterator[str]:
    name = f"chart-{uuid.uuid4().hex[:8]}"
    _kubectl(control_plane, "create", "namespace", name)
    yield name
    control_plane.kubectl("delete", "namespace", name, "--wait=false", check=False)


def _sets(settings: list[str]) -> list[str]:
    return [arg for s in settings for arg in ("--set", s)]


def _rendered(helm: Helm, release: str, namespace: str, settings: list[str], *extra: str) -> str:
    return helm("template", release, str(CHART), "--namespace", namespace, *_sets(settings), *extra).stdout


def _objects(manifest: str) -> list[tuple[str, str, str | None]]:
    """(kind.group, name, namespace) of every object in a multi-document manifest."""
    out = []
    for doc in yaml.safe_load_all(manifest):
        if not doc:
            continue
        group = doc["apiVersion"].rpartition("/")[0]
        kind = f"{doc['kind']}.{group}" if group else doc["kind"]
        out.append((kind, doc["metadata"]["name"], doc["metadata"].get("namespace")))
    return out


def _exists(cp: ControlPlane, kind: str, name: str, namespace: str | None) -> bool:
    args = ["get", kind, name, "-o", "name"]
    if namespace:
        args += ["--namespace", namespace]
    proc = cp.kubectl(*args, check=False)
    if proc.returncode == 0:
        return True
    assert "NotFound" in proc.stderr, proc.stderr  # anything else is a broken test, not "gone"
    return False


@pytest.mark.parametrize("settings", [[], ALL_FEATURES], ids=["defaults", "all-features"])
def test_server_side_dry_run_accepts_everything(
    control_plane: ControlPlane, helm: Helm, monitoring_crds: None, fresh_namespace: str, settings: list[str]
) -> None:
    manifest = _rendered(helm, "dry", fresh_namespace, settings, "--include-crds")
    kinds = {kind for kind, _, _ in _objects(manifest)}
    assert "CustomResourceDefinition.apiextensions.k8s.io" in kinds
    if settings:
        assert {"ServiceMonitor.monitoring.coreos.com", "PodMonitor.monitoring.coreos.com"} <= kinds
        assert "PrometheusRule.monitoring.coreos.com" in kinds
        assert {"NetworkPolicy.networking.k8s.io", "Role.rbac.authorization.k8s.io"} <= kinds
    # Strict field validation: a misspelt field is an error, not a warning.
    out = _kubectl(control_plane, "apply", "--dry-run=server", "--validate=strict", "-f", "-", input=manifest)
    assert out.count("(server dry run)") == len(_objects(manifest)), out


def test_install_creates_everything_and_uninstall_keeps_the_crd(
    control_plane: ControlPlane, helm: Helm, monitoring_crds: None, fresh_namespace: str
) -> None:
    ns, release = fresh_namespace, f"ki{uuid.uuid4().hex[:6]}"
    crd_existed = _exists(control_plane, "crd", CRD_NAME, None)

    # --wait: both Deployments become available (kwok runs the pods on its fake node).
    helm(
        "install", release, str(CHART), "--namespace", ns, *_sets(ALL_FEATURES), "--wait", "--timeout", "180s"
    )
    expected = _objects(_rendered(helm, release, ns, ALL_FEATURES))
    manifest = helm("get", "manifest", release, "--namespace", ns).stdout
    assert sorted(_objects(manifest)) == sorted(expected)
    kinds = {kind for kind, _, _ in expected}
    assert kinds == {
        "ServiceAccount",
        "ConfigMap",
        "ClusterRole.rbac.authorization.k8s.io",
        "ClusterRoleBinding.rbac.authorization.k8s.io",
        "Role.rbac.authorization.k8s.io",
        "RoleBinding.rbac.authorization.k8s.io",
        "Service",
        "Deployment.apps",
        "NetworkPolicy.networking.k8s.io",
        "ServiceMonitor.monitoring.coreos.com",
        "PodMonitor.monitoring.coreos.com",
        "PrometheusRule.monitoring.coreos.com",
    }
    missing = [o for o in expected if not _exists(control_plane, *o)]
    assert not missing, f"not created by helm install: {missing}"
    for deployment in (f"{release}-kubeinfer-operator", f"{release}-kubeinfer-gateway"):
        status = json.loads(_kubectl(control_plane, "get", "deployment", deployment, "-n", ns, "-o", "json"))
        assert status["status"].get("availableReplicas") == status["spec"]["replicas"], deployment

    # The CRD came with the chart (crds/) unless an earlier test had created it already.
    _kubectl(control_plane, "wait", "--for=condition=Established", "--timeout=60s", f"crd/{CRD_NAME}")
    if not crd_existed:
        crd = json.loads(_kubectl(control_plane, "get", "crd", CRD_NAME, "-o", "json"))
        chart_crd = yaml.safe_load((CHART / "crds" / "kubeinfer.io_llmmodels.yaml").read_text())
        assert crd["spec"]["versions"][0]["schema"] == chart_crd["spec"]["versions"][0]["schema"]

    # A user's model, to show what keeping the CRD is for.
    model = yaml.safe_load((ROOT / "examples" / "tiny-gguf-cpu.yaml").read_text())
    model["metadata"]["namespace"] = ns
    _kubectl(control_plane, "apply", "-f", "-", input=json.dumps(model))

    helm("uninstall", release, "--namespace", ns, "--wait", "--timeout", "120s")
    deadline = time.monotonic() + 60
    left = expected
    while left and time.monotonic() < deadline:
        left = [o for o in left if _exists(control_plane, *o)]
        if left:
            time.sleep(0.5)
    assert not left, f"left behind by helm uninstall: {left}"

    assert _exists(control_plane, "crd", CRD_NAME, None), "helm uninstall deleted the CRD"
    assert _exists(control_plane, f"{contract.PLURAL}.{contract.GROUP}", model["metadata"]["name"], ns)
    _kubectl(
        control_plane, "delete", f"{contract.PLURAL}.{contract.GROUP}", model["metadata"]["name"], "-n", ns
    )
