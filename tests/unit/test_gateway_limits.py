"""The gateway's resource limits (docs/gateway.md, "Limits"): header size (431), body size per route
(413), in-flight requests per client (429), slow bodies (408) and idle keep-alive connections.

In process with Starlette's TestClient where one request at a time will do; otherwise the real
servers the CLI runs, each test on both (kubeinfer's own, gateway/httpserver.py, the default, and
uvicorn with `uvicorn_options`), on 127.0.0.1 with a free port, and raw sockets for what an HTTP client
library would not do (trickle a body, sit on an idle connection).
Replicas are played in memory (httpx.MockTransport). Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import AsyncIterator
from typing import Any, get_args

import httpx
import pytest
import uvicorn
from starlette.testclient import TestClient

from kubeinfer.cli import build_parser
from kubeinfer.gateway.app import GatewayApp, GatewaySettings, create_app
from kubeinfer.gateway.auth import ApiKey, KeyStore, digest
from kubeinfer.gateway.cli import gateway_config, gateway_settings, uvicorn_options
from kubeinfer.gateway.config import GatewayConfig, Route
from kubeinfer.gateway.httpserver import HTTPServer
from kubeinfer.gateway.limits import BodyDeadlines, ClientSlots
from kubeinfer.gateway.proxy import PROXIED
from kubeinfer.gateway.registry import ModelEntry, Registry
from kubeinfer.gateway.routing import Endpoint
from tests.cases import FIXTURES
from tests.httpx_upstream import mock_upstream

LLAMA = FIXTURES / "llama-server"
VLLM = FIXTURES / "vllm-0.32.0"
CHAT_ANSWER = json.loads((VLLM / "chat_completion.json").read_text())
FIRST_EVENT = (LLAMA / "chat_completion_stream.txt").read_text().split("\n\n")[0].encode() + b"\n\n"


def chat(content: str = "hi", **extra: Any) -> dict[str, Any]:
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": 4, **extra}


class Engine:
    """One replica: answers at once, or holds a request whose prompt is "wait" until `gate` is set,
    refuses connections for "fail", and streams (slowly, until cut or 10 s) for `stream: true`."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.held = 0
        self.streams_closed = 0

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/metrics":
            return httpx.Response(404)
        body = json.loads(request.content)
        content = (body.get("messages") or [{}])[0].get("content")
        if content == "fail":
            raise httpx.ConnectError("connection refused", request=request)
        if body.get("stream"):
            return httpx.Response(200, headers={"content-type": "text/event-stream"}, stream=_Stream(self))
        if content == "wait":
            self.held += 1
            await asyncio.wait_for(self.gate.wait(), 10)
        return httpx.Response(200, json=CHAT_ANSWER)


class _Stream(httpx.AsyncByteStream):
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    async def __aiter__(self) -> AsyncIterator[bytes]:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not self.engine.gate.is_set():
            yield FIRST_EVENT
            await asyncio.sleep(0.05)
        yield b"data: [DONE]\n\n"

    async def aclose(self) -> None:
        self.engine.streams_closed += 1


def _app(settings: GatewaySettings, engine: Any = None, keys: KeyStore | None = None) -> GatewayApp:
    reg = Registry()
    reg.set_model(ModelEntry(name="tiny", served_name="tiny"), [Endpoint(id="r0", address="10.0.0.1:8000",
                                                                         model="tiny")])  # fmt: skip
    settings.hold_timeout = settings.hold_timeout or 2
    settings.scrape_interval = 3600
    return create_app(reg, settings, upstream=mock_upstream(engine or Engine()), keys=keys)


@pytest.fixture(params=["kubeinfer", "uvicorn"])
def server(request: pytest.FixtureRequest) -> str:
    """The HTTP server a test runs the gateway on: each test on both."""
    return str(request.param)


