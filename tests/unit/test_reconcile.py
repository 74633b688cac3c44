"""Pure parts of the reconciler: drift detection and body parsing."""

from __future__ import annotations

import copy

from kubeinfer.operator.reconcile import drifted, parse_body
from kubeinfer.render.config import load_config
from kubeinfer.render.manifests import render
from kubeinfer.validation import parse_model
from tests.cases import FULL_VLLM, manifest


def _desired():
    doc = manifest("m", FULL_VLLM)
    doc["metadata"].update(namespace="ml", uid="u1")
    return render(parse_model(doc), load_config())[0]


def _as_served(desired):
    """What the apiserver returns: our fields plus defaults and status."""
    observed = copy.deepcopy(desired)
    observed["metadata"].update(resourceVersion="7", generation=1, managedFields=[{"manager": "x"}])
    observed["status"] = {"replicas": 2}
    pod = observed["spec"]["template"]["spec"]
    pod["dnsPolicy"] = "ClusterFirst"
    c = pod["containers"][0]
    c["terminationMessagePath"] = "/dev/termination-log"
    c["readinessProbe"]["successThreshold"] = 1
    return observed


def test_server_defaults_are_not_drift():
    desired = _desired()
    assert not drifted(desired, _as_served(desired))


def test_edits_to_our_fields_are_drift():
    desired = _desired()
    for mutate in (
        lambda o: o["spec"].update(replicas=5),
        lambda o: o["spec"]["template"]["spec"]["containers"][0]["args"].append("--bogus"),
        lambda o: o["spec"]["template"]["spec"]["containers"][0]["env"].pop(),
        lambda o: o["spec"]["template"]["metadata"]["labels"].pop("kubeinfer.io/spec-hash"),
    ):
        observed = _as_served(desired)
        mutate(observed)
        assert drifted(desired, observed)


def test_parse_body_ignores_status_and_server_metadata():
    body = {
        "apiVersion": "kubeinfer.io/v1alpha1", "kind": "LLMModel",
        "metadata": {"name": "m", "namespace": "ml", "uid": "u", "generation": 3, "resourceVersion": "9",
                     "managedFields": [], "annotations": {"kubeinfer.io/last-handled-configuration": "{}"}},
        "spec": {"model": {"source": "hf://o/m"}},
        "status": {"conditions": [], "unknownFromOlderVersion": 1},
    }  # fmt: skip
    model = parse_body(body)
    assert (model.name, model.namespace, model.metadata.generation) == ("m", "ml", 3)


def test_foreign_controller_is_recognised():
    from kubeinfer.operator.reconcile import foreign_controller

    ours = {"metadata": {"ownerReferences": [{"kind": "LLMModel", "uid": "u1", "controller": True}]}}
    theirs = {
        "metadata": {"ownerReferences": [{"kind": "ConfigMap", "name": "x", "uid": "u2", "controller": True}]}
    }
    plain_owner = {"metadata": {"ownerReferences": [{"kind": "ConfigMap", "uid": "u3"}]}}  # not a controller
    assert foreign_controller(ours, "u1") is None
    assert foreign_controller(theirs, "u1") == theirs["metadata"]["ownerReferences"][0]
    assert foreign_controller(plain_owner, "u1") is None
    assert foreign_controller({"metadata": {}}, "u1") is None


def test_earlier_autoscalers_follow_the_last_handled_mode():
    import json

    from kubeinfer.operator.reconcile import LAST_HANDLED, earlier_autoscalers

    def body(last):
        annotations = (
            {} if last is None else {LAST_HANDLED: last if isinstance(last, str) else json.dumps(last)}
        )
        return {"metadata": {"name": "m", "annotations": annotations}}

    both = ("HorizontalPodAutoscaler", "ScaledObject")
    assert earlier_autoscalers(body(None)) == both  # never handled to the end: either may exist
    assert earlier_autoscalers(body("not json")) == both
    assert earlier_autoscalers(body({"spec": {"autoscaling": {"mode": "hpa"}}})) == (
        "HorizontalPodAutoscaler",
    )
    assert earlier_autoscalers(body({"spec": {"autoscaling": {"mode": "keda"}}})) == ("ScaledObject",)
    assert earlier_autoscalers(body({"spec": {"autoscaling": {"mode": "builtin"}}})) == ()
    assert earlier_autoscalers(body({"spec": {"autoscaling": {"maxReplicas": 3}}})) == ()
    assert earlier_autoscalers(body({"spec": {}})) == ()
