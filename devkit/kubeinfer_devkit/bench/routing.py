"""`kubeinfer bench routing`: the gateway's routing policies over simulated vLLM replicas.

For each policy (round-robin, least-load, prefix-aware) a fresh fleet of `kubeinfer sim` replicas
(cold prefix caches) and a fresh `kubeinfer gateway` process over them get the same requests, a
closed loop of `concurrency` streams. Per policy: TTFT, output tokens/s, success rate, the replicas'
own prefix-cache hit rate (`vllm:prefix_cache_hits_total / vllm:prefix_cache_queries_total` from
their /metrics) and where each prefix group went (from the gateway's `x-kubeinfer-replica` header),
which shows load imbalance and spill-overs.

Workloads: `shared-prefix` (`groups` system prompts of `system_prompt_len` tokens, groups interleaved
in a seeded random order: see `datasets.shared_prefix`) and `no-sharing` (prompts of the same length
that share nothing). Round-robin loses on shared prefixes only when its caches thrash, i.e. when one
replica's cache (`num_blocks * block_size` tokens) holds fewer than `groups` prefixes while the
prefixes of `groups / replicas` groups fit; the defaults are sized so (docs/benchmarks.md).
"""

from __future__ import annotations

import os
import tempfile
import time
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

from kubeinfer.gateway.scrape import ReplicaStats, parse_metrics
from kubeinfer_devkit.bench import datasets, fleet, peers, stats
from kubeinfer_devkit.bench.datasets import Prompt
from kubeinfer_devkit.bench.loadgen import LoadConfig, RunResult, run_load

POLICIES = ("round-robin", "least-load", "prefix-aware")
Workload = Literal["shared-prefix", "no-sharing"]
MODEL = "sim"
REPLICA_HEADER = "x-kubeinfer-replica"


@dataclass(frozen=True)
class RoutingConfig:
    replicas: int = 8
    workload: Workload = "shared-prefix"
    policies: tuple[str, ...] = POLICIES
    groups: int = 32
    system_prompt_len: int = 2000
    question_len: int = 32
    max_tokens: int = 32
    requests: int = 400
    concurrency: int = 64
    num_blocks: int = 1024
    """Per simulated replica: 1024 x 16 tokens hold about 7 prefixes of 2000 tokens beside the running
    requests, fewer than the 32 groups round-robin sends to every replica, more than the ~4 that
    prefix-aware sends to each."""
    block_size: int = 16
    max_num_seqs: int = 256
    """The simulator's (vLLM's default); passed to the gateway only with `tell_gateway_max_num_seqs`."""
    tell_gateway_max_num_seqs: bool = False
    target_inflight: int | None = None
    """routing.targetInflight of the gateway's model (None: maxNumSeqs if told, else 32)."""
    scrape_interval: float = 1.0
    """The gateway's --scrape-interval (seconds between /metrics scrapes of every replica)."""
    sim_options: Mapping[str, Any] | None = None
    """More `kubeinfer sim` options for every replica (Python names)."""
    seed: int = 0
    pin: bool = True
    timeout: float = 120.0
    repeat: int = 1
    """Runs of every policy (interleaved: all policies, then all again), each on fresh replicas; the
    figures are their means, `spread` their mean, stddev, min, max and CV."""
    peers: tuple[str, ...] = ()
    """Other gateways run as more policies (`peer_policies`), on fresh sims like kubeinfer's."""

    def validate(self) -> None:
        if (
            self.replicas < 1
            or self.requests < 1
            or self.concurrency < 1
            or self.groups < 1
            or self.repeat < 1
        ):
            raise ValueError("replicas, requests, concurrency, groups and repeat must be at least 1")
        if self.workload not in ("shared-prefix", "no-sharing"):
            raise ValueError(f"workload must be shared-prefix or no-sharing, not {self.workload!r}")
        unknown = [p for p in self.policies if p not in POLICIES]
        if unknown or not self.policies:
            raise ValueError(f"policies must be among {', '.join(POLICIES)}: {unknown or 'none given'}")
        peers.parse_peers(",".join(self.peers))

    def sim(self) -> dict[str, Any]:
        return {"num_blocks": self.num_blocks, "block_size": self.block_size,
                "max_num_seqs": self.max_num_seqs, **(self.sim_options or {})}  # fmt: skip


