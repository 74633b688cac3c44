"""`kubeinfer bench ...`: load generator, gateway overhead, routing policies, real engines, operator
throughput, cold start from zero (docs/benchmarks.md)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from kubeinfer.cliutil import CLIError
from kubeinfer_devkit.devcluster.cli import _state_dir


def cmd_bench_operator(args: argparse.Namespace) -> int:
    import json

    from kubeinfer_devkit.devcluster.local import bench_operator

    result = bench_operator(
        args.models, args.concurrency, _state_dir(args.state_dir), timeout=args.timeout,
        controllers=not args.no_controllers,
    )  # fmt: skip
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:32} {value}")
    return 0 if result["deployments"] == args.models else 1


def cmd_bench_serve(args: argparse.Namespace) -> int:
    import asyncio

    from kubeinfer_devkit.bench.datasets import DatasetError
    from kubeinfer_devkit.bench.loadgen import LoadConfig, run_repeats
    from kubeinfer_devkit.bench.report import Progress, format_table, to_json

    if args.dataset_path and args.dataset:
        raise CLIError("--dataset-path and --dataset exclude each other")
    config = LoadConfig(
        url=args.url, model=args.model, endpoint=args.endpoint, iterations=args.iterations,
        concurrency=args.concurrency, rate=args.rate, max_tokens=args.max_tokens, stream=args.stream,
        warmup=args.warmup, api_key=args.api_key, seed=args.seed, timeout=args.timeout,
        dataset="file" if args.dataset_path else args.dataset or "synthetic", input_len=args.input_len,
        output_len=args.output_len, groups=args.groups, system_prompt_len=args.system_prompt_len,
        question_len=args.question_len, dataset_path=args.dataset_path, ignore_eos=args.ignore_eos,
    )  # fmt: skip
    show = sys.stderr.isatty() if args.progress is None else args.progress
    progress = Progress(args.repeat) if show else None
    try:
        config.validate()
        result = asyncio.run(run_repeats(config, args.repeat, on_progress=progress))
    except (ValueError, DatasetError) as exc:  # DatasetError names the file and line
        raise CLIError(str(exc)) from None
    finally:
        if progress:
            progress.close()
    sys.stdout.write(to_json(result) + "\n" if args.json else format_table(result))
    return 0 if all(run.success for run in result.runs) else 1


def _bench_output(args: argparse.Namespace, result: dict[str, Any], text: str) -> None:
    """JSON or the human summary on stdout; with --plot, also a figure (the `bench` extra)."""
    import json

    sys.stdout.write(json.dumps(result, indent=2) + "\n" if args.json else text)
    if args.plot:
        from kubeinfer_devkit.bench.plot import PlotError, plot

        try:
            plot(result, args.plot)
        except PlotError as exc:
            raise CLIError(str(exc)) from None


def _say(text: str) -> None:
    print(f"[bench] {text}", file=sys.stderr, flush=True)


def _peers(text: str | None) -> tuple[str, ...]:
    from kubeinfer_devkit.bench.peers import parse_peers

    try:
        return parse_peers(text)
    except ValueError as exc:
        raise CLIError(str(exc)) from None


PEERS_HELP = (
    "comma-separated other gateways to measure side by side: vllm-router, litellm (each installed once "
    "into its own venv under ~/.cache/kubeinfer/peers; one that fails is reported, not dropped)"
)


def cmd_bench_overhead(args: argparse.Namespace) -> int:
    from kubeinfer_devkit.bench.overhead import OverheadConfig, format_overhead, run_overhead

    config = OverheadConfig(
        rate=args.rate, duration=args.duration, body_bytes=args.body_bytes, slot=args.slot,
        replicas=args.replicas, large_body_bytes=args.large_body_bytes, large_rate=args.large_rate,
        large_duration=args.large_duration, stream_concurrency=args.stream_concurrency,
        stream_tokens=args.stream_tokens, stream_interval_ms=args.stream_interval_ms,
        stream_duration=args.stream_duration, stream_slot=args.stream_slot, warmup=args.warmup,
        pin=args.pin, phases=tuple(args.phases.split(",")), peers=_peers(args.peers),
        gateway=args.gateway or "", variants=tuple(v for v in (args.variants or "").split(",") if v),
    )  # fmt: skip
    try:
        result = asyncio.run(run_overhead(config, on_phase=lambda name: _say(f"phase {name}")))
    except (ValueError, RuntimeError) as exc:
        raise CLIError(str(exc)) from None
    _bench_output(args, result, format_overhead(result))
    return 0 if not result["errors"] else 1


def cmd_bench_routing(args: argparse.Namespace) -> int:
    from kubeinfer_devkit.bench.routing import RoutingConfig, format_routing, run_routing

    config = RoutingConfig(
        replicas=args.replicas, workload=args.workload, policies=tuple(args.policies.split(",")),
        groups=args.groups, system_prompt_len=args.system_prompt_len, question_len=args.question_len,
        max_tokens=args.max_tokens, requests=args.requests, concurrency=args.concurrency,
        num_blocks=args.num_blocks, target_inflight=args.target_inflight,
        tell_gateway_max_num_seqs=args.tell_max_num_seqs, max_num_seqs=args.max_num_seqs, seed=args.seed,
        pin=args.pin, scrape_interval=args.scrape_interval, repeat=args.repeat, peers=_peers(args.peers),
    )  # fmt: skip
    try:
        result = asyncio.run(run_routing(config, on_policy=lambda name: _say(f"policy {name}")))
    except (ValueError, RuntimeError) as exc:
        raise CLIError(str(exc)) from None
    _bench_output(args, result, format_routing(result))
    return 0 if all(p["success_rate"] == 1.0 for p in result["policies"].values()) else 1


def cmd_bench_engines(args: argparse.Namespace) -> int:
    from kubeinfer_devkit.bench.engines import EnginesConfig, format_engines, run_engines

    config = EnginesConfig(
        replicas=args.replicas, groups=args.groups, requests=args.requests, concurrency=args.concurrency,
        kv_cache_bytes=args.kv_cache_bytes, seed=args.seed, sims=args.sims,
        tell_gateway_max_num_seqs=args.tell_max_num_seqs,
    )  # fmt: skip
    try:
        result = asyncio.run(run_engines(config, on_step=_say))
    except (ValueError, RuntimeError) as exc:
        raise CLIError(str(exc)) from None
    _bench_output(args, result, format_engines(result))
    return 0


def cmd_bench_coldstart(args: argparse.Namespace) -> int:
    import json

    from kubeinfer_devkit.bench.coldstart import ColdstartConfig, StackError, format_coldstart, run_coldstart
    from kubeinfer_devkit.devcluster.stackstate import default_state_dir

    config = ColdstartConfig(
        state_dir=Path(args.state_dir) if args.state_dir else default_state_dir(), runs=args.runs,
        model_name=args.model_name, timeout=args.timeout, keep=args.keep, pause=args.pause, seed=args.seed,
    )  # fmt: skip
    try:
        result = asyncio.run(run_coldstart(config, on_step=_say))
    except (ValueError, StackError) as exc:
        raise CLIError(str(exc)) from None
    sys.stdout.write(json.dumps(result, indent=2) + "\n" if args.json else format_coldstart(result))
    return 0 if result["runs"] and not any(run["error"] for run in result["runs"]) else 1


def cmd_bench_plot(args: argparse.Namespace) -> int:
    import json

    from kubeinfer_devkit.bench.plot import PlotError, plot

    try:
        result = json.loads(Path(args.file).read_text())
        plot(result, args.output)
    except (OSError, ValueError, PlotError) as exc:
        raise CLIError(f"{args.file}: {exc}") from None
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    p = bench.add_parser("operator", help="N models applied at once: time until every Deployment exists")
    p.add_argument("--models", type=int, default=200)
    p.add_argument(
        "--concurrency",
        type=int,
        default=1,
        help="creates in flight (1: as `kubectl apply -f` sends a 200-document file; 50: a burst)",
    )
    p.add_argument("--timeout", type=float, default=120)
    p.add_argument(
        "--no-controllers",
        action="store_true",
        help="only etcd + apiserver (isolates the operator's latency)",
    )
    p.add_argument("--state-dir")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench_operator)

    p = bench.add_parser("serve", help="load an OpenAI-compatible endpoint: latency, TTFT, ITL, throughput")
    p.add_argument("--url", required=True, help="base URL, with or without /v1 (e.g. http://127.0.0.1:8000)")
    p.add_argument("--model", required=True, help="the model name to send")
    p.add_argument("--endpoint", choices=("chat", "completions"), default="chat")
    p.add_argument("--iterations", type=int, default=100, help="measured requests per run")
    p.add_argument(
        "--concurrency", type=int, help="closed loop: requests in flight (default 1); with --rate: a cap"
    )
    p.add_argument("--rate", type=float, help="open loop: Poisson arrivals at this many requests/s (seeded)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--ignore-eos", action="store_true", help="vLLM: always generate max tokens")
    p.add_argument("--warmup", type=int, default=0, help="requests sent first and left out of the figures")
    p.add_argument("--repeat", type=int, default=1, help="runs; reports mean, stddev, min, max and CV")
    p.add_argument("--api-key", help="sent as a Bearer token")
    p.add_argument("--seed", type=int, default=0, help="prompts and arrivals (run i uses seed + i)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    p.add_argument("--dataset", choices=("synthetic", "shared-prefix"), help="default: synthetic")
    p.add_argument("--dataset-path", help="JSONL: one {prompt | messages, max_tokens?} per line")
    p.add_argument("--input-len", type=int, default=128, help="synthetic: prompt tokens (about)")
    p.add_argument("--output-len", type=int, help="synthetic, shared-prefix: max tokens per request")
    p.add_argument("--groups", type=int, default=4, help="shared-prefix: distinct system prompts")
    p.add_argument("--system-prompt-len", type=int, default=1024, help="shared-prefix: tokens (about)")
    p.add_argument("--question-len", type=int, default=32, help="shared-prefix: tokens (about)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, help="progress bar on stderr (default: if a TTY)"
    )
    p.set_defaults(func=cmd_bench_serve)

    p = bench.add_parser(
        "overhead", help="latency and CPU the gateway adds: direct vs through it, interleaved (one core)"
    )
    p.add_argument("--rate", type=float, default=500.0, help="requests/s of the small-body phase")
    p.add_argument("--duration", type=float, default=20.0, help="seconds of the small-body phase")
    p.add_argument("--body-bytes", type=int, default=1024)
    p.add_argument("--slot", type=float, default=1.0, help="seconds before switching direct <-> gateway")
    p.add_argument("--replicas", type=int, default=2, help="echo replicas behind the gateway")
    p.add_argument("--large-body-bytes", type=int, default=200 * 1024)
    p.add_argument("--large-rate", type=float, default=100.0)
    p.add_argument("--large-duration", type=float, default=10.0)
    p.add_argument("--stream-concurrency", type=int, default=256)
    p.add_argument("--stream-tokens", type=int, default=40, help="chunks per stream")
    p.add_argument("--stream-interval-ms", type=float, default=50.0, help="between a stream's chunks")
    p.add_argument("--stream-duration", type=float, default=24.0)
    p.add_argument("--stream-slot", type=float, default=6.0)
    p.add_argument("--warmup", type=float, default=1.0, help="seconds of load per target before measuring")
    p.add_argument("--phases", default="small,large,stream", help="comma-separated: small, large, stream")
    p.add_argument("--pin", action=argparse.BooleanOptionalAction, default=True,
                   help="gateway on the last core, the rest on the others (Linux, 2+ cores)")  # fmt: skip
    p.add_argument("--peers", help=PEERS_HELP)
    p.add_argument(
        "--gateway", metavar="SERVER+CLIENT",
        help="kubeinfer's gateway: HTTP server (kubeinfer, uvicorn, granian, aiohttp) + client to the "
        "replicas (kubeinfer, aiohttp); default: the gateway's defaults",
    )  # fmt: skip
    p.add_argument(
        "--variants", metavar="SERVER+CLIENT,...",
        help="more kubeinfer gateways as targets of their own, e.g. uvicorn+aiohttp (the earlier stack); "
        "floor: the gateway's server and client as a bare proxy, with none of its logic",
    )  # fmt: skip
    p.add_argument("--json", action="store_true")
    p.add_argument("--plot", help="also write a figure (PNG or SVG; needs the bench extra)")
    p.set_defaults(func=cmd_bench_overhead)

    p = bench.add_parser("routing", help="round-robin vs least-load vs prefix-aware over simulated replicas")
    p.add_argument("--replicas", type=int, default=8)
    p.add_argument("--workload", choices=("shared-prefix", "no-sharing"), default="shared-prefix")
    p.add_argument("--policies", default="round-robin,least-load,prefix-aware")
    p.add_argument("--groups", type=int, default=32, help="shared-prefix: distinct system prompts")
    p.add_argument("--system-prompt-len", type=int, default=2000, help="tokens")
    p.add_argument("--question-len", type=int, default=32, help="tokens")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--requests", type=int, default=400)
    p.add_argument("--concurrency", type=int, default=64, help="closed loop: streams in flight")
    p.add_argument("--num-blocks", type=int, default=1024, help="each sim's KV cache, blocks of 16 tokens")
    p.add_argument("--max-num-seqs", type=int, default=256, help="each sim's")
    p.add_argument(
        "--tell-max-num-seqs", action="store_true", help="put the sims' maxNumSeqs in the static file"
    )
    p.add_argument("--target-inflight", type=int, help="routing.targetInflight of the gateway's model")
    p.add_argument("--scrape-interval", type=float, default=1.0, help="the gateway's, seconds")
    p.add_argument("--repeat", type=int, default=1, help="runs of every policy; figures are their means")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pin", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--peers", help=PEERS_HELP + "; vllm-router runs as cache_aware and round_robin")
    p.add_argument("--json", action="store_true")
    p.add_argument("--plot", help="also write a figure (PNG or SVG; needs the bench extra)")
    p.set_defaults(func=cmd_bench_routing)

    p = bench.add_parser(
        "engines", help="round-robin vs prefix-aware over real vLLM replicas on CPU, and sims"
    )
    p.add_argument("--replicas", type=int, default=3)
    p.add_argument("--groups", type=int, default=12)
    p.add_argument("--requests", type=int, default=72)
    p.add_argument("--concurrency", type=int, default=6)
    p.add_argument("--kv-cache-bytes", type=int, default=64 << 20, help="each vLLM's --kv-cache-memory-bytes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sims", action=argparse.BooleanOptionalAction, default=True,
                   help="also the same workload on sims with vLLM's block size and count")  # fmt: skip
    p.add_argument("--tell-max-num-seqs", action="store_true", help="put maxNumSeqs (8) in the static file")
    p.add_argument("--json", action="store_true")
    p.add_argument("--plot", help="also write a figure (PNG or SVG; needs the bench extra)")
    p.set_defaults(func=cmd_bench_engines)

    p = bench.add_parser(
        "coldstart", help="scale from zero on the local stack: first request -> first token, by phase"
    )
    p.add_argument("--state-dir", help="the stack's (default: that of `kubeinfer up`)")
    p.add_argument("--runs", type=int, default=5, help="cold starts, each from zero replicas")
    p.add_argument("--model-name", default="coldstart-tiny", help="the LLMModel the bench applies")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per wait and per request")
    p.add_argument(
        "--pause", type=float, default=2.0, help="before each request a random 0..PAUSE s wait (seeded)"
    )
    p.add_argument("--seed", type=int, default=0, help="of the pauses (run i uses seed + i)")
    p.add_argument("--keep", action="store_true", help="leave the bench's model in place at the end")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bench_coldstart)

    p = bench.add_parser("plot", help="draw a figure from a bench overhead/routing/engines --json file")
    p.add_argument("file", help="the JSON a bench printed")
    p.add_argument("-o", "--output", required=True, help="PNG or SVG file to write")
    p.set_defaults(func=cmd_bench_plot)
