"""Engine /metrics -> ReplicaStats, on real captures from vLLM 0.32 and llama-server."""

from __future__ import annotations

import dataclasses

import pytest

from kubeinfer.gateway.scrape import ReplicaStats, ScrapeError, parse_metrics, prefix_hit_rate
from tests.cases import FIXTURES


def _read(name: str) -> str:
    return (FIXTURES / name).read_text()


VLLM_IDLE = _read("vllm-0.32.0/metrics_idle.txt")
VLLM_LOAD = _read("vllm-0.32.0/metrics_under_load.txt")
VLLM_PREFIX = _read("vllm-0.32.0/metrics_after_prefix_hits.txt")
LLAMA_IDLE = _read("llama-server/metrics_idle.txt")
LLAMA_LOAD = _read("llama-server/metrics_under_load.txt")


def test_vllm_under_load():
    s = parse_metrics(VLLM_LOAD)
    assert s == ReplicaStats(
        engine="vllm",
        running=8,
        waiting=6,
        kv_cache_usage=pytest.approx(0.007814407814407787),
        prefix_cache_queries=1755,
        prefix_cache_hits=0,
        prompt_tokens_total=1755,
        generation_tokens_total=7446,
        block_size=128,
        kv_cache_bytes=1073741824,
    )


def test_vllm_idle():
    s = parse_metrics(VLLM_IDLE)
    assert (s.engine, s.running, s.waiting, s.kv_cache_usage) == ("vllm", 0, 0, 0.0)
    assert (s.prefix_cache_queries, s.prefix_cache_hits) == (2196, 0)
    assert (s.prompt_tokens_total, s.generation_tokens_total) == (2196, 10402)


def test_vllm_prefix_hits():
    s = parse_metrics(VLLM_PREFIX)
    assert (s.prefix_cache_queries, s.prefix_cache_hits) == (1452, 768)
    assert (s.prompt_tokens_total, s.generation_tokens_total) == (1452, 16)


def test_vllm_waiting_by_reason_is_not_added_to_waiting():
    # vllm:num_requests_waiting_by_reason also carries 6 (capacity); summing by family prefix would say 12.
    assert "vllm:num_requests_waiting_by_reason" in VLLM_LOAD
    assert parse_metrics(VLLM_LOAD).waiting == 6


def test_llama_server_under_load():
    s = parse_metrics(LLAMA_LOAD)
    # llama.cpp's prompt_tokens_total (41) excludes the 7 tokens reused from its cache: 41 + 7 = 48.
    assert s == ReplicaStats(
        engine="llama-server",
        running=4,
        waiting=4,
        kv_cache_usage=None,
        prefix_cache_queries=48,
        prefix_cache_hits=7,
        prompt_tokens_total=48,
        generation_tokens_total=16,
    )


def test_llama_server_idle():
    s = parse_metrics(LLAMA_IDLE)
    assert (s.engine, s.running, s.waiting) == ("llama-server", 0, 0)
    assert (s.prefix_cache_queries, s.prefix_cache_hits, s.prompt_tokens_total) == (68, 23, 68)
    assert s.generation_tokens_total == 4072
    assert (s.block_size, s.kv_cache_bytes) == (None, None)


def test_llama_server_older_kv_ratio_gauge():
    text = LLAMA_LOAD + "# TYPE llamacpp:kv_cache_usage_ratio gauge\nllamacpp:kv_cache_usage_ratio 0.25\n"
    assert parse_metrics(text).kv_cache_usage == 0.25


@pytest.mark.parametrize(
    ("text", "engine"), [(VLLM_LOAD, "vllm"), (VLLM_IDLE, "vllm"), (LLAMA_LOAD, "llama-server")]
)
def test_engine_given_matches_detected(text, engine):
    assert parse_metrics(text, engine) == parse_metrics(text)
    assert parse_metrics(text).engine == engine


@pytest.mark.parametrize(("text", "wrong"), [(VLLM_LOAD, "llama-server"), (LLAMA_LOAD, "vllm")])
def test_wrong_engine_is_an_error_not_zero_load(text, wrong):
    with pytest.raises(ScrapeError, match="missing"):
        parse_metrics(text, wrong)


def _strip_type_lines(text: str) -> str:
    return "".join(line for line in text.splitlines(keepends=True) if not line.startswith("#"))


@pytest.mark.parametrize("text", [VLLM_LOAD, LLAMA_LOAD, LLAMA_IDLE])
def test_same_result_without_type_lines(text):
    # Without `# TYPE` the parser keeps counters as untyped series named with their `_total`.
    assert parse_metrics(_strip_type_lines(text)) == parse_metrics(text)


def _two_engines(text: str) -> str:
    """The capture as a data-parallel vLLM would print it: every engine="0" series again as engine="1"."""
    second = [
        line.replace('engine="0"', 'engine="1"')
        for line in text.splitlines(keepends=True)
        if 'engine="0"' in line
    ]
    return text + "".join(second)


