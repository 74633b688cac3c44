"""`kubeinfer demo | up | down`: the local stack (docs/local-stack.md)."""

from __future__ import annotations

import argparse
from pathlib import Path

from kubeinfer.cliutil import CLIError


def _state_dir(path: str | None) -> Path:
    if path:
        return Path(path)
    from kubeinfer_devkit.devcluster.build import cache_root

    return cache_root() / "local"


def cmd_demo(args: argparse.Namespace) -> int:
    from kubeinfer_devkit.devcluster.local import demo

    manifest = Path(args.file)
    if not manifest.is_file():
        raise CLIError(f"{manifest}: no such file")
    return demo(manifest, _state_dir(args.state_dir), keep=args.keep)


def cmd_up(args: argparse.Namespace) -> int:
    from kubeinfer_devkit.devcluster.stack import up

    manifest = Path(args.file) if args.file else None
    if manifest is not None and not manifest.is_file():
        raise CLIError(f"{manifest}: no such file")
    state = Path(args.state_dir) if args.state_dir else None
    return up(state, manifest, foreground=args.foreground, gateway_port=args.gateway_port)


def cmd_down(args: argparse.Namespace) -> int:
    from kubeinfer_devkit.devcluster.stack import down

    return down(Path(args.state_dir) if args.state_dir else None, purge=args.purge)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("demo", help="local control plane + operator + a tiny model, to Ready")
    p.add_argument("-f", "--file", default="examples/tiny-gguf-cpu.yaml", help="the LLMModel to apply")
    p.add_argument("--state-dir", help="where the control plane keeps its state (default: cache dir)")
    p.add_argument("--keep", action="store_true", help="keep everything running until Ctrl-C")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "up",
        help="the local stack: control plane, a GPU-less node running real engines, operator, gateway",
        description="Start (or find) the local stack and print how to use it (docs/local-stack.md).",
    )
    p.add_argument("-f", "--file", help="also apply this LLMModel, wait for Ready and ask it something")
    p.add_argument("--state-dir", help="default: ${XDG_CACHE_HOME:-~/.cache}/kubeinfer/stack")
    p.add_argument("--foreground", action="store_true", help="stay attached; Ctrl-C stops everything")
    p.add_argument("--gateway-port", type=int, default=8000, help="gateway on 127.0.0.1 (0: any free port)")
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("down", help="stop the local stack (its engine processes too)")
    p.add_argument("--state-dir", help="default: ${XDG_CACHE_HOME:-~/.cache}/kubeinfer/stack")
    p.add_argument("--purge", action="store_true", help="also delete the state (cluster data, logs, models)")
    p.set_defaults(func=cmd_down)
