"""The floor of the gateway's stack: a proxy on the gateway's own HTTP server and replica client that
does nothing else (`kubeinfer bench overhead --variants floor`).

It reads the body, sends it to the next replica in turn and relays the answer through the same
per-chunk path as the gateway (the replica's socket callback writes to the client's socket), with no
body check, admission, routing, metrics, usage or access log. What it costs per request and per chunk
is what the event loop, the two sockets and the kernel's loopback work cost with this server and
client: the part of the gateway's figures that no change to the gateway's own logic can remove.
Measured beside the gateway in the same interleaved run, it splits the gateway's cost in two.

    python -m kubeinfer_devkit.bench.floor --port 8000 --replica 127.0.0.1:9001 --replica ...
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any

from kubeinfer.gateway import httpserver
from kubeinfer.gateway.upstream import PooledUpstream, UpstreamError
from kubeinfer_devkit.asgi import Disconnected, lifespan, read_body

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

# Hop-by-hop and framing headers the server sets itself; content-length is kept (one write for JSON).
_DROP = frozenset({"connection", "keep-alive", "transfer-encoding", "date", "server"})


class FloorProxy:
    """An ASGI app: every POST to the next replica, the answer relayed as it comes."""

    def __init__(self, replicas: Sequence[str]) -> None:
        if not replicas:
            raise ValueError("at least one replica")
        self._next = itertools.cycle(replicas).__next__
        self.upstream: PooledUpstream | None = None

    def _start(self) -> None:
        self.upstream = PooledUpstream(connect_timeout=5.0, read_timeout=300.0)  # in the server's loop

    async def __call__(self, scope: Message, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send, on_startup=self._start)
            return
        if scope["method"] != "POST":  # /readyz and anything else: the bench's readiness probe
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
            await send({"type": "http.response.body", "body": b"ok"})
            return
        try:
            body = await read_body(receive)
        except Disconnected:
            return
        assert self.upstream is not None
        url = f"http://{self._next()}{scope['path']}"
        try:
            upstream = await self.upstream.post(url, {"content-type": "application/json"}, body)
        except UpstreamError as exc:
            body = str(exc).encode()
            await send({"type": "http.response.start", "status": 502,
                        "headers": [(b"content-length", str(len(body)).encode())]})  # fmt: skip
            await send({"type": "http.response.body", "body": body})
            return
        headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in upstream.headers
                   if k.lower() not in _DROP]  # fmt: skip
        try:
            await send({"type": "http.response.start", "status": upstream.status, "headers": headers})
            client = send.__self__  # type: ignore[attr-defined]  # httpserver's request: its write path
            write = client.write_body
            client.on_drain = upstream.resume  # type: ignore[attr-defined]
            await upstream.pump(lambda chunk: bool(write(chunk)))  # type: ignore[attr-defined]
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await upstream.close()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kubeinfer_devkit.bench.floor", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--replica", action="append", required=True, help="host:port, repeatable")
    args = parser.parse_args(argv)
    httpserver.run(FloorProxy(args.replica), args.host, args.port)


if __name__ == "__main__":
    main()
