"""The Helm chart charts/kubeinfer, without a cluster: `helm lint`, `helm template` and the values
schema, plus the contracts between the chart and the package (operator configuration, CRD copy).

Uses the helm binary that kubeinfer_devkit.devcluster.build builds and caches; if it cannot be had these
tests fail rather than skip.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from kubeinfer import contract
from kubeinfer.api.v1alpha1 import Pricing
from kubeinfer.gateway.app import GatewaySettings, create_app
from kubeinfer.gateway.config import GatewayConfig
from kubeinfer.gateway.registry import ModelEntry, Registry
from kubeinfer.gateway.routing import Endpoint
from kubeinfer.render.config import RenderConfig, load_config
from kubeinfer_devkit.devcluster.build import BuildError, ensure_binaries
from tests.cases import FIXTURES
from tests.httpx_upstream import mock_upstream

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "kubeinfer"
RELEASE, NAMESPACE = "ki", "kubeinfer-system"
OPERATOR, GATEWAY = "ki-kubeinfer-operator", "ki-kubeinfer-gateway"
ALL_FEATURES = [
    "monitoring.serviceMonitor.enabled=true",
    "monitoring.podMonitor.enabled=true",
    "monitoring.grafanaDashboard.enabled=true",
    "monitoring.prometheusRule.enabled=true",
    "networkPolicy.enabled=true",
    "gateway.rbac.secretsNamespaced=true",
]
DASHBOARD = CHART / "dashboards" / "kubeinfer.json"
GATEWAY_CONFIG_PATH = "/etc/kubeinfer/gateway.yaml"


@pytest.fixture(scope="module")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    try:
        binary = ensure_binaries(["helm"])["helm"]
    except (BuildError, OSError) as exc:
        pytest.fail(f"no helm binary (kubeinfer_devkit.devcluster.build): {exc}", pytrace=False)
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
        "--autoscale-interval",
        "10",
        "--autoscale-window",
        "60",
        "--gateway-selector",
        "app.kubernetes.io/name=kubeinfer,app.kubernetes.io/instance=ki,app.kubernetes.io/component=gateway",
        "--gateway-port",
        "8000",
    ]
    # The builtin autoscaler finds the gateway pods by the labels the chart gives them.
    gateway = objs["Deployment", GATEWAY]["spec"]["template"]["metadata"]["labels"]
    selector = dict(
        kv.split("=") for kv in c["command"][c["command"].index("--gateway-selector") + 1].split(",")
    )
    assert selector.items() <= gateway.items()
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
    assert c["command"] == [
        "kubeinfer", "gateway", "--port", "8000", "--metrics-port", "9090", "--config", GATEWAY_CONFIG_PATH
    ]  # fmt: skip
    # The --config file is the ConfigMap's key, mounted where the command looks for it.
    mount = next(m for m in c["volumeMounts"] if m["name"] == "config")
    assert f"{mount['mountPath']}/gateway.yaml" == GATEWAY_CONFIG_PATH
    volume = next(v for v in dep["spec"]["template"]["spec"]["volumes"] if v["name"] == "config")
    assert volume["configMap"]["name"] == GATEWAY
    assert set(objs["ConfigMap", GATEWAY]["data"]) == {"gateway.yaml"}
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
        ("kubeinfer.io", "llmmodels/scale"): {"get", "patch", "update"},
        ("apps", "deployments"): crud,
        ("", "services"): crud,
        ("policy", "poddisruptionbudgets"): crud,
        ("autoscaling", "horizontalpodautoscalers"): crud,
        ("keda.sh", "scaledobjects"): crud,
        ("", "pods"): {"get", "list", "watch"},
        ("batch", "jobs"): {"get", "list", "watch", "create", "delete"},
        ("", "pods/log"): {"get"},
        ("", "persistentvolumeclaims"): {"get", "create"},
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
        ("kubeinfer.io", "llmmodels/scale"): {"get", "patch"},  # scale from zero, its one write
        ("", "pods"): read,
        ("", "secrets"): read,
    }
    assert ("Role", GATEWAY) not in objs


def test_gateway_rbac_secrets_namespaced(helm: Any) -> None:
    objs = by_kind(template(helm, "gateway.rbac.secretsNamespaced=true"))
    read = {"get", "list", "watch"}
    assert rules_of(objs["ClusterRole", GATEWAY]) == {
        ("kubeinfer.io", "llmmodels"): read,
        ("kubeinfer.io", "llmmodels/scale"): {"get", "patch"},
        ("", "pods"): read,
    }
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
        ("ConfigMap", "ki-kubeinfer-dashboard"),
        ("PrometheusRule", "ki-kubeinfer"),
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
    # Engine samples get model="<namespace>/<LLMModel>": the gateway's own model label when it watches
    # every namespace (no --namespace, as the chart runs it), so one $model filter fits both.
    (relabel,) = endpoint["relabelings"]
    meta_label = "__meta_kubernetes_pod_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", contract.LABEL_MODEL)
    assert relabel == {
        "sourceLabels": ["__meta_kubernetes_namespace", meta_label],
        "separator": "/",
        "targetLabel": "model",
        "action": "replace",
    }
    assert "--namespace" not in _container(objs["Deployment", GATEWAY])["command"]

    np = objs["NetworkPolicy", "ki-kubeinfer-models"]
    assert np["metadata"]["namespace"] == NAMESPACE
    assert np["spec"]["podSelector"] == {
        "matchLabels": {contract.LABEL_COMPONENT: contract.COMPONENT_MODEL_SERVER}
    }
    assert np["spec"]["policyTypes"] == ["Ingress"]
    gateway_rule, metrics_rule = np["spec"]["ingress"]
    # The gateway (requests, scrapes) and the operator (vLLM's run-time LoRA adapter loads), each
    # selected by its pod labels: not each other's, nor any other pod of the release's namespace.
    peer, operator_peer = gateway_rule["from"]
    gateway_pod_labels = objs["Deployment", GATEWAY]["spec"]["template"]["metadata"]["labels"]
    operator_pod_labels = objs["Deployment", OPERATOR]["spec"]["template"]["metadata"]["labels"]
    assert peer["podSelector"]["matchLabels"].items() <= gateway_pod_labels.items()
    assert not peer["podSelector"]["matchLabels"].items() <= operator_pod_labels.items()
    assert operator_peer["podSelector"]["matchLabels"].items() <= operator_pod_labels.items()
    assert not operator_peer["podSelector"]["matchLabels"].items() <= gateway_pod_labels.items()
    for p in (peer, operator_peer):
        assert p["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": NAMESPACE}}
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
        ("gateway.config.auth=sometimes", ["/gateway/config/auth", "auto", "keys", "anonymous"]),
        ("gateway.config.retries=11", ["/gateway/config/retries", "maximum"]),
        ("gateway.config.scrapeInterval=0", ["/gateway/config/scrapeInterval"]),
        ("gateway.config.maxBodyBytes=10", ["/gateway/config/maxBodyBytes", "minimum"]),
        ("gateway.config.scrapeIntervall=2", ["/gateway/config", "'scrapeIntervall' not allowed"]),
        ("monitoring.grafanaDashboard.enabled=yes", ["/monitoring/grafanaDashboard/enabled", "boolean"]),
        ("monitoring.prometheusRule.errorRatio=2", ["/monitoring/prometheusRule/errorRatio", "maximum"]),
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


# --- the gateway's configuration file ------------------------------------------------------------------


def _gateway_config(helm: Any, *sets: str, values: dict[str, Any] | None = None, tmp: Path) -> GatewayConfig:
    """gateway.yaml of the rendered ConfigMap, read as the gateway reads its --config file."""
    cm = by_kind(template(helm, *sets, values=values, tmp=tmp))["ConfigMap", GATEWAY]
    data = yaml.safe_load(cm["data"]["gateway.yaml"])
    return GatewayConfig.model_validate(data)


def test_gateway_config_defaults_are_the_gateways_own_but_auth_keys(helm: Any, tmp_path: Path) -> None:
    config = _gateway_config(helm, tmp=tmp_path)
    # The chart spells out the gateway's defaults; only auth differs: in a cluster every request
    # needs a key (auto would leave the API open until the first key Secret is created).
    assert config == GatewayConfig(auth="keys")
    assert config.auth == "keys"
    assert config.hold_timeout is None and config.keys_namespace is None  # the models' / POD_NAMESPACE


def test_gateway_config_follows_values(helm: Any, tmp_path: Path) -> None:
    overrides = {
        "auth": "auto",
        "keysNamespace": "team-keys",
        "scrapeInterval": 2.5,
        "scrapeTimeout": 1,
        "holdTimeout": 30,
        "retries": 0,
        "maxBodyBytes": 1 << 20,
        "logFormat": "text",
        "accessLog": False,
    }
    config = _gateway_config(helm, values={"gateway": {"config": overrides}}, tmp=tmp_path)
    assert config == GatewayConfig.model_validate(overrides)
    assert (config.auth, config.keys_namespace, config.hold_timeout) == ("auto", "team-keys", 30)
    assert (config.max_body_bytes, config.access_log, config.log_format) == (1 << 20, False, "text")
    # --set works too, and a new configuration rolls the gateway pods.
    assert _gateway_config(helm, "gateway.config.auth=anonymous", tmp=tmp_path).auth == "anonymous"
    before = by_kind(template(helm))["Deployment", GATEWAY]["spec"]["template"]["metadata"]["annotations"]
    after = by_kind(template(helm, "gateway.config.retries=1"))["Deployment", GATEWAY]["spec"]["template"]
    assert after["metadata"]["annotations"]["checksum/config"] != before["checksum/config"]


def _constraints(prop: dict[str, Any]) -> dict[str, Any]:
    """Types, enum and bounds of a JSON-schema property, however it is spelt (anyOf or type lists)."""
    out: dict[str, Any] = {"types": set()}
    for variant in prop.get("anyOf", [prop]):
        kind = variant.get("type")
        out["types"] |= set(kind) if isinstance(kind, list) else {kind}
        for word in ("enum", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "pattern"):
            if word in variant:
                out[word] = sorted(variant[word]) if word == "enum" else variant[word]
    return out


def test_values_schema_of_gateway_config_is_the_models() -> None:
    """values.schema.json's gateway.config says what GatewayConfig accepts: same keys, types, enums
    and bounds, nothing else (so helm refuses what the gateway would refuse at start)."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    chart = schema["properties"]["gateway"]["properties"]["config"]
    model = GatewayConfig.model_json_schema(by_alias=True)
    assert chart["additionalProperties"] is False and model["additionalProperties"] is False
    assert set(chart["properties"]) == set(model["properties"])
    for key, prop in model["properties"].items():
        assert _constraints(chart["properties"][key]) == _constraints(prop), key
    # values.yaml spells out every default it sets, and they are the model's (auth aside).
    values = yaml.safe_load((CHART / "values.yaml").read_text())["gateway"]["config"]
    for key, value in values.items():
        if key != "auth":
            assert value == model["properties"][key]["default"], key


