"""The weight cache in a reconcile pass: make sure each cache entry is filled, and say how far it is.

For a model with `model.cache`, each pass (reconcile.py) calls :func:`observe` before it applies the
Deployment: it creates the cache claim if missing, creates the download Job of every entry that is
not known to be complete, and reads each running Job's progress from its pod's log (the fetcher's
JSON lines, kubeinfer/weights/progress.py). The Deployment is applied only once every entry is
Ready, so engines never start on missing files; until then a Deployment from an earlier spec (an
earlier revision) keeps serving.

An entry Ready in the status this operator last wrote for the same key is not looked at again: the
Job may be gone (deleted, or cleaned up), the files stay. A Job that failed is deleted and created
again only when the model's spec changed since (a token added, a quant fixed): retrying the same
spec would fail the same way. `kubectl delete job` retries by hand.

The pure part (what a Job and its log mean) is operator/weightstate.py.
"""

from __future__ import annotations

from typing import Any

from kubernetes_asyncio import client

from kubeinfer import kube
from kubeinfer.api.v1alpha1 import LLMModel
from kubeinfer.operator.weightstate import EntryState, entry_state, job_phase
from kubeinfer.render.config import RenderConfig
from kubeinfer.render.weights import cache_claim, cache_of, entries, fetch_job, job_name
from kubeinfer.weights import progress

FETCH_CONTAINER = "fetch"


def from_status(model: LLMModel, previous: dict[str, Any]) -> list[EntryState]:
    """Every entry Ready, as the last status saw them (for passes that skip :func:`observe`)."""
    cache = cache_of(model)
    if cache is None:
        return []
    before = {e.get("key"): e for e in (previous.get("weights") or {}).get("entries") or []}
    out = []
    for entry in entries(model):
        total = int((before.get(entry.key) or {}).get("bytesTotal") or 0)
        p = progress.Progress(progress.READY, total, total)
        out.append(EntryState(entry, "Ready", job_name(cache.claim_name, entry), p))
    return out


async def observe(
    api: client.ApiClient, model: LLMModel, config: RenderConfig, previous: dict[str, Any]
) -> list[EntryState]:
    """Create what is missing (claim, Jobs) and read every entry's state; [] without model.cache."""
    wanted = entries(model)
    cache = cache_of(model)
    if not wanted or cache is None:
        return []
    claim = cache_claim(model)
    assert claim is not None
    await kube.create_claim_if_missing(api, claim)
    before = {e.get("key"): e for e in (previous.get("weights") or {}).get("entries") or []}
    spec_changed = previous.get("observedGeneration") != model.metadata.generation
    out = []
    for entry in wanted:
        name = job_name(cache.claim_name, entry)
        last = before.get(entry.key) or {}
        if last.get("phase") == "Ready":
            total = int(last.get("bytesTotal") or 0)
            out.append(EntryState(entry, "Ready", name, progress.Progress(progress.READY, total, total)))
            continue
        job = await kube.get_job(api, model.namespace, name)
        created = False
        if job is not None and job_phase(job) == "Failed" and spec_changed and last.get("phase") == "Failed":
            await kube.delete_job(api, model.namespace, name)
            job = await kube.get_job(api, model.namespace, name)
        if job is not None and (job.get("metadata") or {}).get("deletionTimestamp"):
            # Being deleted (the retry above, or by hand): a later pass creates it again once it is gone;
            # Pending keeps this model on the progress poll until then.
            out.append(EntryState(entry, "Pending", name, progress.Progress()))
            continue
        if job is None:
            job = await kube.create_job(api, fetch_job(model, entry, config))
            created = True
        log, message = await kube.job_log_tail(api, model.namespace, name, FETCH_CONTAINER)
        state = entry_state(entry, name, job, log, message)
        out.append(EntryState(state.entry, state.phase, state.job, state.p, created))
    return out
