"""LLMModel status from what the cluster shows: a pure function, tested without a cluster.

Conditions:
* ResourcesFit: the GPU-memory estimate (True, False, or Unknown when it cannot be judged).
* Ready: at least one replica can serve (old or new version) - the gateway can route to it.
* Progressing: a rollout or scale is under way (True), finished (False, reason Complete), or
  blocked because the spec does not fit (False, reason ResourcesDoNotFit).
* Degraded: something needs a person: pods crash-looping, images not pulling, unschedulable pods,
  a rollout past its deadline, a remote model whose key Secret is missing, a child object the
  operator may not write (another controller owns it: ChildConflict; the apiserver refused it:
  ApplyFailed), or a weight download that failed (WeightsFailed).
* WeightsReady (only with model.cache): every cache entry is downloaded (True, Cached), being
  downloaded (False, Downloading / DownloadPending), or failed (False, with the fetcher's reason:
  RepoNotFound, GatedRepo, FileNotFound, DiskFull, ...).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kubeinfer import contract
from kubeinfer.api.v1alpha1 import Estimate, LLMModel
from kubeinfer.operator.weightstate import EntryState, weights_condition, weights_status
from kubeinfer.render.manifests import endpoint

# WeightsReady=False reasons that are not failures: the download is under way.
_FETCHING = {"Downloading", "DownloadPending"}

# Container waiting reasons that will not resolve on their own.
_STUCK_REASONS = {
    "CrashLoopBackOff", "ImagePullBackOff", "ErrImagePull", "InvalidImageName", "CreateContainerConfigError",
    "CreateContainerError", "RunContainerError",
}  # fmt: skip


@dataclass(frozen=True)
class ChildProblem:
    """A child the operator could not apply: its kind, a condition reason and a message for a person."""

    kind: str
    reason: str
    message: str


@dataclass
class AdapterReport:
    """An adapter across the replicas of one pass."""

    name: str
    loaded_on: int = 0
    errors: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Observed:
    """What the reconciler saw: the Deployment (or None), the model's pods, remote key presence."""

    deployment: dict[str, Any] | None = None
    pods: list[dict[str, Any]] | None = field(default_factory=list)  # None: not listed this pass
    remote_secret_ok: bool | None = None
    applied: bool = True  # False when the spec was held back (does not fit)
    spec_hash: str | None = None
    child_problem: ChildProblem | None = None
    weights: list[EntryState] = field(default_factory=list)  # model.cache entries; [] without
    adapters: list[AdapterReport] | None = None  # vLLM: this pass's adapter sync; None: not synced


def _cond(type_: str, status: str, reason: str, message: str) -> dict[str, Any]:
    return {"type": type_, "status": status, "reason": reason, "message": message}


def _pod_problems(pods: list[dict[str, Any]]) -> list[str]:
    problems = []
    for pod in pods:
        name = pod.get("metadata", {}).get("name", "?")
        st = pod.get("status") or {}
        for cs in st.get("containerStatuses") or []:
            waiting = (cs.get("state") or {}).get("waiting") or {}
            if waiting.get("reason") in _STUCK_REASONS:
                problems.append(
                    f"pod {name}: {waiting['reason']}: {waiting.get('message') or ''}".rstrip(": ")
                )
        for c in st.get("conditions") or []:
            if (
                c.get("type") == "PodScheduled"
                and c.get("status") == "False"
                and c.get("reason") == "Unschedulable"
            ):
                problems.append(f"pod {name} unschedulable: {c.get('message', '')}")
    return problems


