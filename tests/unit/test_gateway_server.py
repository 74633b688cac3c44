"""kubeinfer's own HTTP server (gateway/httpserver.py) and client (gateway/upstream.py PooledUpstream),
for real over sockets on 127.0.0.1.

The rest of the gateway's tests drive the ASGI app in process (Starlette's TestClient) with replicas
played in memory; here the same app runs as `kubeinfer gateway` runs it, on its own server, in front
of replicas on real sockets reached with its own client: JSON and streamed answers, the usage ledger
and metrics, a dead replica retried before the first byte, a client leaving mid-stream (the replica's
connection is closed), auth, errors, keep-alive, pipelining, HEAD, Expect: 100-continue. The client's
own cases (pool reuse, a stale pooled connection, cuts, read timeout, a body that ends with the
connection) use raw replicas. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest

from kubeinfer.gateway.app import GatewayApp, GatewaySettings, create_app
from kubeinfer.gateway.auth import ApiKey, KeyStore, digest
from kubeinfer.gateway.httpserver import HTTPServer
from kubeinfer.gateway.registry import ModelEntry, Registry
from kubeinfer.gateway.routing import Endpoint
from kubeinfer.gateway.upstream import PooledUpstream, UpstreamError
from kubeinfer_devkit.asgi import lifespan, read_body

CHUNK = (
    b'data: {"id":"x","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":" tok"}}]}'
    b"\n\n"
)
USAGE = (
    b'data: {"id":"x","object":"chat.completion.chunk","choices":[],'
    b'"usage":{"prompt_tokens":3,"completion_tokens":%d,"total_tokens":%d}}\n\ndata: [DONE]\n\n'
)


def answer(tokens: int = 4) -> bytes:
    return json.dumps({
        "id": "x", "object": "chat.completion", "model": "tiny",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": " tok" * tokens},
                     "finish_reason": "length"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": tokens, "total_tokens": tokens + 3},
    }).encode()  # fmt: skip


class Replica:
    """A raw ASGI replica: JSON answers, SSE streams (`stream: true`, one chunk every `interval` s, until
    `max_tokens` or cut), and counts of what it saw."""

    def __init__(self, interval: float = 0.01) -> None:
        self.interval = interval
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.streams_cut = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        body = await read_body(receive)
        if scope["path"] == "/metrics":
            await _reply(send, 200, b"text/plain", b"")
            return
        req = json.loads(body)
        self.requests.append(req)
        self.headers.append({k.decode(): v.decode() for k, v in scope["headers"]})
        tokens = req.get("max_tokens", 4)
        if not req.get("stream"):
            await _reply(send, 200, b"application/json", answer(tokens))
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})  # fmt: skip
        left = asyncio.ensure_future(receive())  # done when the gateway closes the connection
        try:
            for _ in range(tokens):
                if left.done():
                    self.streams_cut += 1
                    return
                await send({"type": "http.response.body", "body": CHUNK, "more_body": True})
                await asyncio.sleep(self.interval)
            await send({"type": "http.response.body", "body": USAGE % (tokens, tokens + 3)})
        finally:
            left.cancel()


async def _reply(send: Any, status: int, ctype: bytes, body: bytes) -> None:
    headers = [(b"content-type", ctype), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


@contextlib.asynccontextmanager
async def serving(
    app: Any, keep_alive_timeout: float = 5.0, header_timeout: float = 30.0
) -> AsyncIterator[int]:
    """`app` on kubeinfer's server on a free port of 127.0.0.1."""
    server = HTTPServer(app, keep_alive_timeout=keep_alive_timeout, header_timeout=header_timeout)
    await server.start("127.0.0.1", 0)
    try:
        yield server.port
    finally:
        await asyncio.wait_for(server.shutdown(grace=1), 10)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def gateway(addresses: list[str], keys: KeyStore | None = None, **settings: Any) -> GatewayApp:
    reg = Registry()
    reg.set_model(
        ModelEntry(name="tiny", served_name="tiny"),
        [Endpoint(id=f"r{i}", address=a, model="tiny") for i, a in enumerate(addresses)],
    )
    # The default client: PooledUpstream.
    return create_app(reg, GatewaySettings(scrape_interval=3600, hold_timeout=2, **settings), keys=keys)


def chat(**extra: Any) -> dict[str, Any]:
    return {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **extra}


# --- the gateway on its own server, in front of real sockets ----------------------------------------------


