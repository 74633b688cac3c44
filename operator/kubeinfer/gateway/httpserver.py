"""The gateway's own HTTP/1.1 server: an asyncio Protocol on httptools that serves an ASGI app.

Why not uvicorn: per proxied request, uvicorn's protocol, its ASGI cycle and its flow control cost
about a quarter of the gateway's CPU (py-spy, docs/benchmarks.md "Gateway overhead"): an address
lookup per connection, a proxy-headers middleware, an asyncio.Event per cycle, a task per request and
per-message checks. This server does what the gateway needs and no more, on the same parser
(httptools, llhttp in C) and event loop (uvloop):

- one task per request (the app's coroutine), started once the head is parsed; `receive()` returns a
  Future (no coroutine per call), already done when the body is in, so a small body costs no wait;
- a response with a `content-length` is written in one `transport.write` (head and body together),
  anything else with chunked transfer encoding, the head written at once (a stream's client sees the
  status before the first token);
- keep-alive connections, closed by one sweeper per server after `keep_alive_timeout` idle seconds
  (no timer per request), or when a request head takes over `header_timeout` (30 s) to arrive;
  pipelined requests answered in order, `Expect: 100-continue`, HEAD;
- back-pressure both ways: a request body over 64 KiB buffered pauses reading, and `send` waits while
  the socket's write buffer is over its high-water mark (a slow client slows its own relay).

The app is the gateway's ASGI app (app.py), the same object uvicorn and the tests run, so everything
it does works alike on either server (`kubeinfer gateway --server uvicorn` keeps the old one).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import socket
import time
from collections.abc import Awaitable, Callable, MutableMapping
from email.utils import formatdate
from typing import Any

import httptools

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
App = Callable[
    [Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]
]

log = logging.getLogger("kubeinfer.gateway.server")

BODY_HIGH_WATER = 64 << 10
"""Request body bytes buffered before the connection stops reading until the app takes them."""
_ASGI = {"version": "3.0", "spec_version": "2.4"}
_REASONS = {
    200: b"OK", 201: b"Created", 204: b"No Content", 400: b"Bad Request", 401: b"Unauthorized",
    403: b"Forbidden", 404: b"Not Found", 405: b"Method Not Allowed", 408: b"Request Timeout",
    413: b"Payload Too Large", 422: b"Unprocessable Entity", 429: b"Too Many Requests",
    431: b"Request Header Fields Too Large", 500: b"Internal Server Error", 502: b"Bad Gateway",
    503: b"Service Unavailable", 504: b"Gateway Timeout",
}  # fmt: skip
_STATUS_LINES: dict[int, bytes] = {}
_DISCONNECT: Message = {"type": "http.disconnect"}
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_LAST_CHUNK = b"0\r\n\r\n"


def _status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    if line is None:
        reason = _REASONS.get(status, b"")
        line = _STATUS_LINES[status] = b"HTTP/1.1 %d %s\r\n" % (status, reason)
    return line


class _Request:
    """One request on a connection: its scope, its body as it comes, and the state of its answer."""

    __slots__ = (
        "body", "body_done", "chunked", "conn", "expect_continue", "head", "head_only", "keep_alive",
        "on_drain", "response_done", "scope", "started", "waiter",
    )  # fmt: skip

    def __init__(self, conn: _Connection, scope: Scope, keep_alive: bool, expect_continue: bool) -> None:
        self.conn = conn
        self.scope = scope
        self.body: collections.deque[bytes] = collections.deque()
        self.body_done = False
        self.keep_alive = keep_alive
        self.expect_continue = expect_continue
        self.head_only = scope["method"] == "HEAD"
        self.waiter: asyncio.Future[Message] | None = None
        self.started = False
        self.response_done = False
        self.chunked = False
        self.head: bytes | None = None
        """The response head, held back until the body (content-length) or written (chunked)."""
        self.on_drain: Callable[[], None] | None = None
        """Called when the client's socket takes data again after `write_body` said it was full."""

    def write_body(self, body: bytes) -> bool:
        """A piece of the body, written now (no ASGI message, no coroutine): the relay's per-chunk path
        for a started response. True when the client's socket buffer is full (stop feeding it)."""
        conn = self.conn
        if conn.closed or self.response_done or not body or self.head_only:
            return conn.write_paused
        out = b"%x\r\n%b\r\n" % (len(body), body) if self.chunked else body
        head = self.head
        if head is not None:
            self.head = None
            out = head + out
        conn.transport.write(out)
        return conn.write_paused

    # --- ASGI receive ---------------------------------------------------------------------------------

    def receive(self) -> asyncio.Future[Message]:
        """The next message as a Future: done at once when the body (or its end) is already here."""
        conn = self.conn
        fut: asyncio.Future[Message] = conn.loop.create_future()
        if self.body or self.body_done:
            fut.set_result(self._take())
        elif conn.closed or self.response_done:
            fut.set_result(_DISCONNECT)
        else:
            if self.expect_continue:
                self.expect_continue = False
                conn.transport.write(_CONTINUE)
            self.waiter = fut
        return fut

    def _take(self) -> Message:
        body = self.body
        if len(body) == 1:
            data = body.popleft()
        elif body:
            data = b"".join(body)
            body.clear()
        else:
            data = b""
        more = not self.body_done
        self.body_done = False  # delivered: from now on receive() waits for the end of the request
        self.conn.resume_body()
        return {"type": "http.request", "body": data, "more_body": more}

    def feed(self, chunk: bytes) -> None:
        self.body.append(chunk)
        self._wake()

    def end_body(self) -> None:
        self.body_done = True
        self.expect_continue = False
        self._wake()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(self._take())

    def disconnected(self) -> None:
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(_DISCONNECT)

    # --- ASGI send ------------------------------------------------------------------------------------

    async def send(self, message: Message) -> None:
        conn = self.conn
        kind = message["type"]
        if kind == "http.response.body":
            if not self.started:
                raise RuntimeError("http.response.body before http.response.start")
            if self.response_done:
                return
            body = message.get("body", b"")
            more = message.get("more_body", False)
            if conn.closed:
                if not more:
                    self.response_done = True
                return
            transport = conn.transport
            head = self.head
            if self.head_only:
                out = b""
            elif self.chunked:
                out = b"%x\r\n%b\r\n" % (len(body), body) if body else b""
                if not more:
                    out += _LAST_CHUNK
            else:
                out = body
            if head is not None:
                self.head = None
                out = head + out
            if out:
                transport.write(out)
            if not more:
                self.response_done = True
                conn.response_complete(self)
            elif conn.write_paused:
                await conn.drain()
        elif kind == "http.response.start":
            if self.started:
                raise RuntimeError("http.response.start sent twice")
            self.started = True
            status = message["status"]
            if status in (204, 304) or status < 200:
                self.head_only = True  # no body, no framing (RFC 9112 6.3)
            parts = [_status_line(status), b""]
            length = dated = False
            for name, value in message.get("headers", ()):
                lname = name.lower()
                if lname == b"content-length":
                    length = True
                elif lname == b"date":
                    dated = True  # a proxied answer keeps the replica's
                elif lname == b"connection" and value.lower() == b"close":
                    self.keep_alive = False
                    continue  # written below, once
                elif lname == b"transfer-encoding":
                    continue  # ours to choose
                parts += (name, b": ", value, b"\r\n")
            if not length and not self.head_only:
                if self.scope["http_version"] == "1.1":
                    self.chunked = True
                    parts.append(b"transfer-encoding: chunked\r\n")
                else:
                    self.keep_alive = False  # HTTP/1.0 without a length: the close ends the body
            if not dated:
                parts[1] = conn.server.date_header
            if not self.keep_alive:
                parts.append(b"connection: close\r\n")
            parts.append(b"\r\n")
            head = b"".join(parts)
            if self.chunked or self.head_only:
                if not conn.closed:
                    conn.transport.write(head)  # a stream's status goes out now
            else:
                self.head = head  # with the body, in one write
        else:
            raise RuntimeError(f"unexpected ASGI message {kind!r}")


