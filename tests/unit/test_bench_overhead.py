"""`kubeinfer bench overhead`: result math, CPU from /proc stat, the static file, the echo replica, and a
smoke run of the whole benchmark at tiny scale (an echo fleet and a gateway process, about 5 s)."""

from __future__ import annotations

import itertools
import json
import os

import httpx
import pytest

from kubeinfer.cli import main
from kubeinfer.gateway.registry import StaticDiscovery
from kubeinfer.gateway.scrape import parse_metrics
from kubeinfer_devkit.bench import fleet, overhead
from kubeinfer_devkit.bench.overhead import (
    Sample,
    added,
    check_goals,
    per_unit_us,
    slot_schedule,
    summarize_phase,
)

# A real /proc/PID/stat line whose command name holds a space and a parenthesis.
STAT = (
    "4242 (python3 (x)) S 1 4242 4242 0 -1 4194560 12000 0 3 0 "
    "1234 567 0 0 20 0 5 0 12345 1000000 2500 18446744073709551615 1 1 0 0 0 0 0 16781312 17410 0 0 0 17 "
    "1 0 0 0 0 0"
)


def test_cpu_seconds_reads_utime_and_stime_after_the_command_name():
    assert fleet.cpu_seconds(STAT, 100) == pytest.approx((1234 + 567) / 100)


def test_process_cpu_seconds_of_this_process_grows():
    before = fleet.process_cpu_seconds(os.getpid())
    sum(i * i for i in range(300_000))
    assert fleet.process_cpu_seconds(os.getpid()) >= before


def test_added_latency_is_gateway_minus_direct_per_percentile():
    direct = {"p50": 1.0, "p90": 2.0, "p99": 4.0, "mean": 1.5}
    gateway = {"p50": 1.8, "p90": 3.0, "p99": 9.0, "mean": None}
    assert added(direct, gateway) == pytest.approx({"p50": 0.8, "p90": 1.0, "p99": 5.0, "mean": None})


def test_cpu_per_request():
    assert per_unit_us(0.5, 1000) == pytest.approx(500.0)
    assert per_unit_us(0.5, 0) is None


def test_slots_alternate_starting_direct_and_cover_the_duration():
    slots = slot_schedule(3.5, 1.0)
    assert [t for _, _, t in slots] == ["direct", "gateway", "direct", "gateway"]
    assert slots[0][0] == 0 and slots[-1][1] == 3.5
    assert all(a[1] == b[0] for a, b in itertools.pairwise(slots))


def test_request_body_has_the_size_asked_and_is_a_chat_request():
    for size, stream in ((1024, False), (200 * 1024, False), (300, True)):
        raw = overhead.request_body(size, stream=stream, max_tokens=16)
        assert len(raw) == size
        body = json.loads(raw)
        assert body["model"] == overhead.MODEL and body["stream"] is stream
        assert body["messages"][0]["role"] == "user"


def test_summarize_phase_figures():
    samples = [Sample("direct", 0, 0.001 * (i + 1)) for i in range(10)]
    samples += [Sample("gateway", 0, 0.002 * (i + 1)) for i in range(10)]
    samples.append(Sample("gateway", 0, 0.5, error="http_502"))
    samples[0].gaps, samples[10].gaps = [0.020, 0.020], [0.021, 0.022]
    samples[0].chunks, samples[10].chunks = 3, 3
    out = summarize_phase(samples, gateway_cpu_s=0.01, gateway_slot_s=1.0, client_cpu_s=0.1, wall_s=2.0)
    assert out["direct_p50_ms"] == pytest.approx(5.5) and out["gateway_p50_ms"] == pytest.approx(11.0)
    assert out["added_p50_ms"] == pytest.approx(5.5)
    assert out["added_itl_p50_ms"] == pytest.approx(1.5)
    assert out["gateway_cpu_us_per_request"] == pytest.approx(1000.0)  # 10 ms over 10 good requests
    assert out["gateway_cpu_us_per_chunk"] == pytest.approx(10000 / 3)
    assert out["gateway_cpu_util"] == pytest.approx(0.01) and out["client_cpu_util"] == pytest.approx(0.05)
    assert out["errors"] == {"gateway:http_502": 1}
    assert out["gateway"]["requests"] == 11 and out["gateway"]["ok"] == 10