def compute_status(
    model: LLMModel,
    estimate: Estimate,
    observed: Observed,
    previous: dict[str, Any] | None,
    now: str,
) -> dict[str, Any]:
    """The full status object (every declared key; None clears a stale one in a merge patch)."""
    gen = model.metadata.generation
    conditions: list[dict[str, Any]] = []

    if estimate.fits is True:
        conditions.append(_cond("ResourcesFit", "True", "Fits", estimate.message or "fits"))
    elif estimate.fits is False:
        reason = "DoesNotFitOverridden" if model.spec.resources.skip_fit_check else "DoesNotFit"
        conditions.append(_cond("ResourcesFit", "False", reason, estimate.message or "does not fit"))
    else:
        conditions.append(_cond("ResourcesFit", "Unknown", "NotEstimated", estimate.message or ""))

    status: dict[str, Any] = {
        "observedGeneration": gen,
        "servedName": model.served_name,
        "estimate": estimate.model_dump(by_alias=True, exclude_none=True, mode="json"),
        "specHash": observed.spec_hash,
    }

    if model.spec.remote is not None:
        ok = observed.remote_secret_ok is not False
        ref = model.spec.remote.api_key_secret_ref
        missing = f"Secret {ref.name} (key {ref.key}) not found" if ref else ""
        conditions += [
            _cond("Ready", "True" if ok else "False", "RemoteReady" if ok else "SecretMissing",
                  f"forwarding to {model.spec.remote.base_url}" if ok else missing),
            _cond("Progressing", "False", "Remote", "remote models run no pods"),
            _cond("Degraded", "False" if ok else "True", "AsExpected" if ok else "SecretMissing", missing),
        ]  # fmt: skip
        status.update(
            replicas=0, readyReplicas=0, updatedReplicas=0, endpoint=model.spec.remote.base_url, selector=None
        )
        status["conditions"] = _stamp(conditions, previous, now, gen)
        return status

    desired = model.spec.replicas
    dep = observed.deployment or {}
    ds = dep.get("status") or {}
    replicas = int(ds.get("replicas") or 0)
    ready = int(ds.get("readyReplicas") or 0)
    updated = int(ds.get("updatedReplicas") or 0)
    dep_current = bool(dep) and (ds.get("observedGeneration") or 0) >= (
        dep.get("metadata", {}).get("generation") or 0
    )
    deadline_exceeded = any(
        c.get("type") == "Progressing" and c.get("reason") == "ProgressDeadlineExceeded"
        for c in ds.get("conditions") or []
    )

    blocked = (
        observed.child_problem
        if observed.child_problem and observed.child_problem.kind == "Deployment"
        else None
    )
    weights = weights_condition(observed.weights)
    fetching = weights is not None and weights[0] == "False"
    if weights is not None:
        conditions.append(_cond("WeightsReady", *weights))
    if blocked is not None:
        conditions.append(_cond("Ready", "False", blocked.reason, blocked.message))
    elif ready == 0 and fetching and weights is not None:
        reason = "WeightsFailed" if weights[1] not in _FETCHING else "WeightsDownloading"
        conditions.append(
            _cond("Ready", "False", reason, f"no pods until the weights are cached: {weights[2]}")
        )
    elif ready > 0:
        conditions.append(_cond("Ready", "True", "Available", f"{ready}/{desired} replicas ready"))
    elif desired == 0:
        idle = model.spec.autoscaling is not None and model.spec.autoscaling.min_replicas == 0
        why = "scaled to zero while idle; the next request scales it up" if idle else "replicas is 0"
        conditions.append(_cond("Ready", "False", "ScaledToZero", why))
    elif not observed.applied and not dep:
        conditions.append(
            _cond("Ready", "False", "ResourcesDoNotFit", "no pods: the model does not fit its GPUs")
        )
    else:
        conditions.append(_cond("Ready", "False", "NoReadyReplicas", f"0/{desired} replicas ready"))

    if blocked is not None:
        conditions.append(_cond("Progressing", "False", blocked.reason, "the Deployment cannot be written"))
    elif fetching and weights is not None and weights[1] in _FETCHING:
        conditions.append(_cond("Progressing", "True", "WeightsDownloading", weights[2]))
    elif fetching and weights is not None:
        conditions.append(
            _cond("Progressing", "False", "WeightsFailed", "the spec's weights could not be fetched")
        )
    elif not observed.applied:
        conditions.append(
            _cond("Progressing", "False", "ResourcesDoNotFit",
                  "spec not rolled out: it does not fit its GPUs (set resources.skipFitCheck to override)")
        )  # fmt: skip
    elif not dep_current or updated < desired or ready < desired or replicas > desired:
        what = "rolling out" if updated < replicas or (replicas > desired) else "scaling"
        conditions.append(
            _cond("Progressing", "True", "RollingOut" if what == "rolling out" else "Scaling",
                  f"{what}: {updated} updated, {ready} ready of {desired} desired")
        )  # fmt: skip
    else:
        conditions.append(
            _cond("Progressing", "False", "Complete", f"{ready}/{desired} replicas on the current spec")
        )

    if observed.pods is None:
        # Pods were not read on this pass: keep the last verdict while replicas are still missing.
        last: dict[str, Any] = next(
            (c for c in (previous or {}).get("conditions") or [] if c.get("type") == "Degraded"), {}
        )
        failing = last.get("status") == "True" and last.get("reason") == "ReplicasFailing" and ready < desired
        problems = [m for m in str(last.get("message", "")).split("; ") if m] if failing else []
    else:
        problems = _pod_problems(observed.pods)
    if deadline_exceeded:
        problems.append("rollout exceeded its progress deadline")
    if fetching and weights is not None and weights[1] not in _FETCHING:
        problems.insert(0, weights[2])
    if observed.child_problem is not None:
        problem = observed.child_problem
        conditions.append(
            _cond("Degraded", "True", problem.reason, "; ".join([problem.message, *problems])[:1000])
        )
    elif fetching and weights is not None and weights[1] not in _FETCHING:
        conditions.append(_cond("Degraded", "True", "WeightsFailed", "; ".join(problems)[:1000]))
    elif problems:
        conditions.append(_cond("Degraded", "True", "ReplicasFailing", "; ".join(problems)[:1000]))
    else:
        conditions.append(_cond("Degraded", "False", "AsExpected", ""))

    selector = ",".join(f"{k}={v}" for k, v in contract.selector_labels(model.name).items())
    status.update(
        replicas=replicas,
        readyReplicas=ready,
        updatedReplicas=updated,
        selector=selector,
        endpoint=endpoint(model),
        weights=weights_status(observed.weights),
        adapters=adapters_status(model, observed.adapters, ready, updated),
    )
    status["conditions"] = _stamp(conditions, previous, now, gen)
    return status


