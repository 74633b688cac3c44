"""Read an engine's Prometheus /metrics into the few numbers the gateway routes on.

Pure: text in, `ReplicaStats` out; fetching the text is the caller's business.

Parsing is `prometheus_client`'s. That parser names a counter's *family* without its `_total` suffix
(`# TYPE vllm:prefix_cache_queries_total counter` gives family `vllm:prefix_cache_queries`) but keeps the
suffix on the *samples* (and appends it to a counter sample that lacks it), while an untyped series keeps
whatever name it was written with. Sample names are therefore the one spelling that is the same with and
without `# TYPE` lines, so everything below is looked up by sample name, e.g. `vllm:prompt_tokens_total`.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from prometheus_client.parser import text_string_to_metric_families

EngineName = Literal["vllm", "llama-server"]

_PREFIXES: Mapping[str, EngineName] = {"vllm:": "vllm", "llamacpp:": "llama-server"}


class ScrapeError(ValueError):
    """The /metrics text is not Prometheus exposition, or not an engine we know."""


@dataclass(frozen=True)
class ReplicaStats:
    """One scrape of one replica. Counters are cumulative since the engine started; None = not exported.

    Token counters mean the same on both engines: `prompt_tokens_total` counts every prompt token,
    computed or served from the prefix cache; `prefix_cache_queries`/`prefix_cache_hits` count prompt
    tokens looked up in / found in that cache.
    """

    engine: EngineName
    running: int
    """Requests being decoded now (vLLM num_requests_running, llama.cpp requests_processing)."""
    waiting: int
    """Requests queued inside the engine (vLLM num_requests_waiting, llama.cpp requests_deferred)."""
    kv_cache_usage: float | None = None
    """Fraction of the KV cache in use, 0..1 (mean over vLLM's engines)."""
    prefix_cache_queries: int | None = None
    prefix_cache_hits: int | None = None
    prompt_tokens_total: int | None = None
    generation_tokens_total: int | None = None
    block_size: int | None = None
    """KV cache block size in tokens (vllm:cache_config_info)."""
    kv_cache_bytes: int | None = None
    """KV cache memory, summed over engines (vllm:cache_config_info kv_cache_memory_bytes)."""
    running_adapters: frozenset[str] = frozenset()
    """LoRA adapters of the requests running now (vllm:lora_requests_info): in the GPU's adapter
    slots, so another request for one of them costs no adapter swap."""
    loaded_adapters: frozenset[str] | None = None
    """LoRA adapters the replica serves (vLLM's /v1/models, read beside /metrics); None: not read."""


def parse_metrics(text: str, engine: EngineName | None = None) -> ReplicaStats:
    """Parse one /metrics body. `engine` is detected from the metric names when not given.

    Samples of one name are summed over their label sets: a vLLM server with several engines (data
    parallel) labels each `engine="N"`, and the replica's load is their total.
    Raises ScrapeError on text that does not parse or lacks the engine's running/waiting gauges (a load
    silently read as 0 would pull every request onto a broken replica).
    """
    names: set[str] = set()
    sums: dict[str, float] = defaultdict(float)
    kv_usage: list[float] = []
    info: list[Mapping[str, str]] = []
    lora: tuple[float, Mapping[str, str]] | None = None
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                names.add(sample.name)
                if sample.name == "vllm:cache_config_info":
                    info.append(sample.labels)
                elif sample.name == "vllm:lora_requests_info":
                    # One series per label set ever seen, valued with the time it was last set: the
                    # newest is the current state.
                    if lora is None or sample.value >= lora[0]:
                        lora = (sample.value, sample.labels)
                elif sample.name in ("vllm:kv_cache_usage_perc", "llamacpp:kv_cache_usage_ratio"):
                    kv_usage.append(sample.value)  # a fraction; averaged, not summed
                elif not math.isnan(sample.value):
                    sums[sample.name] += sample.value
    except ValueError as e:  # the parser raises ValueError (or subclasses) on any malformed line
        raise ScrapeError(f"malformed Prometheus text: {e}") from e

    engine = engine or _detect(names)
    if engine == "vllm":
        running, waiting = "vllm:num_requests_running", "vllm:num_requests_waiting"
    else:
        running, waiting = "llamacpp:requests_processing", "llamacpp:requests_deferred"
    missing = [name for name in (running, waiting) if name not in sums]
    if missing:
        raise ScrapeError(f"not {engine} metrics: missing {', '.join(missing)}")
    bad = [f"{name}={sums[name]}" for name in (running, waiting) if not 0 <= sums[name] < math.inf]
    if bad:  # a negative or infinite load is no load reading either
        raise ScrapeError(f"not {engine} metrics: {', '.join(bad)}")

    def counter(name: str) -> int | None:
        # A counter that is negative or summed past a float's range is as good as not exported.
        return int(sums[name]) if name in sums and 0 <= sums[name] < math.inf else None

    if engine == "vllm":
        queries, hits = counter("vllm:prefix_cache_queries_total"), counter("vllm:prefix_cache_hits_total")
        prompt, generation = counter("vllm:prompt_tokens_total"), counter("vllm:generation_tokens_total")
    else:
        # llama.cpp's prompt counter excludes the tokens its slot cache reused; add them back so that
        # prompt_tokens_total and the prefix-cache counters mean what vLLM's do.
        computed, hits = (
            counter("llamacpp:prompt_tokens_total"),
            counter("llamacpp:prompt_tokens_cached_total"),
        )
        prompt = computed + hits if computed is not None and hits is not None else computed
        queries = prompt if hits is not None else None
        generation = counter("llamacpp:tokens_predicted_total")

    usage = [u for u in kv_usage if not math.isnan(u)]
    return ReplicaStats(
        engine=engine,
        running=int(sums[running]),
        waiting=int(sums[waiting]),
        kv_cache_usage=min(1.0, max(0.0, sum(usage) / len(usage))) if usage else None,
        prefix_cache_queries=queries,
        prefix_cache_hits=hits,
        prompt_tokens_total=prompt,
        generation_tokens_total=generation,
        block_size=next((b for b in (_int_label(i, "block_size") for i in info) if b is not None), None),
        kv_cache_bytes=_sum_labels(info, "kv_cache_memory_bytes"),
        running_adapters=_names(lora[1].get("running_lora_adapters", "")) if lora else frozenset(),
    )


def _names(text: str) -> frozenset[str]:
    return frozenset(n.strip() for n in text.split(",") if n.strip())


def listed_adapters(models: object, base: str | None = None) -> dict[str, str]:
    """The LoRA adapters in a vLLM /v1/models answer, name -> the path it was loaded from (`root`):
    the entries that name a parent model (the base model has none), of `base` if given. Anything
    unexpected reads as no adapters."""
    data = models.get("data") if isinstance(models, dict) else None
    out = {}
    for item in data if isinstance(data, list) else []:
        if not isinstance(item, dict):
            continue
        parent, name = item.get("parent"), item.get("id")
        if isinstance(parent, str) and parent and isinstance(name, str) and (base is None or parent == base):
            out[name] = str(item.get("root") or "")
    return out


def loaded_adapters(models: object, base: str | None = None) -> frozenset[str]:
    """The names of :func:`listed_adapters`."""
    return frozenset(listed_adapters(models, base))


def prefix_hit_rate(prev: ReplicaStats, cur: ReplicaStats) -> float | None:
    """Share of prompt tokens served from the prefix cache between two scrapes of one replica.

    None when either scrape lacks the counters or no tokens were looked up in between. A counter that
    went down means the engine restarted; its current value is then the delta since the restart.
    """
    q0, h0, q1, h1 = (
        prev.prefix_cache_queries,
        prev.prefix_cache_hits,
        cur.prefix_cache_queries,
        cur.prefix_cache_hits,
    )
    if q0 is None or h0 is None or q1 is None or h1 is None:
        return None
    queries, hits = q1 - q0, h1 - h0
    if queries < 0 or hits < 0:
        queries, hits = q1, h1
    if queries <= 0:
        return None
    return min(1.0, max(0.0, hits / queries))


def _detect(names: set[str]) -> EngineName:
    for prefix, engine in _PREFIXES.items():
        if any(name.startswith(prefix) for name in names):
            return engine
    raise ScrapeError("no vllm: or llamacpp: metrics: not a known engine's /metrics")


def _int_label(labels: Mapping[str, str], key: str) -> int | None:
    try:
        return int(labels[key])
    except (KeyError, ValueError):  # absent, or "None" as vLLM prints an unset field
        return None


def _sum_labels(info: list[Mapping[str, str]], key: str) -> int | None:
    values = [v for v in (_int_label(i, key) for i in info) if v is not None]
    return sum(values) if values else None
