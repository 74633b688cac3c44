"""`kubeinfer bench routing` and `bench engines`: the pure parts (workloads, placement, ratios, hit
rates, goals, plots' kind) and a smoke run of `bench routing` at tiny scale (2 sims per policy)."""

from __future__ import annotations

import json

import pytest

from kubeinfer.cli import main
from kubeinfer.gateway import routing as gateway_routing
from kubeinfer.gateway.scrape import ReplicaStats
from kubeinfer_devkit.bench import engines, plot, routing
from kubeinfer_devkit.bench.routing import RoutingConfig, compare, placement, ratio_vs, reduction_vs


def test_reduction_and_gain_ratios():
    assert reduction_vs(400.0, 100.0) == pytest.approx(0.75)
    assert reduction_vs(100.0, 120.0) == pytest.approx(-0.2)
    assert ratio_vs(400.0, 500.0) == pytest.approx(0.25)
    assert ratio_vs(0.0, 5.0) is None and reduction_vs(None, 1.0) is None and ratio_vs(1.0, None) is None


def _policy(ttft: float, p90: float, tok_s: float, success: float = 1.0) -> dict[str, float]:
    return {"mean_ttft_ms": ttft, "p90_ttft_ms": p90, "output_tok_s": tok_s, "success_rate": success}


def test_compare_against_round_robin_and_goals():
    policies = {"round-robin": _policy(400, 900, 100), "least-load": _policy(380, 800, 104),
                "prefix-aware": _policy(150, 300, 140)}  # fmt: skip
    c = compare(policies, "shared-prefix")
    assert c["prefix-aware"]["ttft_reduction_vs_rr"] == pytest.approx(0.625)
    assert c["prefix-aware"]["p90_ttft_reduction_vs_rr"] == pytest.approx(2 / 3)
    assert c["prefix-aware"]["throughput_gain_vs_rr"] == pytest.approx(0.4)
    assert c["least-load"]["throughput_gain_vs_rr"] == pytest.approx(0.04)
    assert all(c["goals"].values())
    policies["prefix-aware"] = _policy(250, 300, 120, success=0.99)
    goals = compare(policies, "shared-prefix")["goals"]
    assert goals == {"ttft_reduction>=0.5": False, "throughput_gain>=0.25": False, "success_rate==1": False}
    # No sharing: prefix-aware should match round-robin within 5 %.
    near = {"round-robin": _policy(400, 900, 100), "prefix-aware": _policy(410, 950, 97)}
    assert all(compare(near, "no-sharing")["goals"].values())
    far = {"round-robin": _policy(400, 900, 100), "prefix-aware": _policy(480, 950, 90)}
    assert compare(far, "no-sharing")["goals"]["ttft_within_5pct"] is False
    assert compare({"prefix-aware": _policy(1, 1, 1)}, "no-sharing") == {}


def test_repeated_runs_are_averaged_with_their_spread():
    runs = [
        {**_policy(400, 900, 100), "groups_on_several_replicas": 2, "note": "first"},
        {**_policy(600, 1100, 140, success=0.9), "groups_on_several_replicas": 4, "note": "last"},
    ]
    merged = routing.merge_runs(runs)
    assert merged["mean_ttft_ms"] == 500 and merged["output_tok_s"] == 120 and merged["runs"] == 2
    assert merged["groups_on_several_replicas"] == 3 and merged["note"] == "last"
    assert merged["success_rate"] == 0.9  # the worst run's
    assert merged["spread"]["mean_ttft_ms"]["min"] == 400 and merged["spread"]["mean_ttft_ms"]["max"] == 600
    assert routing.merge_runs(runs[:1]) == runs[0]


def test_placement_counts_requests_groups_and_split_groups():
    records = [("a", 0), ("a", 0), ("b", 1), ("b", 0), ("c", 2), (None, 3), ("a", None)]
    p = placement(records)
    assert p["requests_per_replica"] == {"a": 3, "b": 2, "c": 1}
    assert p["imbalance"] == pytest.approx(3 / 2)
    assert p["groups_per_replica"] == {"a": 1, "b": 2, "c": 1}
    assert p["groups_on_several_replicas"] == 1  # group 0 on a and b
    assert p["replicas_per_group_mean"] == pytest.approx(4 / 3)
    assert p["requests_off_home"] == pytest.approx(1 / 5)  # group 0's request on b
    assert placement([])["imbalance"] is None


