"""`kubeinfer crd | api-docs | validate`: the API's schema, its reference, and its checks offline."""

from __future__ import annotations

import argparse
import sys

from kubeinfer.cliutil import add_file_arg, parse_all


def cmd_crd(args: argparse.Namespace) -> int:
    from kubeinfer.crdgen import crd_yaml

    sys.stdout.write(crd_yaml())
    return 0


def cmd_docs(args: argparse.Namespace) -> int:
    from kubeinfer.docgen import api_reference

    sys.stdout.write(api_reference())
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    for path in args.file:
        for model in parse_all(path):
            print(f"{path}: {model.name}: valid ({model.spec.engine}, serves {model.served_name})")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("crd", help="print the LLMModel CustomResourceDefinition")
    p.set_defaults(func=cmd_crd)

    p = sub.add_parser("api-docs", help="print the API reference (Markdown)")
    p.set_defaults(func=cmd_docs)

    p = sub.add_parser("validate", help="check LLMModel manifests as the apiserver would")
    add_file_arg(p)
    p.set_defaults(func=cmd_validate)
