"""Rendering: golden files per example, and the properties each manifest must have."""

from __future__ import annotations

import copy
import os

import pytest
import yaml

from kubeinfer import contract
from kubeinfer.api.v1alpha1 import LLMModel
from kubeinfer.estimate import estimate
from kubeinfer.render.config import load_config
from kubeinfer.render.manifests import merge_overlay, render, spec_hash
from kubeinfer.render.weights import cache_objects
from kubeinfer.validation import parse_model
from tests.cases import EXAMPLES, FULL_LLAMA, FULL_VLLM, ROOT, load_example, manifest

GOLDEN = ROOT / "tests" / "golden"
CONFIG = load_config()


def _with_uid(doc):
    doc = copy.deepcopy(doc)
    doc["metadata"].setdefault("namespace", "ml")
    doc["metadata"]["uid"] = "00000000-0000-0000-0000-000000000001"
    return doc


def _golden_text(doc) -> str:
    model = parse_model(_with_uid(doc))
    est = estimate(model.spec)
    head = f"# estimate: {est.message}\n"
    objects = cache_objects(model, CONFIG) + render(model, CONFIG)
    return head + yaml.safe_dump_all(objects, sort_keys=False, width=120)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_golden(path):
    golden = GOLDEN / path.name
    text = _golden_text(load_example(path))
    if os.environ.get("UPDATE_GOLDEN"):
        golden.parent.mkdir(exist_ok=True)
        golden.write_text(text)
    assert golden.exists(), f"missing {golden}; run `make golden`"
    assert text == golden.read_text(), (
        f"{path.name} renders differently from {golden}; review, then `make golden`"
    )


def _objects(spec, name="m"):
    model = parse_model(_with_uid(manifest(name, spec)))
    return model, {o["kind"]: o for o in render(model, CONFIG)}


def test_objects_are_owned_labelled_and_named_by_contract():
    model, objs = _objects(FULL_VLLM)
    assert set(objs) == {"Deployment", "Service", "PodDisruptionBudget"}
    for obj in objs.values():
        assert obj["metadata"]["name"] == contract.child_name("m")
        assert obj["metadata"]["namespace"] == "ml"
        owner = obj["metadata"]["ownerReferences"][0]
        assert (owner["kind"], owner["name"], owner["controller"]) == ("LLMModel", "m", True)
        assert obj["metadata"]["labels"][contract.LABEL_MODEL] == "m"
    pod = objs["Deployment"]["spec"]["template"]
    assert pod["metadata"]["labels"][contract.LABEL_SPEC_HASH] == spec_hash(model)
    ann = pod["metadata"]["annotations"]
    assert ann[contract.ANNOTATION_SERVED_NAME] == "org/model"
    assert ann[contract.ANNOTATION_PORT] == str(contract.ENGINE_PORT)
    assert yaml.safe_load(ann[contract.ANNOTATION_MODALITIES]) == ["text", "image"]
    # The selector is a subset of the template labels and does not contain the hash (stable across rollouts).
    sel = objs["Deployment"]["spec"]["selector"]["matchLabels"]
    assert contract.LABEL_SPEC_HASH not in sel
    assert sel.items() <= pod["metadata"]["labels"].items()
    assert objs["Service"]["spec"]["selector"] == sel