def test_hit_rates_from_scrapes():
    before = ReplicaStats("vllm", 0, 0, prefix_cache_queries=1000, prefix_cache_hits=200)
    after = ReplicaStats("vllm", 0, 0, prefix_cache_queries=3000, prefix_cache_hits=1700)
    assert routing.hit_rate(before, after) == pytest.approx(0.75)
    assert routing.hit_rate(None, after) == pytest.approx(1700 / 3000)
    assert routing.hit_rate(after, after) is None
    other = ReplicaStats("vllm", 0, 0, prefix_cache_queries=500, prefix_cache_hits=0)
    assert engines.delta_hit_rate([before, other], [after, other]) == pytest.approx(0.75)


def test_workloads_are_the_same_length_and_share_only_with_shared_prefix():
    cfg = RoutingConfig(requests=16, groups=4, system_prompt_len=50, question_len=5)
    shared = routing.build_prompts(cfg)
    assert len(shared) == 16 and {p.group for p in shared} == {0, 1, 2, 3}
    assert shared == routing.build_prompts(cfg)
    none = routing.build_prompts(
        RoutingConfig(requests=16, workload="no-sharing", system_prompt_len=50, question_len=5)
    )
    assert all(p.group is None and p.prompt is not None and len(p.prompt.split()) == 55 for p in none)
    assert len({p.prompt.split()[0] + p.prompt.split()[1] for p in none if p.prompt}) > 8


@pytest.mark.parametrize("unit", ["char", "word"])
def test_engine_prompts_share_exactly_the_prefix_in_tokens(unit):
    ps = engines.engine_prompts(24, 6, prefix_tokens=300, question_tokens=20, unit=unit, seed=1)
    tokens = (lambda s: list(s)) if unit == "char" else (lambda s: s.split())
    by_group: dict[int, list[str]] = {}
    for p in ps:
        assert p.prompt is not None and p.group is not None
        by_group.setdefault(p.group, []).append(p.prompt)
        assert len(tokens(p.prompt)) == pytest.approx(320, abs=2)
    for prompts in by_group.values():
        assert len({tokens(p)[:300] == tokens(prompts[0])[:300] for p in prompts}) == 1
    heads = {tuple(tokens(prompts[0])[:10]) for prompts in by_group.values()}
    assert len(heads) == 6  # groups differ from their first tokens
    assert engines.engine_prompts(24, 6, 300, 20, unit, seed=2) != ps


def test_engine_prompts_of_a_group_share_the_gateway_prefix_blocks():
    """What the gateway's prefix index sees: a group's prompts share the blocks of their prefix, and
    groups differ from the first block on."""
    cfg = engines.EnginesConfig()
    ps = engines.engine_prompts(cfg.groups * 2, cfg.groups, cfg.prefix_tokens, cfg.question_tokens, "char")
    shared = cfg.prefix_tokens // gateway_routing.BLOCK_CHARS - 1  # the chat framing may shift it by a block
    blocks: dict[int, set[tuple[int, ...]]] = {}
    for p in ps:
        assert p.prompt is not None and p.group is not None
        blocks.setdefault(p.group, set()).add(gateway_routing.prefix_blocks({"prompt": p.prompt})[:shared])
    assert all(len(b) == 1 for b in blocks.values()) and len(blocks) == cfg.groups
    firsts = {next(iter(b))[0] for b in blocks.values()}
    assert len(firsts) == cfg.groups


def test_num_blocks_from_vllm_metrics():
    text = 'vllm:cache_config_info{block_size="128",engine="0",num_gpu_blocks="128",x="y"} 1.0\n'
    assert engines.num_blocks(text) == 128
    assert engines.num_blocks("nothing") is None


def test_engines_config_checks_the_context_fits():
    engines.EnginesConfig().validate()
    with pytest.raises(ValueError):
        engines.EnginesConfig(prefix_tokens=4090).validate()


def test_vllm_argv_has_the_engine_tier_flags():
    argv = engines.vllm_argv("/m", "127.0.0.1", 8000, engines.EnginesConfig())
    for flag in ("--enable-prefix-caching", "--kv-cache-memory-bytes", "--max-model-len", "--dtype"):
        assert flag in argv
    assert argv[argv.index("--dtype") + 1] == "float32"
    assert json.loads(argv[argv.index("--hf-overrides") + 1]) == {"max_position_embeddings": 4096}


def test_plot_kind_from_keys():
    assert plot.kind({"policies": {}, "comparison": {}}) == "routing"
    assert plot.kind({"vllm": {}}) == "engines"
    assert plot.kind({"small": {}}) == "overhead"
    with pytest.raises(plot.PlotError):
        plot.kind({"runs": []})


