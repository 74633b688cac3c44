"""The simulator's /metrics: vLLM 0.32's metric families, names, HELP texts and buckets.

Gauges and counters are read off the engine at scrape time (:class:`_EngineCollector`); the
histograms are observed by the engine loop once per step (:meth:`Metrics.on_step`) and per new
request (:meth:`Metrics.on_add`). Names and buckets follow a real vLLM 0.32 capture
(tests/fixtures/vllm-0.32.0).
"""

from __future__ import annotations

import math
import time
from bisect import bisect_left
from collections.abc import Iterable

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

from kubeinfer_devkit.sim.model import Engine, Step

KV_BYTES_PER_TOKEN = 131072
"""Llama-3-8B in fp16: 32 layers x 8 KV heads x 128 dims x 2 (K and V) x 2 bytes; for cache_config_info."""

_LABELS = ["engine", "model_name"]  # sorted, as vLLM's exposition prints them

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0)  # fmt: skip
_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                    240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip
_ITERATION_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
_PREEMPTION_BUCKETS = (1, 2, 3, 4, 5, 10, 20)


def _one_two_five(limit: int) -> list[float]:
    """vLLM's token-count buckets: 1, 2, 5, 10, 20, 50, ... up to max_model_len."""
    out: list[float] = []
    scale = 1
    while True:
        for m in (1, 2, 5):
            if m * scale > limit:
                return out
            out.append(float(m * scale))
        scale *= 10


_HELP = {  # vLLM 0.32's HELP texts
    "vllm:num_requests_running": "Number of requests in model execution batches.",
    "vllm:num_requests_waiting": "Number of requests waiting to be processed.",
    "vllm:num_requests_waiting_by_reason": "Number of waiting requests by reason. Reason labels: "
    "'capacity' = waiting for scheduling capacity; 'deferred' = deferred by transient constraints (LoRA "
    "budget, KV transfer, blocked status). Sum of all reasons equals vllm:num_requests_waiting.",
    "vllm:kv_cache_usage_perc": "KV-cache usage. 1 means 100 percent usage.",
    "vllm:prefix_cache_queries": "Prefix cache queries, in terms of number of queried tokens.",
    "vllm:prefix_cache_hits": "Prefix cache hits, in terms of number of cached tokens.",
    "vllm:num_preemptions": "Cumulative number of preemption from the engine.",
    "vllm:prompt_tokens": "Number of prefill tokens processed.",
    "vllm:prompt_tokens_by_source": "Number of prompt tokens by source.",
    "vllm:prompt_tokens_cached": "Number of cached prompt tokens (local + external).",
    "vllm:generation_tokens": "Number of generation tokens processed.",
    "vllm:request_success": "Count of successfully processed requests.",
    "vllm:cache_config_info": "Information of the LLMEngine CacheConfig",
}


class _EngineCollector(Collector):
    """Gauges and counters read off the engine at scrape time: nothing to update on the hot path."""

    def __init__(self, engine: Engine, model: str) -> None:
        self.engine, self.model = engine, model
        self.created = time.time()

    def collect(self) -> Iterable[Metric]:
        e, lv, created = self.engine, ["0", self.model], self.created
        cfg = e.config
        gauges = (
            ("vllm:num_requests_running", e.num_running),
            ("vllm:num_requests_waiting", e.num_waiting),
            ("vllm:kv_cache_usage_perc", e.kv_usage()),
        )
        for name, value in gauges:
            family = GaugeMetricFamily(name, _HELP[name], labels=_LABELS)
            family.add_metric(lv, value)
            yield family
        name = "vllm:num_requests_waiting_by_reason"
        family = GaugeMetricFamily(name, _HELP[name], labels=[*_LABELS, "reason"])
        family.add_metric([*lv, "capacity"], e.num_waiting)
        family.add_metric([*lv, "deferred"], 0)
        yield family
        counters = (
            ("vllm:prefix_cache_queries", e.prefix_queries),
            ("vllm:prefix_cache_hits", e.prefix_hits),
            ("vllm:num_preemptions", e.preemptions),
            ("vllm:prompt_tokens", e.prompt_tokens),
            ("vllm:prompt_tokens_cached", e.prompt_tokens_cached),
            ("vllm:generation_tokens", e.generation_tokens),
        )
        for name, value in counters:
            counter = CounterMetricFamily(name, _HELP[name], labels=_LABELS)
            counter.add_metric(lv, value, created=created)
            yield counter
        name = "vllm:prompt_tokens_by_source"
        counter = CounterMetricFamily(name, _HELP[name], labels=[*_LABELS, "source"])
        computed = e.prompt_tokens - e.prompt_tokens_cached
        for source, value in (("local_compute", computed), ("local_cache_hit", e.prompt_tokens_cached),
                              ("external_kv_transfer", 0)):  # fmt: skip
            counter.add_metric([*lv, source], value, created=created)
        yield counter
        name = "vllm:request_success"
        counter = CounterMetricFamily(name, _HELP[name], labels=["engine", "finished_reason", "model_name"])
        for reason, value in e.finished.items():
            counter.add_metric(["0", reason, self.model], value, created=created)
        yield counter
        # vLLM's info gauge carries no model_name, only engine.
        info = {
            "block_size": str(cfg.block_size),
            "cache_dtype": "auto",
            "enable_prefix_caching": "True",
            "engine": "0",
            "gpu_memory_utilization": "0.9",
            "is_attention_free": "False",
            "kv_cache_memory_bytes": str(cfg.num_blocks * cfg.block_size * KV_BYTES_PER_TOKEN),
            "kv_cache_size_tokens": str(cfg.num_blocks * cfg.block_size),
            "num_cpu_blocks": "None",
            "num_gpu_blocks": str(cfg.num_blocks),
            "sliding_window": "None",
        }
        family = GaugeMetricFamily(
            "vllm:cache_config_info", _HELP["vllm:cache_config_info"], labels=list(info)
        )
        family.add_metric(list(info.values()), 1.0)
        yield family


