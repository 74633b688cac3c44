"""The gateway's ASGI app: the OpenAI-compatible proxy (gateway/proxy.py) plus its own endpoints.

`create_app` wires it together: the State (gateway/state.py) lives for the app's lifetime, a scraper
task reads every replica's /metrics, and an optional discovery task keeps the registry current. The
hot path, `POST /v1/...`, is dispatched before Starlette's router and middleware; everything else
(`/v1/models`, `/v1/admin/*`, health, metrics and `/openapi.json`) is a plain Starlette route.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from kubeinfer.gateway.auth import ApiKey, Denied, KeyStore
from kubeinfer.gateway.limits import header_bytes
from kubeinfer.gateway.openapi import DOCUMENT
from kubeinfer.gateway.proxy import PROXIED, proxy
from kubeinfer.gateway.registry import Registry
from kubeinfer.gateway.relay import Receive, Scope, Send
from kubeinfer.gateway.request import error, parse_duration
from kubeinfer.gateway.routing import Load
from kubeinfer.gateway.scrape import ScrapeError, loaded_adapters, parse_metrics
from kubeinfer.gateway.state import GatewaySettings, State
from kubeinfer.gateway.upstream import PooledUpstream, Upstream, UpstreamError

__all__ = ["PROXIED", "GatewaySettings", "State", "create_app", "error", "parse_duration", "scrape_once"]


def _caller(request: Request, admin: bool = False) -> ApiKey | JSONResponse:
    """The request's API key, or the 401/403 answer (the same keys as the proxied API)."""
    state: State = request.app.state.gw
    try:
        key = state.keys.authenticate(
            request.headers.get("authorization") or request.headers.get("x-api-key")
        )
    except Denied as denied:
        return error(denied.status, denied.message, "invalid_request_error", code=denied.code)
    if admin and not key.admin:
        return error(403, "this API key may not use the admin API", "permission_error", code="admin_only")
    return key


async def list_models(request: Request) -> JSONResponse:
    state: State = request.app.state.gw
    key = _caller(request)
    if isinstance(key, JSONResponse):
        return key
    data = [
        {"id": public, "object": "model", "owned_by": "kubeinfer", "created": 0,
         "root": entry.served_name, "engine": entry.engine, "modalities": list(entry.modalities),
         "state": state.registry.state(entry.name)}
        for entry, public in state.registry.listed()
        if key.models is None or public in key.models  # a key sees only the models it may use
    ]  # fmt: skip
    data += [
        # A LoRA adapter is a model of its own, whose parent is the base model (as vLLM lists them).
        {"id": adapter, "object": "model", "owned_by": "kubeinfer", "created": 0,
         "root": entry.served_name, "parent": entry.served_name, "engine": entry.engine,
         "modalities": list(entry.modalities), "state": state.registry.state(entry.name)}
        for entry, adapter in state.registry.listed_adapters()
        if key.models is None or adapter in key.models
    ]  # fmt: skip
    return JSONResponse({"object": "list", "data": data})