ROUTING_KEYS = {
    "config", "pinned", "policies", "comparison", "cached_ttft_ms", "rr_p90_ttft_over_cached",
    "ttft_reduction_vs_rr", "throughput_gain_vs_rr", "load_average_before", "load_average_after",
}  # fmt: skip
POLICY_KEYS = {"mean_ttft_ms", "p90_ttft_ms", "output_tok_s", "success_rate", "prefix_cache_hit_rate",
               "requests_per_replica", "groups_per_replica", "groups_on_several_replicas", "imbalance",
               "hit_rate_per_replica"}  # fmt: skip


def test_cli_routing_smoke(capsys, tmp_path):
    """All three policies, each on two fresh sims behind a fresh gateway; JSON keys and a plot."""
    pytest.importorskip("matplotlib")
    figure = tmp_path / "routing.svg"
    rc = main(
        ["bench", "routing", "--json", "--replicas", "2", "--requests", "8", "--concurrency", "2",
         "--groups", "2", "--system-prompt-len", "400", "--question-len", "4", "--max-tokens", "3",
         "--plot", str(figure)]
    )  # fmt: skip
    out = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert out.keys() >= ROUTING_KEYS
    assert list(out["policies"]) == ["round-robin", "least-load", "prefix-aware"]
    for p in out["policies"].values():
        assert p.keys() >= POLICY_KEYS and p["success_rate"] == 1.0
        assert sum(p["requests_per_replica"].values()) == 8
    assert out["policies"]["round-robin"]["requests_per_replica"] == {"sim-0": 4, "sim-1": 4}
    # Each group on one replica with prefix-aware (nothing to spill at this load). The system prompt is
    # longer than the gateway's 2048-character prefix key, else the key would hold the question too.
    assert out["policies"]["prefix-aware"]["groups_on_several_replicas"] == 0
    assert {"ttft_reduction_vs_rr", "throughput_gain_vs_rr"} <= out["comparison"]["prefix-aware"].keys()
    assert figure.read_text().startswith("<?xml")


def _engines_result() -> dict[str, object]:
    run = {"hit_rate": 0.4, "mean_ttft_ms": 500.0, "p90_ttft_ms": 900.0, "output_tok_s": 30.0,
           "success_rate": 1.0, "groups_on_several_replicas": 3}  # fmt: skip
    return {
        "config": {"replicas": 3}, "startup_s": 60.0, "vllm_num_blocks": 128, "load_average_before": [1.0],
        "load_average_after": [2.0], "vllm": {"round-robin": run, "prefix-aware": {**run, "hit_rate": 0.7}},
        "sim": {"round-robin": run, "prefix-aware": run},
    }  # fmt: skip


def test_engines_table_and_every_plot_kind(tmp_path):
    text = engines.format_engines(_engines_result())
    assert "vllm   prefix-aware       70.0%" in text and "128 KV blocks" in text
    pytest.importorskip("matplotlib")
    dist = {"p50": 1.0, "p90": 2.0, "p99": 3.0, "mean": 1.5}
    phase = {"direct": {"latency_ms": dist, "itl_ms": dist}, "gateway": {"latency_ms": dist, "itl_ms": dist},
             "body_bytes": 1024, "rate": 500.0}  # fmt: skip
    policy = {"mean_ttft_ms": 1.0, "p90_ttft_ms": 2.0, "output_tok_s": 3.0, "prefix_cache_hit_rate": None}
    results = {
        "overhead": {"small": phase, "stream": {**phase, "rate": None}, "load_average_before": [1.0]},
        "routing": {"policies": {"round-robin": policy}, "comparison": {},
                    "config": {"workload": "no-sharing", "replicas": 2, "groups": 2, "concurrency": 2}},
        "engines": _engines_result(),
    }  # fmt: skip
    # With peers: a second row compares the targets' CPU in each phase.
    peers = {"vllm-router": {"gateway_cpu_us_per_request": 190.0, "gateway_cpu_us_per_chunk": 25.0}}
    results["overhead-peers"] = {
        "small": {**phase, "gateway_cpu_us_per_request": 380.0, "peers": peers},
        "stream": {**phase, "rate": None, "gateway_cpu_us_per_chunk": 33.0, "peers": peers},
        "load_average_before": [1.0],
    }
    assert plot.targets(results["overhead-peers"], "small", "gateway_cpu_us_per_request") == {
        "kubeinfer": 380.0,
        "vllm-router": 190.0,
    }
    for name, result in results.items():
        out = tmp_path / f"{name}.png"
        plot.plot(result, str(out))
        assert out.read_bytes().startswith(b"\x89PNG")
