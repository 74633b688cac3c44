"""The `kubeinfer` command: assembles the command groups, each a small `cli` module next to what it
drives. The product's groups are listed here; the dev kit's (`up`, `down`, `demo`, `sim`, `bench`)
join through the `kubeinfer.cli` entry-point group when `kubeinfer-devkit` is installed, so the
product never imports the dev kit. Groups import their heavy modules lazily: `kubeinfer crd` stays
fast."""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import entry_points

from kubeinfer.cliutil import CLIError

# (module, attribute): each registers its subcommands on the top-level parser.
PRODUCT_GROUPS = (
    "kubeinfer.api.cli",
    "kubeinfer.render.cli",
    "kubeinfer.operator.cli",
    "kubeinfer.gateway.cli",
    "kubeinfer.weights.cli",
)
ENTRY_POINT_GROUP = "kubeinfer.cli"


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(prog="kubeinfer", description="Kubernetes operator and gateway for LLMs")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in PRODUCT_GROUPS:
        importlib.import_module(name).register(sub)
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        ep.load()(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except CLIError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