async def test_json_and_streams_through_the_gateway_with_usage_and_metrics():
    replica = Replica()
    async with serving(replica) as rport:
        app = gateway([f"127.0.0.1:{rport}"])
        async with (
            serving(app) as port,
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as c,
        ):
            r = await c.post("/v1/chat/completions", json=chat(max_tokens=5), headers={"authorization": "x"})
            assert r.status_code == 200
            assert r.json()["usage"]["completion_tokens"] == 5
            assert r.headers["x-kubeinfer-replica"] == "r0"
            assert r.headers["content-length"] == str(len(r.content))  # passed through, not chunked
            assert "authorization" not in replica.headers[-1]  # the client's key is never forwarded

            async with c.stream("POST", "/v1/chat/completions", json=chat(stream=True, max_tokens=6)) as s:
                assert s.status_code == 200 and s.headers["transfer-encoding"] == "chunked"
                text = b"".join([chunk async for chunk in s.aiter_raw()])
            assert text.count(b" tok") == 6 and text.endswith(b"data: [DONE]\n\n")
            assert b'"usage"' not in text  # asked for by the gateway, stripped for this client
            assert replica.requests[-1]["stream_options"] == {"include_usage": True}

            ledger = app.state.gw.ledger[("anonymous", "tiny")]
            assert ledger["requests"] == 2 and ledger["completionTokens"] == 11
            metrics = (await c.get("/metrics")).text
            assert 'kubeinfer_gateway_requests_total{code="200",model="tiny",replica="r0"} 2.0' in metrics
            assert (await c.get("/v1/models")).json()["data"][0]["id"] == "tiny"
            r = await c.post("/v1/chat/completions", json={**chat(), "model": "nope"})
            assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
            r = await c.post(
                "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
            )
            assert r.status_code == 400
            assert (await c.get("/v1/chat/completions")).status_code == 405


async def test_a_dead_replica_is_retried_before_the_first_byte():
    replica = Replica()
    dead = _free_port()  # nothing listens there
    async with serving(replica) as rport:
        app = gateway([f"127.0.0.1:{dead}", f"127.0.0.1:{rport}"])
        async with (
            serving(app) as port,
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as c,
        ):
            for _ in range(4):  # round-robin sends half of them to the dead one first
                r = await c.post("/v1/chat/completions", json=chat())
                assert r.status_code == 200 and r.headers["x-kubeinfer-replica"] == "r1"
            metrics = (await c.get("/metrics")).text
            retries = re.search(r'kubeinfer_gateway_retries_total\{model="tiny"\} ([0-9.]+)', metrics)
            assert retries is not None and float(retries.group(1)) >= 2


async def test_all_replicas_dead_is_a_502_envelope():
    app = gateway([f"127.0.0.1:{_free_port()}"], retries=0)
    async with serving(app) as port, httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as c:
        r = await c.post("/v1/chat/completions", json=chat())
        assert r.status_code == 502 and r.json()["error"]["code"] == "bad_gateway"


async def test_a_client_leaving_mid_stream_closes_the_replica_connection():
    replica = Replica(interval=0.05)
    async with serving(replica) as rport:
        app = gateway([f"127.0.0.1:{rport}"])
        async with serving(app) as port:
            body = json.dumps(chat(stream=True, max_tokens=200)).encode()
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            head = b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            writer.write(head + b"content-length: %d\r\n\r\n%s" % (len(body), body))
            seen = b""
            while seen.count(b"data:") < 2:
                data = await asyncio.wait_for(reader.read(4096), 5)
                assert data, "closed before two events"
                seen += data
            writer.close()
            deadline = time.monotonic() + 5
            while replica.streams_cut == 0 or app.state.gw.loads["r0"].inflight:
                assert time.monotonic() < deadline, "the replica's stream was not cut"
                await asyncio.sleep(0.02)
            assert app.state.gw.loads["r0"].inflight == 0


async def test_keys_are_checked_on_the_own_server():
    replica = Replica()
    async with serving(replica) as rport:
        app = gateway([f"127.0.0.1:{rport}"], keys=KeyStore([ApiKey("alice", digest("ka"))], required=True))
        async with (
            serving(app) as port,
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as c,
        ):
            assert (await c.post("/v1/chat/completions", json=chat())).status_code == 401
            r = await c.post("/v1/chat/completions", json=chat(), headers={"authorization": "Bearer ka"})
            assert r.status_code == 200
            assert app.state.gw.ledger[("alice", "tiny")]["requests"] == 1


# --- the server itself --------------------------------------------------------------------------------


async def _echo_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        await lifespan(receive, send)
        return
    body = await read_body(receive)
    out = json.dumps({"path": scope["path"], "query": scope["query_string"].decode(), "n": len(body),
                      "method": scope["method"]}).encode()  # fmt: skip
    await _reply(send, 200, b"application/json", out)


