"""Status conditions from observed children: pure, so every case is cheap to pin down."""

from __future__ import annotations

from kubeinfer.estimate import estimate
from kubeinfer.operator.status import Observed, compute_status, status_changed, transitions
from kubeinfer.validation import parse_model
from tests.cases import manifest

NOW = "2026-11-22T00:00:00Z"


def _model(spec, gen=1):
    doc = manifest("m", spec)
    doc["metadata"].update(namespace="ml", generation=gen)
    return parse_model(doc)


def _dep(replicas, ready, updated, gen=1, observed=1, conditions=()):
    return {
        "metadata": {"generation": gen},
        "status": {"replicas": replicas, "readyReplicas": ready, "updatedReplicas": updated,
                   "observedGeneration": observed, "conditions": list(conditions)},
    }  # fmt: skip


def conds(status):
    return {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}


CPU = {"model": {"source": "hf://o/m", "parameters": "1B"}, "resources": {"gpus": 0}, "replicas": 2}


def test_ready_and_complete():
    m = _model(CPU)
    s = compute_status(m, estimate(m.spec), Observed(_dep(2, 2, 2)), None, NOW)
    c = conds(s)
    assert c["Ready"] == ("True", "Available")
    assert c["Progressing"] == ("False", "Complete")
    assert c["Degraded"] == ("False", "AsExpected")
    assert c["ResourcesFit"] == ("True", "Fits")
    assert s["readyReplicas"] == 2 and s["replicas"] == 2
    assert s["endpoint"] == "http://llm-m.ml.svc:8000"
    assert s["selector"] == "kubeinfer.io/model=m,app.kubernetes.io/component=model-server"
    assert all(x["observedGeneration"] == 1 for x in s["conditions"])


def test_rollout_in_progress_keeps_ready():
    m = _model(CPU)
    s = compute_status(m, estimate(m.spec), Observed(_dep(3, 2, 1)), None, NOW)
    assert conds(s)["Ready"][0] == "True"
    assert conds(s)["Progressing"] == ("True", "RollingOut")


def test_deployment_not_yet_observed_is_progressing():
    m = _model(CPU)
    s = compute_status(m, estimate(m.spec), Observed(_dep(2, 2, 2, gen=2, observed=1)), None, NOW)
    assert conds(s)["Progressing"][0] == "True"


def test_does_not_fit_holds_spec_back():
    m = _model({"model": {"source": "hf://o/m", "parameters": "70B"}, "resources": {"gpuType": "L4"}})
    e = estimate(m.spec)
    s = compute_status(m, e, Observed(None, applied=False), None, NOW)
    c = conds(s)
    assert c["ResourcesFit"] == ("False", "DoesNotFit")
    assert c["Ready"] == ("False", "ResourcesDoNotFit")
    assert c["Progressing"] == ("False", "ResourcesDoNotFit")
    msg = next(x["message"] for x in s["conditions"] if x["type"] == "ResourcesFit")
    assert "does not fit" in msg and "GiB" in msg


def test_crash_loop_and_unschedulable_are_degraded():
    m = _model(CPU)
    pods = [
        {"metadata": {"name": "p1"}, "status": {"containerStatuses": [
            {"state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 5m"}}}]}},
        {"metadata": {"name": "p2"}, "status": {"conditions": [
            {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "0/1 nodes"}]}},
    ]  # fmt: skip
    s = compute_status(m, estimate(m.spec), Observed(_dep(2, 0, 2), pods=pods), None, NOW)
    c = next(x for x in s["conditions"] if x["type"] == "Degraded")
    assert c["status"] == "True" and "CrashLoopBackOff" in c["message"] and "unschedulable" in c["message"]


def test_remote_waits_for_secret():
    m = _model({"model": {}, "remote": {"baseURL": "https://x.example/v1", "model": "y",
                                        "apiKeySecretRef": {"name": "k"}}})  # fmt: skip
    missing = compute_status(m, estimate(m.spec), Observed(remote_secret_ok=False), None, NOW)
    assert conds(missing)["Ready"] == ("False", "SecretMissing")
    ok = compute_status(m, estimate(m.spec), Observed(remote_secret_ok=True), missing, "2026-11-22T00:01:00Z")
    assert conds(ok)["Ready"] == ("True", "RemoteReady")
    assert ok["endpoint"] == "https://x.example/v1" and ok["selector"] is None
    assert ("Ready", "RemoteReady", "forwarding to https://x.example/v1") in transitions(missing, ok)


