"""kopf wiring: which events trigger a reconcile. Thin on purpose; the work is in reconcile.py.

Choices for a real cluster:
* one operator replica (the chart uses `strategy: Recreate`) running standalone, without kopf's
  peering: simpler RBAC and no peering CRD; a crashed operator is restarted by its Deployment and
  resumes every model (`on.resume`), and models keep serving meanwhile;
* no finalizers (no delete handlers, no kopf timers): children carry ownerReferences, so the
  garbage collector deletes them, and deleting a model never blocks on the operator being up;
* kopf's bookkeeping lives in `kubeinfer.io/` annotations, never in `status` (the CRD declares every
  status field, and the apiserver would prune kopf's).
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

import kopf

from kubeinfer import contract, kube
from kubeinfer.operator import scaling
from kubeinfer.operator.reconcile import Locks, Result, drifted, parse_body, reconcile
from kubeinfer.render.config import load_config
from kubeinfer.render.manifests import render

MODEL = (contract.GROUP, contract.VERSION, contract.PLURAL)
REFRESH_SECONDS = float(os.environ.get("KUBEINFER_REFRESH_SECONDS", "60"))
# The builtin autoscaler (operator/scaling.py): 0 turns it off.
AUTOSCALE_INTERVAL = float(os.environ.get("KUBEINFER_AUTOSCALE_INTERVAL", "10"))
AUTOSCALE_WINDOW = float(os.environ.get("KUBEINFER_AUTOSCALE_WINDOW", "60"))
# How often a model whose weights are downloading re-reads its Jobs' progress (status.weights).
WEIGHTS_POLL_SECONDS = float(os.environ.get("KUBEINFER_WEIGHTS_POLL_SECONDS", "5"))

_WARNING = {("ResourcesFit", "False"), ("Degraded", "True"), ("Ready", "False")}
# WeightsReady=False reasons that are steps of a download, not failures.
_WEIGHTS_UNDER_WAY = {"DownloadStarted", "Downloading", "DownloadPending"}


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    settings.persistence.finalizer = f"{contract.GROUP}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=contract.GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=contract.GROUP, key="last-handled-configuration"
    )
    settings.posting.level = logging.INFO
    settings.watching.server_timeout = 300
    memo.config = load_config(os.environ.get("KUBEINFER_CONFIG") or None)
    memo.api_cm = kube.api_client()
    memo.api = await memo.api_cm.__aenter__()
    memo.locks = Locks()
    memo.last_status = {}
    memo.namespaces = [n for n in os.environ.get("KUBEINFER_NAMESPACES", "").split(",") if n]
    memo.refresher = asyncio.create_task(_refresh_forever(memo))
    memo.weights_poller = asyncio.create_task(_poll_downloads_forever(memo))
    memo.scaler = None
    if AUTOSCALE_INTERVAL > 0:
        targets = scaling.GatewayTargets(
            urls=tuple(u for u in os.environ.get("KUBEINFER_GATEWAY_URLS", "").split(",") if u),
            namespace=os.environ.get("KUBEINFER_GATEWAY_NAMESPACE") or None,
            selector=os.environ.get("KUBEINFER_GATEWAY_SELECTOR") or scaling.GatewayTargets.selector,
            port=int(os.environ.get("KUBEINFER_GATEWAY_PORT") or scaling.GatewayTargets.port),
        )
        memo.scaler = asyncio.create_task(
            scaling.run_forever(memo.api, targets, memo.namespaces, AUTOSCALE_INTERVAL, AUTOSCALE_WINDOW)
        )


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    memo.refresher.cancel()
    memo.weights_poller.cancel()
    if memo.scaler is not None:
        memo.scaler.cancel()
    await memo.api_cm.__aexit__(None, None, None)


async def _emit(body: Any, result: Result, memo: kopf.Memo, in_handler: bool) -> None:
    for type_, reason, message in result.transitions:
        status = next((c["status"] for c in result.status.get("conditions", []) if c["type"] == type_), "")
        failed_download = type_ == "WeightsReady" and status == "False" and reason not in _WEIGHTS_UNDER_WAY
        kind = "Warning" if (type_, status) in _WARNING or failed_download else "Normal"
        text = f"{type_}={status}: {message}"[:1024]
        if in_handler:
            kopf.event(body, type=kind, reason=reason, message=text)
        else:  # the refresh loop: kopf.event works only inside a handler's context
            await kube.post_event(memo.api, dict(body), kind, reason, text)


async def _run(
    body: Any, memo: kopf.Memo, deployment: dict[str, Any] | None = None, fresh: bool = False
) -> Result:
    """Reconcile one model. `fresh`: the body was just read from the apiserver, so its status is the
    truth, even one that someone else wrote (which the pass then corrects)."""
    meta = body["metadata"]
    key = (meta["namespace"], meta["name"])
    async with memo.locks.get(*key):
        # The status we wrote last is newer than the one in a body from the index or a queued event.
        last = memo.last_status.get(key)
        previous = last[1] if last and last[0] == meta.get("generation") and not fresh else None
        result: Result = await reconcile(
            memo.api, dict(body), memo.config, deployment=deployment, previous=previous
        )
        memo.last_status[key] = (meta.get("generation"), result.status)
    await _emit(body, result, memo, in_handler=not fresh)
    return result


@kopf.on.resume(*MODEL)
@kopf.on.create(*MODEL)
@kopf.on.update(*MODEL)
async def model_changed(body: kopf.Body, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
    result = await _run(body, memo)
    logger.info("reconciled: applied %s", ", ".join(result.applied) or "nothing")


async def _refresh_forever(memo: kopf.Memo) -> None:
    """Periodic pass over every model: notices what no watched object announces (crash loops, a
    remote model's key Secret, a status written by someone else). One operator-wide loop rather than
    kopf timers, because kopf puts a finalizer on every object that has a timer, and deleting a model
    must not wait for the operator."""
    log = logging.getLogger("kubeinfer.refresh")
    while True:
        await asyncio.sleep(REFRESH_SECONDS)
        try:
            for body in await kube.list_models(memo.api, memo.namespaces):
                if not body.get("metadata", {}).get("deletionTimestamp"):
                    await _run(body, memo, fresh=True)
        except Exception:  # keep refreshing whatever one pass hit; kopf handlers still run
            log.exception("refresh pass failed")


def _downloading(status: dict[str, Any]) -> bool:
    return ((status.get("weights") or {}).get("phase")) in ("Pending", "Downloading")


async def _poll_downloads_forever(memo: kopf.Memo) -> None:
    """Re-read the progress of models whose weights are being downloaded, every few seconds: a Job's
    progress is in its pod's log, which no watch announces. Only those models: the others cost
    nothing here."""
    log = logging.getLogger("kubeinfer.weights")
    while True:
        await asyncio.sleep(WEIGHTS_POLL_SECONDS)
        for (ns, name), (_, status) in list(memo.last_status.items()):
            if not _downloading(status):
                continue
            try:
                body = await kube.get_model(memo.api, ns, name)
                if body is not None and not body.get("metadata", {}).get("deletionTimestamp"):
                    await _run(body, memo, fresh=True)
            except Exception:  # the next poll (or the model's own handlers) tries again
                log.exception("reading the download progress of %s/%s failed", ns, name)


@kopf.on.event("batch", "v1", "jobs", labels={contract.LABEL_COMPONENT: contract.COMPONENT_WEIGHTS})
async def download_changed(body: kopf.Body, event: kopf.RawEvent, memo: kopf.Memo, **kwargs: Any) -> None:
    """A download Job finished or failed: reconcile the models of its namespace that wait on it at
    once (a Job is shared, so it has no single owner to look up)."""
    if event.get("type") not in ("MODIFIED", "DELETED"):
        return
    ns = body.get("metadata", {}).get("namespace")
    job = body.get("metadata", {}).get("name")
    index: kopf.Index[tuple[str, str], dict[str, Any]] = kwargs["models"]
    for (model_ns, _), store in index.items():
        if model_ns != ns:
            continue
        for model in store:
            status = (
                memo.last_status.get((ns, model["metadata"]["name"])) or (None, model.get("status") or {})
            )[1]
            jobs = {e.get("job") for e in (status.get("weights") or {}).get("entries") or []}
            if job in jobs and not model.get("metadata", {}).get("deletionTimestamp"):
                await _run(model, memo)


@kopf.on.delete(*MODEL, optional=True)
async def model_deleted(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    # optional=True: no finalizer; this only drops the lock. The garbage collector removes children.
    memo.locks.forget(body["metadata"]["namespace"], body["metadata"]["name"])
    memo.last_status.pop((body["metadata"]["namespace"], body["metadata"]["name"]), None)


@kopf.index(*MODEL)
def models(
    namespace: str | None, name: str, body: kopf.Body, **_: Any
) -> dict[tuple[str | None, str], dict[str, Any]]:
    """In-memory index of models, so a Deployment event needs no API call to find its owner."""
    return {(namespace, name): dict(body)}


@kopf.on.event("apps", "v1", "deployments", labels={contract.LABEL_MANAGED_BY: contract.MANAGED_BY})
async def child_changed(
    body: kopf.Body, event: kopf.RawEvent, memo: kopf.Memo, logger: kopf.Logger, **kwargs: Any
) -> None:
    """A Deployment of ours changed (rollout progress, drift, deletion): reconcile its model."""
    model = _owner_model(body, kwargs)
    if model is None:
        return
    # A deleted Deployment is re-created by a full pass; otherwise only its drift is repaired.
    deployment = None if event.get("type") == "DELETED" else dict(event["object"])
    result = await _run(model, memo, deployment)
    if result.applied:
        meta = model["metadata"]
        logger.info(
            "re-applied %s of model %s/%s (drift or deletion)",
            ", ".join(result.applied),
            meta["namespace"],
            meta["name"],
        )


def _owner_model(body: kopf.Body, kwargs: dict[str, Any]) -> dict[str, Any] | None:
    """The indexed LLMModel a child belongs to (by its model label), unless it is being deleted."""
    owner = (body.get("metadata", {}).get("labels") or {}).get(contract.LABEL_MODEL)
    ns = body.get("metadata", {}).get("namespace")
    if not owner or not ns:
        return None
    index: kopf.Index[tuple[str, str], dict[str, Any]] = kwargs["models"]
    store = index.get((ns, owner))
    model = next(iter(store), None) if store is not None else None
    if model is None or model.get("metadata", {}).get("deletionTimestamp"):
        return None
    return model


@kopf.on.event("", "v1", "services", labels={contract.LABEL_MANAGED_BY: contract.MANAGED_BY})
@kopf.on.event(
    "policy", "v1", "poddisruptionbudgets", labels={contract.LABEL_MANAGED_BY: contract.MANAGED_BY}
)
async def other_child_changed(
    body: kopf.Body, event: kopf.RawEvent, memo: kopf.Memo, logger: kopf.Logger, **kwargs: Any
) -> None:
    """A Service or PodDisruptionBudget of ours was edited or deleted by someone: a full pass puts it
    back at once. Only a drifted object costs a pass, so our own applies (and the listing at start,
    ADDED events) cost none."""
    if event.get("type") not in ("MODIFIED", "DELETED"):
        return
    model = _owner_model(body, kwargs)
    if model is None:
        return
    try:
        wanted = render(parse_body(model), memo.config)
    except Exception:  # an invalid spec: the model's own handler reports it
        return
    kind, name = body.get("kind"), body.get("metadata", {}).get("name")
    desired = next((o for o in wanted if o["kind"] == kind and o["metadata"]["name"] == name), None)
    if desired is None:  # not wanted now (a PDB the operator removed at one replica): nothing to do
        return
    if event.get("type") == "MODIFIED" and not drifted(desired, dict(event["object"])):
        return
    result = await _run(model, memo)
    if kind in result.applied:
        logger.info("%s %s was edited or deleted: re-applied", kind, name)
