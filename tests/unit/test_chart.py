"""The Helm chart charts/kubeinfer, without a cluster: `helm lint`, `helm template` and the values
schema, plus the contracts between the chart and the package (operator configuration, CRD copy).

Uses the helm binary that kubeinfer.devcluster.build builds and caches; if it cannot be had these
tests fail rather than skip.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubeinfer import contract
from kubeinfer.devcluster.build import BuildError, ensure_binaries
from kubeinfer.render.config import RenderConfig, load_config

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "kubeinfer"
RELEASE, NAMESPACE = "ki", "kubeinfer-system"
OPERATOR, GATEWAY = "ki-kubeinfer-operator", "ki-kubeinfer-gateway"
ALL_FEATURES = [
    "monitoring.serviceMonitor.enabled=true",
    "monitoring.podMonitor.enabled=true",
    "networkPolicy.enabled=true",
    "gateway.rbac.secretsNamespaced=true",
]


@pytest.fixture(scope="module")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    try:
        binary = ensure_binaries(["helm"])["helm"]
    except (BuildError, OSError) as exc:
        pytest.fail(f"no helm binary (kubeinfer.devcluster.build): {exc}", pytrace=False)
    home = tmp_path_factory.mktemp("helm-home")
    env = {
        **os.environ,
        # Keep helm's cache/config/data out of the user's home.
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_DATA_HOME": str(home / "data"),
    }

    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([str(binary), *args], capture_output=True, text=True, env=env, timeout=120)
        if check and proc.returncode != 0:
            pytest.fail(f"helm {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    yield run


def template(
    helm: Any, *sets: str, values: dict[str, Any] | None = None, tmp: Path | None = None
) -> list[dict]:
    args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE]
    for s in sets:
        args += ["--set", s]
    if values is not None:
        assert tmp is not None
        path = tmp / "values.yaml"
        path.write_text(yaml.safe_dump(values))
        args += ["--values", str(path)]
    out = helm(*args).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def by_kind(docs: list[dict]) -> dict[tuple[str, str], dict]:
    index = {}
    for d in docs:
        key = (d["kind"], d["metadata"]["name"])
        assert key not in index, f"duplicate {key}"
        index[key] = d
    return index


def rules_of(role: dict) -> dict[tuple[str, str], set[str]]:
    """{(apiGroup, resource): verbs}; every rule must be explicit (no wildcards, no resourceNames)."""
    out: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"] and "*" not in rule["apiGroups"]
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                out.setdefault((group, resource), set()).update(rule["verbs"])
    return out


# --- lint ------------------------------------------------------------------------------------------


def test_helm_lint(helm: Any) -> None:
    helm("lint", str(CHART))


@pytest.mark.parametrize("sets", [[], ALL_FEATURES], ids=["defaults", "all-features"])
def test_helm_lint_strict(helm: Any, sets: list[str]) -> None:
    args = ["lint", "--strict", str(CHART)]
    for s in sets:
        args += ["--set", s]
    out = helm(*args).stdout
    assert "0 chart(s) failed" in out


# --- defaults ----------------------------------------------------------------------------------------

DEFAULT_OBJECTS = {
    ("ServiceAccount", OPERATOR),
    ("ServiceAccount", GATEWAY),
    ("ConfigMap", OPERATOR),
    ("ConfigMap", GATEWAY),
    ("ClusterRole", OPERATOR),
    ("ClusterRole", GATEWAY),
    ("ClusterRoleBinding", OPERATOR),
    ("ClusterRoleBinding", GATEWAY),
    ("Deployment", OPERATOR),
    ("Deployment", GATEWAY),
    ("Service", GATEWAY),
}


def test_defaults_render_exactly_the_core_objects(helm: Any) -> None:
    objs = by_kind(template(helm))
    assert set(objs) == DEFAULT_OBJECTS  # no monitors, NetworkPolicy or Role unless asked for
    for (kind, _), obj in objs.items():
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        if kind not in ("ClusterRole", "ClusterRoleBinding"):
            assert obj["metadata"]["namespace"] == NAMESPACE


def _container(deployment: dict) -> dict:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def _assert_hardened(deployment: dict) -> None:
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    sc = _container(deployment)["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert sc.get("privileged") is not True
    # A read-only root needs somewhere to write temp files.
    assert {"name": "tmp", "mountPath": "/tmp"} in _container(deployment)["volumeMounts"]


def test_operator_deployment(helm: Any) -> None:
    objs = by_kind(template(helm))
    dep = objs["Deployment", OPERATOR]
    assert dep["spec"]["replicas"] == 1
    assert dep["spec"]["strategy"] == {"type": "Recreate"}  # never two operators at once
    pod = dep["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == OPERATOR
    c = _container(dep)
    assert c["image"] == "kubeinfer/kubeinfer:0.1.0"  # no registry host by default
    assert c["command"] == [
        "kubeinfer",
        "operator",
        "--config",
        "/etc/kubeinfer/config.yaml",
        "--liveness-port",
        "8080",
    ]
    assert c["ports"] == [{"name": "health", "containerPort": 8080, "protocol": "TCP"}]
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert c["resources"]["requests"] and c["resources"]["limits"]
    assert {"name": "config", "mountPath": "/etc/kubeinfer", "readOnly": True} in c["volumeMounts"]
    config_volume = next(v for v in pod["volumes"] if v["name"] == "config")
    assert config_volume["configMap"]["name"] == OPERATOR
    assert "config.yaml" in objs["ConfigMap", OPERATOR]["data"]
    _assert_hardened(dep)


def test_gateway_deployment_and_service(helm: Any) -> None:
    objs = by_kind(template(helm))
    dep = objs["Deployment", GATEWAY]
    assert dep["spec"]["replicas"] == 2
    c = _container(dep)
    assert c["command"] == ["kubeinfer", "gateway", "--port", "8000", "--metrics-port", "9090"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": 8000, "metrics": 9090}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert dep["spec"]["template"]["spec"]["serviceAccountName"] == GATEWAY
    _assert_hardened(dep)

    svc = objs["Service", GATEWAY]
    assert svc["spec"]["type"] == "ClusterIP"
    http = next(p for p in svc["spec"]["ports"] if p["name"] == "http")
    assert (http["port"], http["targetPort"]) == (80, "http")
    # The Service selects the gateway pods and only them (model pods carry
    # app.kubernetes.io/name=kubeinfer too).
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    assert svc["spec"]["selector"]["app.kubernetes.io/component"] == "gateway"
    assert objs["ConfigMap", GATEWAY]["data"] == {
        "gateway.yaml": "# Rendered by the kubeinfer Helm chart from the value gateway.config.\n{}\n"
    }


def test_image_registry_digest_and_tag(helm: Any) -> None:
    def image(*sets: str) -> str:
        return _container(by_kind(template(helm, *sets))["Deployment", OPERATOR])["image"]

    assert (
        image("image.registry=mirror.internal:5000/team/")
        == "mirror.internal:5000/team/kubeinfer/kubeinfer:0.1.0"
    )
    assert image("image.tag=dev") == "kubeinfer/kubeinfer:dev"
    digest = "sha256:" + "a" * 64
    assert image(f"image.digest={digest}") == f"kubeinfer/kubeinfer:0.1.0@{digest}"


def test_operator_rbac_is_exactly_what_it_needs(helm: Any) -> None:
    objs = by_kind(template(helm))
    crud = {"get", "list", "watch", "create", "patch", "update", "delete"}
    assert rules_of(objs["ClusterRole", OPERATOR]) == {
        ("kubeinfer.io", "llmmodels"): {"get", "list", "watch", "patch", "update"},
        ("kubeinfer.io", "llmmodels/status"): {"get", "patch", "update"},
        ("apps", "deployments"): crud,
        ("", "services"): crud,
        ("policy", "poddisruptionbudgets"): crud,
        ("", "pods"): {"get", "list", "watch"},
        ("", "secrets"): {"get"},
        ("", "events"): {"create", "patch"},
        ("events.k8s.io", "events"): {"create", "patch"},
        ("apiextensions.k8s.io", "customresourcedefinitions"): {"get", "list", "watch"},
        ("", "namespaces"): {"get", "list", "watch"},
    }
    binding = objs["ClusterRoleBinding", OPERATOR]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": OPERATOR,
    }
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": OPERATOR, "namespace": NAMESPACE}]


def test_every_rbac_rule_says_why() -> None:
    for name in ("operator-rbac.yaml", "gateway-rbac.yaml"):
        lines = (CHART / "templates" / name).read_text().splitlines()
        for i, line in enumerate(lines):
            if line.strip().startswith("- apiGroups:"):
                above = lines[i - 1].strip()
                assert above.startswith("#"), f"{name}:{i + 1}: rule without a comment saying why"


def test_gateway_rbac_cluster_wide_secrets_by_default(helm: Any) -> None:
    objs = by_kind(template(helm))
    read = {"get", "list", "watch"}
    assert rules_of(objs["ClusterRole", GATEWAY]) == {
        ("kubeinfer.io", "llmmodels"): read,
        ("", "pods"): read,
        ("", "secrets"): read,
    }
    assert ("Role", GATEWAY) not in objs


def test_gateway_rbac_secrets_namespaced(helm: Any) -> None:
    objs = by_kind(template(helm, "gateway.rbac.secretsNamespaced=true"))
    read = {"get", "list", "watch"}
    assert rules_of(objs["ClusterRole", GATEWAY]) == {("kubeinfer.io", "llmmodels"): read, ("", "pods"): read}
    role = objs["Role", GATEWAY]
    assert role["metadata"]["namespace"] == NAMESPACE
    assert rules_of(role) == {("", "secrets"): read}
    binding = objs["RoleBinding", GATEWAY]
    assert binding["roleRef"]["kind"] == "Role" and binding["roleRef"]["name"] == GATEWAY
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": GATEWAY, "namespace": NAMESPACE}]


# --- optional features -------------------------------------------------------------------------------


def test_all_optional_features(helm: Any) -> None:
    objs = by_kind(template(helm, *ALL_FEATURES))
    extra = set(objs) - DEFAULT_OBJECTS
    assert extra == {
        ("ServiceMonitor", GATEWAY),
        ("PodMonitor", "ki-kubeinfer-models"),
        ("NetworkPolicy", "ki-kubeinfer-models"),
        ("Role", GATEWAY),
        ("RoleBinding", GATEWAY),
    }

    sm = objs["ServiceMonitor", GATEWAY]
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    svc = objs["Service", GATEWAY]
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    (endpoint,) = sm["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    assert endpoint["port"] in {p["name"] for p in svc["spec"]["ports"]}
    metrics = next(p for p in svc["spec"]["ports"] if p["name"] == endpoint["port"])
    assert metrics["targetPort"] == "metrics"

    pm = objs["PodMonitor", "ki-kubeinfer-models"]
    assert pm["spec"]["selector"] == {
        "matchLabels": {contract.LABEL_COMPONENT: contract.COMPONENT_MODEL_SERVER}
    }
    assert pm["spec"]["namespaceSelector"] == {"any": True}
    (endpoint,) = pm["spec"]["podMetricsEndpoints"]
    assert (endpoint["port"], endpoint["path"]) == (contract.ENGINE_PORT_NAME, contract.METRICS_PATH)

    np = objs["NetworkPolicy", "ki-kubeinfer-models"]
    assert np["metadata"]["namespace"] == NAMESPACE
    assert np["spec"]["podSelector"] == {
        "matchLabels": {contract.LABEL_COMPONENT: contract.COMPONENT_MODEL_SERVER}
    }
    assert np["spec"]["policyTypes"] == ["Ingress"]
    gateway_rule, metrics_rule = np["spec"]["ingress"]
    (peer,) = gateway_rule["from"]
    gateway_pod_labels = objs["Deployment", GATEWAY]["spec"]["template"]["metadata"]["labels"]
    assert peer["podSelector"]["matchLabels"].items() <= gateway_pod_labels.items()
    assert peer["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": NAMESPACE}}
    assert gateway_rule["ports"] == [{"port": contract.ENGINE_PORT_NAME, "protocol": "TCP"}]
    (peer,) = metrics_rule["from"]
    assert peer == {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}


def test_network_policy_per_namespace_and_without_metrics_rule(helm: Any, tmp_path: Path) -> None:
    values = {
        "networkPolicy": {
            "enabled": True,
            "namespaces": ["team-a", "team-b"],
            "metricsNamespaceSelector": None,
        }
    }
    docs = [d for d in template(helm, values=values, tmp=tmp_path) if d["kind"] == "NetworkPolicy"]
    assert sorted(d["metadata"]["namespace"] for d in docs) == ["team-a", "team-b"]
    for d in docs:
        assert len(d["spec"]["ingress"]) == 1  # only the gateway


def test_monitor_labels_and_intervals(helm: Any) -> None:
    objs = by_kind(
        template(
            helm,
            *ALL_FEATURES,
            "monitoring.serviceMonitor.labels.release=prom",
            "monitoring.podMonitor.interval=15s",
        )
    )
    assert objs["ServiceMonitor", GATEWAY]["metadata"]["labels"]["release"] == "prom"
    assert objs["PodMonitor", "ki-kubeinfer-models"]["spec"]["podMetricsEndpoints"][0]["interval"] == "15s"


# --- values schema -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        ("operator.replicas=two", ["/operator/replicas", "integer"]),
        ("operator.replicas=2", ["/operator/replicas", "maximum"]),
        ("replicas=3", ["additional properties 'replicas' not allowed"]),
        ("operator.config.startupTimeoutSeconds=5", ["/operator/config/startupTimeoutSeconds"]),
        ("operator.config.unknown=1", ["/operator/config", "'unknown' not allowed"]),
        ("gateway.service.type=Ingress", ["/gateway/service/type"]),
        ("networkPolicy.enabled=yes", ["/networkPolicy/enabled", "boolean"]),
    ],
)
def test_schema_rejects_bad_values(helm: Any, setting: str, expected: list[str]) -> None:
    proc = helm("template", RELEASE, str(CHART), "--set", setting, check=False)
    assert proc.returncode != 0, f"{setting} was accepted"
    assert "values don't meet the specifications of the schema" in proc.stderr, proc.stderr
    for text in expected:
        assert text in proc.stderr, proc.stderr


def test_schema_is_draft07_and_closed() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    assert schema["additionalProperties"] is False
    for key in ("image", "engines", "operator", "gateway", "monitoring", "networkPolicy"):
        assert schema["properties"][key]["additionalProperties"] is False, key
    # Every top-level key of values.yaml is known to the schema (else helm would refuse the defaults).
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert set(values) <= set(schema["properties"])


def test_every_value_is_documented() -> None:
    """Every value in values.yaml has a comment right above it, except section headers (mappings
    whose keys the schema defines: their keys carry the comments)."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    lines = (CHART / "values.yaml").read_text().splitlines()
    missing: list[str] = []

    def walk(node: yaml.MappingNode, sub: dict[str, Any], path: str) -> None:
        props = sub.get("properties", {})
        for key_node, value_node in node.value:
            key = key_node.value
            child = props.get(key)
            if child is None:  # a free-form map (resources, securityContext ...): its owner is commented
                continue
            is_section = (
                isinstance(value_node, yaml.MappingNode) and value_node.value and "properties" in child
            )
            if is_section:
                walk(value_node, child, f"{path}{key}.")
                continue
            above = lines[key_node.start_mark.line - 1].strip() if key_node.start_mark.line else ""
            if not above.startswith("#"):
                missing.append(f"{path}{key} (line {key_node.start_mark.line + 1})")

    root = yaml.compose((CHART / "values.yaml").read_text())
    assert isinstance(root, yaml.MappingNode)
    walk(root, schema, "")
    assert not missing, f"values without a comment: {missing}"


