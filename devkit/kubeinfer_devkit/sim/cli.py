"""`kubeinfer sim`: a simulated vLLM server for benchmarks without GPUs (docs/simulator.md)."""

from __future__ import annotations

import argparse

from kubeinfer.cliutil import CLIError
from kubeinfer_devkit.sim.model import EngineConfig as Sim  # stdlib only: cheap enough to import here


def cmd_sim(args: argparse.Namespace) -> int:
    import dataclasses

    from kubeinfer_devkit.sim.server import create_app, make_server

    try:
        config = Sim(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Sim)})
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    app = create_app(config, model=args.model, prompt_tokens_details=args.enable_prompt_tokens_details)
    make_server(app, args.host, args.port).run()
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("sim", help="a simulated vLLM server for benchmarks without GPUs (docs/simulator.md)")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model", default="sim", help="the served model name (default: %(default)s)")
    for flag, kind, text in (
        ("--max-num-seqs", int, "running sequences at most"),
        ("--max-num-batched-tokens", int, "tokens per engine step (decode + prefill chunks)"),
        ("--num-blocks", int, "KV cache size in blocks"),
        ("--block-size", int, "tokens per KV block"),
        ("--max-model-len", int, "prompt + output tokens at most"),
        ("--prefill-overhead-ms", float, "fixed cost of a step that prefills"),
        ("--prefill-ms-per-token", float, "per prompt token not served from the prefix cache"),
        ("--decode-ms", float, "fixed cost of a decode step"),
        ("--decode-ms-per-seq", float, "added per sequence decoding in the step"),
        ("--seed", int, "seeds the generated text"),
    ):
        default = getattr(Sim, flag[2:].replace("-", "_"))
        p.add_argument(flag, type=kind, default=default, help=f"{text} (default: %(default)s)")
    p.add_argument(
        "--enable-prompt-tokens-details", action="store_true",
        help="report usage.prompt_tokens_details.cached_tokens, as vLLM's flag of that name",
    )  # fmt: skip
    p.set_defaults(func=cmd_sim)
