"""`--peers` of `kubeinfer bench overhead` and `routing`: the pure parts (LiteLLM's config, vllm-router's
command line, ratios and tables, the reporting of a peer that failed). No network, no peer installed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kubeinfer_devkit.bench import peers, routing
from kubeinfer_devkit.bench.overhead import Sample, peer_view, slot_schedule, slot_seconds, summarize_phase

URLS = ["http://127.0.0.1:8001", "http://127.0.0.1:8002/"]


def test_litellm_config_balances_one_model_name_over_every_replica():
    cfg = peers.litellm_config("echo", URLS)
    assert [m["model_name"] for m in cfg["model_list"]] == ["echo", "echo"]
    params = [m["litellm_params"] for m in cfg["model_list"]]
    assert [p["api_base"] for p in params] == ["http://127.0.0.1:8001/v1", "http://127.0.0.1:8002/v1"]
    assert all(p["model"] == "openai/echo" for p in params)
    settings = cfg["litellm_settings"]
    assert settings["drop_params"] is True and settings["telemetry"] is False
    assert settings["success_callback"] == [] and settings["num_retries"] == 0
    assert cfg["general_settings"]["disable_spend_logs"] is True


def test_litellm_argv_and_environment():
    argv = peers.litellm_argv("/v/bin/litellm", "/tmp/c.yaml", 4000)
    assert argv[:3] == ["/v/bin/litellm", "--config", "/tmp/c.yaml"]
    assert argv[argv.index("--port") + 1] == "4000" and argv[argv.index("--num_workers") + 1] == "1"
    assert peers.LITELLM_ENV["LITELLM_LOCAL_MODEL_COST_MAP"] == "True"


def test_vllm_router_argv():
    argv = peers.vllm_router_argv("/v/bin/vllm-router", URLS, 30000, policy="cache_aware", metrics_port=30001)
    i = argv.index("--worker-urls")
    assert argv[i + 1 : i + 3] == URLS
    assert argv[argv.index("--policy") + 1] == "cache_aware"
    assert argv[argv.index("--port") + 1] == "30000" and argv[argv.index("--host") + 1] == "127.0.0.1"
    assert argv[argv.index("--prometheus-port") + 1] == "30001"
    with pytest.raises(ValueError):
        peers.vllm_router_argv("x", URLS, 1, policy="prefix-aware")


def test_parse_peers():
    assert peers.parse_peers(None) == ()
    assert peers.parse_peers("vllm-router, litellm,vllm-router") == ("vllm-router", "litellm")
    with pytest.raises(ValueError, match="unknown peers"):
        peers.parse_peers("nginx")


def test_peer_dir_is_under_the_cache_and_versioned(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    spec = peers.PEERS["vllm-router"]
    assert peers.peer_dir(spec) == tmp_path / "kubeinfer" / "peers" / f"vllm-router-{spec.version}"
    assert "==" in spec.requirement


def test_an_installed_peer_is_reused_without_running_anything(tmp_path):
    spec = peers.PEERS["litellm"]
    venv = peers.peer_dir(spec, tmp_path)
    venv.mkdir(parents=True)
    (venv / peers.MARKER).write_text(spec.requirement + "\n")
    assert peers.ensure_installed(spec, tmp_path, python="/nonexistent/python") == venv
    assert peers.installed_version(venv, spec) == spec.version


def test_a_failed_install_is_an_error_entry_not_a_missing_peer(tmp_path):
    # No interpreter at that path: the install fails at once, offline, and nothing is left behind.
    spec = peers.PEERS["vllm-router"]
    with pytest.raises(peers.PeerError, match="nonexistent"):
        peers.ensure_installed(spec, tmp_path, python=str(tmp_path / "nonexistent" / "python"))
    assert not peers.peer_dir(spec, tmp_path).exists()
    entry = peers.peer_error("vllm-router", peers.PeerError("pip exited 1: no matching distribution"),
                             stage="install")  # fmt: skip
    assert entry == {
        "error": "install failed: pip exited 1: no matching distribution", "stage": "install",
        "version": spec.version,
    }  # fmt: skip


def test_prepare_reports_each_failure(tmp_path, monkeypatch):
    def fail(spec, root=None, **kw):
        raise peers.PeerError(f"{spec.name} broke")

    monkeypatch.setattr(peers, "ensure_installed", fail)
    said: list[str] = []
    ready, failed = peers.prepare(["vllm-router", "litellm"], on_step=said.append, root=tmp_path)
    assert ready == {} and set(failed) == {"vllm-router", "litellm"}
    assert failed["litellm"]["error"] == "install failed: litellm broke"
    assert len(said) == 2


def test_tail_keeps_the_last_lines_cut_short():
    text = "\n".join(f"line {i}" for i in range(20)) + "\n" + "x" * 1000
    tail = peers._tail(text)
    assert tail.splitlines()[0] == "line 15" and len(tail.splitlines()[-1]) == 300


def test_tree_cpu_includes_this_process():
    assert peers.tree_cpu_seconds(os.getpid()) >= 0.0
    assert isinstance(peers.children(os.getpid()), list)
    assert peers.tree_cpu_seconds(2**22 + 12345) == 0.0  # no such process


def test_ratio():
    assert peers.ratio(2.0, 5.0) == pytest.approx(2.5)
    assert peers.ratio(None, 1.0) is None and peers.ratio(0.0, 1.0) is None and peers.ratio(1.0, None) is None
    # An added latency at or below the noise floor, or negative, gives no ratio.
    assert peers.ratio(-0.6, 84.0, 0.1) is None and peers.ratio(0.02, 0.3, 0.1) is None
    assert peers.ratio(1.2, -1.2, 0.1) is None and peers.ratio(1.2, 2.4, 0.1) == pytest.approx(2.0)


def test_slots_cycle_through_every_target():
    slots = slot_schedule(8.0, 1.0, ("direct", "gateway", "vllm-router", "litellm"))
    assert [t for _, _, t in slots[:5]] == ["direct", "gateway", "vllm-router", "litellm", "direct"]
    assert slot_seconds(slots) == {"direct": 2.0, "gateway": 2.0, "vllm-router": 2.0, "litellm": 2.0}


def test_a_peer_is_summarized_against_the_same_direct_samples():
    samples = [Sample("direct", 0, 0.001) for _ in range(10)]
    samples += [Sample("gateway", 0, 0.002) for _ in range(10)]
    samples += [Sample("vllm-router", 0, 0.0015) for _ in range(10)]
    view = peer_view(samples, "vllm-router")
    assert sorted({s.target for s in view}) == ["direct", "gateway"] and len(view) == 20
    assert samples[20].target == "vllm-router"  # relabelled copies, not the originals
    out = summarize_phase(view, gateway_cpu_s=0.001, gateway_slot_s=1.0, client_cpu_s=0.0, wall_s=1.0)
    assert out["added_p50_ms"] == pytest.approx(0.5)
    assert out["gateway_cpu_us_per_request"] == pytest.approx(100.0)


def _phase() -> dict[str, object]:
    return {
        "added_p50_ms": 0.4, "added_p99_ms": 2.0, "gateway_cpu_us_per_request": 200.0,
        "added_itl_p99_ms": None, "gateway_cpu_us_per_chunk": None,
        "peers": {
            "vllm-router": {"added_p50_ms": 0.2, "added_p99_ms": 1.0, "gateway_cpu_us_per_request": 50.0},
            "litellm": {"added_p50_ms": 4.0, "added_p99_ms": 30.0, "gateway_cpu_us_per_request": 2000.0},
        },
    }  # fmt: skip


def test_overhead_comparison_values_and_ratios():
    phase = _phase()
    cmp = peers.overhead_comparison(phase, {**phase["peers"], "broken": {"error": "start failed: x"}})  # type: ignore[dict-item]
    assert cmp["vllm-router"]["gateway_cpu_us_per_request"] == {
        "value": 50.0, "kubeinfer": 200.0, "ratio_vs_kubeinfer": 0.25,
    }  # fmt: skip
    assert cmp["litellm"]["added_p99_ms"]["ratio_vs_kubeinfer"] == pytest.approx(15.0)
    assert "added_itl_p99_ms" not in cmp["litellm"]  # measured by nobody in this phase
    assert cmp["broken"] == {"error": "start failed: x"}


def test_overhead_peer_tables_show_values_ratios_and_errors():
    result = {
        "small": _phase(),
        "peers": {"vllm-router": {"version": "0.1.17"}, "litellm": {"version": "1.100.0"},
                  "other": {"error": "install failed: no network"}},
    }  # fmt: skip
    text = peers.format_overhead_peers(result)
    assert "| kubeinfer" in text and "50.0 (0.25x)" in text and "2000.0 (10.00x)" in text
    assert "other: install failed: no network" in text
    assert peers.format_overhead_peers({"small": _phase()}) == ""


def test_format_table_is_markdown():
    text = peers.format_table(["a", "bb"], [["1", "2"], ["333", "4"]])
    assert text.splitlines() == ["| a   | bb |", "| --- | -- |", "| 1   | 2  |", "| 333 | 4  |"]


def test_routing_peer_rows_and_report():
    assert routing.peer_policies(["vllm-router"]) == [
        ("vllm-router/cache_aware", "vllm-router", "cache_aware"),
        ("vllm-router/round_robin", "vllm-router", "round_robin"),
    ]
    text = peers.format_routing_peers({"peers": {
        "vllm-router": {"version": "0.1.17", "policies": ["vllm-router/cache_aware"]},
        "litellm": {"error": "start failed: litellm did not start (exited 1)"},
    }})  # fmt: skip
    assert "vllm-router 0.1.17: policies vllm-router/cache_aware" in text
    assert "litellm: start failed" in text


def test_routing_table_has_peer_rows_and_p99():
    row = {"mean_ttft_ms": 10.0, "p90_ttft_ms": 20.0, "p99_ttft_ms": 30.0, "output_tok_s": 100.0,
           "success_rate": 1.0, "prefix_cache_hit_rate": None, "imbalance": None,
           "groups_on_several_replicas": None}  # fmt: skip
    result = {
        "config": {"workload": "shared-prefix", "replicas": 2, "requests": 4, "concurrency": 2, "groups": 2,
                   "system_prompt_len": 10, "num_blocks": 8},
        "load_average_before": None, "load_average_after": None, "cached_ttft_ms": None,
        "rr_p90_ttft_over_cached": None, "comparison": {},
        "policies": {"round-robin": row, "vllm-router/cache_aware": row},
        "peers": {"vllm-router": {"version": "0.1.17", "policies": ["vllm-router/cache_aware"]}},
    }  # fmt: skip
    text = routing.format_routing(result)
    assert "vllm-router/cache_aware" in text and "p99 TTFT" in text and "30.0" in text


def test_configs_reject_unknown_peers():
    with pytest.raises(ValueError, match="unknown peers"):
        routing.RoutingConfig(peers=("haproxy",)).validate()
    from kubeinfer_devkit.bench.overhead import OverheadConfig

    with pytest.raises(ValueError, match="unknown peers"):
        OverheadConfig(peers=("haproxy",)).validate()


def test_cache_root_defaults_to_home(monkeypatch):
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert peers.cache_root() == Path.home() / ".cache" / "kubeinfer" / "peers"
