"""The gateway's HTTP client to replicas and remote APIs, behind one small interface.

Two implementations:

- `PooledUpstream` (the default): plain-HTTP replicas through the gateway's own HTTP/1.1 client, an
  asyncio Protocol per keep-alive connection with httptools' response parser (llhttp, C), and a
  per-address pool. It is what a proxy hop needs and nothing more: no request or response objects,
  no per-chunk timer (one sweeper enforces the read timeout), no cookie, redirect or tracing
  machinery. aiohttp's client was about a fifth of the gateway's CPU per request (py-spy,
  docs/benchmarks.md); this one a fraction of that. `https://` URLs (remote APIs: TLS, proxies,
  anything unusual) go to aiohttp, through the same interface.
- `AiohttpUpstream`: aiohttp for everything (`--upstream-client aiohttp`, the earlier default).
  aiohttp's pure-Python rival httpx (h11, anyio) cost several times more per request; aiohttp also
  comes with kubernetes_asyncio already.

Tests that replace the network with an in-memory transport pass their own `Upstream` to `create_app`
(tests/httpx_upstream.py wraps httpx's `MockTransport`); httpx is not a dependency of the product.

Every implementation gives the proxy the same thing: the status and headers once the upstream answered (or
`UpstreamError` before any byte, which the proxy may retry elsewhere), then the raw body chunks as
they arrive (`UpstreamError` mid-body), and `close()`, which also aborts an unfinished response, so
the engine stops generating for a client that is gone.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncIterator, Callable
from typing import Protocol

import aiohttp
import httptools

from kubeinfer import contract


class UpstreamError(Exception):
    """Connection, protocol or timeout failure talking to a replica."""


class UpstreamResponse(Protocol):
    status: int
    headers: list[tuple[str, str]]

    def chunks(self) -> AsyncIterator[bytes]: ...

    async def close(self) -> None: ...


class Upstream(Protocol):
    async def post(self, url: str, headers: dict[str, str], body: bytes) -> UpstreamResponse: ...

    async def get_text(self, url: str, timeout: float) -> tuple[int, str]: ...

    async def aclose(self) -> None: ...


# --- aiohttp (production) --------------------------------------------------------------------------


class _AiohttpResponse:
    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self._resp = resp
        self.status = resp.status
        self.headers = list(resp.headers.items())

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._resp.content.iter_any():
                yield chunk
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise UpstreamError(f"{type(exc).__name__}: {exc}") from exc

    async def close(self) -> None:
        # release() would read an unfinished body to the end to reuse the connection; close() drops it.
        if self._resp.content.is_eof():
            self._resp.release()
        else:
            self._resp.close()


class AiohttpUpstream:
    def __init__(self, connect_timeout: float, read_timeout: float) -> None:
        # No pool limit: admission control (targetInflight per replica) already bounds concurrency.
        connector = aiohttp.TCPConnector(
            limit=0, keepalive_timeout=contract.UPSTREAM_KEEPALIVE_SECONDS, enable_cleanup_closed=True
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            # Bodies pass through as they are: no decompression, no added headers, no cookie jar.
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding"),
            cookie_jar=aiohttp.DummyCookieJar(),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout, sock_read=read_timeout),
        )

    async def post(self, url: str, headers: dict[str, str], body: bytes) -> UpstreamResponse:
        for attempt in (1, 2):
            try:
                resp = await self._session.post(url, data=body, headers=headers)
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
                # A pooled keep-alive connection the replica had already closed fails like this on
                # reuse; that says nothing about the replica, so once more on a fresh connection.
                if attempt == 1 and not isinstance(exc, aiohttp.ClientConnectorError):
                    continue
                raise UpstreamError(f"{type(exc).__name__}: {exc}") from exc
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise UpstreamError(f"{type(exc).__name__}: {exc}") from exc
            return _AiohttpResponse(resp)
        raise AssertionError("unreachable")

    async def get_text(self, url: str, timeout: float) -> tuple[int, str]:
        try:
            async with self._session.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                return resp.status, await resp.text()
        except (aiohttp.ClientError, TimeoutError, UnicodeDecodeError) as exc:
            raise UpstreamError(f"{type(exc).__name__}: {exc}") from exc

    async def aclose(self) -> None:
        await self._session.close()


# --- kubeinfer's own HTTP/1.1 client (production, plain-HTTP replicas) ---------------------------------

_PAUSE_ABOVE = 256 << 10
"""Response bytes buffered (not yet taken by the relay) before the connection stops reading."""


class _Conn(asyncio.Protocol):
    """One keep-alive connection to a replica; carries one request at a time."""

    __slots__ = (
        "_buffered",
        "_framed",
        "_reading_paused",
        "body",
        "closed",
        "complete",
        "error",
        "head",
        "headers",
        "idle_since",
        "keep_alive",
        "key",
        "last_read",
        "parser",
        "pool",
        "sink",
        "sink_error",
        "status",
        "transport",
        "waiter",
    )  # fmt: skip

    def __init__(self, pool: PooledUpstream, key: str) -> None:
        self.pool = pool
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.idle_since = 0.0
        self.last_read = 0.0
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.headers: list[tuple[str, str]] = []
        self.head: asyncio.Future[None] | None = None
        self.body: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._reading_paused = False
        self.waiter: asyncio.Future[None] | None = None
        self.complete = False
        self.keep_alive = True
        self._framed = False
        self.error: str | None = None
        self.sink: Callable[[bytes], bool] | None = None
        """Where body chunks go straight from `on_body` while `_PooledResponse.pump` runs."""
        self.sink_error: BaseException | None = None

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool._forget(self)
        if self.status and exc is None and not self._framed and not self.complete:
            self.complete = True  # a body without length or chunks ends with the connection
            self.keep_alive = False
        elif not self.complete:
            self.error = f"connection lost: {exc}" if exc else "connection closed by the replica"
            self._wake_head()
        self._wake()

    def data_received(self, data: bytes) -> None:
        self.last_read = self.pool.now
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.error = f"invalid response: {exc}"
            self.keep_alive = False
            self._wake_head()
            self._wake()
            if self.transport is not None:
                self.transport.close()

    def eof_received(self) -> bool | None:
        return None

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.decode("latin-1")
        if len(key) in (14, 17) and key.lower() in ("content-length", "transfer-encoding"):
            self._framed = True
        self.headers.append((key, value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()
        self._wake_head()

    def on_body(self, body: bytes) -> None:
        sink = self.sink
        if sink is not None:
            try:
                if sink(body) and not self._reading_paused and self.transport is not None:
                    self._reading_paused = True  # the client reads slower than the replica writes
                    self.transport.pause_reading()
            except BaseException as exc:  # the relay failed on this chunk: stop here, pump() raises it
                self.sink = None
                self.sink_error = exc
                self.error = f"relay failed: {exc!r}"
                if self.transport is not None:
                    self.transport.pause_reading()
                self._wake()
            return
        self.body.append(body)
        self._buffered += len(body)
        if self._buffered > _PAUSE_ABOVE and not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        self.complete = True
        self._wake()

    def _wake_head(self) -> None:
        head = self.head
        if head is not None and not head.done():
            head.set_result(None)

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def take(self) -> bytes:
        body = self.body
        data = body.popleft() if len(body) == 1 else b"".join(body)
        body.clear()
        self._buffered = 0
        if self._reading_paused and self.transport is not None and not self.closed:
            self._reading_paused = False
            self.transport.resume_reading()
        return data


class _PooledResponse:
    """The response on one `_Conn`: status and headers now, the body as it comes."""

    __slots__ = ("_conn", "_done", "headers", "status")

    def __init__(self, conn: _Conn) -> None:
        self._conn = conn
        self.status = conn.status
        self.headers = conn.headers
        self._done = False

    async def chunks(self) -> AsyncIterator[bytes]:
        conn = self._conn
        loop = conn.pool.loop
        while True:
            if conn.body:
                yield conn.take()
                continue
            if conn.complete:
                return
            if conn.error is not None:
                raise UpstreamError(conn.error)
            waiter = conn.waiter = loop.create_future()
            await waiter

    @property
    def whole(self) -> bool:
        """Whether the whole body is here already (a short JSON answer usually is, with its head)."""
        return self._conn.complete

    async def pump(self, sink: Callable[[bytes], bool]) -> None:
        """Hand each body chunk to `sink` from the connection's own callback as it arrives (no task
        wake-up per chunk), until the body ends; UpstreamError when it is cut. `sink` returns True when
        its consumer (the client's socket) is full: reading stops until `resume()`."""
        conn = self._conn
        if conn.body:
            sink(conn.take())
        if not conn.complete and conn.error is None:
            conn.sink = sink
            waiter = conn.waiter = conn.pool.loop.create_future()
            try:
                await waiter
            finally:
                conn.sink = None
        if conn.sink_error is not None:
            raise conn.sink_error
        if conn.body:  # not expected: chunks go to the sink; kept so nothing is ever lost
            sink(conn.take())
        if not conn.complete:
            raise UpstreamError(conn.error or "the replica's response ended early")

    def resume(self) -> None:
        """The consumer has room again: read on."""
        conn = self._conn
        if conn._reading_paused and conn.transport is not None and not conn.closed:
            conn._reading_paused = False
            conn.transport.resume_reading()

    async def close(self) -> None:
        if self._done:
            return
        self._done = True
        conn = self._conn
        conn.pool._finished(conn)


class PooledUpstream:
    """Plain-HTTP replicas over pooled keep-alive connections (`_Conn`); https through aiohttp."""

    def __init__(self, connect_timeout: float, read_timeout: float, keepalive: float | None = None) -> None:
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.keepalive = contract.UPSTREAM_KEEPALIVE_SECONDS if keepalive is None else keepalive
        self.loop = asyncio.get_running_loop()
        self.idle: dict[str, list[_Conn]] = {}
        self.busy: set[_Conn] = set()
        self.now = time.monotonic()
        self._hosts: dict[str, tuple[str, int, bytes]] = {}
        self._tls: AiohttpUpstream | None = None
        self._sweeper = self.loop.create_task(self._sweep())

    def _fallback(self) -> AiohttpUpstream:
        if self._tls is None:
            self._tls = AiohttpUpstream(self.connect_timeout, self.read_timeout)
        return self._tls

    async def _sweep(self) -> None:
        """Once a second: the clock for read times, reads over `read_timeout` aborted, idle
        connections past the keep-alive dropped (before the replica's own 5 s, as aiohttp's was)."""
        while True:
            await asyncio.sleep(1.0)
            now = self.now = time.monotonic()
            for conn in [c for c in self.busy if now - c.last_read > self.read_timeout]:
                conn.error = f"no data from the replica for {self.read_timeout:g}s"
                conn._wake_head()
                conn._wake()
                if conn.transport is not None:
                    conn.transport.abort()
            for conns in self.idle.values():
                for conn in [c for c in conns if now - c.idle_since > self.keepalive]:
                    conns.remove(conn)
                    if conn.transport is not None:
                        conn.transport.close()

    def _host(self, hostport: str) -> tuple[str, int, bytes]:
        found = self._hosts.get(hostport)
        if found is None:
            host, _, port = hostport.rpartition(":")
            if not host or not port.isdigit():
                host, port = hostport, "80"
            found = self._hosts[hostport] = (host.strip("[]"), int(port), hostport.encode("latin-1"))
        return found

    async def _connect(self, key: str) -> _Conn:
        host, port, _ = self._host(key)
        try:
            _, conn = await asyncio.wait_for(
                self.loop.create_connection(lambda: _Conn(self, key), host, port), self.connect_timeout
            )
        except (OSError, TimeoutError) as exc:
            raise UpstreamError(f"cannot connect to {key}: {type(exc).__name__}: {exc}") from exc
        return conn

    def _idle_conn(self, hostport: str) -> _Conn | None:
        """The most recently used idle connection to `hostport` still open, or None."""
        conns = self.idle.get(hostport)
        while conns:
            conn = conns.pop()
            if not conn.closed and conn.transport is not None and not conn.transport.is_closing():
                return conn
        return None

    def _forget(self, conn: _Conn) -> None:
        self.busy.discard(conn)
        conns = self.idle.get(conn.key)
        if conns and conn in conns:
            conns.remove(conn)

    def _finished(self, conn: _Conn) -> None:
        """The relay is done with `conn`: back to the pool when the response was read to its end."""
        self.busy.discard(conn)
        if conn.complete and conn.keep_alive and not conn.closed and not conn.body:
            conn._reset()
            conn.idle_since = self.now = time.monotonic()
            self.idle.setdefault(conn.key, []).append(conn)
        elif conn.transport is not None and not conn.closed:
            conn.closed = True
            conn.transport.abort()  # unfinished: the replica sees the close and stops generating

    async def post(self, url: str, headers: dict[str, str], body: bytes) -> UpstreamResponse:
        if not url.startswith("http://"):
            return await self._fallback().post(url, headers, body)
        hostport, _, path = url[7:].partition("/")
        host_header = self._host(hostport)[2]
        head = [b"POST /", path.encode("latin-1"), b" HTTP/1.1\r\nhost: ", host_header,
                b"\r\ncontent-length: ", str(len(body)).encode(), b"\r\n"]  # fmt: skip
        for k, v in headers.items():
            head += (k.encode("latin-1"), b": ", v.encode("latin-1"), b"\r\n")
        head.append(b"\r\n")
        request = b"".join(head)
        for attempt in (1, 2):
            found = self._idle_conn(hostport)
            reused = found is not None
            conn = found or await self._connect(hostport)
            self.busy.add(conn)
            conn.last_read = self.now
            head_fut = conn.head = self.loop.create_future()
            transport = conn.transport
            assert transport is not None
            if len(body) < 16384:
                transport.write(request + body)
            else:
                transport.writelines((request, body))
            try:
                await head_fut
            except BaseException:  # cancelled (the client left): this connection's state is unknown
                self.busy.discard(conn)
                conn.closed = True
                transport.abort()
                raise
            if conn.error is not None and not conn.status:
                self.busy.discard(conn)
                if not conn.closed:
                    conn.closed = True
                    transport.abort()
                # A pooled connection the replica had already closed fails like this on reuse; that
                # says nothing about the replica, so once more on a fresh connection.
                if attempt == 1 and reused and not conn.body:
                    continue
                raise UpstreamError(f"{hostport}: {conn.error}")
            return _PooledResponse(conn)
        raise AssertionError("unreachable")

    async def get_text(self, url: str, timeout: float) -> tuple[int, str]:
        if not url.startswith("http://"):
            return await self._fallback().get_text(url, timeout)
        hostport, _, path = url[7:].partition("/")
        request = b"GET /%s HTTP/1.1\r\nhost: %s\r\naccept-encoding: identity\r\n\r\n" % (
            path.encode("latin-1"), self._host(hostport)[2],
        )  # fmt: skip

        async def fetch() -> tuple[int, str]:
            conn = self._idle_conn(hostport) or await self._connect(hostport)
            self.busy.add(conn)
            conn.last_read = self.now
            conn.head = self.loop.create_future()
            response = _PooledResponse(conn)
            try:
                assert conn.transport is not None
                conn.transport.write(request)
                await conn.head
                if conn.error is not None and not conn.status:
                    raise UpstreamError(conn.error)
                response.status = conn.status
                body = b"".join([chunk async for chunk in response.chunks()])
            finally:
                await response.close()
            return response.status, body.decode()

        try:
            return await asyncio.wait_for(fetch(), timeout)
        except (TimeoutError, UnicodeDecodeError) as exc:
            raise UpstreamError(f"{type(exc).__name__}: {exc}") from exc

    async def aclose(self) -> None:
        self._sweeper.cancel()
        for conn in [*self.busy, *(c for conns in self.idle.values() for c in conns)]:
            if conn.transport is not None:
                conn.transport.close()
        self.idle.clear()
        self.busy.clear()
        if self._tls is not None:
            await self._tls.aclose()
