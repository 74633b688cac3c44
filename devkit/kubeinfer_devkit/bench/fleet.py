"""Replicas for the gateway benchmarks, served from one process of their own.

`python -m kubeinfer_devkit.bench.fleet --kind sim|echo --count N [--option name=value ...]` starts N servers
on free ports of 127.0.0.1 in one event loop (uvloop and httptools when installed, as the gateway
uses), prints one JSON line `{"urls": [...]}` on stdout once all listen, and serves until stdin closes
or the process gets SIGTERM. Benchmarks run the fleet in its own process so that its CPU does not
disturb the load generator's clock, and pin it to a core (`start_fleet`).

Kinds:

- `sim`: `kubeinfer sim` (options are its flags' Python names: `num_blocks=512`, `decode_ms=0`).
- `echo`: `EchoUpstream`, the cheapest OpenAI-shaped replica: no parsing beyond two regular
  expressions, a canned answer. It stands in for a zero-latency engine in `bench overhead`, where the
  simulator's own CPU (an engine loop and a JSON parse per request) would be part of what is measured.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Generator, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

from kubeinfer_devkit.asgi import Disconnected, lifespan, read_body
from kubeinfer_devkit.devcluster import procs

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

_STREAM = re.compile(rb'"stream"\s*:\s*true')
_MAX_TOKENS = re.compile(rb'"max_tokens"\s*:\s*([0-9]+)')
_JSON = [(b"content-type", b"application/json")]
_SSE = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]
# Enough for the gateway's scrape parser to recognise a vLLM replica with nothing running.
_METRICS = (
    b"# TYPE vllm:num_requests_running gauge\n"
    b'vllm:num_requests_running{engine="0",model_name="echo"} 0.0\n'
    b"# TYPE vllm:num_requests_waiting gauge\n"
    b'vllm:num_requests_waiting{engine="0",model_name="echo"} 0.0\n'
)
_CHUNK = (
    b'data: {"id":"echo","object":"chat.completion.chunk","created":0,"model":"echo",'
    b'"choices":[{"index":0,"delta":{"content":" tok"},"finish_reason":null}]}\n\n'
)
_USAGE = (
    b'data: {"id":"echo","object":"chat.completion.chunk","created":0,"model":"echo","choices":[],'
    b'"usage":{"prompt_tokens":1,"completion_tokens":%d,"total_tokens":%d}}\n\ndata: [DONE]\n\n'
)


def _answer(tokens: int) -> bytes:
    return json.dumps(
        {"id": "echo", "object": "chat.completion", "created": 0, "model": "echo",
         "choices": [{"index": 0, "message": {"role": "assistant", "content": " tok" * tokens},
                      "finish_reason": "length"}],
         "usage": {"prompt_tokens": 1, "completion_tokens": tokens, "total_tokens": tokens + 1}},
        separators=(",", ":"),
    ).encode()  # fmt: skip


@dataclass
class EchoUpstream:
    """A raw ASGI replica: `POST /v1/chat/completions` (or `/v1/completions`) answers at once with
    `max_tokens` tokens (default 16): one JSON body, or with `"stream": true` one SSE chunk per token,
    `chunk_interval_ms` apart (the first at once), then usage and [DONE]. `/metrics` and `/health`
    answer as an idle vLLM would. Stream requests are found with a regular expression, never a JSON
    parse, so a 200 KB request body costs a scan, not a parse."""

    chunk_interval_ms: float = 20.0
    requests: int = field(default=0, init=False)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        path = scope["path"]
        if scope["method"] == "POST" and path in ("/v1/chat/completions", "/v1/completions"):
            await self._generate(receive, send)
        elif path == "/metrics":
            await _reply(send, 200, [(b"content-type", b"text/plain; version=0.0.4")], _METRICS)
        elif path == "/health":
            await _reply(send, 200, [], b"")
        else:
            await _reply(send, 404, _JSON, b'{"detail":"Not Found"}')

    async def _generate(self, receive: Receive, send: Send) -> None:
        try:
            body = await read_body(receive)
        except Disconnected:
            return
        self.requests += 1
        found = _MAX_TOKENS.search(body)
        tokens = int(found.group(1)) if found else 16
        if not _STREAM.search(body):
            await _reply(send, 200, _JSON, _answer(tokens))
            return
        await send({"type": "http.response.start", "status": 200, "headers": _SSE})
        interval = self.chunk_interval_ms / 1000
        for i in range(tokens):
            if i and interval > 0:
                await asyncio.sleep(interval)
            await send({"type": "http.response.body", "body": _CHUNK, "more_body": True})
        await send({"type": "http.response.body", "body": _USAGE % (tokens, tokens + 1), "more_body": False})


async def _reply(send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    headers = [*headers, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _option(text: str) -> tuple[str, Any]:
    name, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected name=value, not {text!r}")
    for kind in (int, float):
        with contextlib.suppress(ValueError):
            return name.replace("-", "_"), kind(value)
    return name.replace("-", "_"), value


def _server_class() -> Any:
    import uvicorn

    class Server(uvicorn.Server):
        """Signals are the fleet's (below): several servers share the process."""

        @contextlib.contextmanager
        def capture_signals(self) -> Generator[None, None, None]:
            yield

    return Server