async def _raw(port: int, data: bytes, until: Callable[[bytes], bool]) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    seen = b""
    try:
        while not until(seen):
            chunk = await asyncio.wait_for(reader.read(65536), 5)
            if not chunk:
                break
            seen += chunk
    finally:
        writer.close()
    return seen


async def test_pipelined_requests_are_answered_in_order_and_head_has_no_body():
    async with serving(_echo_app) as port:
        data = (b"POST /a?x=1 HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\n\r\nabc"
                b"GET /b%20c HTTP/1.1\r\nhost: x\r\n\r\n"
                b"HEAD /c HTTP/1.1\r\nhost: x\r\n\r\n")  # fmt: skip
        seen = await _raw(port, data, lambda s: s.count(b"HTTP/1.1 200") == 3)
        first, second = seen.index(b'"path": "/a"'), seen.index(b'"path": "/b c"')
        assert first < second and b'"query": "x=1"' in seen and b'"n": 3' in seen
        assert seen.endswith(b"\r\n\r\n")  # the HEAD answer is a head only
        assert seen.count(b"date: ") == 3


async def test_expect_continue_large_chunked_body_and_bad_requests():
    async with serving(_echo_app) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"POST /x HTTP/1.1\r\nhost: x\r\nexpect: 100-continue\r\ntransfer-encoding: chunked\r\n\r\n"
        )
        assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5) == b"HTTP/1.1 100 Continue\r\n\r\n"
        piece = b"z" * 50000
        for _ in range(4):  # over the 64 KiB buffer: reading pauses until the app takes it
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        writer.write(b"0\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        assert b'"n": 200000' in await asyncio.wait_for(reader.readexactly(length), 5)
        writer.close()
        bad = await _raw(port, b"NOT HTTP\r\n\r\n", lambda s: False)
        assert bad.startswith(b"HTTP/1.1 400")


async def test_a_trickled_head_is_cut_off_after_the_header_timeout():
    async with serving(_echo_app, keep_alive_timeout=1.0, header_timeout=1.0) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        started = time.monotonic()
        with contextlib.suppress(ConnectionError):
            for _ in range(40):  # 8 s at most: a byte of head every 0.2 s, never the end of it
                writer.write(b"GET /x HTTP/1.1\r\nx-slow: " if _ == 0 else b"a")
                await writer.drain()
                if reader.at_eof():
                    break
                with contextlib.suppress(TimeoutError):
                    if await asyncio.wait_for(reader.read(1), 0.2) == b"":
                        break
        assert 1.0 <= time.monotonic() - started < 4
        writer.close()


async def test_app_errors_are_500_and_http10_closes():
    async def broken(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await Replica()(scope, receive, send)
            return
        if scope["path"] == "/empty":  # 204: no body and no framing, even without a length
            await send({"type": "http.response.start", "status": 204, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        if scope["path"] == "/stream":  # no length, HTTP/1.0: the body ends with the connection
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"one ", "more_body": True})
            await send({"type": "http.response.body", "body": b"two"})
            return
        raise RuntimeError("boom")

    async with serving(broken) as port:
        seen = await _raw(port, b"GET / HTTP/1.1\r\nhost: x\r\n\r\n", lambda s: s.endswith(b"Error"))
        assert seen.startswith(b"HTTP/1.1 500") and b"connection: close" in seen
        seen = await _raw(port, b"GET /empty HTTP/1.1\r\nhost: x\r\n\r\nGET /empty HTTP/1.1\r\n\r\n",
                          lambda s: s.count(b"204") == 2)  # fmt: skip
        assert seen.count(b"HTTP/1.1 204 No Content\r\n") == 2 and b"chunked" not in seen
        seen = await _raw(port, b"GET /stream HTTP/1.0\r\n\r\n", lambda s: False)
        assert seen.startswith(b"HTTP/1.1 200") and seen.endswith(b"\r\n\r\none two")
        assert b"chunked" not in seen


# --- the client --------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def raw_replica(
    handle: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> AsyncIterator[int]:
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


async def _read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = (
        int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        if b"content-length" in head.lower()
        else 0
    )
    return head + await reader.readexactly(length)


async def test_client_reuses_connections_and_reads_json_and_chunks():
    replica = Replica()
    async with serving(replica) as port:
        client = PooledUpstream(1, 10)
        try:
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            for _ in range(3):
                resp = await client.post(
                    url, {"content-type": "application/json"}, json.dumps(chat()).encode()
                )
                assert resp.status == 200
                body = b"".join([c async for c in resp.chunks()])
                await resp.close()
                assert json.loads(body)["usage"]["completion_tokens"] == 4
            assert len(client.idle[f"127.0.0.1:{port}"]) == 1  # one connection, kept
            resp = await client.post(url, {}, json.dumps(chat(stream=True, max_tokens=3)).encode())
            got: list[bytes] = []
            await resp.pump(lambda chunk: got.append(chunk) or False)  # type: ignore[attr-defined]
            await resp.close()
            assert b"".join(got).count(b" tok") == 3 and b"".join(got).endswith(b"[DONE]\n\n")
            status, text = await client.get_text(f"http://127.0.0.1:{port}/metrics", 2)
            assert status == 200 and text == ""
        finally:
            await client.aclose()


async def test_client_retries_a_stale_pooled_connection_once_and_reports_refusals():
    served = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        served.append(1)
        body = b"ok"
        # Answers, then closes without saying so: the pooled connection is stale on its next use.
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n" + body)
        await writer.drain()
        writer.close()

    async with raw_replica(handle) as port:
        client = PooledUpstream(1, 10)
        try:
            for _ in range(3):
                resp = await client.post(f"http://127.0.0.1:{port}/x", {}, b"{}")
                assert b"".join([c async for c in resp.chunks()]) == b"ok"
                await resp.close()
                await asyncio.sleep(0.05)  # the replica's close arrives
            assert len(served) == 3
        finally:
            await client.aclose()
    client = PooledUpstream(1, 10)
    try:
        with pytest.raises(UpstreamError, match="cannot connect"):
            await client.post(f"http://127.0.0.1:{_free_port()}/x", {}, b"{}")
    finally:
        await client.aclose()


async def test_client_cut_body_read_timeout_and_body_until_close():
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await _read_request(reader)
        if b"/cut" in request:
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npartial")
        elif b"/silent" in request:
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n4\r\nsome\r\n")
            await writer.drain()
            await asyncio.sleep(5)
        else:  # no length, no chunks: the body is what comes until the close
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nall of it")
        await writer.drain()
        writer.close()

    async with raw_replica(handle) as port:
        client = PooledUpstream(1, read_timeout=0.5)
        try:
            resp = await client.post(f"http://127.0.0.1:{port}/cut", {}, b"{}")
            with pytest.raises(UpstreamError):
                async for _ in resp.chunks():
                    pass
            await resp.close()
            resp = await client.post(f"http://127.0.0.1:{port}/whole", {}, b"{}")
            assert b"".join([c async for c in resp.chunks()]) == b"all of it"
            await resp.close()
            resp = await client.post(f"http://127.0.0.1:{port}/silent", {}, b"{}")
            started = time.monotonic()
            with pytest.raises(UpstreamError, match="no data"):
                async for _ in resp.chunks():
                    pass
            assert time.monotonic() - started < 3
            await resp.close()
            assert not client.busy
        finally:
            await client.aclose()


# --- the other servers `kubeinfer gateway --server` offers ------------------------------------------------


@pytest.mark.parametrize("server", ["kubeinfer", "uvicorn", "aiohttp", "granian"])
def test_every_server_of_the_cli_serves_json_and_streams(server, tmp_path):
    """`kubeinfer gateway --server X` as its own process in front of an echo replica: a JSON answer with
    its usage and a stream with its events, both counted in /metrics."""
    if server == "granian":
        pytest.importorskip("granian", reason="granian is optional (measured slower)")
    import urllib.request

    from kubeinfer_devkit.bench import fleet

    replicas = fleet.start_fleet("echo", 1, {"chunk_interval_ms": 1})
    try:
        static = fleet.static_config("echo", replicas.addresses, "round-robin")
        gw = fleet.start_gateway(static, str(tmp_path), extra_args=["--server", server])
        try:
            for stream in (False, True):
                body = {"model": "echo", "messages": [{"role": "user", "content": "x"}], "max_tokens": 3}
                req = urllib.request.Request(
                    gw.url + "/v1/chat/completions", data=json.dumps({**body, "stream": stream}).encode(),
                    headers={"content-type": "application/json"},
                )  # fmt: skip
                with urllib.request.urlopen(req, timeout=10) as resp:
                    text = resp.read()
                    assert resp.status == 200 and resp.headers["x-kubeinfer-replica"]
                if stream:
                    assert text.count(b" tok") == 3 and text.endswith(b"data: [DONE]\n\n")
                else:
                    assert json.loads(text)["usage"]["completion_tokens"] == 3
            with urllib.request.urlopen(gw.url + "/metrics", timeout=10) as resp:
                metrics = resp.read().decode()
            assert 'kubeinfer_gateway_usage_requests_total{key="anonymous",model="echo"} 2.0' in metrics
        finally:
            gw.stop()
    finally:
        replicas.stop()