# Histograms: key, name, HELP (vLLM's), buckets ("tokens": 1-2-5 steps up to max_model_len, as vLLM's).
_HISTOGRAMS: tuple[tuple[str, str, str, tuple[float, ...] | str], ...] = (
    ("prompt", "vllm:request_prompt_tokens", "Number of prefill tokens processed.", "tokens"),
    ("generation", "vllm:request_generation_tokens", "Number of generation tokens processed.", "tokens"),
    ("iteration", "vllm:iteration_tokens_total", "Histogram of number of tokens per engine_step.",
     _ITERATION_BUCKETS),
    ("max_generation", "vllm:request_max_num_generation_tokens",
     "Histogram of maximum number of requested generation tokens.", "tokens"),
    ("max_tokens", "vllm:request_params_max_tokens", "Histogram of the max_tokens request parameter.",
     "tokens"),
    ("ttft", "vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
     _TTFT_BUCKETS),
    ("itl", "vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", _ITL_BUCKETS),
    ("tpot", "vllm:request_time_per_output_token_seconds",
     "Histogram of time_per_output_token_seconds per request.", _ITL_BUCKETS),
    ("e2e", "vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
     _LATENCY_BUCKETS),
    ("queue", "vllm:request_queue_time_seconds", "Histogram of time spent in WAITING phase for request.",
     _LATENCY_BUCKETS),
    ("inference", "vllm:request_inference_time_seconds",
     "Histogram of time spent in RUNNING phase for request.", _LATENCY_BUCKETS),
    ("prefill", "vllm:request_prefill_time_seconds", "Histogram of time spent in PREFILL phase for request.",
     _LATENCY_BUCKETS),
    ("decode", "vllm:request_decode_time_seconds", "Histogram of time spent in DECODE phase for request.",
     _LATENCY_BUCKETS),
    ("preemptions", "vllm:request_num_preemptions",
     "Histogram of the number of times a request was preempted.", _PREEMPTION_BUCKETS),
    ("kv_computed", "vllm:request_prefill_kv_computed_tokens",
     "Histogram of new KV tokens computed during prefill (excluding cached tokens).", "tokens"),
)  # fmt: skip


class _Histogram:
    """A histogram without labels or locks: the engine loop is its only writer, and observing one is a
    bisect and two additions (prometheus_client's Histogram costs several times that, once per token)."""

    __slots__ = ("bounds", "counts", "doc", "name", "sum")

    def __init__(self, name: str, doc: str, bounds: tuple[float, ...]) -> None:
        self.name, self.doc, self.bounds = name, doc, bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # `le` is inclusive: bisect_left
        self.sum += value

    def family(self, labels: list[str], values: list[str], created: float) -> HistogramMetricFamily:
        family = HistogramMetricFamily(self.name, self.doc, labels=labels)
        cumulative, buckets = 0, []
        for bound, count in zip((*self.bounds, math.inf), self.counts, strict=True):
            cumulative += count
            buckets.append(("+Inf" if bound == math.inf else repr(bound), float(cumulative)))
        family.add_metric(values, buckets, self.sum)
        # The `_created` sample, which prometheus_client renders as a gauge of its own, as vLLM's has.
        family.samples.append(Sample(f"{self.name}_created", dict(zip(labels, values, strict=True)), created))
        return family


class Metrics(Collector):
    """vLLM's metric families, read at scrape time from the engine's counters and these histograms."""

    def __init__(self, registry: CollectorRegistry, engine: Engine, model: str) -> None:
        registry.register(_EngineCollector(engine, model))
        self.model, self.created = model, time.time()
        tokens = tuple(_one_two_five(engine.config.max_model_len))
        self.h = {
            key: _Histogram(name, doc, tokens if bounds == "tokens" else tuple(map(float, bounds)))
            for key, name, doc, bounds in _HISTOGRAMS
        }
        self.ttft, self.itl, self.iteration = self.h["ttft"], self.h["itl"], self.h["iteration"]
        registry.register(self)

    def collect(self) -> Iterable[Metric]:
        for hist in self.h.values():
            yield hist.family(_LABELS, ["0", self.model], self.created)

    def on_add(self, requested_max_tokens: int) -> None:
        self.h["max_tokens"].observe(requested_max_tokens)
        self.h["max_generation"].observe(requested_max_tokens)

    def on_step(self, step: Step, now: float) -> None:
        self.iteration.observe(step.num_tokens)
        ttft, itl = self.ttft, self.itl
        for seq in step.emitted:
            if seq.output == 1:
                ttft.observe(now - seq.arrival)
            elif seq.prev_token_at is not None:
                itl.observe(now - seq.prev_token_at)
        h = self.h
        for seq in step.finished:
            first = seq.first_token_at if seq.first_token_at is not None else now
            scheduled = seq.scheduled_at if seq.scheduled_at is not None else seq.arrival
            h["prompt"].observe(seq.num_prompt)
            h["generation"].observe(seq.output)
            h["e2e"].observe(now - seq.arrival)
            h["queue"].observe(scheduled - seq.arrival)
            h["inference"].observe(now - scheduled)
            h["prefill"].observe(first - scheduled)
            h["decode"].observe(now - first)
            if seq.output > 1:
                h["tpot"].observe((now - first) / (seq.output - 1))
            h["preemptions"].observe(seq.preemptions)
            h["kv_computed"].observe(seq.prefill_computed)
