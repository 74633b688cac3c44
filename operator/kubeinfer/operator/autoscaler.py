"""The builtin autoscaler's decisions: pure, so every case is cheap to pin down.

The signal is the gateways' own count of each model's requests, in flight plus queued
(`kubeinfer_gateway_model_load`). Each request passes through exactly one gateway replica, so the
model's load is the sum over gateway replicas: nothing is counted twice, and gateways never talk to
each other. The operator is the only writer of spec.replicas (through the scale subresource), so
several gateways cannot fight over it; the one exception is the gateway's scale from zero, a single
idempotent 0 -> 1 write when a request arrives for a model with no replicas.

The rules, per model with `autoscaling.mode: builtin`:
* load is averaged over a window (`--autoscale-window`, default 60 s) of samples taken every
  `--autoscale-interval` (10 s);
* the recommendation is ceil(average load / targetInflightPerReplica), within minReplicas..maxReplicas;
* a higher recommendation scales up at once;
* a lower one scales down only when every recommendation of the last `scaleDownDelay` was below the
  current count, and then to the highest of them (the stabilization window of Kubernetes' HPA): load
  that dips and comes back does not flap;
* nothing scales down until the autoscaler has watched the model for a whole `scaleDownDelay` since it
  started or since someone else changed the replicas (the gateway's scale from zero, `kubectl scale`);
  and not on a round where some gateway could not be read, since a partial sum under-counts.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from kubeinfer.api.fields import duration_seconds
from kubeinfer.api.v1alpha1 import Autoscaling

LOAD_METRIC = "kubeinfer_gateway_model_load"


@dataclass(frozen=True)
class Decision:
    desired: int
    """Replicas to set now (equal to the current count when nothing changes)."""
    recommended: int
    """What the load alone asks for, before scaleDownDelay holds a scale-down back."""
    load: float
    reason: str
    message: str

    def changes(self, current: int) -> bool:
        return self.desired != current


@dataclass
class _History:
    samples: collections.deque[tuple[float, float]] = field(default_factory=collections.deque)
    recommendations: collections.deque[tuple[float, int]] = field(default_factory=collections.deque)
    since: float = 0.0
    """Start of the current watch: first sample, or the last replica change made by someone else."""
    replicas: int | None = None
    """spec.replicas as this autoscaler last saw or set it."""


def recommend(load: float, spec: Autoscaling) -> int:
    raw = math.ceil(load / spec.target_inflight_per_replica - 1e-9) if load > 0 else 0
    return max(spec.min_replicas, min(spec.max_replicas, raw))


class Autoscaler:
    """Load history per model and the decision of each round. Keys are (namespace, name)."""

    def __init__(self, window: float) -> None:
        self.window = window
        self._models: dict[tuple[str, str], _History] = {}

    def forget(self, keep: Iterable[tuple[str, str]]) -> None:
        """Drop the history of models that no longer exist or no longer autoscale."""
        kept = set(keep)
        for key in [k for k in self._models if k not in kept]:
            del self._models[key]

    def decide(
        self,
        key: tuple[str, str],
        spec: Autoscaling,
        replicas: int,
        load: float | None,
        now: float,
        complete: bool = True,
    ) -> Decision:
        """One round for one model. `load` is this round's sum over gateways (None: no gateway could be
        read); `complete` is False when some gateway could not be read (the sum may be short)."""
        h = self._models.setdefault(key, _History(since=now, replicas=replicas))
        if h.replicas != replicas:  # someone else scaled: respect it for a whole scaleDownDelay
            h.since, h.replicas = now, replicas
            h.recommendations.clear()
        if load is not None:
            h.samples.append((now, load))
        while h.samples and h.samples[0][0] <= now - self.window:
            h.samples.popleft()
        avg = sum(v for _, v in h.samples) / len(h.samples) if h.samples else 0.0
        delay = duration_seconds(spec.scale_down_delay)
        target = spec.target_inflight_per_replica

        if replicas < spec.min_replicas or replicas > spec.max_replicas:
            desired = max(spec.min_replicas, min(spec.max_replicas, replicas))
            return self._set(h, desired, desired, avg, "OutOfBounds",
                             f"replicas {replicas} outside {spec.min_replicas}..{spec.max_replicas}: "
                             f"{replicas} -> {desired}", now)  # fmt: skip
        if not h.samples:
            return Decision(replicas, replicas, avg, "NoLoadSignal", "no gateway could be read")

        rec = recommend(avg, spec)
        h.recommendations.append((now, rec))
        while h.recommendations and h.recommendations[0][0] <= now - delay:
            h.recommendations.popleft()
        why = f"load {avg:.1f} against target {target} per replica"
        if rec > replicas:
            return self._set(h, rec, rec, avg, "LoadAboveTarget", f"{why}: {replicas} -> {rec}", now)
        if rec < replicas:
            highest = max(r for _, r in h.recommendations)
            watched = now - h.since >= delay
            if highest < replicas and watched and complete and load is not None:
                reason = "Idle" if highest == 0 else "LoadBelowTarget"
                message = f"{why} for {spec.scale_down_delay}: {replicas} -> {highest}"
                return self._set(h, highest, rec, avg, reason, message, now)
            return Decision(replicas, rec, avg, "Stabilizing", f"{why}: waiting out scaleDownDelay")
        return Decision(replicas, rec, avg, "AtTarget", why)

    @staticmethod
    def _set(
        h: _History, desired: int, rec: int, avg: float, reason: str, message: str, now: float
    ) -> Decision:
        h.replicas = desired
        # A new count: the next scale-down needs a whole scaleDownDelay of evidence gathered after it.
        h.since = now
        h.recommendations.clear()
        return Decision(desired, rec, avg, reason, message)


def model_loads(families: Iterable[tuple[str, dict[str, str], float]]) -> dict[tuple[str, str], float]:
    """Per-model load, by (namespace, name), from one gateway's samples (name, labels, value). A gateway
    that does not know a model's namespace (static discovery) reports it as ""."""
    out: dict[tuple[str, str], float] = {}
    for name, labels, value in families:
        if name == LOAD_METRIC and "model" in labels and math.isfinite(value) and value >= 0:
            key = (labels.get("model_namespace", ""), labels["model"])
            out[key] = out.get(key, 0.0) + value
    return out