@contextlib.asynccontextmanager
async def serve(
    app: GatewayApp, config: GatewayConfig | None = None, server: str = "kubeinfer"
) -> AsyncIterator[int]:
    """The app on `server` (kubeinfer's own or uvicorn), as `kubeinfer gateway` runs it, on a free port
    of 127.0.0.1."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    if server == "kubeinfer":
        own = HTTPServer(app, keep_alive_timeout=(config or GatewayConfig()).keep_alive_timeout)
        await own.start(sock=sock)
        try:
            yield port
        finally:
            await asyncio.wait_for(own.shutdown(grace=1), 10)
            sock.close()
        return
    server_ = uvicorn.Server(uvicorn.Config(app, **uvicorn_options(config or GatewayConfig())))
    task = asyncio.create_task(server_.serve(sockets=[sock]))
    try:
        async with asyncio.timeout(10):
            while not server_.started:
                assert not task.done(), "uvicorn did not start"
                await asyncio.sleep(0.01)
        yield port
    finally:
        server_.should_exit = True
        await asyncio.wait_for(task, 10)
        sock.close()


async def _connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length (the gateway's own answers have one)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    body = await asyncio.wait_for(reader.readexactly(int(headers.get("content-length", "0"))), 5)
    return int(lines[0].split()[1]), headers, body


async def _until(check: Any, seconds: float = 5) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def _handlers() -> list[asyncio.Task[Any]]:
    """The server's request tasks (one per request being handled): uvicorn's or kubeinfer's."""
    return [
        t
        for t in asyncio.all_tasks()
        if any(n in repr(t.get_coro()) for n in ("run_asgi", "_Connection._run"))
    ]


def _envelope(body: bytes | dict[str, Any], code: str) -> dict[str, Any]:
    err = (json.loads(body) if isinstance(body, bytes) else body)["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == code, err
    return err


# --- configuration ----------------------------------------------------------------------------------


def test_limits_are_config_fields_and_flags(tmp_path):
    f = tmp_path / "gateway.yaml"
    f.write_text(
        "maxBodyBytes: 4096\nmaxBodyBytesByRoute: {embeddings: 2048, chat/completions: 8192}\n"
        "maxHeaderBytes: 16384\nbodyTimeout: 5\nmaxConcurrentPerClient: 8\nkeepAliveTimeout: 75\n"
    )
    args = ["gateway", "--config", str(f), "--max-body-bytes-for", "embeddings=1024",
            "--max-body-bytes-for", "responses=65536", "--max-concurrent-per-client", "3",
            "--keep-alive-timeout", "65", "--body-timeout", "2.5", "--max-header-bytes", "8192"]  # fmt: skip
    config = gateway_config(build_parser().parse_args(args))
    # Route limits from flags are laid over the file's, route by route.
    assert config.max_body_bytes_by_route == {
        "embeddings": 1024,
        "chat/completions": 8192,
        "responses": 65536,
    }
    assert (config.max_concurrent_per_client, config.keep_alive_timeout) == (3, 65)
    assert (config.body_timeout, config.max_header_bytes, config.max_body_bytes) == (2.5, 8192, 4096)
    settings = gateway_settings(config)
    assert settings.max_body_bytes_by_route == config.max_body_bytes_by_route
    assert (settings.max_concurrent_per_client, settings.body_timeout, settings.max_header_bytes) == (
        3,
        2.5,
        8192,
    )
    assert uvicorn_options(config)["timeout_keep_alive"] == 65

    defaults = gateway_config(build_parser().parse_args(["gateway"]))
    assert defaults.max_body_bytes_by_route == {} and defaults.max_concurrent_per_client is None
    assert (defaults.max_header_bytes, defaults.body_timeout, defaults.keep_alive_timeout) == (65536, 30, 5)
    assert gateway_settings(defaults) == GatewaySettings()  # the app's defaults are the config's

    for bad in ("images=4096", "embeddings=10", "embeddings"):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["gateway", "--max-body-bytes-for", bad])
    f.write_text("maxBodyBytesByRoute: {images: 4096}\n")
    with pytest.raises(Exception, match="images"):
        gateway_config(build_parser().parse_args(["gateway", "--config", str(f)]))


def test_route_names_are_the_proxied_apis():
    assert set(get_args(Route)) == set(PROXIED)


# --- header size ------------------------------------------------------------------------------------


def test_headers_over_the_limit_get_431_on_every_path():
    app = _app(GatewaySettings(max_header_bytes=16 << 10))
    with TestClient(app) as client:
        assert client.get("/healthz", headers={"x-pad": "a" * (15 << 10)}).status_code == 200
        r = client.post("/v1/chat/completions", json=chat(), headers={"x-pad": "a" * (17 << 10)})
        assert r.status_code == 431
        assert "16384" in _envelope(r.json(), "request_header_fields_too_large")["message"]
        # Many small headers count as much as one big one, on Starlette's routes too.
        many = [(f"x-pad-{i}", "a" * 100) for i in range(200)]
        assert client.get("/healthz", headers=many).status_code == 431
        assert client.post("/v1/chat/completions", json=chat()).status_code == 200


# --- body size per route ----------------------------------------------------------------------------