def test_goals():
    router = {"gateway_cpu_us_per_request": {"value": 100, "kubeinfer": 180, "ratio_vs_kubeinfer": 100 / 180}}
    good = {
        "small": {"added_p50_ms": 0.25, "added_p99_ms": 0.9, "gateway_cpu_us_per_request": 180, "errors": {},
                  "vs_kubeinfer": {"vllm-router": router}},
        "stream": {"added_itl_p99_ms": 0.5, "gateway_cpu_us_per_chunk": 14},
    }  # fmt: skip
    assert all(check_goals(good).values())
    slow = {"vllm-router": {"gateway_cpu_us_per_request": {"ratio_vs_kubeinfer": 0.4}}}
    bad = {"small": {"added_p50_ms": 0.4, "added_p99_ms": 0.9, "gateway_cpu_us_per_request": 400,
                     "errors": {"gateway:x": 1}, "vs_kubeinfer": slow}}  # fmt: skip
    goals = check_goals(bad)
    assert goals["added_p50_ms<=0.3"] is False and goals["added_p99_ms<=1"] is True
    assert goals["cpu_us_per_request<=200"] is False and goals["cpu_per_request<=2x_vllm_router"] is False
    assert goals["stream_added_itl_p99_ms<=1"] is None and goals["stream_cpu_us_per_chunk<=15"] is None
    assert goals["no_errors"] is False
    assert check_goals({"small": {"added_p50_ms": 0.2}})["cpu_per_request<=2x_vllm_router"] is None


def test_static_config_is_a_valid_static_discovery_file():
    doc = fleet.static_config("m", ["127.0.0.1:1", "127.0.0.1:2"], "prefix-aware", max_num_seqs=8,
                              target_inflight=64, max_queue=1000)  # fmt: skip
    spec = StaticDiscovery.model_validate(doc)
    (model,) = spec.models
    assert model.endpoints == ["127.0.0.1:1", "127.0.0.1:2"] and model.max_num_seqs == 8
    assert model.routing.strategy == "prefix-aware" and model.routing.target_inflight == 64
    assert model.routing.max_queue == 1000
    assert "maxNumSeqs" not in fleet.static_config("m", [], "round-robin")["models"][0]


async def test_echo_upstream_answers_json_streams_and_metrics():
    app = fleet.EchoUpstream(chunk_interval_ms=0)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://echo") as client:
        r = await client.post(
            "/v1/chat/completions", content=overhead.request_body(500, stream=False, max_tokens=3)
        )
        assert r.json()["usage"]["completion_tokens"] == 3
        r = await client.post(
            "/v1/chat/completions", content=overhead.request_body(500, stream=True, max_tokens=4)
        )
        events = [line for line in r.text.split("\n\n") if line]
        assert len(events) == 4 + 2 and events[-1] == "data: [DONE]"
        assert json.loads(events[-2].removeprefix("data: "))["usage"]["completion_tokens"] == 4
        stats = parse_metrics((await client.get("/metrics")).text)
        assert stats.engine == "vllm" and (stats.running, stats.waiting) == (0, 0)
        assert (await client.get("/health")).status_code == 200
        assert (await client.get("/nope")).status_code == 404
    assert app.requests == 2


OVERHEAD_KEYS = {
    "direct_p50_ms", "gateway_p50_ms", "added_p50_ms", "added_p99_ms", "gateway_cpu_us_per_request",
    "errors", "goals", "config", "pinned", "small", "stream", "stream_added_itl_p99_ms",
}  # fmt: skip
PHASE_KEYS = {
    "direct", "gateway", "direct_p50_ms", "gateway_p50_ms", "direct_p99_ms", "gateway_p99_ms",
    "added_p50_ms", "added_p99_ms", "added_itl_p50_ms", "added_itl_p99_ms", "gateway_cpu_us_per_request",
    "gateway_cpu_us_per_chunk", "gateway_cpu_util", "client_cpu_us_per_request", "client_cpu_util",
    "send_lag_ms", "errors", "body_bytes",
}  # fmt: skip


