"""The gateway's settings and its shared state: routing loads, queues, the usage ledger, metrics.

One State per gateway process, created in the app's lifespan; the proxy and the admin endpoints
read and update it from the one event loop, so it needs no locks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Generic, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from kubeinfer.gateway.admission import ModelQueue
from kubeinfer.gateway.auth import KeyStore
from kubeinfer.gateway.limits import BodyDeadlines, ClientSlots
from kubeinfer.gateway.registry import ModelEntry, Registry
from kubeinfer.gateway.routing import Endpoint, Load, PrefixIndex
from kubeinfer.gateway.upstream import Upstream
from kubeinfer.gateway.usage import Usage

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

M = TypeVar("M", Counter, Gauge, Histogram)


class Series(Generic[M]):
    """`metric.labels(*values)`, memoized per tuple of values: labels() checks, str()s and locks on
    every call, a few per cent of the gateway's CPU per request.

    Never pruned, like the metric's own children (nothing removes a series; one removed from the
    metric would go stale here). So only for bounded label sets: models x replicas, models x keys, a
    few status codes, never a client-chosen value. A replica that goes away leaves one entry here
    per series it used, beside the series the metric keeps for it anyway."""

    __slots__ = ("_children", "_metric")

    def __init__(self, metric: M) -> None:
        self._metric: M = metric
        self._children: dict[tuple[object, ...], M] = {}

    def __call__(self, *values: object) -> M:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._metric.labels(*values)
        return child


@dataclass
class GatewaySettings:
    max_body_bytes: int = 32 << 20
    max_body_bytes_by_route: dict[str, int] = field(default_factory=dict)
    """Body limits of some routes (the path after /v1/); the others have max_body_bytes."""
    max_header_bytes: int = 64 << 10
    body_timeout: float = 30.0
    """Seconds from the start of reading a body to its last byte (408 after that)."""
    max_concurrent_per_client: int | None = None
    """In-flight requests per API key, or per client address when anonymous (429 beyond); None: no limit."""
    retries: int = 2
    hold_timeout: float | None = None
    """How long a request may wait for a replica; None: the model's routing.queueTimeout."""
    scrape_interval: float = 1.0
    scrape_timeout: float = 0.5
    connect_timeout: float = 5.0
    read_timeout: float = 600.0