def test_engine_container_has_probes_gpu_limits_shm_and_token():
    _, objs = _objects(FULL_VLLM)
    pod = objs["Deployment"]["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["command"] == ["vllm", "serve"]
    assert c["image"] == "example/vllm:custom"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "4"
    assert c["readinessProbe"]["httpGet"]["path"] == "/health"
    assert c["startupProbe"]["failureThreshold"] * c["startupProbe"]["periodSeconds"] >= 3600
    assert c["lifecycle"]["preStop"]["sleep"]["seconds"] > 0
    env = {e["name"]: e for e in c["env"]}
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf", "key": "token"}
    assert env["FOO"]["value"] == "bar"
    vols = {v["name"]: v for v in pod["volumes"]}
    assert vols["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "16Gi"}
    assert pod["nodeSelector"] == {"pool": "gpu"}
    assert pod["runtimeClassName"] == "nvidia"
    # podTemplate overlay applied
    assert objs["Deployment"]["spec"]["template"]["metadata"]["labels"]["team"] == "ml"


def test_rollout_keeps_old_replicas_until_new_are_ready():
    _, objs = _objects(FULL_VLLM)
    strategy = objs["Deployment"]["spec"]["strategy"]
    assert strategy["rollingUpdate"]["maxUnavailable"] == 0


def test_pvc_sources_are_mounted_read_only():
    _, objs = _objects(FULL_LLAMA)
    pod = objs["Deployment"]["spec"]["template"]["spec"]
    claims = [v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v]
    assert claims == ["models"]
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "pvc-models")
    assert mount["readOnly"] and mount["mountPath"] == f"{contract.PVC_MOUNT_ROOT}/models"
    args = pod["containers"][0]["args"]
    assert args[:2] == ["-m", f"{contract.PVC_MOUNT_ROOT}/models/big/model-Q4_K_M.gguf"]
    assert "--metrics" in args


def test_single_replica_has_no_pdb_and_cpu_model_no_gpu_limit():
    doc = load_example(ROOT / "examples" / "tiny-gguf-cpu.yaml")
    model = parse_model(_with_uid(doc))
    objs = {o["kind"]: o for o in render(model, CONFIG)}
    assert "PodDisruptionBudget" not in objs
    limits = objs["Deployment"]["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert "nvidia.com/gpu" not in limits


def test_remote_models_render_nothing():
    model = parse_model(load_example(ROOT / "examples" / "remote-openai.yaml"))
    assert render(model, CONFIG) == []


def test_spec_hash_changes_with_pod_settings_only():
    base = parse_model(manifest("m", FULL_VLLM))
    scaled = parse_model(manifest("m", {**FULL_VLLM, "replicas": 3}))
    rerouted = parse_model(manifest("m", {**FULL_VLLM, "routing": {"strategy": "round-robin"}}))
    longer = parse_model(manifest("m", {**FULL_VLLM, "maxModelLen": 4096}))
    assert spec_hash(base) == spec_hash(scaled) == spec_hash(rerouted)
    assert spec_hash(base) != spec_hash(longer)
    # vLLM's pods do not depend on the in-flight target; llama-server's --threads-http does.
    deeper = parse_model(manifest("m", {**FULL_VLLM, "routing": {"targetInflight": 100}}))
    assert spec_hash(base) == spec_hash(deeper)


def test_llama_server_spec_hash_follows_the_in_flight_target_its_args_depend_on():
    def model(routing: dict[str, object] | None) -> LLMModel:
        spec = {"engine": "llama-server", "model": {"source": "pvc://m/model.gguf"}, "maxNumSeqs": 4}
        return parse_model(manifest("m", {**spec, **({"routing": routing} if routing else {})}))

    def threads(m: LLMModel) -> str:
        args = render(m, CONFIG)[0]["spec"]["template"]["spec"]["containers"][0]["args"]
        return str(args[args.index("--threads-http") + 1])

    base, rerouted, deeper = model(None), model({"strategy": "round-robin"}), model({"targetInflight": 100})
    assert spec_hash(base) == spec_hash(rerouted) and threads(base) == threads(rerouted)
    assert threads(base) != threads(deeper) and spec_hash(base) != spec_hash(deeper)


def test_render_is_deterministic():
    model = parse_model(_with_uid(manifest("m", FULL_VLLM)))
    assert yaml.safe_dump_all(render(model, CONFIG)) == yaml.safe_dump_all(render(model, CONFIG))


def test_merge_overlay_merges_containers_by_name():
    base = {"containers": [{"name": "engine", "image": "a", "env": [{"name": "X", "value": "1"}]}]}
    over = {"containers": [{"name": "engine", "env": [{"name": "Y", "value": "2"}]}, {"name": "sidecar"}]}
    out = merge_overlay(base, over)
    assert [c["name"] for c in out["containers"]] == ["engine", "sidecar"]
    assert out["containers"][0]["image"] == "a"
    assert [e["name"] for e in out["containers"][0]["env"]] == ["X", "Y"]


def test_config_overrides_images(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("imageRegistry: mirror.local:5000\nimages: {vllm: custom/vllm:1}\n")
    cfg = load_config(f)
    assert cfg.image_for("vllm") == "mirror.local:5000/custom/vllm:1"
    assert cfg.image_for("llama-server").endswith(CONFIG.images.llama_server)


# --- autoscaling.mode hpa / keda: the ecosystem autoscalers -------------------------------------------------

LLAMA_EXAMPLE = ROOT / "examples" / "llama-3.1-8b-awq.yaml"
AUTOSCALER_KINDS = {"hpa": "HorizontalPodAutoscaler", "keda": "ScaledObject"}


def _autoscaled(mode: str | None, **autoscaling):
    doc = load_example(LLAMA_EXAMPLE)
    if mode is None:
        doc["spec"].pop("autoscaling")
    else:
        doc["spec"]["autoscaling"] = {**doc["spec"]["autoscaling"], "mode": mode, **autoscaling}
    return parse_model(_with_uid(doc))


@pytest.mark.parametrize("mode", ["hpa", "keda"])
def test_golden_autoscaler(mode):
    """Only the autoscaler object: the rest of this model is the llama-3.1-8b-awq golden."""
    golden = GOLDEN / f"autoscaler-{mode}.yaml"
    model = _autoscaled(mode, scaleDownDelay="10m")
    objs = [o for o in render(model, CONFIG) if o["kind"] == AUTOSCALER_KINDS[mode]]
    text = f"# {LLAMA_EXAMPLE.name} with autoscaling.mode {mode}, scaleDownDelay 10m\n"
    text += yaml.safe_dump_all(objs, sort_keys=False, width=120)
    if os.environ.get("UPDATE_GOLDEN"):
        golden.write_text(text)
    assert golden.exists(), f"missing {golden}; run `make golden`"
    assert text == golden.read_text(), f"the {mode} autoscaler renders differently from {golden}"


@pytest.mark.parametrize("mode", [None, "builtin", "off", "hpa", "keda"])
def test_autoscaler_object_only_for_hpa_and_keda(mode):
    model = _autoscaled(mode)
    kinds = [o["kind"] for o in render(model, CONFIG)]
    assert kinds[:3] == ["Deployment", "Service", "PodDisruptionBudget"]
    assert kinds[3:] == ([AUTOSCALER_KINDS[mode]] if mode in AUTOSCALER_KINDS else [])
    # The autoscaler's settings never restart pods, whatever the mode.
    assert spec_hash(model) == spec_hash(_autoscaled(None))


def test_hpa_scales_the_llmmodel_on_the_gateways_load():
    model = _autoscaled(
        "hpa", minReplicas=2, maxReplicas=6, targetInflightPerReplica=12, scaleDownDelay="90s"
    )
    hpa = {o["kind"]: o for o in render(model, CONFIG)}["HorizontalPodAutoscaler"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["metadata"]["name"] == contract.child_name(model.name)
    assert hpa["metadata"]["ownerReferences"][0]["uid"] == model.metadata.uid
    spec = hpa["spec"]
    assert spec["scaleTargetRef"] == {
        "apiVersion": "kubeinfer.io/v1alpha1",
        "kind": "LLMModel",
        "name": "llama31-8b",
    }
    assert (spec["minReplicas"], spec["maxReplicas"]) == (2, 6)
    [metric] = spec["metrics"]
    assert metric["type"] == "External"
    assert metric["external"]["metric"] == {
        "name": "kubeinfer_gateway_model_load",
        "selector": {"matchLabels": {"model_namespace": "ml", "model": "llama31-8b"}},
    }
    # AverageValue over an External metric: desired = ceil(sum of load / target).
    assert metric["external"]["target"] == {"type": "AverageValue", "averageValue": "12"}
    assert spec["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 90
    assert spec["behavior"]["scaleUp"]["stabilizationWindowSeconds"] == 0


def test_hpa_stabilization_window_is_capped_at_the_apis_hour():
    hpa = render(_autoscaled("hpa", scaleDownDelay="2h"), CONFIG)[-1]
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 3600
    so = render(_autoscaled("keda", scaleDownDelay="2h"), CONFIG)[-1]
    assert so["spec"]["cooldownPeriod"] == 7200  # KEDA's own cooldown has no such cap


def test_scaled_object_queries_the_configured_prometheus(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("prometheusAddress: http://prom.obs.svc:9090\n")
    model = _autoscaled(
        "keda", minReplicas=0, maxReplicas=3, targetInflightPerReplica=5, scaleDownDelay="1m30s"
    )
    so = render(model, load_config(f))[-1]
    assert (so["apiVersion"], so["kind"]) == ("keda.sh/v1alpha1", "ScaledObject")
    assert so["metadata"]["name"] == contract.child_name(model.name)
    spec = so["spec"]
    assert spec["scaleTargetRef"] == {
        "apiVersion": "kubeinfer.io/v1alpha1",
        "kind": "LLMModel",
        "name": "llama31-8b",
    }
    assert (spec["minReplicaCount"], spec["maxReplicaCount"], spec["cooldownPeriod"]) == (0, 3, 90)
    assert (
        spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"][
            "stabilizationWindowSeconds"
        ]
        == 90
    )
    [trigger] = spec["triggers"]
    assert trigger["type"] == "prometheus"
    assert trigger["metadata"] == {
        "serverAddress": "http://prom.obs.svc:9090",
        "query": 'sum(kubeinfer_gateway_model_load{model_namespace="ml",model="llama31-8b"})',
        "threshold": "5",
    }
    assert CONFIG.prometheus_address == "http://prometheus-operated.monitoring.svc:9090"
