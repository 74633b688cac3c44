"""One reconcile pass for one LLMModel: render, apply, observe, write status.

Called by every trigger (model created/changed/resumed, a child changed, the periodic refresh); it is
idempotent, so it does not matter which trigger ran it or how often. Passes for the same model are
serialized by a per-model lock.
"""

from __future__ import annotations

import asyncio
import datetime
import json
from dataclasses import dataclass
from typing import Any

from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException
from pydantic import ValidationError

from kubeinfer import contract, kube
from kubeinfer.api.v1alpha1 import LLMModel
from kubeinfer.estimate import estimate
from kubeinfer.operator import adapters, weights
from kubeinfer.operator.status import ChildProblem, Observed, compute_status, status_changed, transitions
from kubeinfer.operator.weightstate import EntryState, progress_milestone, ready_in_status
from kubeinfer.render.config import RenderConfig
from kubeinfer.render.manifests import render, spec_hash

ALL_CHILDREN = ("Deployment", "Service", "PodDisruptionBudget")
# The object that autoscaling.mode hpa / keda adds (render/manifests.py).
AUTOSCALER_CHILDREN = {"hpa": "HorizontalPodAutoscaler", "keda": "ScaledObject"}
# kopf's copy of the spec it last handled to the end (handlers.py: its diff-base storage).
LAST_HANDLED = f"{contract.GROUP}/last-handled-configuration"


@dataclass
class Result:
    status: dict[str, Any]
    transitions: list[tuple[str, str, str]]
    applied: list[str]


class Locks:
    """Per-model asyncio locks, so two triggers never reconcile one model at once."""

    def __init__(self) -> None:
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}

    def get(self, namespace: str, name: str) -> asyncio.Lock:
        return self._locks.setdefault((namespace, name), asyncio.Lock())

    def forget(self, namespace: str, name: str) -> None:
        self._locks.pop((namespace, name), None)


def now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_body(body: dict[str, Any]) -> LLMModel:
    """The typed model from a watched object (status and server-managed metadata left out)."""
    meta = body.get("metadata") or {}
    return LLMModel.model_validate(
        {
            "apiVersion": body.get("apiVersion", contract.API_VERSION),
            "kind": contract.KIND,
            "metadata": {
                "name": meta["name"],
                "namespace": meta.get("namespace"),
                "uid": meta.get("uid"),
                "generation": meta.get("generation"),
            },
            "spec": body.get("spec") or {},
        }
    )


def drifted(desired: Any, observed: Any) -> bool:
    """True unless every field we set has the same value in the observed object.

    The apiserver adds defaults (and other managers may add fields) that we leave alone, so the
    observed object is compared as a superset; lists must match element by element.
    """
    if isinstance(desired, dict):
        if not isinstance(observed, dict):
            return True
        return any(drifted(v, observed.get(k)) for k, v in desired.items())
    if isinstance(desired, list):
        if not isinstance(observed, list) or len(desired) != len(observed):
            return True
        return any(drifted(d, o) for d, o in zip(desired, observed, strict=True))
    return bool(desired != observed)


def earlier_autoscalers(body: dict[str, Any]) -> tuple[str, ...]:
    """Kinds of autoscaler object an earlier spec of this model may have left: the one of the mode
    kopf last handled, or both when there is no such record (a model not yet handled to the end).
    So a stale HorizontalPodAutoscaler or ScaledObject is deleted on the pass that changes the mode,
    without a delete request for every model on every pass."""
    raw = ((body.get("metadata") or {}).get("annotations") or {}).get(LAST_HANDLED)
    try:
        last = json.loads(raw) if raw else None
    except ValueError:
        last = None
    if not isinstance(last, dict):
        return tuple(AUTOSCALER_CHILDREN.values())
    mode = ((last.get("spec") or {}).get("autoscaling") or {}).get("mode", "builtin")
    return (AUTOSCALER_CHILDREN[mode],) if mode in AUTOSCALER_CHILDREN else ()