async def admin_models(request: Request) -> JSONResponse:
    """Per model: engine, replicas ready/total, queue, in-flight, and what the scrapes say."""
    state: State = request.app.state.gw
    if isinstance(denied := _caller(request, admin=True), JSONResponse):
        return denied
    now = time.monotonic()
    out = []
    for entry in state.registry.models.values():
        endpoints = state.registry.endpoints.get(entry.name, [])
        replicas: list[dict[str, Any]] = []
        for e in endpoints:
            load = state.loads.get(e.id, Load())
            fresh = (
                load.scraped is not None
                and load.scraped_at is not None
                and (now - load.scraped_at <= 3 * state.settings.scrape_interval)
            )
            stats = load.scraped if fresh else None
            replicas.append({
                "id": e.id, "address": e.address, "ready": e.ready, "inflight": load.inflight,
                "running": stats.running if stats else None, "waiting": stats.waiting if stats else None,
                "kvCacheUsage": stats.kv_cache_usage if stats else None,
                "prefixBlocksRouted": state.prefix_index.held(e.id),
                "prefixCacheHitRate": (
                    stats.prefix_cache_hits / stats.prefix_cache_queries
                    if stats and stats.prefix_cache_queries and stats.prefix_cache_hits is not None else None
                ),
            })  # fmt: skip
        queue = state.queues.get(entry.name)
        kv = [r["kvCacheUsage"] for r in replicas if r["kvCacheUsage"] is not None]
        scraped = [s for e in endpoints if (s := state.loads.get(e.id, Load()).scraped) is not None]
        hits = sum(s.prefix_cache_hits or 0 for s in scraped)
        queries = sum(s.prefix_cache_queries or 0 for s in scraped)
        out.append({
            "name": entry.name, "servedName": entry.served_name, "aliases": list(entry.aliases),
            "engine": entry.engine, "modalities": list(entry.modalities), "strategy": entry.routing.strategy,
            "state": state.registry.state(entry.name),
            "replicas": {"ready": sum(e.ready for e in endpoints), "total": len(endpoints)},
            "queued": queue.waiting if queue else 0,
            "inflight": sum(state.loads.get(e.id, Load()).inflight for e in endpoints),
            "kvCacheUsage": sum(kv) / len(kv) if kv else None,  # mean over freshly scraped replicas
            "prefixCacheHitRate": hits / queries if queries else None,  # since the engines started
            "remote": entry.remote is not None, "estimate": entry.estimate,
            "replicaStats": replicas,
        })  # fmt: skip
    return JSONResponse({"object": "list", "data": out})


async def admin_usage(request: Request) -> JSONResponse:
    state: State = request.app.state.gw
    if isinstance(denied := _caller(request, admin=True), JSONResponse):
        return denied
    data = [{"key": key, "model": model, **counts} for (key, model), counts in sorted(state.ledger.items())]
    return JSONResponse({"object": "list", "data": data})


async def healthz(request: Request) -> Response:
    return Response("ok", media_type="text/plain")


async def readyz(request: Request) -> Response:
    """503 until discovery has listed models, pods and keys: a gateway that knows no model yet would
    answer 404 to every request, so it must not get traffic."""
    ready: Callable[[], bool] | None = request.app.state.ready
    if ready is not None and not ready():
        return Response("discovery not synced", status_code=503, media_type="text/plain")
    return Response("ok", media_type="text/plain")


async def metrics_endpoint(request: Request) -> Response:
    state: State = request.app.state.gw
    for model, queue in state.queues.items():
        state.queued.labels(model).set(queue.waiting)
    for endpoint_id, load in state.loads.items():
        state.inflight_gauge.labels(endpoint_id).set(load.inflight)
    # The autoscaler's signal, per model: this gateway's requests in flight plus queued. Computed at
    # scrape time, so the request path pays nothing for it.
    for name, entry in state.registry.models.items():
        waiting = state.queues[name].waiting if name in state.queues else 0
        inflight = sum(state.loads.get(e.id, Load()).inflight for e in state.registry.endpoints.get(name, []))
        state.model_load.labels(entry.namespace or "", entry.object_name or name).set(inflight + waiting)
    return Response(generate_latest(state.metrics), media_type="text/plain; version=0.0.4")


async def scrape_once(state: State) -> None:
    """Scrape every replica's /metrics concurrently, each bounded by scrape_timeout."""

    async def one(endpoint_id: str, address: str, adapters_of: str | None) -> None:
        try:
            status, text = await state.upstream.get_text(
                f"http://{address}/metrics", state.settings.scrape_timeout
            )
            if status != 200:
                return
            stats = parse_metrics(text)
            if adapters_of is not None:
                # vLLM loads and unloads adapters at run time: which it serves now is in /v1/models.
                status, text = await state.upstream.get_text(
                    f"http://{address}/v1/models", state.settings.scrape_timeout
                )
                if status == 200:
                    stats = dataclasses.replace(
                        stats, loaded_adapters=loaded_adapters(json.loads(text), adapters_of)
                    )
        except (UpstreamError, ScrapeError, ValueError):
            return  # stale data ages out; own in-flight counts carry the routing meanwhile
        load = state.loads.get(endpoint_id, Load())
        state.loads[endpoint_id] = Load(load.inflight, stats, time.monotonic(), load.inflight)

    jobs = []
    for name, eps in state.registry.endpoints.items():
        entry = state.registry.models.get(name)
        for e in eps:
            if e.ready and not e.id.startswith("remote:"):
                dynamic = entry is not None and bool(entry.adapters) and e.adapters is None
                jobs.append(one(e.id, e.address, entry.served_name if dynamic and entry else None))
    await asyncio.gather(*jobs)
    state.prefix_index.retain({e.id for eps in state.registry.endpoints.values() for e in eps})