def _notes(helm: Any, tmp_path: Path, *sets: str) -> str:
    """templates/NOTES.txt as `helm install` prints it (helm template leaves NOTES out, so a copy of
    the chart renders it through tpl into a ConfigMap)."""
    chart = tmp_path / "chart"
    shutil.copytree(CHART, chart, dirs_exist_ok=True)
    (chart / "notes.txt").write_text((CHART / "templates" / "NOTES.txt").read_text())
    (chart / "templates" / "zz-notes.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: notes\ndata:\n  notes: |\n"
        '    {{- tpl (.Files.Get "notes.txt") . | nindent 4 }}\n'
    )
    args = [
        "template",
        RELEASE,
        str(chart),
        "--namespace",
        NAMESPACE,
        "--show-only",
        "templates/zz-notes.yaml",
    ]
    for s in sets:
        args += ["--set", s]
    return yaml.safe_load(helm(*args).stdout)["data"]["notes"]


def test_notes_say_how_to_create_an_api_key(helm: Any, tmp_path: Path) -> None:
    notes = _notes(helm, tmp_path)
    ns = f"kubectl -n {NAMESPACE}"
    assert f'{ns} create secret generic api-key-alice --from-literal={contract.API_KEY_DATA}="$KEY"' in notes
    assert f"{ns} label secret api-key-alice {contract.LABEL_API_KEY}=true" in notes
    for annotation in (
        contract.ANNOTATION_KEY_NAME,
        contract.ANNOTATION_KEY_MODELS,
        contract.ANNOTATION_KEY_RPM,
        contract.ANNOTATION_KEY_TPM,
    ):
        assert f"{annotation}=" in notes, annotation
    assert "serves nothing" in notes and "401" in notes  # auth: keys, the chart's default
    assert "Authorization: Bearer $KEY" in notes

    auto = _notes(helm, tmp_path, "gateway.config.auth=auto", "gateway.config.keysNamespace=team-keys")
    assert "kubectl -n team-keys create secret generic" in auto
    assert "open to anyone" in auto and "serves nothing" not in auto
    anonymous = _notes(helm, tmp_path, "gateway.config.auth=anonymous")
    assert "create secret" not in anonymous and "Bearer" not in anonymous
    assert "takes no keys" in anonymous


