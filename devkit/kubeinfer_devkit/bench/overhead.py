"""`kubeinfer bench overhead`: what the gateway adds to a request, in latency and in CPU.

The same load goes to the replicas directly and through `kubeinfer gateway` in one run, interleaved in
slots (direct, gateway, direct, ...), so both see the same machine: a busy neighbour slows both alike.
The replicas are `fleet.EchoUpstream` (answers at once, so any latency beyond the direct path's is the
gateway's) in their own process; the gateway runs as its own process, as in production. With two or
more cores the gateway is pinned to the last core and the replicas and the load generator to the
others, so the gateway's figure is one core's.

This file is over 500 lines because the three phases share one slot schedule, one sampler and one
report, and `--peers` (bench/peers.py) puts every peer gateway through the same slots.

Three phases, each with its own figures:

- `small`: an open loop of Poisson arrivals at `rate`/s with `body_bytes` request bodies, non-streamed
  answers of 16 tokens. Added latency = gateway percentile - direct percentile.
- `large`: the same with `large_body_bytes` bodies at `large_rate`/s.
- `stream`: a closed loop of `stream_concurrency` SSE streams of `stream_tokens` chunks, one every
  `stream_interval_ms`. Added inter-chunk latency = gateway ITL percentile - direct ITL percentile.

The load generator is a lean aiohttp client (one keep-alive session per target; httpx costs several
times more CPU per request: docs/benchmarks.md). It reports its own CPU and how late it sent requests
against the schedule (`send_lag_ms`), so a run where the client, not the gateway, was the limit shows.
The gateway's CPU is read from /proc/PID/stat (utime + stime) at every gateway slot's start and end.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import aiohttp

from kubeinfer_devkit.bench import fleet, peers, stats
from kubeinfer_devkit.bench.client import SSEReader
from kubeinfer_devkit.bench.peers import overhead_comparison

MODEL = "echo"

# Issue 13's goals (docs/benchmarks.md, "Results: kubeinfer's own server and client"): small phase at
# 500 requests/s of 1 KB, stream phase at 256 streams; vllm-router's CPU when it runs as a peer.
GOALS = {
    "added_p50_ms": 0.3,
    "added_p99_ms": 1.0,
    "gateway_cpu_us_per_request": 200.0,
    "stream_added_itl_p99_ms": 1.0,
    "stream_gateway_cpu_us_per_chunk": 15.0,
    "cpu_per_request_vs_vllm_router": 2.0,
}


@dataclass(frozen=True)
class OverheadConfig:
    rate: float = 500.0
    duration: float = 20.0
    """Seconds of the small phase, both targets together (each gets about half)."""
    body_bytes: int = 1024
    slot: float = 1.0
    """Seconds per slot before switching between direct and gateway."""
    replicas: int = 2
    warmup: float = 1.0
    """Seconds of load on each target before the measured slots (connections, caches)."""
    large_body_bytes: int = 200 * 1024
    large_rate: float = 100.0
    large_duration: float = 10.0
    stream_concurrency: int = 256
    stream_tokens: int = 40
    stream_interval_ms: float = 50.0
    stream_duration: float = 24.0
    stream_slot: float = 6.0
    seed: int = 0
    pin: bool = True
    phases: tuple[str, ...] = ("small", "large", "stream")
    peers: tuple[str, ...] = ()
    """Other gateways measured in the same interleaved run (`peers.PEERS`): each phase then lasts
    (2 + peers) / 2 times longer, so that every target keeps its time."""
    gateway: str = ""
    """kubeinfer's gateway as `SERVER+CLIENT` (`variant_args`); empty: the gateway's defaults."""
    variants: tuple[str, ...] = ()
    """More kubeinfer gateways, each `SERVER+CLIENT` (e.g. `uvicorn+aiohttp`, the earlier stack), run as
    targets of their own beside the peers, named `kubeinfer[SERVER+CLIENT]`; `floor` is the gateway's
    server and client with none of its logic (`bench.floor`)."""

    def validate(self) -> None:
        if self.rate <= 0 or self.large_rate <= 0 or self.duration <= 0 or self.slot <= 0:
            raise ValueError("rates, duration and slot must be positive")
        if self.replicas < 1 or self.stream_concurrency < 1 or self.stream_tokens < 2:
            raise ValueError("replicas and stream concurrency must be >= 1, stream tokens >= 2")
        if self.body_bytes < 64 or self.large_body_bytes < 64:
            raise ValueError("bodies must be at least 64 bytes")
        unknown = set(self.phases) - {"small", "large", "stream"}
        if unknown:
            raise ValueError(f"unknown phases: {sorted(unknown)}")
        peers.parse_peers(",".join(self.peers))
        for v in (self.gateway, *self.variants) if self.gateway else self.variants:
            if v != FLOOR or v == self.gateway:
                variant_args(v)


# --- pure parts --------------------------------------------------------------------------------------

SERVERS = ("kubeinfer", "uvicorn", "granian", "aiohttp")
CLIENTS = ("kubeinfer", "aiohttp")
FLOOR = "floor"
"""The variant that is not a gateway: its server and client as a bare proxy (`bench.floor`)."""


def variant_args(variant: str) -> list[str]:
    """`kubeinfer gateway` flags of a variant `SERVER[+CLIENT]`: its HTTP server (kubeinfer, uvicorn,
    granian, aiohttp) and its client to the replicas (kubeinfer, aiohttp)."""
    server, _, client = variant.partition("+")
    if server not in SERVERS or (client and client not in CLIENTS):
        raise ValueError(f"gateway variant {variant!r}: want SERVER[+CLIENT], SERVER one of "
                         f"{', '.join(SERVERS)}, CLIENT one of {', '.join(CLIENTS)}")  # fmt: skip
    return ["--server", server] + (["--upstream-client", client] if client else [])


def variant_name(variant: str) -> str:
    return "floor (bare proxy)" if variant == FLOOR else f"kubeinfer[{variant}]"


def request_body(size: int, *, stream: bool, max_tokens: int, seed: int = 0) -> bytes:
    """A chat request of exactly `size` bytes (the user message is padded with words)."""
    rng = random.Random(f"overhead:{seed}:{size}")
    body: dict[str, Any] = {"model": MODEL, "max_tokens": max_tokens, "stream": stream,
                            "messages": [{"role": "user", "content": ""}]}  # fmt: skip
    if stream:
        body["stream_options"] = {"include_usage": True}
    empty = len(json.dumps(body).encode())
    words: list[str] = []
    length = 0
    while empty + length < size:
        w = rng.choice(("alpha", "beta", "gamma", "delta", "kappa", "omega"))
        words.append(w)
        length += len(w) + (1 if len(words) > 1 else 0)
    text = " ".join(words)[: max(0, size - empty)]
    body["messages"][0]["content"] = text
    return json.dumps(body).encode()


def slot_schedule(
    duration: float, slot: float, targets: Sequence[str] = ("direct", "gateway")
) -> list[tuple[float, float, str]]:
    """(start, end, target) slots over `duration`, cycling through `targets` (direct and gateway, and
    the peers with `--peers`) in a fixed order that starts with direct."""
    out, t, i = [], 0.0, 0
    while t < duration - 1e-9:
        end = min(duration, t + slot)
        out.append((t, end, targets[i % len(targets)]))
        t, i = end, i + 1
    return out


def slot_seconds(slots: Sequence[tuple[float, float, str]]) -> dict[str, float]:
    """Seconds of the schedule per target."""
    out: dict[str, float] = {}
    for start, end, target in slots:
        out[target] = out.get(target, 0.0) + end - start
    return out


def added(direct: dict[str, float | None], gateway: dict[str, float | None]) -> dict[str, float | None]:
    """Gateway minus direct, per percentile (None when either side has no samples)."""
    return {
        k: (gateway[k] - direct[k]) if gateway.get(k) is not None and direct.get(k) is not None else None  # type: ignore[operator]
        for k in direct
    }


def per_unit_us(cpu_seconds: float, units: int) -> float | None:
    """Microseconds of CPU per request (or chunk); None without any."""
    return cpu_seconds * 1e6 / units if units else None


@dataclass
class Sample:
    target: str
    start: float
    latency: float
    lag: float = 0.0
    """How late the request was sent against its scheduled time (open loop)."""
    ttft: float | None = None
    gaps: list[float] = field(default_factory=list)
    chunks: int = 0
    error: str | None = None


def summarize_phase(
    samples: Sequence[Sample], *, gateway_cpu_s: float, gateway_slot_s: float, client_cpu_s: float,
    wall_s: float,
) -> dict[str, Any]:  # fmt: skip
    """The figures of one phase from its samples and CPU readings (pure)."""
    out: dict[str, Any] = {}
    by = {t: [s for s in samples if s.target == t] for t in ("direct", "gateway")}
    errors: dict[str, int] = {}
    for target, ss in by.items():
        ok = [s for s in ss if s.error is None]
        for s in ss:
            if s.error is not None:
                key = f"{target}:{s.error}"
                errors[key] = errors.get(key, 0) + 1
        lat = stats.distribution([s.latency for s in ok], 1000)
        itl = stats.distribution([g for s in ok for g in s.gaps], 1000)
        out[target] = {
            "requests": len(ss), "ok": len(ok), "latency_ms": lat, "itl_ms": itl,
            "chunks": sum(s.chunks for s in ok),
        }  # fmt: skip
    d, g = out["direct"], out["gateway"]
    out["direct_p50_ms"], out["gateway_p50_ms"] = d["latency_ms"]["p50"], g["latency_ms"]["p50"]
    out["direct_p99_ms"], out["gateway_p99_ms"] = d["latency_ms"]["p99"], g["latency_ms"]["p99"]
    lat_added = added(d["latency_ms"], g["latency_ms"])
    out["added_p50_ms"], out["added_p99_ms"] = lat_added["p50"], lat_added["p99"]
    itl_added = added(d["itl_ms"], g["itl_ms"])
    out["added_itl_p50_ms"], out["added_itl_p99_ms"] = itl_added["p50"], itl_added["p99"]
    out["gateway_cpu_us_per_request"] = per_unit_us(gateway_cpu_s, g["ok"])
    out["gateway_cpu_us_per_chunk"] = per_unit_us(gateway_cpu_s, g["chunks"]) if g["chunks"] else None
    out["gateway_cpu_util"] = gateway_cpu_s / gateway_slot_s if gateway_slot_s > 0 else None
    out["client_cpu_us_per_request"] = per_unit_us(client_cpu_s, len(samples))
    out["client_cpu_util"] = client_cpu_s / wall_s if wall_s > 0 else None
    lags = [s.lag for s in samples]
    out["send_lag_ms"] = {"p50": stats.percentile(lags, 50), "p99": stats.percentile(lags, 99)}
    if out["send_lag_ms"]["p50"] is not None:
        out["send_lag_ms"] = {k: v * 1000 for k, v in out["send_lag_ms"].items()}
    out["errors"] = errors
    return out


def check_goals(result: dict[str, Any]) -> dict[str, bool | None]:
    """Each goal met (True), missed (False) or not measured in this run (None)."""
    small, stream = result.get("small") or {}, result.get("stream") or {}

    def within(value: Any, limit: float) -> bool | None:
        return None if value is None else bool(value <= limit)

    router = ((small.get("vs_kubeinfer") or {}).get("vllm-router") or {}).get("gateway_cpu_us_per_request")
    ratio = router.get("ratio_vs_kubeinfer") if router else None  # vllm-router's / kubeinfer's
    return {
        "added_p50_ms<=0.3": within(small.get("added_p50_ms"), GOALS["added_p50_ms"]),
        "added_p99_ms<=1": within(small.get("added_p99_ms"), GOALS["added_p99_ms"]),
        "cpu_us_per_request<=200": within(
            small.get("gateway_cpu_us_per_request"), GOALS["gateway_cpu_us_per_request"]
        ),
        "stream_added_itl_p99_ms<=1": within(
            stream.get("added_itl_p99_ms"), GOALS["stream_added_itl_p99_ms"]
        ),
        "stream_cpu_us_per_chunk<=15": within(
            stream.get("gateway_cpu_us_per_chunk"), GOALS["stream_gateway_cpu_us_per_chunk"]
        ),
        "cpu_per_request<=2x_vllm_router": (
            None if not ratio else bool(1 / ratio <= GOALS["cpu_per_request_vs_vllm_router"])
        ),
        "no_errors": not any((result.get(p) or {}).get("errors") for p in ("small", "large", "stream")),
    }


# --- the load generator ------------------------------------------------------------------------------


async def _send(
    session: aiohttp.ClientSession, url: str, body: bytes, target: str, *, stream: bool, lag: float = 0.0
) -> Sample:
    start = time.perf_counter()
    sample = Sample(target, start, 0.0, lag)
    try:
        async with session.post(url, data=body, headers={"content-type": "application/json"}) as resp:
            if resp.status != 200:
                await resp.read()
                sample.error = f"http_{resp.status}"
            elif stream:
                sse = SSEReader()
                clock = time.perf_counter
                async for data in resp.content.iter_any():
                    sse.feed(data, clock())
                sse.close(time.perf_counter())
                if sse.error:
                    sample.error = sse.error
                sample.ttft = sse.first - start if sse.first is not None else None
                sample.gaps, sample.chunks = sse.gaps, sse.chunks
            else:
                await resp.read()
    except (aiohttp.ClientError, TimeoutError) as exc:
        sample.error = type(exc).__name__
    sample.latency = time.perf_counter() - start
    return sample


class _Targets:
    """One keep-alive aiohttp session per target; direct requests go round-robin over the replicas.
    Targets: "direct", "gateway" (kubeinfer's) and one per peer gateway."""

    def __init__(
        self, direct_urls: Sequence[str], gateway_url: str, peer_urls: Mapping[str, str] | None = None
    ) -> None:
        self.direct = [f"{u}/v1/chat/completions" for u in direct_urls]
        self.gateways = {"gateway": f"{gateway_url}/v1/chat/completions"}
        self.gateways.update({n: f"{u}/v1/chat/completions" for n, u in (peer_urls or {}).items()})
        self.names = ("direct", *self.gateways)
        self._next = 0
        self.sessions: dict[str, aiohttp.ClientSession] = {}

    async def __aenter__(self) -> _Targets:
        for name in self.names:
            self.sessions[name] = aiohttp.ClientSession(
                # Below uvicorn's 5 s keep-alive (the gateway's): the client closes an idle connection
                # first, so a request never races the server's close (ServerDisconnectedError).
                connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=3),
                timeout=aiohttp.ClientTimeout(total=120),
                skip_auto_headers=("User-Agent",),
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        return self

    async def __aexit__(self, *exc: object) -> None:
        for s in self.sessions.values():
            await s.close()

    def url(self, target: str) -> str:
        if target != "direct":
            return self.gateways[target]
        self._next += 1
        return self.direct[self._next % len(self.direct)]


@dataclass
class _Meter:
    """CPU of one gateway (its process, or its process tree for a peer) during its slots."""

    read_cpu: Callable[[], float]
    gateway_cpu: float = 0.0
    gateway_time: float = 0.0
    _opened: tuple[float, float] | None = None

    def open(self) -> None:
        self._opened = (self.read_cpu(), time.perf_counter())

    def close(self) -> None:
        if self._opened is not None:
            cpu, t = self._opened
            self.gateway_cpu += self.read_cpu() - cpu
            self.gateway_time += time.perf_counter() - t
            self._opened = None


Meters = Mapping[str, _Meter]
"""One per gateway target."""


async def _open_loop(
    targets: _Targets, meters: Meters, body: bytes, rate: float, duration: float, slot: float, seed: int
) -> list[Sample]:
    rng = random.Random(f"overhead-arrivals:{seed}")
    slots = slot_schedule(duration, slot, targets.names)
    tasks: list[asyncio.Task[Sample]] = []
    # With peers, a gateway slower than the rate (LiteLLM) still has requests in flight at its slot's
    # end, and would spend them on the gateways' shared core in the next gateway's slot: each gateway
    # slot then ends only once its requests are done, the schedule shifted by that wait (and the wait
    # counted in that gateway's CPU). Without peers, slots switch on time as they always did.
    drain = len(targets.names) > 2
    t0 = time.perf_counter()
    for start, end, target in slots:
        first = len(tasks)
        # Open the meter at the slot's start: in-flight requests of the last slot finish within it
        # (a few ms), a small bias alike for every slot.
        if target != "direct":
            meters[target].open()
        t = start + rng.expovariate(rate)
        while t < end:
            delay = t0 + t - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            lag = max(0.0, time.perf_counter() - (t0 + t))
            tasks.append(asyncio.create_task(_send(
                targets.sessions[target], targets.url(target), body, target, stream=False, lag=lag
            )))  # fmt: skip
            t += rng.expovariate(rate)
        delay = t0 + end - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if drain and target != "direct":
            pending = [task for task in tasks[first:] if not task.done()]
            if pending:
                waited = time.perf_counter()
                await asyncio.wait(pending)
                t0 += time.perf_counter() - waited
        if target != "direct":
            meters[target].close()
    return list(await asyncio.gather(*tasks))


async def _closed_streams(
    targets: _Targets, meters: Meters, body: bytes, concurrency: int, duration: float, slot: float
) -> list[Sample]:
    slots = slot_schedule(duration, slot, targets.names)
    t0 = time.perf_counter()
    current = ["direct"]
    stop = False
    samples: list[Sample] = []

    async def worker(i: int) -> None:
        await asyncio.sleep(i * slot / concurrency / 10)  # stagger the first wave
        while not stop:
            target = current[0]
            samples.append(
                await _send(targets.sessions[target], targets.url(target), body, target, stream=True)
            )

    # Streams outlast slots (a stream started late in a gateway slot is relayed into the next one), so
    # the gateway's CPU is read over the whole phase; its idle cost (a scrape a second) is negligible.
    for meter in meters.values():
        meter.open()
    workers = [asyncio.create_task(worker(i)) for i in range(concurrency)]
    for _start, end, target in slots:
        current[0] = target
        delay = t0 + end - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
    stop = True
    await asyncio.gather(*workers)
    seconds = slot_seconds(slots)
    for name, meter in meters.items():
        meter.close()
        meter.gateway_time = seconds.get(name, 0.0)
    # A stream belongs to the target it was sent to; streams still running at a switch overlap the next
    # slot by one stream's length at most, alike for both targets.
    return samples


def _meters(cpu_readers: Mapping[str, Callable[[], float]]) -> dict[str, _Meter]:
    return {name: _Meter(read) for name, read in cpu_readers.items()}


def peer_view(samples: Sequence[Sample], peer: str) -> list[Sample]:
    """The direct samples and the peer's, the peer's relabelled "gateway": what `summarize_phase`
    reads, so a peer gets exactly kubeinfer's figures against the same direct samples."""
    return [s for s in samples if s.target == "direct"] + [
        replace(s, target="gateway") for s in samples if s.target == peer
    ]


async def _phase(
    name: str, config: OverheadConfig, targets: _Targets, cpu_readers: Mapping[str, Callable[[], float]]
) -> dict[str, Any]:
    meters = _meters(cpu_readers)
    n_targets = len(targets.names)
    if name == "stream":
        body = request_body(config.body_bytes, stream=True, max_tokens=config.stream_tokens, seed=config.seed)
        # Warm-up: a full set of connections on every target.
        await _closed_streams(targets, _meters(cpu_readers), body, config.stream_concurrency,
                              n_targets * max(config.warmup, 0.1), max(config.warmup, 0.1))  # fmt: skip
        c0, w0 = time.process_time(), time.perf_counter()
        # With peers the phase is longer, so each target keeps the time it has without them.
        duration = config.stream_duration * n_targets / 2
        samples = await _closed_streams(
            targets, meters, body, config.stream_concurrency, duration, config.stream_slot
        )
    else:
        size, rate, duration = (
            (config.body_bytes, config.rate, config.duration) if name == "small"
            else (config.large_body_bytes, config.large_rate, config.large_duration)
        )  # fmt: skip
        body = request_body(size, stream=False, max_tokens=16, seed=config.seed)
        if config.warmup > 0:
            await _open_loop(targets, _meters(cpu_readers), body, rate, n_targets * config.warmup,
                             config.warmup, config.seed + 1)  # fmt: skip
        c0, w0 = time.process_time(), time.perf_counter()
        duration = duration * n_targets / 2
        samples = await _open_loop(targets, meters, body, rate, duration, config.slot, config.seed)
    client_cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    kubeinfer = [s for s in samples if s.target in ("direct", "gateway")]
    # The client's CPU is shared by every target: each gets its share by its requests.
    out = summarize_phase(
        kubeinfer, gateway_cpu_s=meters["gateway"].gateway_cpu, gateway_slot_s=meters["gateway"].gateway_time,
        client_cpu_s=client_cpu * len(kubeinfer) / max(1, len(samples)), wall_s=wall * 2 / n_targets,
    )  # fmt: skip
    peer_figures: dict[str, Any] = {}
    for peer in targets.names[2:]:
        view = peer_view(samples, peer)
        figures = summarize_phase(
            view, gateway_cpu_s=meters[peer].gateway_cpu, gateway_slot_s=meters[peer].gateway_time,
            client_cpu_s=client_cpu * len(view) / max(1, len(samples)), wall_s=wall * 2 / n_targets,
        )  # fmt: skip
        figures[peer] = figures.pop("gateway")
        figures.pop("direct")
        figures["errors"] = {k.replace("gateway:", f"{peer}:"): v for k, v in figures["errors"].items()
                             if not k.startswith("direct:")}  # fmt: skip
        peer_figures[peer] = figures
    out["body_bytes"] = len(body)
    if name != "stream":
        out["rate"] = rate
        seconds = slot_seconds(slot_schedule(duration, config.slot, targets.names))
        out["achieved_rps"] = {t: out[t]["requests"] / seconds["direct"] for t in ("direct", "gateway")}
        for peer, figures in peer_figures.items():
            figures["achieved_rps"] = figures[peer]["requests"] / seconds[peer]
    if peer_figures:
        out["peers"] = peer_figures
        out["vs_kubeinfer"] = overhead_comparison(out, peer_figures)
    return out


def _load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


@dataclass
class _Variant:
    """Another kubeinfer gateway process, run as a target like a peer."""

    url: str
    proc: fleet.GatewayProcess

    def cpu_seconds(self) -> float:
        return peers.tree_cpu_seconds(self.proc.pid)

    def stop(self) -> None:
        self.proc.stop()


def _start_peers(
    venvs: Mapping[str, Any], replica_urls: Sequence[str], workdir: str, cores: set[int] | None,
    entries: dict[str, dict[str, Any]], on_step: Callable[[str], None] | None,
) -> dict[str, peers.PeerProcess]:  # fmt: skip
    """Start every installed peer over the replicas; a failure becomes its entry's error."""
    started: dict[str, peers.PeerProcess] = {}
    for name, venv in venvs.items():
        try:
            # vllm-router: round-robin, as kubeinfer's gateway here (no routing decision to weigh).
            started[name] = peers.start_peer(name, venv, replica_urls, MODEL, workdir, cores=cores)
            entries[name] = {"version": started[name].version, "pid": started[name].pid}
        except peers.PeerError as exc:
            entries[name] = peers.peer_error(name, exc, stage="start")
            if on_step:
                on_step(f"{name}: {entries[name]['error']}")
    return started


async def run_overhead(
    config: OverheadConfig, *, on_phase: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Start the echo replicas and a gateway (and the peers), run the phases, stop everything; the
    result dict."""
    config.validate()
    venvs, peer_entries = peers.prepare(config.peers, on_step=on_phase)
    pin = config.pin and fleet.can_pin()
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    gateway_cores = {cores[-1]} if pin else None
    other_cores = set(cores[:-1]) if pin else None
    if other_cores:
        os.sched_setaffinity(0, other_cores)  # this process (the load generator); the fleet inherits it
    result: dict[str, Any] = {
        "config": asdict(config), "pinned": pin, "gateway_cores": sorted(gateway_cores or []),
        "client_cores": sorted(other_cores or []), "upstream": "echo", "load_average_before": _load(),
    }  # fmt: skip
    try:
        with tempfile.TemporaryDirectory(prefix="kubeinfer-bench-") as tmp:
            replicas = fleet.start_fleet(
                "echo", config.replicas, {"chunk_interval_ms": config.stream_interval_ms}
            )
            try:
                static = fleet.static_config(
                    MODEL, replicas.addresses, "round-robin", target_inflight=10000, max_queue=100000
                )
                gateway = fleet.start_gateway(
                    static, tmp, cores=gateway_cores,
                    extra_args=variant_args(config.gateway) if config.gateway else (),
                )  # fmt: skip
                started: dict[str, Any] = {}
                try:
                    for v in config.variants:
                        if v == FLOOR:
                            proc = fleet.start_floor(replicas.addresses, cores=gateway_cores)
                        else:
                            proc = fleet.start_gateway(
                                static, tmp, cores=gateway_cores, extra_args=variant_args(v)
                            )
                        started[variant_name(v)] = _Variant(proc.url, proc)
                        peer_entries[variant_name(v)] = {"version": v, "pid": proc.pid}
                    started.update(
                        _start_peers(venvs, replicas.urls, tmp, gateway_cores, peer_entries, on_phase)
                    )
                    peer_urls = {n: p.url for n, p in started.items()}
                    readers: dict[str, Callable[[], float]] = {
                        "gateway": lambda: peers.tree_cpu_seconds(gateway.pid),
                        **{n: p.cpu_seconds for n, p in started.items()},
                    }
                    async with _Targets(replicas.urls, gateway.url, peer_urls) as targets:
                        for name in config.phases:
                            if on_phase:
                                on_phase(name)
                            result[name] = await _phase(name, config, targets, readers)
                finally:
                    for p in started.values():
                        p.stop()
                    gateway.stop()
            finally:
                replicas.stop()
    finally:
        if other_cores:
            os.sched_setaffinity(0, set(cores))
    result["load_average_after"] = _load()
    small = result.get("small") or {}
    for key in ("direct_p50_ms", "gateway_p50_ms", "added_p50_ms", "added_p99_ms",
                "gateway_cpu_us_per_request"):  # fmt: skip
        result[key] = small.get(key)
    result["errors"] = {
        f"{p}:{k}": v
        for p in ("small", "large", "stream")
        for k, v in (result.get(p) or {}).get("errors", {}).items()
    }
    stream = result.get("stream") or {}
    result["stream_added_itl_p99_ms"] = stream.get("added_itl_p99_ms")
    result["goals"] = check_goals(result)
    result["gateway"] = config.gateway or "kubeinfer+kubeinfer"
    if config.peers or config.variants:
        # Every peer asked for is here: its version, or why it is missing.
        names = [variant_name(v) for v in config.variants] + list(config.peers)
        result["peers"] = {n: peer_entries.get(n, {"error": "not run"}) for n in names}
        result["vs_kubeinfer"] = small.get("vs_kubeinfer") or {}
    return result


def format_overhead(result: dict[str, Any]) -> str:
    """A short human summary of `run_overhead`'s result."""
    lines = [f"pinned: {result['pinned']} (gateway on cores {result['gateway_cores']}); "
             f"load average {result['load_average_before']} -> {result['load_average_after']}"]  # fmt: skip

    def ms(v: Any) -> str:
        return "-" if v is None else f"{v:.3f}"

    for name in ("small", "large", "stream"):
        p = result.get(name)
        if not p:
            continue
        d, g = p["direct"], p["gateway"]
        lines.append(
            f"\n[{name}] body {p['body_bytes']} B" + (f", {p['rate']:g} req/s" if "rate" in p else "")
        )
        lines.append(
            f"  requests direct {d['requests']} gateway {g['requests']}; errors {p['errors'] or 'none'}"
        )
        for label, key in (("latency", "latency_ms"), ("ITL", "itl_ms")):
            if d[key]["p50"] is None:
                continue
            lines.append(
                f"  {label} p50/p99 ms: direct {ms(d[key]['p50'])}/{ms(d[key]['p99'])} "
                f"gateway {ms(g[key]['p50'])}/{ms(g[key]['p99'])}"
            )
        lines.append(f"  added p50 {ms(p['added_p50_ms'])} ms, p99 {ms(p['added_p99_ms'])} ms"
                     + (f"; ITL p50 {ms(p['added_itl_p50_ms'])}, p99 {ms(p['added_itl_p99_ms'])} ms"
                        if name == "stream" else ""))  # fmt: skip
        cpu = p["gateway_cpu_us_per_request"]
        lines.append(
            f"  gateway CPU {'-' if cpu is None else f'{cpu:.0f}'} us/request"
            + (f", {p['gateway_cpu_us_per_chunk']:.1f} us/chunk" if p.get("gateway_cpu_us_per_chunk") else "")
            + f", {100 * (p['gateway_cpu_util'] or 0):.0f}% of its core; client CPU "
            f"{100 * (p['client_cpu_util'] or 0):.0f}%, send lag p99 {ms(p['send_lag_ms']['p99'])} ms"
        )
    lines.append("\ngoals: " + ", ".join(f"{k} {'-' if v is None else 'met' if v else 'MISSED'}"
                                          for k, v in result["goals"].items()))  # fmt: skip
    return "\n".join(lines) + "\n" + peers.format_overhead_peers(result)
