"""`kubeinfer render | estimate`: what a manifest becomes, and whether it fits its GPUs."""

from __future__ import annotations

import argparse
import sys

import yaml

from kubeinfer.cliutil import add_file_arg, parse_all


def cmd_render(args: argparse.Namespace) -> int:
    from kubeinfer.estimate import estimate
    from kubeinfer.render.config import load_config
    from kubeinfer.render.manifests import render
    from kubeinfer.render.weights import cache_objects

    config = load_config(args.config)
    out: list[str] = []
    for path in args.file:
        for model in parse_all(path):
            est = estimate(model.spec)
            out.append(f"# {model.name}: {est.message}\n")
            # The weight cache's claim and download Jobs come first: the operator creates them first.
            objects = cache_objects(model, config) + render(model, config)
            out.append(yaml.safe_dump_all(objects, sort_keys=False, width=120))
            if args.estimate:
                out.append(
                    "---\n# estimate\n"
                    + yaml.safe_dump(est.model_dump(by_alias=True, exclude_none=True), sort_keys=False)
                )
            out.append("---\n")
    sys.stdout.write("".join(out).rstrip("-\n") + "\n")
    return 0


def cmd_estimate(args: argparse.Namespace) -> int:
    from kubeinfer.estimate import estimate

    for path in args.file:
        for model in parse_all(path):
            print(f"{model.name}: {estimate(model.spec).message}")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("render", help="print the Kubernetes objects a model becomes")
    add_file_arg(p)
    p.add_argument("--config", help="operator configuration file (images, timeouts)")
    p.add_argument("--estimate", action="store_true", help="also print the GPU-memory estimate as YAML")
    p.set_defaults(func=cmd_render)

    p = sub.add_parser("estimate", help="print the GPU-memory fit estimate of models")
    add_file_arg(p)
    p.set_defaults(func=cmd_estimate)