def test_cli_overhead_smoke(capsys, tmp_path):
    """The whole benchmark at tiny scale: echo fleet and gateway processes, all phases, JSON keys."""
    rc = main(
        ["bench", "overhead", "--json", "--rate", "40", "--duration", "1", "--slot", "0.25",
         "--warmup", "0.1",
         "--large-rate", "10", "--large-duration", "0.5", "--large-body-bytes", "20000",
         "--stream-concurrency", "4", "--stream-tokens", "3", "--stream-interval-ms", "5",
         "--stream-duration", "1", "--stream-slot", "0.5"]
    )  # fmt: skip
    out = json.loads(capsys.readouterr().out)
    assert rc == 0, out["errors"]
    assert out.keys() >= OVERHEAD_KEYS
    for phase in ("small", "large", "stream"):
        assert out[phase].keys() >= PHASE_KEYS
        assert out[phase]["direct"]["ok"] > 0 and out[phase]["gateway"]["ok"] > 0
    assert out["large"]["body_bytes"] == 20000
    assert out["stream"]["gateway"]["itl_ms"]["p50"] is not None
    assert out["gateway_cpu_us_per_request"] > 0 and out["errors"] == {}


def test_variants_are_server_and_client_flags_of_the_gateway():
    assert overhead.variant_args("uvicorn+aiohttp") == ["--server", "uvicorn", "--upstream-client", "aiohttp"]
    assert overhead.variant_args("granian") == ["--server", "granian"]
    assert overhead.variant_name("uvicorn+aiohttp") == "kubeinfer[uvicorn+aiohttp]"
    for bad in ("nginx", "uvicorn+httpx", ""):
        with pytest.raises(ValueError, match="SERVER"):
            overhead.variant_args(bad)
    with pytest.raises(ValueError):
        overhead.OverheadConfig(variants=("uvicorn+curl",)).validate()


def test_cli_overhead_variant_smoke(capsys):
    """The earlier stack (uvicorn + aiohttp) as a target of its own beside kubeinfer's gateway, and
    kubeinfer's gateway on uvicorn: both serve, both are reported like peers."""
    rc = main(
        ["bench", "overhead", "--json", "--rate", "40", "--duration", "0.75", "--slot", "0.25",
         "--warmup", "0.1", "--phases", "small,stream", "--stream-concurrency", "2", "--stream-tokens", "3",
         "--stream-interval-ms", "5", "--stream-duration", "0.75", "--stream-slot", "0.25",
         "--gateway", "uvicorn", "--variants", "kubeinfer+aiohttp,floor"]
    )  # fmt: skip
    out = json.loads(capsys.readouterr().out)
    assert rc == 0, out["errors"]
    assert out["gateway"] == "uvicorn"
    name = "kubeinfer[kubeinfer+aiohttp]"
    assert out["peers"][name]["version"] == "kubeinfer+aiohttp"
    assert out["peers"]["floor (bare proxy)"]["version"] == "floor"
    for phase in ("small", "stream"):
        for target in (name, "floor (bare proxy)"):
            assert out[phase]["peers"][target][target]["ok"] > 0
            assert out[phase]["peers"][target]["errors"] == {}


def test_floor_proxy_relays_what_the_replica_answers():
    """The bare proxy under `--variants floor`: JSON and SSE bodies come back as the replica sent them,
    and it cannot stand in for the gateway itself."""
    replicas = fleet.start_fleet("echo", 2, {"chunk_interval_ms": 1})
    try:
        floor = fleet.start_floor(replicas.addresses)
        try:
            with httpx.Client(timeout=10) as http:
                for stream in (False, True):
                    body = overhead.request_body(300, stream=stream, max_tokens=5)
                    got = [http.post(f"{floor.url}/v1/chat/completions", content=body) for _ in range(2)]
                    want = http.post(f"{replicas.urls[0]}/v1/chat/completions", content=body)
                    for r in got:
                        assert r.status_code == 200
                        assert r.headers["content-type"] == want.headers["content-type"]
                        if stream:  # ids and timestamps differ per answer: compare the events' shape
                            assert r.text.count("data: ") == want.text.count("data: ") == 5 + 2
                            assert r.text.endswith("data: [DONE]\n\n")
                        else:
                            assert r.json()["usage"] == want.json()["usage"]
        finally:
            floor.stop()
    finally:
        replicas.stop()
    with pytest.raises(ValueError, match="SERVER"):
        overhead.OverheadConfig(gateway="floor").validate()
