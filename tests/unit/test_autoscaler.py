"""The builtin autoscaler's decisions from injected load: bounds, scale-up at once, scale-down held by
scaleDownDelay (no flapping), replica changes by others respected, partial signals never scale down."""

from __future__ import annotations

import pytest

from kubeinfer.api.v1alpha1 import Autoscaling
from kubeinfer.operator.autoscaler import Autoscaler, model_loads, recommend

KEY = ("ns", "m")


def spec(**kw):
    base = {"minReplicas": 1, "maxReplicas": 4, "targetInflightPerReplica": 8, "scaleDownDelay": "30s"}
    return Autoscaling.model_validate({**base, **kw})


@pytest.mark.parametrize(
    ("load", "want"),
    [(0, 1), (0.1, 1), (8, 1), (8.01, 2), (16, 2), (17, 3), (1000, 4)],
)
def test_recommend_is_ceil_of_load_over_target_within_bounds(load, want):
    assert recommend(load, spec()) == want


def test_zero_load_recommends_min_which_may_be_zero():
    assert recommend(0, spec(minReplicas=0)) == 0
    assert recommend(0.5, spec(minReplicas=0)) == 1


def test_scale_up_is_immediate_and_uses_the_window_average():
    a = Autoscaler(window=10)
    assert a.decide(KEY, spec(), 1, 0.0, now=0).desired == 1
    d = a.decide(KEY, spec(), 1, 40.0, now=5)  # average of 0 and 40 = 20 -> 3 replicas
    assert (d.desired, d.reason, d.load) == (3, "LoadAboveTarget", 20.0)
    assert "1 -> 3" in d.message


def test_scale_down_waits_for_the_whole_delay_then_takes_the_highest_recommendation():
    a = Autoscaler(window=1)  # window shorter than a step: each decision sees one sample
    s = spec(scaleDownDelay="30s")
    assert a.decide(KEY, s, 1, 30.0, now=0).desired == 4
    # Load falls at t=10; a dip to 9 (2 replicas) at t=20, then 0.
    seen = []
    for t, load in [(10, 0.0), (20, 9.0), (25, 0.0), (29, 0.0)]:
        seen.append(a.decide(KEY, s, 4, load, now=t).desired)
    assert seen == [4, 4, 4, 4], "held back: less than 30 s since the scale-up"
    d = a.decide(KEY, s, 4, 0.0, now=45)
    # Recommendations of the last 30 s (t in (15, 45]): 2 (t=20), 1, 1, 1 -> the highest, 2.
    assert (d.desired, d.reason) == (2, "LoadBelowTarget")
    # A new count: the next step down needs another full delay.
    assert a.decide(KEY, s, 2, 0.0, now=50).desired == 2
    assert a.decide(KEY, s, 2, 0.0, now=74).desired == 2
    assert a.decide(KEY, s, 2, 0.0, now=81).desired == 1


def test_oscillating_load_does_not_flap():
    a = Autoscaler(window=1)
    s = spec(scaleDownDelay="20s")
    changes = 0
    replicas = a.decide(KEY, s, 1, 20.0, now=0).desired  # -> 3
    for t in range(5, 200, 5):
        d = a.decide(KEY, s, replicas, 20.0 if (t // 5) % 2 else 1.0, now=t)
        changes += d.changes(replicas)
        replicas = d.desired
    assert replicas == 3 and changes == 0


def test_idle_model_with_min_zero_goes_to_zero_after_the_delay():
    a = Autoscaler(window=10)
    s = spec(minReplicas=0, scaleDownDelay="20s")
    assert a.decide(KEY, s, 1, 0.0, now=0).desired == 1
    assert a.decide(KEY, s, 1, 0.0, now=10).reason == "Stabilizing"
    d = a.decide(KEY, s, 1, 0.0, now=21)
    assert (d.desired, d.reason) == (0, "Idle")


def test_a_replica_change_by_someone_else_restarts_the_watch():
    """The gateway's scale from zero (0 -> 1) must not be undone by a stale idle history."""
    a = Autoscaler(window=60)
    s = spec(minReplicas=0, scaleDownDelay="20s")
    for t in range(0, 100, 10):
        a.decide(KEY, s, 0, 0.0, now=t)
    d = a.decide(KEY, s, 1, 0.0, now=100)  # someone set 1; the window average is still 0
    assert (d.desired, d.reason) == (1, "Stabilizing")
    assert a.decide(KEY, s, 1, 0.0, now=115).desired == 1
    assert a.decide(KEY, s, 1, 0.0, now=121).desired == 0


def test_out_of_bounds_is_corrected_at_once():
    a = Autoscaler(window=10)
    assert a.decide(KEY, spec(minReplicas=2), 1, 0.0, now=0).desired == 2
    assert a.decide(("ns", "other"), spec(maxReplicas=2), 5, 100.0, now=0).desired == 2


def test_no_signal_or_a_partial_one_never_scales_down():
    a = Autoscaler(window=1)
    s = spec(minReplicas=0, scaleDownDelay="10s")
    d = a.decide(KEY, s, 2, None, now=0)
    assert (d.desired, d.reason) == (2, "NoLoadSignal")
    for t in (20, 40):
        assert a.decide(KEY, s, 2, 0.0, now=t, complete=False).desired == 2
    # A partial sum may still scale up: it can only under-count.
    assert a.decide(KEY, s, 2, 30.0, now=50, complete=False).desired == 4


def test_model_loads_sums_a_gateways_samples_per_model_and_ignores_the_rest():
    samples = [
        ("kubeinfer_gateway_model_load", {"model_namespace": "ml", "model": "a"}, 3.0),
        ("kubeinfer_gateway_model_load", {"model_namespace": "dev", "model": "a"}, 1.0),
        ("kubeinfer_gateway_model_load", {"model": "b"}, 0.0),  # a gateway without namespaces
        ("kubeinfer_gateway_queued_requests", {"model": "a"}, 9.0),
        ("kubeinfer_gateway_model_load", {"model_namespace": "ml", "model": "c"}, float("nan")),
        ("kubeinfer_gateway_model_load", {}, 4.0),
    ]
    assert model_loads(samples) == {("ml", "a"): 3.0, ("dev", "a"): 1.0, ("", "b"): 0.0}