def test_body_limit_is_per_route_with_the_default_for_the_others():
    settings = GatewaySettings(max_body_bytes=64 << 10, max_body_bytes_by_route={"embeddings": 2048})
    with TestClient(_app(settings)) as client:
        big = "x" * (8 << 10)
        assert client.post("/v1/chat/completions", json=chat(big)).status_code == 200
        assert client.post("/v1/embeddings", json={"model": "tiny", "input": "hi"}).status_code == 200
        r = client.post("/v1/embeddings", json={"model": "tiny", "input": big})
        assert r.status_code == 413
        assert "2048" in _envelope(r.json(), "request_too_large")["message"]
        # Without a Content-Length (chunked), reading stops at the limit.
        raw = json.dumps({"model": "tiny", "input": big}).encode()
        r = client.post("/v1/embeddings", content=iter([raw[:1000], raw[1000:]]))
        assert r.status_code == 413
        r = client.post("/v1/chat/completions", json=chat("x" * (65 << 10)))
        assert r.status_code == 413 and str(64 << 10) in _envelope(r.json(), "request_too_large")["message"]


# --- in-flight requests per client --------------------------------------------------------------------


def test_client_slots_count_and_forget_idle_clients():
    slots = ClientSlots(2)
    assert slots.take("a") and slots.take("a") and not slots.take("a") and slots.take("b")
    slots.give_back("a")
    assert slots.take("a")
    for client in ("a", "a", "b"):
        slots.give_back(client)
    assert slots.counts == {}


async def test_concurrency_per_key_429_and_release_on_completion(server):
    engine = Engine()
    keys = KeyStore([ApiKey("alice", digest("ka")), ApiKey("bob", digest("kb"))])
    app = _app(GatewaySettings(max_concurrent_per_client=1), engine, keys=keys)
    async with (
        serve(app, server=server) as port,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as c,
    ):
        alice, bob = {"authorization": "Bearer ka"}, {"authorization": "Bearer kb"}
        held = asyncio.create_task(c.post("/v1/chat/completions", json=chat("wait"), headers=alice))
        await _until(lambda: engine.held == 1)
        r = await c.post("/v1/chat/completions", json=chat(), headers=alice)
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert "over 1 requests in flight" in _envelope(r.json(), "concurrency_limit_exceeded")["message"]
        # Another key has its own slots.
        assert (await c.post("/v1/chat/completions", json=chat(), headers=bob)).status_code == 200
        engine.gate.set()
        assert (await asyncio.wait_for(held, 5)).status_code == 200
        assert app.state.gw.client_slots.counts == {}
        assert (await c.post("/v1/chat/completions", json=chat(), headers=alice)).status_code == 200


async def test_concurrency_anonymous_is_per_client_address_and_released_on_error(server):
    engine = Engine()
    app = _app(GatewaySettings(max_concurrent_per_client=1, retries=0), engine)
    async with serve(app, server=server) as port:
        url = f"http://127.0.0.1:{port}"
        other = httpx.AsyncHTTPTransport(local_address="127.0.0.2")  # another client on the loopback
        async with httpx.AsyncClient(base_url=url, timeout=10) as c, \
                httpx.AsyncClient(base_url=url, timeout=10, transport=other) as c2:  # fmt: skip
            held = asyncio.create_task(c.post("/v1/chat/completions", json=chat("wait")))
            await _until(lambda: engine.held == 1)
            assert (await c.post("/v1/chat/completions", json=chat())).status_code == 429
            assert (await c2.post("/v1/chat/completions", json=chat())).status_code == 200
            engine.gate.set()
            assert (await asyncio.wait_for(held, 5)).status_code == 200
            # An upstream failure (502) gives the slot back too.
            r = await c.post("/v1/chat/completions", json=chat("fail"))
            assert r.status_code == 502
            assert app.state.gw.client_slots.counts == {}
            assert (await c.post("/v1/chat/completions", json=chat())).status_code == 200


async def test_concurrency_released_at_stream_end_and_on_client_disconnect(server):
    engine = Engine()
    app = _app(GatewaySettings(max_concurrent_per_client=1), engine)
    slots = None
    async with serve(app, server=server) as port:
        slots = app.state.gw.client_slots
        # A client that goes away mid-stream: the relay is cancelled, the upstream closed, the slot freed.
        body = json.dumps(chat(stream=True)).encode()
        reader, writer = await _connect(port)
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     b"content-length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip
        await writer.drain()
        seen = b""
        while b"data:" not in seen:
            seen += await asyncio.wait_for(reader.read(4096), 5)
            assert seen, "connection closed before the first event"
        assert slots.counts == {"127.0.0.1": 1}
        writer.close()
        await _until(lambda: slots.counts == {} and engine.streams_closed == 1)

        # A stream read to its end.
        engine.gate.set()  # the fake engine's stream ends at once now
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as c:
            async with c.stream("POST", "/v1/chat/completions", json=chat(stream=True)) as r:
                assert r.status_code == 200
                text = b"".join([chunk async for chunk in r.aiter_raw()])
            assert text.endswith(b"data: [DONE]\n\n")
            await _until(lambda: slots.counts == {})
            assert (await c.post("/v1/chat/completions", json=chat())).status_code == 200
    assert slots.counts == {}


