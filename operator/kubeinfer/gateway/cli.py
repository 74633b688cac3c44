"""`kubeinfer gateway`: the OpenAI-compatible gateway, from flags laid over its --config file."""

from __future__ import annotations

import argparse
import asyncio
import os
from pathlib import Path
from typing import Any, get_args

from kubeinfer.cliutil import CLIError


def cmd_gateway(args: argparse.Namespace) -> int:
    import prometheus_client

    from kubeinfer.gateway import logs
    from kubeinfer.gateway.app import create_app
    from kubeinfer.gateway.auth import KeyStore
    from kubeinfer.gateway.registry import load_static, load_static_keys

    config = gateway_config(args)
    logs.configure(config.log_format, access_log=config.access_log)
    discover = None
    ready = None
    keys = KeyStore(required=config.auth == "keys")
    if args.static:
        if not Path(args.static).is_file():
            raise CLIError(f"{args.static}: no such file")
        try:
            registry = load_static(args.static)
            if config.auth != "anonymous":
                keys.replace(load_static_keys(args.static))
        except Exception as exc:  # pydantic or YAML errors: one clear line
            raise CLIError(f"{args.static}: {exc}") from None
    else:
        from kubeinfer import kube
        from kubeinfer.gateway.discovery import Discovery
        from kubeinfer.gateway.registry import Registry

        registry = Registry()
        keys_namespace = config.keys_namespace or os.environ.get("POD_NAMESPACE") or None
        synced = asyncio.Event()
        ready = synced.is_set

        async def discover(reg: Registry) -> None:
            async with kube.api_client() as api:
                found = Discovery(
                    api, reg, namespace=args.namespace, keys=None if config.auth == "anonymous" else keys,
                    keys_namespace=keys_namespace,
                )  # fmt: skip
                found.synced = synced  # /readyz answers 200 once models, pods and keys are listed
                await found.run()

    settings = gateway_settings(config)
    metrics = prometheus_client.CollectorRegistry()
    if args.metrics_port:  # the same registry is also served at /metrics on the API port
        prometheus_client.start_http_server(args.metrics_port, registry=metrics)
    upstream = None
    if args.upstream_client == "aiohttp":
        from kubeinfer.gateway.upstream import AiohttpUpstream

        def upstream(s: Any) -> Any:
            return AiohttpUpstream(s.connect_timeout, s.read_timeout)

    app = create_app(
        registry, settings, upstream=upstream, metrics=metrics, discover=discover, keys=keys, ready=ready
    )
    serve(app, args.host, args.port, config, server=args.server)
    return 0


def serve(app: Any, host: str, port: int, config: Any, server: str = "kubeinfer") -> None:
    """Run the app on `server` (kubeinfer's own, uvicorn, granian or aiohttp's) until SIGTERM or SIGINT."""
    if server == "uvicorn":
        import uvicorn

        uvicorn.run(app, host=host, port=port, **uvicorn_options(config))
    elif server == "granian":
        _serve_granian(app, host, port, config)
    elif server == "aiohttp":
        from kubeinfer.gateway import aioserver

        aioserver.run(app, host, port, keep_alive_timeout=config.keep_alive_timeout)
    else:
        from kubeinfer.gateway import httpserver

        httpserver.run(app, host, port, keep_alive_timeout=config.keep_alive_timeout)


def _serve_granian(app: Any, host: str, port: int, config: Any) -> None:
    """granian's embedded server (Rust, hyper) in this process's event loop, ASGI interface. granian is
    not a dependency (it was measured slower here: docs/gateway.md); `pip install granian` to use it."""
    import uvloop

    try:
        from granian.constants import HTTPModes, Interfaces
        from granian.server.embed import Server
    except ImportError:
        raise CLIError("--server granian needs granian installed (pip install granian)") from None

    async def main() -> None:
        server = Server(
            app, address=host, port=port, interface=Interfaces.ASGI, http=HTTPModes.http1,
            websockets=False, backlog=2048, log_enabled=False,
        )  # fmt: skip
        await server.serve()

    uvloop.run(main())


def gateway_settings(config: Any) -> Any:
    """The app's GatewaySettings from the gateway's configuration (a GatewayConfig)."""
    from kubeinfer.gateway.state import GatewaySettings

    return GatewaySettings(
        scrape_interval=config.scrape_interval, scrape_timeout=config.scrape_timeout,
        hold_timeout=config.hold_timeout, retries=config.retries, max_body_bytes=config.max_body_bytes,
        max_body_bytes_by_route=dict(config.max_body_bytes_by_route), body_timeout=config.body_timeout,
        max_header_bytes=config.max_header_bytes, max_concurrent_per_client=config.max_concurrent_per_client,
    )  # fmt: skip


def uvicorn_options(config: Any) -> dict[str, Any]:
    """uvicorn.run's keyword arguments besides the address (tests serve the app with the same)."""
    return {"log_level": "warning", "access_log": False, "timeout_keep_alive": config.keep_alive_timeout}