def foreign_controller(obj: dict[str, Any], model_uid: str | None) -> dict[str, Any] | None:
    """The controller ownerReference of `obj` when it is not this model: someone else's object."""
    for ref in (obj.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("controller") and ref.get("uid") != model_uid:
            return dict(ref)
    return None


async def apply_child(
    api: client.ApiClient, obj: dict[str, Any], model_uid: str | None
) -> tuple[dict[str, Any] | None, ChildProblem | None]:
    """Apply one child; a refusal that retrying cannot fix becomes a ChildProblem, not an exception.

    A child that another controller owns (a Deployment of the same name created by hand or by another
    tool) is left alone and reported: taking it over would fight its owner. Other 4xx refusals (an
    immutable field changed by hand, a quota, an admission webhook) are reported with the apiserver's
    message. Server errors and lost connections still raise, so kopf retries with backoff.
    """
    kind, meta = obj["kind"], obj["metadata"]
    what = f"{kind} {meta['namespace']}/{meta['name']}"
    try:
        return await kube.apply(api, obj), None
    except ApiException as exc:
        if not 400 <= int(exc.status or 0) < 500 or exc.status in (409, 429):
            raise
        refusal = kube.api_error_message(exc)
        if kube.api_not_served(exc):  # no such API on this cluster (a ScaledObject without KEDA)
            return None, ChildProblem(kind, "APINotServed", f"cannot apply {what}: {refusal}"[:1000])
    existing = await kube.get_child(api, kind, meta["namespace"], meta["name"])
    owner = foreign_controller(existing, model_uid) if existing else None
    if owner is not None:
        return None, ChildProblem(
            kind, "ChildConflict",
            f"{what} already exists and is controlled by {owner.get('kind')} {owner.get('name')}, not by "
            "this LLMModel: kubeinfer leaves it alone. Delete it (or rename the model) to let kubeinfer "
            "create its own.",
        )  # fmt: skip
    return None, ChildProblem(kind, "ApplyFailed", f"applying {what} was refused: {refusal}"[:1000])


async def reconcile(
    api: client.ApiClient,
    body: dict[str, Any],
    config: RenderConfig,
    *,
    deployment: dict[str, Any] | None = None,
    previous: dict[str, Any] | None = None,
) -> Result:
    """Apply what the model needs and write its status.

    With `deployment` (a watch event of the model's Deployment) only a drifted Deployment is
    re-applied; otherwise every child is applied. Server-side apply of an unchanged object writes
    nothing, but it still costs a request, and a rollout produces many Deployment events; for the
    same reason pods are only listed (to explain missing replicas) on full passes.
    `previous` is the status this operator last wrote, when it is newer than the body's.
    """
    if previous is None:
        previous = dict(body.get("status") or {})
    meta = body["metadata"]
    ns, name = meta["namespace"], meta["name"]
    child = contract.child_name(name)
    try:
        model = parse_body(body)
    except ValidationError as exc:
        # The CRD schema should have refused this; say so rather than crash-looping the handler.
        status = {
            "observedGeneration": meta.get("generation"),
            "conditions": [
                {"type": "Ready", "status": "False", "reason": "InvalidSpec", "message": str(exc)[:1000],
                 "lastTransitionTime": now_iso()},
            ],
        }  # fmt: skip
        await kube.patch_model_status(api, ns, name, status)
        return Result(status, [("Ready", "InvalidSpec", str(exc)[:1000])], [])

    est = estimate(model.spec)
    cached: list[EntryState] = []
    applied: list[str] = []
    problem: ChildProblem | None = None
    full = deployment is None
    uid = meta.get("uid")
    if model.spec.remote is not None:
        # A model switched from pods to remote keeps no pods.
        await kube.delete_children(api, ns, child, ALL_CHILDREN + earlier_autoscalers(body))
        ref = model.spec.remote.api_key_secret_ref
        ok = await kube.secret_exists(api, ns, ref.name, ref.key) if ref else True
        observed = Observed(remote_secret_ok=ok)
    else:
        fits = est.fits is not False or model.spec.resources.skip_fit_check
        # The weight cache (model.cache): pods start only once every entry is downloaded. A Deployment
        # event needs no look at the cache when the last status saw it complete.
        if fits and not (deployment is not None and ready_in_status(model, previous)):
            cached = await weights.observe(api, model, config, previous)
        elif fits:
            cached = weights.from_status(model, previous)
        weights_ready = all(s.phase == "Ready" for s in cached)
        if fits and not weights_ready:
            pass  # nothing applied: an existing Deployment (an earlier spec) keeps serving meanwhile
        elif fits and deployment is not None:
            desired = render(model, config)[0]
            if drifted(desired, deployment):
                deployment, problem = await apply_child(api, desired, uid)
                applied += [] if problem else ["Deployment"]
        elif fits:
            rendered = render(model, config)
            for obj in rendered:
                out, refused = await apply_child(api, obj, uid)
                problem = problem or refused
                applied += [] if refused else [obj["kind"]]
                if obj["kind"] == "Deployment":
                    deployment = out
            # A PodDisruptionBudget exists only while replicas > 1; the last status tells if it was.
            if (
                "PodDisruptionBudget" not in {o["kind"] for o in rendered}
                and int(previous.get("replicas") or 0) > 1
            ):
                await kube.delete_children(api, ns, child, ("PodDisruptionBudget",))
            # An HPA or ScaledObject stays only while autoscaling.mode asks for it.
            stale = tuple(k for k in earlier_autoscalers(body) if k not in {o["kind"] for o in rendered})
            if stale:
                await kube.delete_children(api, ns, child, stale)
        if problem is not None and problem.kind == "Deployment":
            deployment = None  # not ours (or not written): its replicas say nothing about this model
        elif deployment is None:
            deployment = await kube.get_deployment(api, ns, child)
        dstatus = (deployment or {}).get("status") or {}
        # Pods are listed only to explain replicas that exist but are not ready.
        missing = (
            int(dstatus.get("readyReplicas") or 0) < model.spec.replicas
            and int(dstatus.get("replicas") or 0) > 0
        )
        pods = await kube.list_model_pods(api, ns, name) if full and missing else None
        reports = None
        if model.spec.engine == "vllm" and model.spec.adapters and weights_ready:
            # Adapters load at run time: every pass brings the ready replicas to the spec's list.
            if int(dstatus.get("readyReplicas") or 0) > 0:
                listed = pods if pods is not None else await kube.list_model_pods(api, ns, name)
                reports = await adapters.sync(model, listed)
            else:
                reports = await adapters.sync(model, [])
        observed = Observed(
            deployment=deployment, pods=pods, applied=fits, spec_hash=spec_hash(model), child_problem=problem,
            weights=cached, adapters=reports,
        )  # fmt: skip

    status = compute_status(model, est, observed, previous, now_iso())
    if status_changed(previous, status):
        await kube.patch_model_status(api, ns, name, status)
    news = transitions(previous, status)
    milestone = progress_milestone(previous.get("weights"), status.get("weights"))
    if milestone:
        news.append(("WeightsReady", "Downloading", milestone))
    for s in cached:
        if s.created:
            news.append(("WeightsReady", "DownloadStarted", f"downloading {s.entry.source} with Job {s.job}"))
    return Result(status, news, applied)