# --- metric names: the gateway's, from the real app; the engines', from real captures -------------------

VLLM_METRICS = FIXTURES / "vllm-0.32.0" / "metrics_under_load.txt"
LLAMA_METRICS = FIXTURES / "llama-server" / "metrics_under_load.txt"
# Labels Prometheus adds to the model pods' samples: the target's, and the PodMonitor's podTargetLabels
# and relabelings (model = <namespace>/<LLMModel name>).
ENGINE_TARGET_LABELS = {"namespace", "pod", "container", "endpoint", "job", "instance", "model",
                        "kubeinfer_io_model", "kubeinfer_io_engine"}  # fmt: skip
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
                "bool", "offset", "inf", "nan"}  # fmt: skip
_CLAUSE = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")


def promql_metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (not functions, keywords or label names)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings ($model, regexes)
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges ([5m], [$__rate_interval])
    text = _CLAUSE.sub("", text)  # by (model, le), on (replica) ...
    names = set()
    for m in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", text):
        before = text[m.start() - 1] if m.start() else " "
        if before.isalnum() or before in "_.$":  # the exponent of 1e3, a variable
            continue
        if text[m.end() :].lstrip().startswith("(") or m.group() in PROMQL_WORDS:
            continue
        names.add(m.group())
    return names


