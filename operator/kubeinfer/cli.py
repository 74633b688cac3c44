"""`kubeinfer` command line. Subcommands import lazily so `kubeinfer crd` stays fast."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from typing import Any

import yaml


class CLIError(Exception):
    """An error for the user: printed as one message, exit status 1, never a traceback."""


def _load_documents(path: str) -> list[dict[str, Any]]:
    if path == "-":
        text = sys.stdin.read()
    else:
        p = Path(path)
        if not p.is_file():
            raise CLIError(f"{path}: no such file")
        text = p.read_text()
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise CLIError(f"{path}: not valid YAML: {exc}") from None
    if not docs:
        raise CLIError(f"{path}: no documents")
    return docs


def _parse_all(path: str) -> list[Any]:
    from kubeinfer.validation import InvalidModel, parse_model

    models, errors = [], []
    for i, doc in enumerate(_load_documents(path)):
        name = doc.get("metadata", {}).get("name", f"document {i + 1}") if isinstance(doc, dict) else i + 1
        try:
            models.append(parse_model(doc))
        except InvalidModel as exc:
            errors += [f"{path}: {name}: {p}" for p in exc.problems]
    if errors:
        raise CLIError("\n".join(errors))
    return models


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
        for model in _parse_all(path):
            print(f"{path}: {model.name}: valid ({model.spec.engine}, serves {model.served_name})")
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    from kubeinfer.estimate import estimate
    from kubeinfer.render.config import load_config
    from kubeinfer.render.manifests import render

    config = load_config(args.config)
    out: list[str] = []
    for path in args.file:
        for model in _parse_all(path):
            est = estimate(model.spec)
            out.append(f"# {model.name}: {est.message}\n")
            out.append(yaml.safe_dump_all(render(model, config), sort_keys=False, width=120))
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
        for model in _parse_all(path):
            print(f"{model.name}: {estimate(model.spec).message}")
    return 0


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


def _state_dir(path: str | None) -> Path:
    if path:
        return Path(path)
    from kubeinfer.devcluster.build import cache_root

    return cache_root() / "local"


def cmd_demo(args: argparse.Namespace) -> int:
    from kubeinfer.devcluster.local import demo

    manifest = Path(args.file)
    if not manifest.is_file():
        raise CLIError(f"{manifest}: no such file")
    return demo(manifest, _state_dir(args.state_dir), keep=args.keep)


def cmd_up(args: argparse.Namespace) -> int:
    from kubeinfer.devcluster.stack import up

    manifest = Path(args.file) if args.file else None
    if manifest is not None and not manifest.is_file():
        raise CLIError(f"{manifest}: no such file")
    state = Path(args.state_dir) if args.state_dir else None
    return up(state, manifest, foreground=args.foreground, gateway_port=args.gateway_port)


def cmd_down(args: argparse.Namespace) -> int:
    from kubeinfer.devcluster.stack import down

    return down(Path(args.state_dir) if args.state_dir else None, purge=args.purge)


def cmd_bench_operator(args: argparse.Namespace) -> int:
    import json

    from kubeinfer.devcluster.local import bench_operator

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

    from kubeinfer.bench.datasets import DatasetError
    from kubeinfer.bench.loadgen import LoadConfig, run_repeats
    from kubeinfer.bench.report import Progress, format_table, to_json

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
        from kubeinfer.bench.plot import PlotError, plot

        try:
            plot(result, args.plot)
        except PlotError as exc:
            raise CLIError(str(exc)) from None


def _say(text: str) -> None:
    print(f"[bench] {text}", file=sys.stderr, flush=True)


def cmd_bench_overhead(args: argparse.Namespace) -> int:
    from kubeinfer.bench.overhead import OverheadConfig, format_overhead, run_overhead

    config = OverheadConfig(
        rate=args.rate, duration=args.duration, body_bytes=args.body_bytes, slot=args.slot,
        replicas=args.replicas, large_body_bytes=args.large_body_bytes, large_rate=args.large_rate,
        large_duration=args.large_duration, stream_concurrency=args.stream_concurrency,
        stream_tokens=args.stream_tokens, stream_interval_ms=args.stream_interval_ms,
        stream_duration=args.stream_duration, stream_slot=args.stream_slot, warmup=args.warmup,
        pin=args.pin, phases=tuple(args.phases.split(",")),
    )  # fmt: skip
    try:
        result = asyncio.run(run_overhead(config, on_phase=lambda name: _say(f"phase {name}")))
    except (ValueError, RuntimeError) as exc:
        raise CLIError(str(exc)) from None
    _bench_output(args, result, format_overhead(result))
    return 0 if not result["errors"] else 1


def cmd_bench_routing(args: argparse.Namespace) -> int:
    from kubeinfer.bench.routing import RoutingConfig, format_routing, run_routing

    config = RoutingConfig(
        replicas=args.replicas, workload=args.workload, policies=tuple(args.policies.split(",")),
        groups=args.groups, system_prompt_len=args.system_prompt_len, question_len=args.question_len,
        max_tokens=args.max_tokens, requests=args.requests, concurrency=args.concurrency,
        num_blocks=args.num_blocks, target_inflight=args.target_inflight,
        tell_gateway_max_num_seqs=args.tell_max_num_seqs, max_num_seqs=args.max_num_seqs, seed=args.seed,
        pin=args.pin, scrape_interval=args.scrape_interval, repeat=args.repeat,
    )  # fmt: skip
    try:
        result = asyncio.run(run_routing(config, on_policy=lambda name: _say(f"policy {name}")))
    except (ValueError, RuntimeError) as exc:
        raise CLIError(str(exc)) from None
    _bench_output(args, result, format_routing(result))
    return 0 if all(p["success_rate"] == 1.0 for p in result["policies"].values()) else 1


def cmd_bench_engines(args: argparse.Namespace) -> int:
    from kubeinfer.bench.engines import EnginesConfig, format_engines, run_engines

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


def cmd_bench_plot(args: argparse.Namespace) -> int:
    import json

    from kubeinfer.bench.plot import PlotError, plot

    try:
        result = json.loads(Path(args.file).read_text())
        plot(result, args.output)
    except (OSError, ValueError, PlotError) as exc:
        raise CLIError(f"{args.file}: {exc}") from None
    return 0


def cmd_sim(args: argparse.Namespace) -> int:
    import dataclasses

    from kubeinfer.sim.model import EngineConfig
    from kubeinfer.sim.server import create_app, make_server

    try:
        config = EngineConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(EngineConfig)})
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    app = create_app(config, model=args.model, prompt_tokens_details=args.enable_prompt_tokens_details)
    make_server(app, args.host, args.port).run()
    return 0


def cmd_gateway(args: argparse.Namespace) -> int:
    import prometheus_client
    import uvicorn

    from kubeinfer.gateway import logs
    from kubeinfer.gateway.app import GatewaySettings, create_app
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

    settings = GatewaySettings(
        scrape_interval=config.scrape_interval, scrape_timeout=config.scrape_timeout,
        hold_timeout=config.hold_timeout, retries=config.retries, max_body_bytes=config.max_body_bytes,
    )  # fmt: skip
    metrics = prometheus_client.CollectorRegistry()
    if args.metrics_port:  # the same registry is also served at /metrics on the API port
        prometheus_client.start_http_server(args.metrics_port, registry=metrics)
    app = create_app(registry, settings, metrics=metrics, discover=discover, keys=keys, ready=ready)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)
    return 0


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
    return config.model_copy(update=flags)


# Flags of `kubeinfer gateway` that override the same-named field of its --config file.
GATEWAY_FLAGS = frozenset(
    {"scrape_interval", "scrape_timeout", "hold_timeout", "retries", "max_body_bytes", "auth",
     "keys_namespace", "log_format", "access_log"}
)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kubeinfer", description="Kubernetes operator and gateway for LLMs")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("crd", help="print the LLMModel CustomResourceDefinition")
    p.set_defaults(func=cmd_crd)

    p = sub.add_parser("api-docs", help="print the API reference (Markdown)")
    p.set_defaults(func=cmd_docs)

    p = sub.add_parser("validate", help="check LLMModel manifests as the apiserver would")
    p.add_argument("-f", "--file", action="append", required=True, help="manifest file ('-' for stdin)")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("render", help="print the Kubernetes objects a model becomes")
    p.add_argument("-f", "--file", action="append", required=True, help="manifest file ('-' for stdin)")
    p.add_argument("--config", help="operator configuration file (images, timeouts)")
    p.add_argument("--estimate", action="store_true", help="also print the GPU-memory estimate as YAML")
    p.set_defaults(func=cmd_render)

    p = sub.add_parser("estimate", help="print the GPU-memory fit estimate of models")
    p.add_argument("-f", "--file", action="append", required=True, help="manifest file ('-' for stdin)")
    p.set_defaults(func=cmd_estimate)

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

    from kubeinfer.sim.model import EngineConfig as Sim  # stdlib only: cheap enough to import here

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

    p = bench.add_parser("plot", help="draw a figure from a bench overhead/routing/engines --json file")
    p.add_argument("file", help="the JSON a bench printed")
    p.add_argument("-o", "--output", required=True, help="PNG or SVG file to write")
    p.set_defaults(func=cmd_bench_plot)
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