# --- pure parts --------------------------------------------------------------------------------------


PEER_POLICIES = {
    "vllm-router": ("cache_aware", "round_robin"),
    "litellm": ("simple-shuffle",),
}


def peer_policies(names: Sequence[str]) -> list[tuple[str, str, str]]:
    """(row name, peer, the peer's policy) of each peer's rows in the table: `vllm-router/cache_aware`..."""
    return [(f"{n}/{policy}", n, policy) for n in names for policy in PEER_POLICIES[n]]


def build_prompts(config: RoutingConfig) -> list[Prompt]:
    """The requests every policy gets, in order. No-sharing prompts have the length of a shared-prefix
    prompt (system prompt + question + the chat template's roles) but share nothing."""
    if config.workload == "shared-prefix":
        return datasets.shared_prefix(
            config.requests, config.groups, config.system_prompt_len, config.question_len, config.max_tokens,
            config.seed,
        )  # fmt: skip
    return datasets.synthetic(
        config.requests, config.system_prompt_len + config.question_len, config.max_tokens, config.seed
    )


def hit_rate(before: ReplicaStats | None, after: ReplicaStats) -> float | None:
    """Prefix-cache hits / queries between two scrapes (tokens), None without queries."""
    h0 = (before.prefix_cache_hits or 0) if before else 0
    q0 = (before.prefix_cache_queries or 0) if before else 0
    queries = (after.prefix_cache_queries or 0) - q0
    return ((after.prefix_cache_hits or 0) - h0) / queries if queries > 0 else None


def placement(records: Sequence[tuple[str | None, int | None]]) -> dict[str, Any]:
    """Where requests went, from (replica, group) pairs: requests per replica, their imbalance
    (max / mean), groups per replica, and how many groups were served by more than one replica."""
    per_replica = Counter(r for r, _ in records if r is not None)
    groups_of: dict[str, set[int]] = defaultdict(set)
    replicas_of: dict[int, set[str]] = defaultdict(set)
    for replica, group in records:
        if replica is not None and group is not None:
            groups_of[replica].add(group)
            replicas_of[group].add(replica)
    mean = sum(per_replica.values()) / len(per_replica) if per_replica else 0
    # A group's home is the replica that served most of it; requests elsewhere spilled (or were spread).
    per_group: dict[int, Counter[str]] = defaultdict(Counter)
    for replica, group in records:
        if replica is not None and group is not None:
            per_group[group][replica] += 1
    away = sum(sum(c.values()) - max(c.values()) for c in per_group.values())
    grouped = sum(sum(c.values()) for c in per_group.values())
    return {
        "requests_per_replica": dict(sorted(per_replica.items())),
        "imbalance": max(per_replica.values()) / mean if mean else None,
        "groups_per_replica": {r: len(g) for r, g in sorted(groups_of.items())},
        "groups_on_several_replicas": sum(1 for rs in replicas_of.values() if len(rs) > 1),
        "requests_off_home": away / grouped if grouped else None,
        "replicas_per_group_mean": (
            sum(len(rs) for rs in replicas_of.values()) / len(replicas_of) if replicas_of else None
        ),
    }


def ratio_vs(base: float | None, other: float | None) -> float | None:
    """other / base - 1 (a gain: +0.25 is 25 % more), None when undefined."""
    return other / base - 1 if base and other is not None else None


def reduction_vs(base: float | None, other: float | None) -> float | None:
    """1 - other / base (a reduction: 0.5 is half), None when undefined."""
    return 1 - other / base if base and other is not None else None