@dataclass
class State:
    registry: Registry
    settings: GatewaySettings
    upstream: Upstream
    loads: dict[str, Load] = field(default_factory=dict)
    rr: dict[str, int] = field(default_factory=dict)
    queues: dict[str, ModelQueue[Endpoint]] = field(default_factory=dict)
    ledger: dict[tuple[str, str], dict[str, float]] = field(default_factory=dict)
    keys: KeyStore = field(default_factory=KeyStore)
    prefix_index: PrefixIndex = field(default_factory=PrefixIndex)
    metrics: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        self._register()
        limit = self.settings.max_concurrent_per_client
        self.client_slots = ClientSlots(limit) if limit is not None else None
        self.body_deadlines = BodyDeadlines(self.settings.body_timeout)  # swept by a task of the app

    def _register(self) -> None:
        self.requests = Counter(
            "kubeinfer_gateway_requests", "Requests by model, replica and status code",
            ["model", "replica", "code"], registry=self.metrics,
        )  # fmt: skip
        self.errors = Counter(
            "kubeinfer_gateway_errors", "Errors answered by the gateway, by type", ["model", "type"],
            registry=self.metrics,
        )  # fmt: skip
        self.retries = Counter("kubeinfer_gateway_retries", "Retries on another replica", ["model"],
                               registry=self.metrics)  # fmt: skip
        self.tokens = Counter(
            "kubeinfer_gateway_tokens", "Tokens by model, API key and kind (prompt, completion)",
            ["model", "key", "kind"], registry=self.metrics,
        )  # fmt: skip
        self.cost = Counter(
            "kubeinfer_gateway_estimated_cost", "Estimated cost (spec.pricing) by model and API key",
            ["model", "key"], registry=self.metrics,
        )  # fmt: skip
        self.usage_requests = Counter(
            "kubeinfer_gateway_usage_requests", "Successful requests by model and API key", ["model", "key"],
            registry=self.metrics,
        )  # fmt: skip
        self.queued = Gauge(
            "kubeinfer_gateway_queued_requests", "Requests waiting for a replica",
            ["model"], registry=self.metrics,
        )  # fmt: skip
        self.model_load = Gauge(
            "kubeinfer_gateway_model_load",
            "Requests of a model in flight or queued here: the autoscalers' signal (summed over gateways)",
            # The LLMModel's own namespace and name: `namespace` would clash with the scrape target's.
            ["model_namespace", "model"], registry=self.metrics,
        )  # fmt: skip
        self.inflight_gauge = Gauge(
            "kubeinfer_gateway_inflight_requests", "Requests this gateway has open, by replica", ["replica"],
            registry=self.metrics,
        )  # fmt: skip
        self.queue_wait = Histogram(
            "kubeinfer_gateway_queue_wait_seconds", "Time a request waited for a replica slot", ["model"],
            buckets=_LATENCY_BUCKETS, registry=self.metrics,
        )  # fmt: skip
        self.ttfb = Histogram(
            "kubeinfer_gateway_time_to_first_byte_seconds", "Upstream time to response headers", ["model"],
            buckets=_LATENCY_BUCKETS, registry=self.metrics,
        )  # fmt: skip
        self.ttft = Histogram(
            "kubeinfer_gateway_time_to_first_token_seconds",
            "Arrival to the first body chunk sent back (the first token of a stream)", ["model", "replica"],
            buckets=_LATENCY_BUCKETS, registry=self.metrics,
        )  # fmt: skip
        self.duration = Histogram(
            "kubeinfer_gateway_request_duration_seconds", "Arrival to the last byte sent back",
            ["model", "replica"], buckets=_LATENCY_BUCKETS, registry=self.metrics,
        )  # fmt: skip
        self.output_rate = Histogram(
            "kubeinfer_gateway_output_tokens_per_second", "Completion tokens/s after the first token",
            ["model"], buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000), registry=self.metrics,
        )  # fmt: skip
        # The request path's series, memoized (`errors` is not: its model label can be any name sent).
        self.requests_for = Series(self.requests)
        self.retries_for = Series(self.retries)
        self.tokens_for = Series(self.tokens)
        self.cost_for = Series(self.cost)
        self.usage_requests_for = Series(self.usage_requests)
        self.queue_wait_for = Series(self.queue_wait)
        self.ttfb_for = Series(self.ttfb)
        self.ttft_for = Series(self.ttft)
        self.duration_for = Series(self.duration)
        self.output_rate_for = Series(self.output_rate)

    def record_usage(
        self, model: ModelEntry, usage: Usage | None, key: str = "anonymous", adapter: str | None = None
    ) -> None:
        """The usage ledger: requests, tokens and estimated cost per API key and model (an adapter is
        a model of its own here, priced as its base model)."""
        name = adapter or model.name
        entry = self.ledger.get((key, name))
        if entry is None:
            entry = self.ledger[(key, name)] = {
                "requests": 0, "promptTokens": 0, "completionTokens": 0, "estimatedCost": 0.0
            }  # fmt: skip
        entry["requests"] += 1
        self.usage_requests_for(name, key).inc()
        if usage is not None:
            entry["promptTokens"] += usage.prompt_tokens
            entry["completionTokens"] += usage.completion_tokens
            self.tokens_for(name, key, "prompt").inc(usage.prompt_tokens)
            self.tokens_for(name, key, "completion").inc(usage.completion_tokens)
            cost = model.cost(usage.prompt_tokens, usage.completion_tokens)
            if cost:
                entry["estimatedCost"] += cost
                self.cost_for(name, key).inc(cost)

    def release(self, model: str, endpoint_id: str) -> None:
        """A request to `endpoint_id` ended: free its slot and let the model's queue move."""
        self.inflight(endpoint_id, -1)
        queue = self.queues.get(model)
        if queue is not None:
            queue.wake()

    def inflight(self, endpoint_id: str, delta: int) -> None:
        load = self.loads.get(endpoint_id, Load())
        self.loads[endpoint_id] = Load(
            max(0, load.inflight + delta), load.scraped, load.scraped_at, load.inflight_at_scrape
        )