async def _serve(kind: str, count: int, options: dict[str, Any]) -> None:
    import uvicorn

    from kubeinfer_devkit.sim.server import create_app

    _Server = _server_class()
    servers, sockets, urls = [], [], []
    for _ in range(count):
        app: Any = EchoUpstream(**options) if kind == "echo" else create_app(**options)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        config = uvicorn.Config(
            app, log_level="warning", access_log=False, lifespan="on", timeout_graceful_shutdown=1,
            backlog=4096, timeout_keep_alive=300,  # idle through the other target's slots
        )  # fmt: skip
        server = _Server(config)
        servers.append(server)
        sockets.append(sock)
        urls.append(f"http://127.0.0.1:{sock.getsockname()[1]}")
    tasks = [asyncio.create_task(s.serve(sockets=[sock])) for s, sock in zip(servers, sockets, strict=True)]
    while not all(s.started for s in servers):
        if any(t.done() for t in tasks):
            for t in tasks:
                if t.done():
                    t.result()
            raise RuntimeError("a fleet server stopped while starting")
        await asyncio.sleep(0.01)
    print(json.dumps({"urls": urls}), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_reader(sys.stdin.fileno(), lambda: stop.set() if not os.read(sys.stdin.fileno(), 4096) else None)
    await stop.wait()
    for s in servers:
        s.should_exit = True
    await asyncio.gather(*tasks, return_exceptions=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kubeinfer_devkit.bench.fleet", description=__doc__)
    parser.add_argument("--kind", choices=("sim", "echo"), default="sim")
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--option", type=_option, action="append", default=[], help="name=value")
    args = parser.parse_args(argv)
    try:
        import uvloop

        run: Callable[[Any], Any] = uvloop.run
    except ImportError:
        run = asyncio.run
    run(_serve(args.kind, args.count, dict(args.option)))
    return 0


# --- the parent's side ------------------------------------------------------------------------------

STOP_GRACE = 5.0
"""Seconds a fleet or gateway process gets to exit after SIGTERM before it is SIGKILLed."""


def can_pin() -> bool:
    """Whether processes can be pinned to separate cores here (Linux, two or more usable cores)."""
    return hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) >= 2


def pin_to(cores: set[int] | None) -> Callable[[], None] | None:
    """A Popen preexec_fn that pins the child (and every thread it starts) to `cores`."""
    # Not can_pin(): the parent may already be pinned to fewer cores than the child is to get.
    if not cores or not hasattr(os, "sched_setaffinity"):
        return None
    return lambda: os.sched_setaffinity(0, cores)


@dataclass
class Fleet:
    urls: list[str]
    proc: subprocess.Popen[bytes]

    @property
    def addresses(self) -> list[str]:
        """host:port of each replica, as a static discovery file lists them."""
        return [u.removeprefix("http://") for u in self.urls]

    def stop(self) -> None:
        procs.stop_process(self.proc, STOP_GRACE)


def start_fleet(
    kind: str, count: int, options: dict[str, Any] | None = None, *, cores: set[int] | None = None,
    timeout: float = 30.0, log: IO[bytes] | None = None,
) -> Fleet:  # fmt: skip
    """Start a fleet process and wait for its URLs."""
    argv = [sys.executable, "-m", "kubeinfer_devkit.bench.fleet", "--kind", kind, "--count", str(count)]
    for name, value in (options or {}).items():
        argv += ["--option", f"{name}={value}"]
    proc = subprocess.Popen(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, preexec_fn=pin_to(cores)
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    line = b""
    os.set_blocking(proc.stdout.fileno(), False)
    while not line.endswith(b"\n"):
        if proc.poll() is not None or time.monotonic() > deadline:
            procs.stop_process(proc, STOP_GRACE)
            raise RuntimeError(f"the {kind} fleet did not start (exit {proc.returncode})")
        chunk = proc.stdout.read()
        if chunk:
            line += chunk
        else:
            time.sleep(0.02)
    return Fleet(json.loads(line)["urls"], proc)


def static_config(
    model: str, addresses: Sequence[str], strategy: str, *, max_num_seqs: int | None = None,
    target_inflight: int | None = None, max_queue: int | None = None,
) -> dict[str, Any]:  # fmt: skip
    """A `kubeinfer gateway --static` document serving `addresses` as the replicas of `model`."""
    routing: dict[str, Any] = {"strategy": strategy}
    if target_inflight is not None:
        routing["targetInflight"] = target_inflight
    if max_queue is not None:
        routing["maxQueue"] = max_queue
    entry: dict[str, Any] = {
        "name": model,
        "engine": "vllm",
        "endpoints": list(addresses),
        "routing": routing,
    }
    if max_num_seqs is not None:
        entry["maxNumSeqs"] = max_num_seqs
    return {"models": [entry]}


@dataclass
class GatewayProcess:
    url: str
    proc: subprocess.Popen[bytes]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        procs.stop_process(self.proc, STOP_GRACE)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def start_gateway(
    static: dict[str, Any], workdir: str, *, cores: set[int] | None = None, scrape_interval: float = 1.0,
    timeout: float = 30.0, log: IO[bytes] | None = None, extra_args: Sequence[str] = (),
) -> GatewayProcess:  # fmt: skip
    """`kubeinfer gateway --static` as its own process (as in production), without an access log, on a
    free port of 127.0.0.1; returns once /readyz answers 200. `extra_args`: more flags of `kubeinfer
    gateway` (`--server uvicorn`, ...)."""
    import yaml

    path = os.path.join(workdir, f"static-{time.monotonic_ns()}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(static, f)
    port = free_port()
    argv = [
        sys.executable, "-m", "kubeinfer.cli", "gateway", "--static", path, "--host", "127.0.0.1",
        "--port", str(port), "--no-access-log", "--scrape-interval", str(scrape_interval), *extra_args,
    ]  # fmt: skip
    return _start_http(argv, port, cores=cores, timeout=timeout, log=log, what="the gateway")


def start_floor(
    addresses: Sequence[str], *, cores: set[int] | None = None, timeout: float = 30.0,
    log: IO[bytes] | None = None,
) -> GatewayProcess:  # fmt: skip
    """The bare proxy of `bench.floor` over `addresses`, on a free port of 127.0.0.1: the gateway's
    server and client with none of its logic, the floor under the gateway's figures."""
    port = free_port()
    argv = [sys.executable, "-m", "kubeinfer_devkit.bench.floor", "--port", str(port)]
    for address in addresses:
        argv += ["--replica", address]
    return _start_http(argv, port, cores=cores, timeout=timeout, log=log, what="the floor proxy")


def _start_http(
    argv: Sequence[str], port: int, *, cores: set[int] | None, timeout: float, log: IO[bytes] | None,
    what: str,
) -> GatewayProcess:  # fmt: skip
    """Start `argv` (serving on 127.0.0.1:`port`) and return once its /readyz answers 200."""
    import urllib.request

    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, preexec_fn=pin_to(cores))
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=1) as resp:
                if resp.status == 200:
                    return GatewayProcess(url, proc)
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            procs.stop_process(proc, STOP_GRACE)
            raise RuntimeError(f"{what} did not start (exit {proc.returncode})")
        time.sleep(0.05)


def cpu_seconds(stat: str, ticks_per_second: float) -> float:
    """utime + stime of a /proc/PID/stat line, in seconds. The command name (field 2) may hold spaces
    and parentheses, so fields are counted after its last ')'."""
    rest = stat.rsplit(")", 1)[1].split()
    return (int(rest[11]) + int(rest[12])) / ticks_per_second  # fields 14 and 15 of proc(5)


def process_cpu_seconds(pid: int) -> float:
    """CPU time a process has used so far (user + system), from /proc, else psutil."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return cpu_seconds(f.read(), os.sysconf("SC_CLK_TCK"))
    except OSError:
        import psutil

        t = psutil.Process(pid).cpu_times()
        return float(t.user + t.system)


if __name__ == "__main__":
    raise SystemExit(main())