def compare(policies: Mapping[str, Mapping[str, Any]], workload: str) -> dict[str, Any]:
    """Each policy against round-robin, and the issue's goals for the workload."""
    rr = policies.get("round-robin")
    out: dict[str, Any] = {}
    if rr is None:
        return out
    for name, p in policies.items():
        if name == "round-robin":
            continue
        out[name] = {
            "ttft_reduction_vs_rr": reduction_vs(rr["mean_ttft_ms"], p["mean_ttft_ms"]),
            "p90_ttft_reduction_vs_rr": reduction_vs(rr["p90_ttft_ms"], p["p90_ttft_ms"]),
            "throughput_gain_vs_rr": ratio_vs(rr["output_tok_s"], p["output_tok_s"]),
        }
    pa = out.get("prefix-aware")
    if pa is not None:
        pa_ok = policies["prefix-aware"]["success_rate"] == 1.0
        red, gain = pa["ttft_reduction_vs_rr"], pa["throughput_gain_vs_rr"]
        if workload == "shared-prefix":
            out["goals"] = {
                "ttft_reduction>=0.5": red is not None and red >= 0.5,
                "throughput_gain>=0.25": gain is not None and gain >= 0.25,
                "success_rate==1": pa_ok,
            }
        else:
            out["goals"] = {
                "ttft_within_5pct": red is not None and abs(red) <= 0.05,
                "throughput_within_5pct": gain is not None and abs(gain) <= 0.05,
                "success_rate==1": pa_ok,
            }
    return out


# Figures averaged over repeated runs (the rest of a policy's dict comes from its last run).
AVERAGED = (
    "mean_ttft_ms", "p50_ttft_ms", "p90_ttft_ms", "p99_ttft_ms", "output_tok_s", "requests_per_s",
    "prefix_cache_hit_rate", "imbalance", "requests_off_home", "replicas_per_group_mean",
    "groups_on_several_replicas", "duration_s", "wall_s",
)  # fmt: skip