class GatewayApp:
    """ASGI entry point: `POST /v1/<proxied API>` goes straight to the proxy, the rest to Starlette.

    A known path asked with another method is 405 with `Allow`, an unknown path 404, both in OpenAI's
    error envelope."""

    def __init__(self, router: Starlette, max_header_bytes: int = 64 << 10) -> None:
        self.router = router
        self.state = router.state  # tests and the CLI reach the State as app.state.gw
        self.get_paths = frozenset(r.path for r in router.routes if isinstance(r, Route))
        self.max_header_bytes = max_header_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and header_bytes(scope["headers"]) > self.max_header_bytes:
            limit = self.max_header_bytes
            resp = error(431, f"request headers over {limit} bytes", "invalid_request_error",
                         code="request_header_fields_too_large", headers={"connection": "close"})  # fmt: skip
            return await resp(scope, receive, send)
        if scope["type"] == "http":
            path, method = scope["path"], scope["method"]
            if path.startswith("/v1/") and path[4:] in PROXIED:
                if method == "POST":
                    return await proxy(self.router.state.gw, scope, receive, send)
                return await _not_allowed(method, path, "POST")(scope, receive, send)
            # Starlette's own 404 and 405 are plain text: answer them here, in the envelope.
            if path not in self.get_paths:
                resp = error(404, f"unknown endpoint {path}", "invalid_request_error", code="not_found")
                return await resp(scope, receive, send)
            if method not in ("GET", "HEAD"):
                return await _not_allowed(method, path, "GET, HEAD")(scope, receive, send)
        await self.router(scope, receive, send)


def _not_allowed(method: str, path: str, allow: str) -> JSONResponse:
    return error(405, f"{path} does not take {method}, only {allow}", "invalid_request_error",
                 code="method_not_allowed", headers={"Allow": allow})  # fmt: skip


async def openapi_document(request: Request) -> JSONResponse:
    return JSONResponse(DOCUMENT)


def create_app(
    registry: Registry,
    settings: GatewaySettings | None = None,
    upstream: Callable[[GatewaySettings], Upstream] | None = None,
    metrics: CollectorRegistry | None = None,
    discover: Callable[[Registry], Coroutine[Any, Any, None]] | None = None,
    keys: KeyStore | None = None,
    ready: Callable[[], bool] | None = None,
) -> GatewayApp:
    """The ASGI app. Replicas are reached with `PooledUpstream` (gateway/upstream.py) unless `upstream`
    makes another client (aiohttp; tests play the replicas in memory), called inside the app's event
    loop. `discover`, if given, runs for the app's lifetime and keeps the registry current (Kubernetes
    discovery)."""
    settings = settings or GatewaySettings()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        client: Upstream
        if upstream is not None:
            client = upstream(settings)
        else:
            client = PooledUpstream(settings.connect_timeout, settings.read_timeout)
        state = State(
            registry=registry, settings=settings, upstream=client, metrics=metrics or CollectorRegistry(),
            keys=keys or KeyStore(),
        )  # fmt: skip
        app.state.gw = state

        async def scraper() -> None:
            while True:
                await scrape_once(state)
                await asyncio.sleep(settings.scrape_interval)

        tasks = [asyncio.create_task(scraper()), asyncio.create_task(state.body_deadlines.run())]
        if discover is not None:
            tasks.append(asyncio.create_task(discover(registry)))
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await client.aclose()

    routes = [
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/admin/models", admin_models, methods=["GET"]),
        Route("/v1/admin/usage", admin_usage, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
        Route("/openapi.json", openapi_document, methods=["GET"]),
    ]
    router = Starlette(routes=routes, lifespan=lifespan)
    router.state.ready = ready
    return GatewayApp(router, settings.max_header_bytes)