# --- contracts with the package -------------------------------------------------------------------------


def test_operator_configmap_is_a_valid_operator_config(helm: Any, tmp_path: Path) -> None:
    cm = by_kind(template(helm))["ConfigMap", OPERATOR]
    path = tmp_path / "config.yaml"
    path.write_text(cm["data"]["config.yaml"])
    data = yaml.safe_load(path.read_text())
    # The same keys as the package's defaults.yaml, and the same values: the chart adds no drift.
    defaults = resources.files("kubeinfer").joinpath("config/defaults.yaml").read_text()
    assert data == yaml.safe_load(defaults)
    # And the operator's own loader accepts it.
    RenderConfig.model_validate(data)
    assert load_config(path) == load_config()


def test_operator_configmap_follows_values(helm: Any, tmp_path: Path) -> None:
    cm = by_kind(
        template(
            helm,
            "engines.images.vllm=vllm/vllm-openai:v9.9.9",
            "operator.config.imageRegistry=mirror.internal",
            "operator.config.startupTimeoutSeconds=600",
            "operator.config.imagePullPolicy=Always",
        )
    )["ConfigMap", OPERATOR]
    path = tmp_path / "config.yaml"
    path.write_text(cm["data"]["config.yaml"])
    config = load_config(path)
    assert config.image_for("vllm") == "mirror.internal/vllm/vllm-openai:v9.9.9"
    assert config.image_for("llama-server") == "mirror.internal/kubeinfer/llama-server:b11434-cuda"
    assert config.startup_timeout_seconds == 600
    assert config.image_pull_policy == "Always"
    # A new configuration rolls the operator (checksum annotation on its pod template).
    before = by_kind(template(helm))["Deployment", OPERATOR]["spec"]["template"]["metadata"]["annotations"]
    after = by_kind(template(helm, "operator.config.startupTimeoutSeconds=600"))["Deployment", OPERATOR]
    assert (
        after["spec"]["template"]["metadata"]["annotations"]["checksum/config"] != before["checksum/config"]
    )


def test_chart_crd_is_a_copy_of_the_generated_crd() -> None:
    chart_crd = CHART / "crds" / "kubeinfer.io_llmmodels.yaml"
    top_crd = ROOT / "crds" / "kubeinfer.io_llmmodels.yaml"
    assert chart_crd.read_bytes() == top_crd.read_bytes(), (
        "charts/kubeinfer/crds/ is out of date: run `make gen`"
    )
    assert sorted(p.name for p in (CHART / "crds").iterdir()) == ["kubeinfer.io_llmmodels.yaml"]


def test_crds_are_not_templates() -> None:
    # In crds/ Helm installs the CRD first and never deletes it; as a template it would be deleted
    # (with every LLMModel in the cluster) on `helm uninstall`.
    for path in (CHART / "templates").iterdir():
        assert "CustomResourceDefinition" not in path.read_text(), path