# --- slow bodies ------------------------------------------------------------------------------------------


def test_body_deadlines_cancel_only_late_reads():
    deadlines = BodyDeadlines(1.0)

    async def main() -> None:
        late = asyncio.create_task(asyncio.sleep(10))
        on_time = asyncio.create_task(asyncio.sleep(10))
        deadlines.start(late)
        deadlines.start(on_time)
        deadlines.reading[late] -= 2  # as if it started reading two seconds ago
        deadlines.sweep(time.monotonic())
        await asyncio.sleep(0)
        assert late.cancelled() and not on_time.cancelled() and on_time in deadlines.reading
        assert deadlines.timed_out(late) and not deadlines.timed_out(on_time)
        on_time.cancel()
        deadlines.finish(on_time)
        assert deadlines.reading == {} and deadlines.expired == set()

    asyncio.run(main())


async def test_a_trickled_body_gets_408_while_others_are_served(server):
    app = _app(GatewaySettings(body_timeout=0.5))
    async with serve(app, server=server) as port:
        reader, writer = await _connect(port)
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     b"content-length: 1000\r\n\r\n{")  # fmt: skip
        started = time.monotonic()

        async def trickle() -> None:
            with contextlib.suppress(ConnectionError):
                for _ in range(200):  # 10 s at most
                    await asyncio.sleep(0.05)
                    writer.write(b" ")
                    await writer.drain()

        trickler = asyncio.create_task(trickle())
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as c:
                t0 = time.monotonic()
                assert (await c.get("/healthz")).status_code == 200
                assert (await c.post("/v1/chat/completions", json=chat())).status_code == 200
                assert time.monotonic() - t0 < 0.4  # served while the slow body is still coming
            assert len(_handlers()) == 1  # the slow request's, waiting for its body
            status, _, body = await _read_response(reader)
            waited = time.monotonic() - started
            assert status == 408
            assert "0.5s" in _envelope(body, "request_timeout")["message"]
            assert 0.45 <= waited < 2.5, waited
            # The handler has returned while the client goes on sending: no task is left on the request.
            assert app.state.gw.body_deadlines.reading == {}
            assert not trickler.done()
            assert _handlers() == []
        finally:
            trickler.cancel()
            writer.close()


async def test_headers_then_silence_gets_408(server):
    app = _app(GatewaySettings(body_timeout=0.3))
    async with serve(app, server=server) as port:
        reader, writer = await _connect(port)
        writer.write(b"POST /v1/embeddings HTTP/1.1\r\nhost: x\r\ncontent-length: 10\r\n\r\n")
        status, _, body = await _read_response(reader)
        assert status == 408
        _envelope(body, "request_timeout")
        writer.close()


# --- header size and keep-alive on the real server --------------------------------------------------------


async def test_real_server_answers_431_for_large_headers(server):
    async with (
        serve(_app(GatewaySettings()), server=server) as port,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as c,
    ):
        r = await c.post("/v1/chat/completions", json=chat(), headers={"x-pad": "a" * (100 << 10)})
        assert r.status_code == 431
        _envelope(r.json(), "request_header_fields_too_large")
        assert (await c.get("/healthz", headers={"x-pad": "a" * (60 << 10)})).status_code == 200


async def test_idle_keep_alive_connection_is_closed_after_the_timeout(server):
    config = GatewayConfig(keep_alive_timeout=1.0)
    async with serve(_app(GatewaySettings()), config, server=server) as port:
        reader, writer = await _connect(port)
        writer.write(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        status, headers, _ = await _read_response(reader)
        assert status == 200 and headers.get("connection") != "close"
        idle = time.monotonic()
        with pytest.raises(TimeoutError):  # still open half-way through the timeout
            await asyncio.wait_for(reader.read(1), 0.5)
        assert await asyncio.wait_for(reader.read(1), 5) == b""  # then closed by the server
        assert 0.9 <= time.monotonic() - idle < 3
        writer.close()