def test_vllm_sums_over_engines():
    s = parse_metrics(_two_engines(VLLM_LOAD))
    assert (s.running, s.waiting) == (16, 12)
    assert (s.prefix_cache_queries, s.prefix_cache_hits) == (3510, 0)
    assert (s.prompt_tokens_total, s.generation_tokens_total) == (3510, 14892)
    assert s.kv_cache_bytes == 2 * 1073741824
    assert s.block_size == 128
    # A fraction is averaged, not summed.
    assert s.kv_cache_usage == pytest.approx(0.007814407814407787)


def test_kv_usage_averages_distinct_engines():
    text = (
        'vllm:num_requests_running{engine="0"} 1\nvllm:num_requests_running{engine="1"} 2\n'
        'vllm:num_requests_waiting{engine="0"} 0\nvllm:num_requests_waiting{engine="1"} 3\n'
        'vllm:kv_cache_usage_perc{engine="0"} 0.2\nvllm:kv_cache_usage_perc{engine="1"} 0.6\n'
    )
    s = parse_metrics(text)
    assert (s.running, s.waiting) == (3, 3)
    assert s.kv_cache_usage == pytest.approx(0.4)
    assert s.prefix_cache_queries is None and s.prompt_tokens_total is None and s.block_size is None


def test_kv_usage_out_of_range_or_nan():
    base = "vllm:num_requests_running 0\nvllm:num_requests_waiting 0\n"
    assert parse_metrics(base + "vllm:kv_cache_usage_perc 1.5\n").kv_cache_usage == 1.0
    assert parse_metrics(base + "vllm:kv_cache_usage_perc NaN\n").kv_cache_usage is None
    assert parse_metrics(base + "vllm:num_requests_running NaN\n").running == 0


def test_cache_config_unset_values():
    # vLLM prints an unset field as "None".
    text = (
        "vllm:num_requests_running 0\nvllm:num_requests_waiting 0\n"
        'vllm:cache_config_info{block_size="None"} 1\n'
    )
    s = parse_metrics(text)
    assert (s.block_size, s.kv_cache_bytes) == (None, None)


@pytest.mark.parametrize(
    "text",
    [
        "<html><body>502 Bad Gateway</body></html>",
        "not metrics at all",
        'vllm:num_requests_running{engine="0} 1\n',
        "vllm:num_requests_running one\n",
    ],
)
def test_malformed_text(text):
    with pytest.raises(ScrapeError, match="malformed"):
        parse_metrics(text)


@pytest.mark.parametrize("text", ["", "# HELP x y\n", "python_gc_objects_collected_total 3\n"])
def test_not_an_engine(text):
    with pytest.raises(ScrapeError, match="not a known engine"):
        parse_metrics(text)


def test_scrape_error_is_a_value_error():
    assert issubclass(ScrapeError, ValueError)


def test_stats_are_frozen():
    s = parse_metrics(VLLM_IDLE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.running = 3  # type: ignore[misc]


# prefix_hit_rate


def _stats(queries: int | None, hits: int | None) -> ReplicaStats:
    return ReplicaStats(
        engine="vllm", running=0, waiting=0, prefix_cache_queries=queries, prefix_cache_hits=hits
    )


def test_hit_rate_over_the_delta():
    assert prefix_hit_rate(_stats(1000, 100), _stats(1400, 400)) == pytest.approx(0.75)


def test_hit_rate_llama_server_captures():
    # under_load was captured first, idle after: 16 more cached tokens of 20 more prompt tokens.
    assert prefix_hit_rate(parse_metrics(LLAMA_LOAD), parse_metrics(LLAMA_IDLE)) == pytest.approx(16 / 20)


def test_hit_rate_after_a_restart_uses_the_new_counters():
    # idle (2196 queries) and after_prefix_hits (1452) are two vLLM processes: the counter went down.
    prev, cur = parse_metrics(VLLM_IDLE), parse_metrics(VLLM_PREFIX)
    assert prefix_hit_rate(prev, cur) == pytest.approx(768 / 1452)


def test_hit_rate_reset_detected_on_hits_alone():
    assert prefix_hit_rate(_stats(100, 50), _stats(120, 10)) == pytest.approx(10 / 120)


def test_hit_rate_none_without_new_queries():
    s = parse_metrics(VLLM_PREFIX)
    assert prefix_hit_rate(s, s) is None
    assert prefix_hit_rate(_stats(5, 5), _stats(0, 0)) is None  # restarted and nothing since


@pytest.mark.parametrize(
    ("prev", "cur"), [((None, None), (10, 5)), ((10, 5), (20, None)), ((10, None), (20, 8))]
)
def test_hit_rate_none_without_counters(prev, cur):
    assert prefix_hit_rate(_stats(*prev), _stats(*cur)) is None


def test_hit_rate_zero_and_clamped():
    assert prefix_hit_rate(_stats(10, 0), _stats(30, 0)) == 0.0
    assert prefix_hit_rate(_stats(10, 0), _stats(12, 5)) == 1.0  # scraped between the two increments