def promql_label_names(expr: str) -> set[str]:
    """Label names in the expression's matchers and by/on/... clauses."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    labels = {m.group(1) for block in re.findall(r"\{([^}]*)\}", text)
              for m in re.finditer(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)", block)}  # fmt: skip
    for _, inner in _CLAUSE.findall(text):
        labels |= {name.strip() for name in inner.split(",") if name.strip()}
    return labels


def _balanced(expr: str) -> bool:
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    stack: list[str] = []
    for ch in text:
        if ch in "([{":
            stack.append({"(": ")", "[": "]", "{": "}"}[ch])
        elif ch in ")]}" and (not stack or stack.pop() != ch):
            return False
    return not stack


def test_promql_helpers() -> None:
    expr = (
        "histogram_quantile(0.99, sum by (model, le) "
        '(rate(a_b_bucket{model=~"$model",x!="y"}[$__rate_interval])))'
        " / on (model) group_left (replica) sum(vllm:c_total) * 1e3 > bool 0 and d"
    )
    assert promql_metric_names(expr) == {"a_b_bucket", "vllm:c_total", "d"}
    assert promql_label_names(expr) == {"model", "le", "x", "replica"}
    assert _balanced(expr) and not _balanced("sum(rate(x[5m])")


@pytest.fixture(scope="module")
def gateway_metrics() -> dict[str, set[str]]:
    """{sample name: label names} of everything the real gateway exports, every family made to have
    samples: a priced model (cost), a first attempt answered 503 (a retry), an unknown model (errors)."""
    answered: list[str] = []

    def engine(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/metrics":
            return httpx.Response(404)
        answered.append(request.url.host)
        if len(answered) == 1:
            return httpx.Response(503)
        return httpx.Response(200, content=(FIXTURES / "vllm-0.32.0" / "chat_completion.json").read_bytes(),
                              headers={"content-type": "application/json"})  # fmt: skip

    reg = Registry()
    model = ModelEntry(name="m", served_name="m", pricing=Pricing(prompt_per1_m=1.0, completion_per1_m=2.0))
    reg.set_model(model, [Endpoint(id=f"r{i}", address=f"10.0.0.{i + 1}:8000", model="m") for i in range(2)])
    app = create_app(reg, GatewaySettings(scrape_interval=3600), upstream=mock_upstream(engine))
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    with TestClient(app) as client:
        assert client.post("/v1/chat/completions", json={"model": "m", **chat}).status_code == 200
        assert client.post("/v1/chat/completions", json={"model": "nope", **chat}).status_code == 404
        text = client.get("/metrics").text
    assert len(answered) == 2  # the 503 was retried on the other replica
    out: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        assert family.samples, f"{family.name} has no samples: the fixture no longer exercises it"
        for sample in family.samples:
            out.setdefault(sample.name, set()).update(sample.labels)
    return out


def _engine_metrics(path: Path) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(path.read_text()):
        for sample in family.samples:
            out.setdefault(sample.name, set()).update(sample.labels)
    return out


@pytest.fixture(scope="module")
def known_metrics(gateway_metrics: dict[str, set[str]]) -> dict[str, set[str]]:
    engines = {**_engine_metrics(VLLM_METRICS), **_engine_metrics(LLAMA_METRICS)}
    assert "vllm:num_requests_running" in engines and "llamacpp:requests_processing" in engines
    return {**gateway_metrics, **{name: labels | ENGINE_TARGET_LABELS for name, labels in engines.items()}}


def check_promql(expr: str, known: dict[str, set[str]]) -> set[str]:
    """Fails unless every metric (and label) the expression reads exists; returns the metric names."""
    assert _balanced(expr), expr
    names = promql_metric_names(expr)
    assert names, f"no metric in {expr!r}"
    unknown = sorted(n for n in names if n not in known)
    assert not unknown, f"{unknown} are not exported by the gateway or the engines: {expr}"
    labels = set().union(*(known[n] for n in names))
    assert promql_label_names(expr) <= labels, f"{promql_label_names(expr) - labels} unknown in {expr}"
    return names


def test_gateway_metric_names_are_the_documented_ones(gateway_metrics: dict[str, set[str]]) -> None:
    # What the dashboard and the alerts are built on (prometheus_client adds _total / _bucket ...).
    for name, labels in {
        "kubeinfer_gateway_requests_total": {"model", "replica", "code"},
        "kubeinfer_gateway_errors_total": {"model", "type"},
        "kubeinfer_gateway_retries_total": {"model"},
        "kubeinfer_gateway_tokens_total": {"model", "key", "kind"},
        "kubeinfer_gateway_usage_requests_total": {"model", "key"},
        "kubeinfer_gateway_estimated_cost_total": {"model", "key"},
        "kubeinfer_gateway_queued_requests": {"model"},
        "kubeinfer_gateway_inflight_requests": {"replica"},
        "kubeinfer_gateway_queue_wait_seconds_bucket": {"model", "le"},
        "kubeinfer_gateway_time_to_first_byte_seconds_bucket": {"model", "le"},
        "kubeinfer_gateway_time_to_first_token_seconds_bucket": {"model", "replica", "le"},
        "kubeinfer_gateway_request_duration_seconds_bucket": {"model", "replica", "le"},
        "kubeinfer_gateway_output_tokens_per_second_bucket": {"model", "le"},
    }.items():
        assert gateway_metrics.get(name) == labels, name


# --- Grafana dashboard ------------------------------------------------------------------------------------


def _dashboard_targets(dashboard: dict[str, Any]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            yield panel, target


def test_dashboard_is_a_grafana_dashboard() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert 36 <= dashboard["schemaVersion"] <= 41
    assert dashboard["uid"] and dashboard["title"]
    assert dashboard.get("id") is None  # provisioned: Grafana assigns the id
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    model = variables["model"]
    assert model["type"] == "query" and model["multi"] and model["includeAll"] and model["allValue"] == ".*"
    assert model["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    assert "kubeinfer_gateway_requests_total" in model["query"]["query"]

    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    titles = set()
    for panel in dashboard["panels"]:
        assert panel.get("title"), panel
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0
        if panel["type"] == "row":
            continue
        titles.add(panel["title"])
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel.get("description"), panel["title"]
        assert panel["targets"], f"{panel['title']}: no query"
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["title"]
            assert target["datasource"] == panel["datasource"]
            assert '"$model"' in target["expr"], f"{panel['title']}: not filtered by $model"
    # The panels the dashboard is for.
    for wanted in (
        "Request rate by model and status code",
        "Errors by type",
        "Time to first token (p50, p99)",
        "Queue wait (p50, p99)",
        "Queued requests",
        "In-flight requests per replica",
        "Output tokens/s",
        "Tokens by key",
        "Estimated cost by key (per hour)",
        "Retries",
        "vLLM requests running and waiting",
        "vLLM KV-cache usage",
        "vLLM prefix-cache hit rate",
        "llama.cpp requests processing and deferred",
    ):
        assert wanted in titles, wanted


def test_dashboard_queries_read_only_real_metrics(known_metrics: dict[str, set[str]]) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    used: set[str] = set()
    for panel, target in _dashboard_targets(dashboard):
        try:
            used |= check_promql(target["expr"], known_metrics)
        except AssertionError as exc:
            raise AssertionError(f"panel {panel['title']!r}: {exc}") from None
    variable = next(v for v in dashboard["templating"]["list"] if v["name"] == "model")
    assert re.fullmatch(r"label_values\((\w+), model\)", variable["query"]["query"])
    assert re.fullmatch(r"label_values\((\w+), model\)", variable["query"]["query"])[1] in known_metrics
    # The engine panels read what each engine exports (vLLM's and llama.cpp's own names).
    assert {
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:prefix_cache_hits_total",
        "vllm:prefix_cache_queries_total",
        "llamacpp:requests_processing",
        "llamacpp:requests_deferred",
    } <= used
    assert {
        "kubeinfer_gateway_requests_total",
        "kubeinfer_gateway_errors_total",
        "kubeinfer_gateway_retries_total",
        "kubeinfer_gateway_tokens_total",
        "kubeinfer_gateway_estimated_cost_total",
        "kubeinfer_gateway_queued_requests",
        "kubeinfer_gateway_inflight_requests",
        "kubeinfer_gateway_queue_wait_seconds_bucket",
        "kubeinfer_gateway_time_to_first_token_seconds_bucket",
    } <= used


def test_dashboard_configmap_only_when_enabled(helm: Any) -> None:
    assert not [d for d in template(helm) if d["metadata"]["name"].endswith("-dashboard")]
    objs = by_kind(template(helm, "monitoring.grafanaDashboard.enabled=true"))
    cm = objs["ConfigMap", "ki-kubeinfer-dashboard"]
    assert cm["metadata"]["namespace"] == NAMESPACE
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"  # the Grafana sidecar's default
    assert cm["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE
    (name,) = cm["data"]
    assert name.endswith(".json")
    assert json.loads(cm["data"][name]) == json.loads(DASHBOARD.read_text())


def test_dashboard_configmap_label_namespace_and_annotations(helm: Any, tmp_path: Path) -> None:
    values = {
        "monitoring": {
            "grafanaDashboard": {
                "enabled": True,
                "namespace": "monitoring",
                "label": "grafana.example.com/dashboard",
                "labelValue": "kubeinfer",
                "labels": {"team": "llm"},
                "annotations": {"grafana_folder": "LLM"},
            }
        }
    }
    cm = by_kind(template(helm, values=values, tmp=tmp_path))["ConfigMap", "ki-kubeinfer-dashboard"]
    assert cm["metadata"]["namespace"] == "monitoring"
    assert cm["metadata"]["labels"]["grafana.example.com/dashboard"] == "kubeinfer"
    assert cm["metadata"]["labels"]["team"] == "llm"
    assert "grafana_dashboard" not in cm["metadata"]["labels"]
    assert cm["metadata"]["annotations"] == {"grafana_folder": "LLM"}


# --- PrometheusRule -----------------------------------------------------------------------------------------


def _rules(helm: Any, *sets: str) -> list[dict[str, Any]]:
    """The alerting rules rendered with --set-json of each setting."""
    args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE]
    for s in ("monitoring.prometheusRule.enabled=true", *sets):
        key, _, value = s.partition("=")
        args += ["--set-json", f"{key}={json.dumps(yaml.safe_load(value))}"]
    objs = by_kind([d for d in yaml.safe_load_all(helm(*args).stdout) if d])
    rule = objs["PrometheusRule", "ki-kubeinfer"]
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["namespace"] == NAMESPACE
    return [r for group in rule["spec"]["groups"] for r in group["rules"]]


def test_prometheus_rule_only_when_enabled(helm: Any) -> None:
    assert not [d for d in template(helm) if d["kind"] == "PrometheusRule"]
    assert {r["alert"] for r in _rules(helm)} == {
        "KubeinferHighErrorRatio",
        "KubeinferQueueWaitHigh",
        "KubeinferNoReadyReplica",
        "KubeinferQueueFull",
    }


def test_prometheus_rule_alerts_read_only_real_metrics(helm: Any, known_metrics: dict[str, set[str]]) -> None:
    for rule in _rules(helm):
        names = check_promql(rule["expr"], known_metrics)
        assert all(n.startswith("kubeinfer_gateway_") for n in names), rule["alert"]
        assert rule["for"] == "10m" and rule["labels"]["severity"] == "warning"
        assert "{{ $labels.model }}" in rule["annotations"]["summary"]
        assert rule["annotations"]["description"]
        assert "{{" not in rule["expr"]  # no Helm (or alert) template left in PromQL
    by_alert = {r["alert"]: r for r in _rules(helm)}
    assert 'type="no_replica"' in by_alert["KubeinferNoReadyReplica"]["expr"]


def test_prometheus_rule_follows_values(helm: Any) -> None:
    # --set makes "0.2" a string (the schema refuses it); --set-json or a values file give a number.
    assert helm("template", RELEASE, str(CHART), "--set", "monitoring.prometheusRule.errorRatio=0.2",
                check=False).returncode != 0  # fmt: skip
    rules = _rules(
        helm,
        "monitoring.prometheusRule.errorRatio=0.2",
        "monitoring.prometheusRule.queueWaitP99Seconds=45",
        "monitoring.prometheusRule.for=3m",
        "monitoring.prometheusRule.severity=critical",
        "monitoring.prometheusRule.labels.release=prom",
    )
    by_alert = {r["alert"]: r for r in rules}
    assert by_alert["KubeinferHighErrorRatio"]["expr"].rstrip().endswith("> 0.2")
    assert by_alert["KubeinferQueueWaitHigh"]["expr"].rstrip().endswith("> 45")
    assert {r["for"] for r in rules} == {"3m"}
    assert {r["labels"]["severity"] for r in rules} == {"critical"}