def test_transition_times_and_change_detection():
    m = _model(CPU)
    first = compute_status(m, estimate(m.spec), Observed(_dep(2, 2, 2)), None, NOW)
    again = compute_status(m, estimate(m.spec), Observed(_dep(2, 2, 2)), first, "2026-11-22T01:00:00Z")
    assert not status_changed(first, again)
    assert transitions(first, again) == []
    down = compute_status(m, estimate(m.spec), Observed(_dep(2, 0, 2)), first, "2026-11-22T02:00:00Z")
    ready = next(x for x in down["conditions"] if x["type"] == "Ready")
    fit = next(x for x in down["conditions"] if x["type"] == "ResourcesFit")
    assert ready["lastTransitionTime"] == "2026-11-22T02:00:00Z"
    assert fit["lastTransitionTime"] == NOW
    assert status_changed(first, down)


def test_partial_pass_keeps_pod_verdict_until_replicas_are_ready():
    m = _model(CPU)
    pods = [{"metadata": {"name": "p1"}, "status": {"containerStatuses": [
        {"state": {"waiting": {"reason": "ImagePullBackOff", "message": "no such image"}}}]}}]  # fmt: skip
    full = compute_status(m, estimate(m.spec), Observed(_dep(2, 0, 2), pods=pods), None, NOW)
    partial = compute_status(m, estimate(m.spec), Observed(_dep(2, 1, 2), pods=None), full, NOW)
    assert conds(partial)["Degraded"] == ("True", "ReplicasFailing")
    healed = compute_status(m, estimate(m.spec), Observed(_dep(2, 2, 2), pods=None), partial, NOW)
    assert conds(healed)["Degraded"] == ("False", "AsExpected")


def test_events_only_for_news():
    m = _model(CPU)
    starting = compute_status(m, estimate(m.spec), Observed(_dep(0, 0, 0)), None, NOW)
    assert transitions(None, starting) == []  # fits, not ready yet, not degraded: no Event
    ready = compute_status(m, estimate(m.spec), Observed(_dep(2, 2, 2)), starting, NOW)
    assert [t[:2] for t in transitions(starting, ready)] == [("Ready", "Available")]
    rolling = compute_status(m, estimate(m.spec), Observed(_dep(3, 2, 1)), ready, NOW)
    assert [t[:2] for t in transitions(ready, rolling)] == [("Progressing", "RollingOut")]
    lost = compute_status(m, estimate(m.spec), Observed(_dep(2, 0, 2)), ready, NOW)
    assert ("Ready", "NoReadyReplicas") in [t[:2] for t in transitions(ready, lost)]
    big = _model({"model": {"source": "hf://o/m", "parameters": "70B"}, "resources": {"gpuType": "L4"}})
    refused = compute_status(big, estimate(big.spec), Observed(None, applied=False), None, NOW)
    assert ("ResourcesFit", "DoesNotFit") in [t[:2] for t in transitions(None, refused)]


def test_foreign_deployment_is_explained_not_counted():
    from kubeinfer.operator.status import ChildProblem

    m = _model(CPU)
    problem = ChildProblem("Deployment", "ChildConflict", "Deployment ml/llm-m is controlled by ReplicaSet x")
    s = compute_status(m, estimate(m.spec), Observed(None, pods=[], child_problem=problem), None, NOW)
    assert conds(s)["Ready"] == ("False", "ChildConflict")
    assert conds(s)["Progressing"] == ("False", "ChildConflict")
    assert conds(s)["Degraded"] == ("True", "ChildConflict")
    assert "ReplicaSet x" in next(c["message"] for c in s["conditions"] if c["type"] == "Degraded")
    assert ("Degraded", "ChildConflict", problem.message) in transitions(None, s)


def test_refused_service_degrades_but_keeps_ready():
    from kubeinfer.operator.status import ChildProblem

    m = _model(CPU)
    problem = ChildProblem("Service", "ApplyFailed", "applying Service ml/llm-m was refused: quota")
    s = compute_status(m, estimate(m.spec), Observed(_dep(2, 2, 2), child_problem=problem), None, NOW)
    assert conds(s)["Ready"] == ("True", "Available")
    assert conds(s)["Degraded"] == ("True", "ApplyFailed")


def test_status_written_by_someone_else_is_replaced():
    """A hand-written status (bogus condition, odd fields left out) is what `previous` holds on a fresh
    pass: the computed status differs, so the operator writes the truth back."""
    m = _model(CPU)
    bogus = {"readyReplicas": 0, "conditions": [{"type": "Ready", "status": "False", "reason": "Hacked"},
                                                {"type": "Custom", "status": "True"}]}  # fmt: skip
    s = compute_status(m, estimate(m.spec), Observed(_dep(2, 2, 2)), bogus, NOW)
    assert status_changed(bogus, s)
    assert conds(s)["Ready"] == ("True", "Available") and "Custom" not in conds(s)
    assert all(c["lastTransitionTime"] == NOW for c in s["conditions"])