def _stamp(
    conditions: list[dict[str, Any]], previous: dict[str, Any] | None, now: str, gen: int | None
) -> list[dict[str, Any]]:
    """Keep lastTransitionTime when a condition's status did not change."""
    before = {c.get("type"): c for c in (previous or {}).get("conditions") or []}
    out = []
    for c in conditions:
        old = before.get(c["type"])
        changed = old is None or old.get("status") != c["status"]
        c = {**c, "lastTransitionTime": now if changed else old.get("lastTransitionTime", now)}  # type: ignore[union-attr]
        if gen is not None:
            c["observedGeneration"] = gen
        out.append(c)
    return out


# Transitions a person wants to see as Events: (condition, new status). The first observation of a
# healthy model ("fits", "not ready yet", "not degraded") is not news, and each Event costs the
# apiserver a write: with 200 models created at once that is measurable.
_NEWSWORTHY = {
    ("ResourcesFit", "False"), ("Ready", "True"), ("Degraded", "True"), ("Progressing", "True"),
    ("WeightsReady", "True"),
}  # fmt: skip


def transitions(previous: dict[str, Any] | None, current: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(type, reason, message) of conditions whose status changed and that deserve an Event.

    Losing readiness or recovering from degradation is news only when the earlier state was seen."""
    before = {c.get("type"): c.get("status") for c in (previous or {}).get("conditions") or []}
    out = []
    reasons = {c.get("type"): c.get("reason") for c in (previous or {}).get("conditions") or []}
    for c in current.get("conditions") or []:
        old = before.get(c["type"])
        if (
            c["type"] == "WeightsReady"
            and c["status"] == "False"
            and c["reason"] != reasons.get("WeightsReady")
        ):
            # Each step of a download is news: it started (or waits), it failed and why.
            if c["reason"] != "DownloadPending":
                out.append((c["type"], c["reason"], c["message"]))
            continue
        if old == c["status"]:
            continue
        if c["type"] == "Progressing" and (old is None or c["status"] != "True"):
            continue  # only the start of a rollout is news; a new model starting up is not one
        if (c["type"], c["status"]) in _NEWSWORTHY or (old is not None and (c["type"], old) in _NEWSWORTHY):
            out.append((c["type"], c["reason"], c["message"]))
    return out


# Status keys another writer owns: the autoscaler loop writes status.autoscaling on its own.
_OWNED_ELSEWHERE = frozenset({"autoscaling"})


def status_changed(previous: dict[str, Any] | None, current: dict[str, Any]) -> bool:
    prev = {k: v for k, v in (previous or {}).items() if v is not None and k not in _OWNED_ELSEWHERE}
    cur = {k: v for k, v in current.items() if v is not None and k not in _OWNED_ELSEWHERE}
    return prev != cur


def adapters_status(
    model: LLMModel, reports: list[AdapterReport] | None, ready_replicas: int, updated_replicas: int
) -> list[dict[str, Any]] | None:
    """status.adapters (pure). vLLM: an adapter is ready on a replica that lists it. llama-server: the
    adapters are on the command line, so they are ready with the current spec's replicas."""
    adapters = model.spec.adapters or []
    if not adapters:
        return None
    out = []
    if model.spec.engine == "llama-server" or reports is None:
        ok = ready_replicas > 0 and updated_replicas > 0
        for a in adapters:
            entry: dict[str, Any] = {"name": a.name, "ready": ok}
            if not ok:
                entry.update(reason="NoReadyReplicas", message="no ready replica runs the current spec yet")
            out.append(entry)
        return out
    by_name = {r.name: r for r in reports}
    for a in adapters:
        r = by_name.get(a.name) or AdapterReport(a.name)
        entry = {"name": a.name, "ready": r.loaded_on > 0}
        if r.errors:
            entry.update(reason="LoadFailed", message="; ".join(sorted(set(r.errors)))[:1000])
        elif r.loaded_on == 0:
            entry.update(reason="NotLoaded", message="no ready replica has loaded it yet")
        out.append(entry)
    return out