class _Connection(asyncio.Protocol):
    """One client connection: parses requests (httptools), runs the app per request, in order."""

    def __init__(self, server: HTTPServer) -> None:
        self.server = server
        self.app = server.app
        self.loop = server.loop
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.parser = httptools.HttpRequestParser(self)
        self.closed = False
        self.write_paused = False
        self.read_paused = False
        self._drain: asyncio.Future[None] | None = None
        self.current: _Request | None = None
        """The request being answered."""
        self.pipeline: collections.deque[_Request] = collections.deque()
        """Requests parsed behind it (pipelining), answered in order."""
        self.parsing: _Request | None = None
        """The request whose head or body is being parsed now."""
        self.task: asyncio.Task[None] | None = None
        self.idle_since: float | None = None
        self.head_since: float | None = None
        """When the head being parsed began (the server's clock): a head must be in within
        `header_timeout`, so a client cannot hold a connection by trickling a head."""
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self.client: tuple[str, int] | None = None

    # --- asyncio.Protocol ------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.client = (peer[0], peer[1]) if isinstance(peer, tuple) else None
        self.idle_since = time.monotonic()
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.connections.discard(self)
        for request in (self.current, *self.pipeline):
            if request is not None:
                request.disconnected()
        if self.parsing is not None and self.parsing is not self.current:
            self.parsing.disconnected()
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    def data_received(self, data: bytes) -> None:
        self.idle_since = None
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._refuse(b"400 Bad Request", b"upgrade is not supported")
        except httptools.HttpParserError:
            self._refuse(b"400 Bad Request", b"invalid HTTP request")

    def eof_received(self) -> bool | None:
        return None  # close

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.current is not None and self.current.on_drain is not None:
            self.current.on_drain()
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)
        self._drain = None

    async def drain(self) -> None:
        if self.write_paused and not self.closed:
            if self._drain is None:
                self._drain = self.loop.create_future()
            await self._drain

    # --- httptools callbacks ---------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self.head_since = self.server.clock
        self._url = b""
        self._headers = []

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self.head_since = None
        parser = self.parser
        url = self._url
        path, _, query = url.partition(b"?")
        raw_path = path
        if b"%" in path:
            from urllib.parse import unquote_to_bytes

            path = unquote_to_bytes(path)
        version = parser.get_http_version()
        headers = self._headers
        expect = False
        for name, value in headers:
            if name == b"expect" and value.lower() == b"100-continue":
                expect = True
        scope: Scope = {
            "type": "http", "asgi": _ASGI, "http_version": version, "server": self.server.sockname,
            "client": self.client, "scheme": "http", "method": parser.get_method().decode("ascii"),
            "root_path": "", "path": path.decode("utf-8", "surrogateescape"), "raw_path": raw_path,
            "query_string": query, "headers": headers, "state": self.server.lifespan_state.copy(),
        }  # fmt: skip
        request = _Request(self, scope, parser.should_keep_alive(), expect)
        self.parsing = request
        if self.current is None:
            self._start(request)
        else:
            self.pipeline.append(request)
            self._pause_reading()  # one request ahead at most

    def on_body(self, body: bytes) -> None:
        request = self.parsing
        if request is None or request.response_done:
            return  # answered before its body was read (413, 408): the rest is dropped
        request.feed(body)
        if sum(map(len, request.body)) > BODY_HIGH_WATER:
            self._pause_reading()

    def on_message_complete(self) -> None:
        request = self.parsing
        self.parsing = None
        if request is not None and not request.response_done:
            request.end_body()

    # --- running requests ------------------------------------------------------------------------------

    def _start(self, request: _Request) -> None:
        self.current = request
        self.task = self.loop.create_task(self._run(request))

    async def _run(self, request: _Request) -> None:
        try:
            await self.app(request.scope, request.receive, request.send)
        except BaseException as exc:
            if not request.started and not self.closed:
                log.exception("error in the gateway app", exc_info=exc)
                request.keep_alive = False
                await request.send({"type": "http.response.start", "status": 500,
                                    "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                                                (b"content-length", b"21")]})  # fmt: skip
                await request.send({"type": "http.response.body", "body": b"Internal Server Error"})
            elif not isinstance(exc, asyncio.CancelledError):
                log.exception("error in the gateway app after the response started", exc_info=exc)
            if not request.response_done:
                self._close()
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            return
        if not request.response_done and not self.closed:
            if not request.started:
                log.error("the gateway app returned without a response")
                await request.send({"type": "http.response.start", "status": 500,
                                    "headers": [(b"content-length", b"0")]})  # fmt: skip
                await request.send({"type": "http.response.body", "body": b""})
            else:
                self._close()  # a response cut short: the client must not wait for the rest

    def response_complete(self, request: _Request) -> None:
        """The answer's last byte is written: next request, idle keep-alive, or close."""
        if request is not self.current:
            return
        self.current = None
        self.task = None
        if not request.keep_alive or self.closed:
            self._close()
            return
        if self.parsing is request:
            # The app answered before the body was all in (413, 408): the rest of the body is read
            # and dropped; the connection stays usable once the parser is past it.
            pass
        request.disconnected()  # a watcher of receive() learns the response is done
        if self.pipeline:
            self._start(self.pipeline.popleft())
        else:
            self.idle_since = time.monotonic()
        self._resume_reading()

    def resume_body(self) -> None:
        if self.read_paused and not self.pipeline:
            self._resume_reading()

    def _pause_reading(self) -> None:
        if not self.read_paused and not self.closed:
            self.read_paused = True
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self.read_paused and not self.closed:
            self.read_paused = False
            self.transport.resume_reading()

    def _refuse(self, status: bytes, text: bytes) -> None:
        if self.current is None and not self.closed:
            self.transport.write(
                b"HTTP/1.1 %s\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: %d\r\n"
                b"connection: close\r\n\r\n%s" % (status, len(text), text)
            )
        self._close()

    def _close(self) -> None:
        if not self.closed:
            self.closed = True
            self.transport.close()

    def idle_for(self, now: float) -> float:
        return now - self.idle_since if self.idle_since is not None and self.current is None else 0.0

    def head_for(self, now: float) -> float:
        return now - self.head_since if self.head_since is not None else 0.0


class HTTPServer:
    """Serves `app` on a listening socket until `shutdown()`; runs the app's lifespan around it."""

    def __init__(
        self, app: App, *, keep_alive_timeout: float = 5.0, header_timeout: float = 30.0, backlog: int = 2048
    ) -> None:
        self.app = app
        self.keep_alive_timeout = keep_alive_timeout
        self.header_timeout = header_timeout
        self.clock = time.monotonic()
        """Updated by the sweeper: a clock for deadlines checked by the sweeper itself."""
        self.backlog = backlog
        self.loop = asyncio.get_running_loop()
        self.connections: set[_Connection] = set()
        self.date_header = b""
        self.sockname: tuple[str, int] | None = None
        self.lifespan_state: dict[str, Any] = {}
        self._server: asyncio.base_events.Server | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._lifespan: _Lifespan | None = None
        self._tick()

    def _tick(self) -> None:
        self.date_header = b"date: " + formatdate(usegmt=True).encode() + b"\r\n"

    async def start(
        self, host: str | None = None, port: int | None = None, sock: socket.socket | None = None
    ) -> None:
        self._lifespan = _Lifespan(self.app, self.lifespan_state)
        await self._lifespan.startup()
        if sock is not None:
            self._server = await self.loop.create_server(
                lambda: _Connection(self), sock=sock, backlog=self.backlog
            )
        else:
            self._server = await self.loop.create_server(
                lambda: _Connection(self), host=host, port=port or 0, backlog=self.backlog, reuse_address=True
            )
        name = self._server.sockets[0].getsockname()
        self.sockname = (name[0], name[1])
        self._tasks.append(self.loop.create_task(self._sweep()))

    @property
    def port(self) -> int:
        assert self.sockname is not None
        return self.sockname[1]

    async def _sweep(self) -> None:
        """Every second (a quarter of the keep-alive timeout if shorter): the Date header, idle
        keep-alive connections closed, and connections whose request head is not in within
        `header_timeout` (uvicorn has no such limit: a head trickled byte by byte holds it forever)."""
        interval = min(1.0, self.keep_alive_timeout / 4)
        while True:
            await asyncio.sleep(interval)
            self._tick()
            now = time.monotonic()
            self.clock = now
            for conn in [
                c for c in self.connections
                if c.idle_for(now) > self.keep_alive_timeout or c.head_for(now) > self.header_timeout
            ]:  # fmt: skip
                conn._close()

    async def shutdown(self, grace: float = 5.0) -> None:
        if self._server is not None:
            self._server.close()
        for task in self._tasks:
            task.cancel()
        # Let requests in flight finish (within `grace`), then close what is left.
        deadline = time.monotonic() + grace
        while any(c.current is not None for c in self.connections) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            if conn.task is not None:
                conn.task.cancel()
            conn._close()
        if self._lifespan is not None:
            await self._lifespan.shutdown()

    async def serve_forever(self) -> None:
        stop = asyncio.Event()
        import signal

        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                self.loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await self.shutdown()


class _Lifespan:
    """The ASGI lifespan protocol: startup before the socket opens, shutdown after it closes."""

    def __init__(self, app: App, state: dict[str, Any]) -> None:
        self.app = app
        self.state = state
        self.inbox: asyncio.Queue[Message] = asyncio.Queue()
        self.started: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.stopped: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        scope = {"type": "lifespan", "asgi": _ASGI, "state": self.state}
        try:
            await self.app(scope, self.inbox.get, self._send)
        except BaseException as exc:
            for fut in (self.started, self.stopped):
                if not fut.done():
                    fut.set_exception(RuntimeError(f"lifespan failed: {exc!r}"))
            raise

    async def _send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "lifespan.startup.complete":
            self.started.set_result(None)
        elif kind == "lifespan.startup.failed":
            self.started.set_exception(RuntimeError(message.get("message") or "lifespan startup failed"))
        elif kind == "lifespan.shutdown.complete":
            self.stopped.set_result(None)
        elif kind == "lifespan.shutdown.failed":
            self.stopped.set_exception(RuntimeError(message.get("message") or "lifespan shutdown failed"))

    async def startup(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())
        await self.inbox.put({"type": "lifespan.startup"})
        await self.started

    async def shutdown(self) -> None:
        await self.inbox.put({"type": "lifespan.shutdown"})
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.stopped, 10)
        if self.task is not None and not self.task.done():
            self.task.cancel()


def run(app: App, host: str, port: int, *, keep_alive_timeout: float = 5.0) -> None:
    """Serve `app` on host:port until SIGTERM or SIGINT (uvloop when installed)."""

    async def main() -> None:
        server = HTTPServer(app, keep_alive_timeout=keep_alive_timeout)
        await server.start(host, port)
        await server.serve_forever()

    try:
        import uvloop
    except ImportError:  # pragma: no cover
        asyncio.run(main())
    else:
        uvloop.run(main())