def merge_runs(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One policy's figures over repeated runs: the mean of each figure, with its `spread`; the success
    rate is the worst run's (every run must succeed)."""
    out = dict(runs[-1])
    if len(runs) == 1:
        return out
    out["spread"] = {}
    for key in AVERAGED:
        values = [r[key] for r in runs if r.get(key) is not None]
        spread = stats.spread(values)
        out[key], out["spread"][key] = spread["mean"], spread
    out["success_rate"] = min(r["success_rate"] for r in runs)
    out["runs"] = len(runs)
    return out


def policy_figures(run: RunResult, hits: float | None, where: dict[str, Any]) -> dict[str, Any]:
    d = run.to_dict()
    return {
        "mean_ttft_ms": d["ttft_ms"]["mean"], "p90_ttft_ms": d["ttft_ms"]["p90"],
        "p50_ttft_ms": d["ttft_ms"]["p50"], "p99_ttft_ms": d["ttft_ms"]["p99"],
        "output_tok_s": d["output_tokens_per_s"], "requests_per_s": d["requests_per_s"],
        "success_rate": d["success"] / d["requests"] if d["requests"] else 0.0,
        "prefix_cache_hit_rate": hits, "latency_ms": d["latency_ms"], "itl_ms": d["itl_ms"],
        "errors": d["errors"], "duration_s": d["duration_s"], **where,
    }  # fmt: skip


# --- running it --------------------------------------------------------------------------------------


def scrape(url: str, timeout: float = 5.0) -> ReplicaStats:
    with urllib.request.urlopen(f"{url}/metrics", timeout=timeout) as resp:
        return parse_metrics(resp.read().decode())


async def _cached_ttft(url: str, prompts: Sequence[Prompt], config: RoutingConfig) -> float | None:
    """TTFT (ms, median of 5) of a request whose prefix is already cached, on an otherwise idle replica:
    the yardstick for "round-robin's p90 TTFT is at least 5x the cached TTFT"."""
    group = [p for p in prompts if p.group == prompts[0].group] or list(prompts[:1])
    same = [Prompt(messages=group[0].messages, max_tokens=config.max_tokens, group=group[0].group)]
    load = LoadConfig(
        url=url, model=MODEL, iterations=5, concurrency=1, warmup=1, max_tokens=config.max_tokens
    )
    result = await run_load(load, prompts=same * 6)
    return stats.percentile([r.ttft * 1000 for r in result.records if r.ttft is not None], 50)


async def _one_policy(
    policy: str, config: RoutingConfig, prompts: Sequence[Prompt], workdir: str,
    cores: tuple[set[int] | None, set[int] | None], peer: tuple[str, Any, str] | None = None,
) -> tuple[dict[str, Any], float | None]:  # fmt: skip
    """One policy on fresh sims: kubeinfer's gateway, or with `peer` = (name, venv, its policy) a peer
    gateway (PeerError when that does not start)."""
    client_cores, gateway_cores = cores
    sims = fleet.start_fleet("sim", config.replicas + 1, config.sim(), cores=client_cores)
    try:
        gateway: fleet.GatewayProcess | peers.PeerProcess
        if peer is not None:
            name, venv, peer_policy = peer
            gateway = peers.start_peer(
                name, venv, sims.urls[: config.replicas], MODEL, workdir, cores=gateway_cores,
                policy=peer_policy,
            )  # fmt: skip
        else:
            static = fleet.static_config(
                MODEL, sims.addresses[: config.replicas], policy,
                max_num_seqs=config.max_num_seqs if config.tell_gateway_max_num_seqs else None,
                target_inflight=config.target_inflight, max_queue=100000,
            )  # fmt: skip
            gateway = fleet.start_gateway(
                static, workdir, cores=gateway_cores, scrape_interval=config.scrape_interval
            )
        try:
            load = LoadConfig(
                url=gateway.url, model=MODEL, iterations=len(prompts), concurrency=config.concurrency,
                max_tokens=config.max_tokens, timeout=config.timeout, capture_headers=(REPLICA_HEADER,),
                seed=config.seed,
            )  # fmt: skip
            run = await run_load(load, prompts=prompts)
        finally:
            gateway.stop()
        after = [scrape(u) for u in sims.urls[: config.replicas]]
        # The spare sim (never behind the gateway) measures the cached TTFT: same process, same load.
        cached = await _cached_ttft(sims.urls[-1], prompts, config)
    finally:
        sims.stop()
    hits = sum(s.prefix_cache_hits or 0 for s in after)
    queries = sum(s.prefix_cache_queries or 0 for s in after)
    ids = [f"{MODEL}-{i}" for i in range(config.replicas)]
    where = placement([(r.headers.get(REPLICA_HEADER), prompts[r.index].group) for r in run.records])
    where["hit_rate_per_replica"] = {i: hit_rate(None, s) for i, s in zip(ids, after, strict=True)}
    return policy_figures(run, hits / queries if queries else None, where), cached


def _load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


async def run_routing(
    config: RoutingConfig, *, on_policy: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Every policy on a fresh fleet and gateway; the result dict (see docs/benchmarks.md)."""
    config.validate()
    prompts = build_prompts(config)
    pin = config.pin and fleet.can_pin()
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    client = set(cores[:-1]) if pin else None
    gateway = {cores[-1]} if pin else None
    result: dict[str, Any] = {
        "config": {**asdict(config), "sim_options": dict(config.sim_options or {})},
        "pinned": pin, "load_average_before": _load(), "policies": {},
    }  # fmt: skip
    cached: list[float] = []
    runs: list[dict[str, dict[str, Any]]] = []
    venvs, peer_entries = peers.prepare(config.peers, on_step=on_policy)
    rows: list[tuple[str, tuple[str, Any, str] | None]] = [(p, None) for p in config.policies]
    rows += [(row, (n, venvs[n], pp)) for row, n, pp in peer_policies(list(venvs))]
    if client:
        os.sched_setaffinity(0, client)
    try:
        with tempfile.TemporaryDirectory(prefix="kubeinfer-bench-") as tmp:
            for i in range(config.repeat):
                runs.append({})
                for policy, peer in rows:
                    if peer is not None and "error" in peer_entries.get(peer[0], {}):
                        continue  # this peer did not start before: reported once
                    if on_policy:
                        on_policy(policy if config.repeat == 1 else f"{policy} (run {i + 1}/{config.repeat})")
                    t0 = time.monotonic()
                    try:
                        figures, ttft = await _one_policy(
                            policy, config, prompts, tmp, (client, gateway), peer
                        )
                    except peers.PeerError as exc:
                        assert peer is not None
                        peer_entries[peer[0]] = peers.peer_error(peer[0], exc, stage="start")
                        if on_policy:
                            on_policy(f"{peer[0]}: {peer_entries[peer[0]]['error']}")
                        continue
                    figures["wall_s"] = time.monotonic() - t0
                    runs[-1][policy] = figures
                    if ttft is not None:
                        cached.append(ttft)
                    if peer is not None:
                        entry = peer_entries.setdefault(peer[0], {"policies": []})
                        entry["version"] = peers.PEERS[peer[0]].version
                        if policy not in entry["policies"]:
                            entry["policies"].append(policy)
    finally:
        if client:
            os.sched_setaffinity(0, set(cores))
    result["load_average_after"] = _load()
    ran = [p for p, _ in rows if all(p in run for run in runs)]
    result["policies"] = {p: merge_runs([run[p] for run in runs]) for p in ran}
    if config.peers:
        result["peers"] = {n: peer_entries.get(n, {"error": "not run"}) for n in config.peers}
    if config.repeat > 1:
        result["runs"] = runs
    result["cached_ttft_ms"] = stats.percentile(cached, 50)
    rr = result["policies"].get("round-robin")
    result["rr_p90_ttft_over_cached"] = (
        rr["p90_ttft_ms"] / result["cached_ttft_ms"]
        if rr and rr["p90_ttft_ms"] is not None and result["cached_ttft_ms"]
        else None
    )
    result["comparison"] = compare(result["policies"], config.workload)
    pa = result["comparison"].get("prefix-aware") or {}
    result["ttft_reduction_vs_rr"] = pa.get("ttft_reduction_vs_rr")
    result["throughput_gain_vs_rr"] = pa.get("throughput_gain_vs_rr")
    return result


def format_routing(result: dict[str, Any]) -> str:
    cfg = result["config"]
    width = max([14, *(len(n) for n in result["policies"])])
    lines = [
        f"{cfg['workload']}: {cfg['replicas']} sims, {cfg['requests']} requests, concurrency "
        f"{cfg['concurrency']}, {cfg['groups']} groups x {cfg['system_prompt_len']} tokens, num_blocks "
        f"{cfg['num_blocks']}; load average {result['load_average_before']} -> "
        f"{result['load_average_after']}",
        "",
        f"{'policy':{width}} {'mean TTFT':>10} {'p90 TTFT':>10} {'p99 TTFT':>10} {'tok/s':>8} "
        f"{'success':>8} {'hit rate':>9} "
        f"{'imbalance':>9} {'split groups':>12}",
    ]

    def num(v: Any, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    for name, p in result["policies"].items():
        lines.append(
            f"{name:{width}} {num(p['mean_ttft_ms'], '10.1f')} {num(p['p90_ttft_ms'], '10.1f')} "
            f"{num(p.get('p99_ttft_ms'), '10.1f')} "
            f"{num(p['output_tok_s'], '8.1f')} {p['success_rate']:8.1%} "
            f"{num(p['prefix_cache_hit_rate'], '9.1%')} "
            f"{num(p['imbalance'], '9.2f')} {num(p['groups_on_several_replicas'], '12.0f')}"
        )

    def spread_text(s: dict[str, Any]) -> str:
        low, high = num(s["min"], ".0f"), num(s["max"], ".0f")
        return f"{num(s['mean'], '.0f')} +- {num(s['stddev'], '.0f')} ({low}-{high})"

    for name, p in result["policies"].items():
        spread = p.get("spread")
        if spread:
            lines.append(
                f"  {name} over {p['runs']} runs: mean TTFT {spread_text(spread['mean_ttft_ms'])} ms, "
                f"tok/s {spread_text(spread['output_tok_s'])}"
            )
    lines.append("")
    lines.append(f"cached TTFT {num(result['cached_ttft_ms'], '.1f')} ms; round-robin p90 TTFT / cached "
                 f"{num(result['rr_p90_ttft_over_cached'], '.1f')}x")  # fmt: skip
    for name, c in result["comparison"].items():
        if name == "goals":
            lines.append("goals: " + ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in c.items()))
        else:
            lines.append(
                f"{name} vs round-robin: TTFT {num(c['ttft_reduction_vs_rr'], '+.1%')} lower, "
                f"p90 TTFT {num(c['p90_ttft_reduction_vs_rr'], '+.1%')} lower, "
                f"throughput {num(c['throughput_gain_vs_rr'], '+.1%')}"
            )
    return "\n".join(lines) + "\n" + peers.format_routing_peers(result)