def gateway_config(args: argparse.Namespace) -> Any:
    """The --config file with the flags given on the command line laid over it."""
    from kubeinfer.gateway.config import load_config

    if args.config and not Path(args.config).is_file():
        raise CLIError(f"{args.config}: no such file")
    try:
        config = load_config(args.config)
    except Exception as exc:  # pydantic or YAML errors: one clear message
        raise CLIError(f"{args.config}: {exc}") from None
    flags = {k: v for k, v in vars(args).items() if k in GATEWAY_FLAGS and v is not None}
    if "max_body_bytes_by_route" in flags:  # --max-body-bytes-for adds to (or changes) the file's routes
        flags["max_body_bytes_by_route"] = {
            **config.max_body_bytes_by_route,
            **flags["max_body_bytes_by_route"],
        }
    return config.model_copy(update=flags)


def _route_limit(text: str) -> tuple[str, int]:
    """`--max-body-bytes-for ROUTE=BYTES`."""
    from kubeinfer.gateway.config import Route

    route, _, size = text.partition("=")
    routes = get_args(Route)
    if route not in routes or not size.isdigit() or int(size) < 1024:
        raise argparse.ArgumentTypeError(f"{text!r}: want ROUTE=BYTES, ROUTE one of {', '.join(routes)}, "
                                         "BYTES at least 1024")  # fmt: skip
    return route, int(size)


class _RouteLimits(argparse.Action):
    def __call__(self, parser: Any, namespace: argparse.Namespace, value: Any, option: Any = None) -> None:
        limits = dict(getattr(namespace, self.dest) or {})
        limits[value[0]] = value[1]
        setattr(namespace, self.dest, limits)


# Flags of `kubeinfer gateway` that override the same-named field of its --config file.
GATEWAY_FLAGS = frozenset(
    {"scrape_interval", "scrape_timeout", "hold_timeout", "retries", "max_body_bytes", "auth",
     "keys_namespace", "log_format", "access_log", "max_body_bytes_by_route", "max_header_bytes",
     "body_timeout", "max_concurrent_per_client", "keep_alive_timeout"}
)  # fmt: skip


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("gateway", help="run the OpenAI-compatible gateway")
    p.add_argument(
        "--static", help="static discovery file (models and replica addresses); default: Kubernetes"
    )
    p.add_argument("--namespace", help="with Kubernetes discovery: only this namespace (default: all)")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--metrics-port", type=int, default=0, help="also serve /metrics on this port")
    p.add_argument("--config", help="gateway configuration file (YAML; flags override it)")
    # No defaults here: an unset flag leaves the config file's value (see gateway/config.py).
    p.add_argument("--scrape-interval", type=float, help="seconds between /metrics scrapes (1)")
    p.add_argument("--scrape-timeout", type=float, help="per-replica scrape timeout (0.5)")
    p.add_argument("--hold-timeout", type=float, help="seconds to wait for a replica (model's queueTimeout)")
    p.add_argument("--retries", type=int, help="retries on another replica before the first byte (2)")
    p.add_argument("--max-body-bytes", type=int, help="larger request bodies get 413 (32 MiB)")
    p.add_argument(
        "--max-body-bytes-for", dest="max_body_bytes_by_route", metavar="ROUTE=BYTES", type=_route_limit,
        action=_RouteLimits, help="body limit of one route, e.g. embeddings=1048576 (repeatable)",
    )  # fmt: skip
    p.add_argument("--max-header-bytes", type=int, help="larger request headers get 431 (64 KiB)")
    p.add_argument("--body-timeout", type=float, help="seconds to receive a request body, else 408 (30)")
    p.add_argument(
        "--max-concurrent-per-client", type=int,
        help="in-flight requests per API key (per address when anonymous), else 429 (no limit)",
    )  # fmt: skip
    p.add_argument("--keep-alive-timeout", type=float, help="seconds an idle client connection stays (5)")
    # Not configuration-file fields: which implementation serves is the operator's choice of binary, not
    # a tuning knob (docs/gateway.md, "HTTP server and client").
    p.add_argument(
        "--server", choices=("kubeinfer", "uvicorn", "granian", "aiohttp"), default="kubeinfer",
        help="HTTP server: kubeinfer's own (default), uvicorn (the earlier one), granian or aiohttp's "
        "(both measured slower)",
    )  # fmt: skip
    p.add_argument(
        "--upstream-client", choices=("kubeinfer", "aiohttp"), default="kubeinfer",
        help="client to the replicas: kubeinfer's own HTTP/1.1 pool (default; https goes to aiohttp) or "
        "aiohttp for all (the earlier one)",
    )  # fmt: skip
    p.add_argument(
        "--auth", choices=("auto", "keys", "anonymous"),
        help="keys: every request needs an API key; anonymous: none; auto (default): anonymous until "
        "a key is configured",
    )  # fmt: skip
    p.add_argument("--keys-namespace", help="namespace of API-key Secrets ($POD_NAMESPACE, else all)")
    p.add_argument("--log-format", choices=("json", "text"), help="log line format (json)")
    p.add_argument(
        "--no-access-log", dest="access_log", action="store_const", const=False,
        help="no log line per proxied request",
    )  # fmt: skip
    p.set_defaults(func=cmd_gateway)
