"""`kubeinfer operator`: run the kopf operator against the current kubeconfig or in-cluster."""

from __future__ import annotations

import argparse


def cmd_operator(args: argparse.Namespace) -> int:
    import asyncio
    import os

    import kopf

    # Set before the handlers module is imported: it reads them at registration time.
    if args.config:
        os.environ["KUBEINFER_CONFIG"] = args.config
    if args.refresh_seconds:
        os.environ["KUBEINFER_REFRESH_SECONDS"] = str(args.refresh_seconds)
    os.environ["KUBEINFER_AUTOSCALE_INTERVAL"] = str(args.autoscale_interval)
    os.environ["KUBEINFER_AUTOSCALE_WINDOW"] = str(args.autoscale_window)
    os.environ["KUBEINFER_GATEWAY_URLS"] = ",".join(args.gateway_url or [])
    gateway_namespace = args.gateway_namespace or os.environ.get("POD_NAMESPACE")
    if gateway_namespace:
        os.environ["KUBEINFER_GATEWAY_NAMESPACE"] = gateway_namespace
    os.environ["KUBEINFER_GATEWAY_SELECTOR"] = args.gateway_selector
    os.environ["KUBEINFER_GATEWAY_PORT"] = str(args.gateway_port)
    namespaces = args.namespace or []
    os.environ["KUBEINFER_NAMESPACES"] = ",".join(namespaces)
    import kubeinfer.operator.handlers  # noqa: F401  (registers the handlers)

    # kopf's own log setup: timestamps, level and the object each line is about.
    kopf.configure(verbose=args.verbose, log_prefix=True)
    liveness = f"http://{args.liveness_host}:{args.liveness_port}/healthz" if args.liveness_port else None
    operator = kopf.operator(
        clusterwide=not namespaces, namespaces=namespaces, standalone=True, liveness_endpoint=liveness
    )
    asyncio.run(operator)
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "operator", help="run the operator (kopf) against the current kubeconfig or in-cluster"
    )
    p.add_argument("--config", help="operator configuration file (images, timeouts)")
    p.add_argument(
        "--namespace", action="append", help="watch only this namespace (repeatable); default: all"
    )
    p.add_argument("--liveness-port", type=int, default=8080, help="serve /healthz here (0: off)")
    p.add_argument("--liveness-host", default="0.0.0.0")
    p.add_argument("--refresh-seconds", type=float, help="period of the status refresh pass (default 60)")
    g = p.add_argument_group("builtin autoscaler (models with autoscaling.mode: builtin)")
    g.add_argument(
        "--autoscale-interval",
        type=float,
        default=10.0,
        help="seconds between autoscaler rounds (0: off; default %(default)s)",
    )
    g.add_argument(
        "--autoscale-window",
        type=float,
        default=60.0,
        help="seconds of load the autoscaler averages (default %(default)s)",
    )
    g.add_argument(
        "--gateway-url",
        action="append",
        help="read the load from this gateway (repeatable); default: the gateway pods",
    )
    g.add_argument(
        "--gateway-namespace", help="namespace of the gateway pods (default: $POD_NAMESPACE, else all)"
    )
    g.add_argument(
        "--gateway-selector",
        default="app.kubernetes.io/component=gateway",
        help="label selector of the gateway pods (default %(default)s)",
    )
    g.add_argument("--gateway-port", type=int, default=8000, help="the gateway pods' port with /metrics")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=cmd_operator)
