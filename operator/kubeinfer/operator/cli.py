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
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=cmd_operator)
