"""`kubeinfer weights fetch | evict | evict-job`: fill and empty the shared weight cache (fetch and evict
run in the cache's Jobs; evict-job prints such a Job)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kubeinfer.cliutil import CLIError


def cmd_fetch(args: argparse.Namespace) -> int:
    from kubeinfer.weights.fetch import FetchOptions, fetch

    try:
        import huggingface_hub  # noqa: F401
    except ImportError:
        raise CLIError(
            "`kubeinfer weights fetch` needs huggingface_hub: pip install 'kubeinfer[weights]'"
        ) from None

    opts = FetchOptions(
        root=args.root,
        key=args.key,
        repo=args.repo,
        revision=args.revision,
        include=tuple(args.include or ()),
        gguf_quant=args.gguf_quant,
        gguf_file=args.gguf_file,
        mmproj=args.mmproj,
        retries=args.retries,
        progress_interval=args.progress_interval,
    )
    return fetch(opts)


def cmd_evict(args: argparse.Namespace) -> int:
    from kubeinfer.weights.fetch import evict

    return evict(args.root, args.keys)


def cmd_evict_job(args: argparse.Namespace) -> int:
    import yaml

    from kubeinfer.render.config import load_config
    from kubeinfer.render.weights import evict_job
    from kubeinfer.weights.fetch import valid_key

    for key in args.keys:
        if not valid_key(key):
            raise CLIError(f"{key!r} is not a cache entry key")
    job = evict_job(args.namespace, args.claim, list(args.keys), load_config(args.config))
    sys.stdout.write(yaml.safe_dump(job, sort_keys=False))
    return 0


def _positive_int(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return n


def _positive_float(value: str) -> float:
    x = float(value)
    if x <= 0:
        raise argparse.ArgumentTypeError("must be more than 0")
    return x


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("weights", help="fill and empty the shared weight cache (the cache Job's command)")
    wsub = p.add_subparsers(dest="weights_command", required=True)

    f = wsub.add_parser(
        "fetch",
        help="download a Hub repository's files into <root>/<key>/ (JSON events on stdout)",
        description="Download a model's files from the Hugging Face Hub ($HF_ENDPOINT, token $HF_TOKEN) into "
        "<root>/<key>/, atomically. Exit codes: 0 done; 10 repo not found, 11 gated/unauthorized, 12 "
        "revision/file not found, 13 disk full, 14 checksum mismatch (permanent); 20 network error.",
    )
    f.add_argument("--root", required=True, type=Path, help="the cache's root folder (the mounted volume)")
    f.add_argument("--key", required=True, help="the entry's folder name under the root")
    f.add_argument("--repo", required=True, metavar="ORG/NAME", help="the Hub repository")
    f.add_argument("--revision", default="main", help="branch, tag or commit (default: main)")
    f.add_argument(
        "--include",
        action="extend",
        nargs="+",
        metavar="PATTERN",
        help="fetch only the files matching one of these (fnmatch, as allow_patterns; repeatable)",
    )
    gguf = f.add_mutually_exclusive_group()
    gguf.add_argument("--gguf-quant", metavar="QUANT", help="the single-file GGUF of this quant, e.g. Q4_K_M")
    gguf.add_argument("--gguf-file", metavar="FILE.gguf", help="exactly this GGUF file")
    f.add_argument(
        "--mmproj", action="store_true", help="also fetch the mmproj*.gguf projector (prefers F16)"
    )
    f.add_argument("--retries", type=_positive_int, default=8, help="attempts on network errors (default 8)")
    f.add_argument(
        "--progress-interval",
        type=_positive_float,
        default=2.0,
        metavar="S",
        help="seconds between progress events",
    )
    f.set_defaults(func=cmd_fetch)

    e = wsub.add_parser("evict", help="remove cache entries (and their partial downloads)")
    e.add_argument("--root", required=True, type=Path, help="the cache's root folder")
    e.add_argument("keys", nargs="+", metavar="KEY")
    e.set_defaults(func=cmd_evict)

    j = wsub.add_parser(
        "evict-job",
        help="print a Job that evicts cache entries from a cache claim (pipe it to kubectl apply -f -)",
        description="Print a Job that runs `kubeinfer weights evict` on the cache claim. KEY is an entry's "
        "directory, as status.weights.entries[].key of the models that use it shows. Evict only entries no "
        "model uses: a replica that starts later would not find its files.",
    )
    j.add_argument("-n", "--namespace", required=True, help="the namespace of the cache claim")
    j.add_argument("--claim", default="kubeinfer-weights", help="the cache claim (default kubeinfer-weights)")
    j.add_argument("--config", help="operator configuration file (for the kubeinfer image)")
    j.add_argument("keys", nargs="+", metavar="KEY")
    j.set_defaults(func=cmd_evict_job)
