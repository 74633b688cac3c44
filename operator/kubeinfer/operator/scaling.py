"""The builtin autoscaler's loop: read the gateways' load, decide (autoscaler.py), scale, tell.

Runs in the operator process, next to the refresh loop. Each round it lists the models, reads
`/metrics` of every gateway replica (found by label selector, or given as URLs), sums each model's
load, and for each model with `autoscaling.mode: builtin` writes the decision through the scale
subresource (so `kubectl get llm`, `kubectl scale` and the Deployment agree), records it in
`status.autoscaling`, and posts an Event when the replica count changes.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
from kubernetes_asyncio import client
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from kubeinfer import kube
from kubeinfer.api.v1alpha1 import Autoscaling
from kubeinfer.operator.autoscaler import Autoscaler, Decision, model_loads

_log = logging.getLogger("kubeinfer.autoscaler")


@dataclass(frozen=True)
class GatewayTargets:
    """Where the gateways are: fixed URLs (local stack, tests) or ready pods by label selector."""

    urls: tuple[str, ...] = ()
    namespace: str | None = None
    selector: str = "app.kubernetes.io/component=gateway"
    port: int = 8000

    async def resolve(self, api: client.ApiClient) -> list[str]:
        if self.urls:
            return list(self.urls)
        return [
            f"http://{ip}:{self.port}" for ip in await kube.ready_pod_ips(api, self.namespace, self.selector)
        ]


async def read_loads(
    session: aiohttp.ClientSession, urls: list[str]
) -> tuple[dict[tuple[str, str], float], int]:
    """Sum of every gateway's per-model load, and how many gateways could not be read."""

    async def one(url: str) -> dict[tuple[str, str], float] | None:
        try:
            async with session.get(f"{url.rstrip('/')}/metrics") as resp:
                if resp.status != 200:
                    return None
                text = await resp.text()
        except (aiohttp.ClientError, TimeoutError, UnicodeDecodeError):
            return None
        try:
            samples = [
                (s.name, s.labels, s.value) for f in text_string_to_metric_families(text) for s in f.samples
            ]
        except ValueError:
            return None
        return model_loads(samples)

    total: dict[tuple[str, str], float] = {}
    failed = 0
    for got in await asyncio.gather(*(one(u) for u in urls)):
        if got is None:
            failed += 1
            continue
        for model, load in got.items():
            total[model] = total.get(model, 0.0) + load
    return total, failed


def _now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def status_of(decision: Decision, previous: dict[str, Any], scaled: bool) -> dict[str, Any]:
    """status.autoscaling after a round: the load rounded so that small wobbles write nothing."""
    out = {
        "desiredReplicas": decision.recommended,
        "load": round(decision.load, 1),
        "lastScaleTime": previous.get("lastScaleTime"),
        "lastScaleReason": previous.get("lastScaleReason"),
    }
    if scaled:
        out["lastScaleTime"], out["lastScaleReason"] = _now_iso(), decision.message
    return out


async def run_round(
    api: client.ApiClient,
    session: aiohttp.ClientSession,
    scaler: Autoscaler,
    targets: GatewayTargets,
    namespaces: list[str],
    now: float | None = None,
) -> dict[tuple[str, str], Decision]:
    """One round over every model; returns the decisions (for logs and tests)."""
    now = time.monotonic() if now is None else now
    models = await kube.list_models(api, namespaces)
    urls = await targets.resolve(api)
    loads, failed = await read_loads(session, urls) if urls else ({}, 0)
    signal = bool(urls) and failed < len(urls)
    decisions: dict[tuple[str, str], Decision] = {}
    for body in models:
        meta, spec = body.get("metadata") or {}, body.get("spec") or {}
        if meta.get("deletionTimestamp") or not spec.get("autoscaling") or spec.get("remote"):
            continue
        try:
            auto = Autoscaling.model_validate(spec["autoscaling"])
        except ValidationError:
            continue  # the model's own reconcile reports an invalid spec
        if auto.mode != "builtin":
            continue
        key = (meta["namespace"], meta["name"])
        replicas = int(spec.get("replicas", 1))
        load = loads.get(key, 0.0) + loads.get(("", key[1]), 0.0) if signal else None
        decision = scaler.decide(key, auto, replicas, load, now, complete=failed == 0)
        decisions[key] = decision
        scaled = decision.changes(replicas)
        if scaled:
            await kube.scale_model(api, key[0], key[1], decision.desired)
            _log.info("%s/%s: %s", key[0], key[1], decision.message)
            await kube.post_event(api, body, "Normal", "Scaled", decision.message)
        previous = (body.get("status") or {}).get("autoscaling") or {}
        status = status_of(decision, previous, scaled)
        if status != {k: previous.get(k) for k in status}:
            await kube.patch_model_status(api, key[0], key[1], {"autoscaling": status})
    scaler.forget(decisions)
    return decisions


async def run_forever(
    api: client.ApiClient,
    targets: GatewayTargets,
    namespaces: list[str],
    interval: float,
    window: float,
) -> None:
    scaler = Autoscaler(window=window)
    timeout = aiohttp.ClientTimeout(total=max(1.0, min(5.0, interval / 2)))
    async with aiohttp.ClientSession(timeout=timeout) as session:
        while True:
            started = time.monotonic()
            try:
                await run_round(api, session, scaler, targets, namespaces)
            except asyncio.CancelledError:
                raise
            except Exception:  # keep scaling whatever one round hit
                _log.exception("autoscaler round failed")
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))
