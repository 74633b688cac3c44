"""The gateway's ASGI app on aiohttp's web server (`kubeinfer gateway --server aiohttp`): a measured
alternative, not the default (docs/gateway.md, "HTTP server and client").

An aiohttp handler per request turns aiohttp's `Request` into an ASGI scope, `receive` and `send`:
the body read with `content.readany()`, the response a `StreamResponse` written as the app sends it.
aiohttp cancels the handler when the client disconnects (`handler_cancellation`), which is how the
relay learns of it here (its `receive()` watcher waits forever).
"""

from __future__ import annotations

import asyncio
from collections.abc import MutableMapping
from typing import Any

from aiohttp import web

from kubeinfer.gateway.httpserver import _ASGI, App, _Lifespan

Message = MutableMapping[str, Any]


def handler_for(app: App) -> Any:
    async def handle(request: web.Request) -> web.StreamResponse:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        version = request.version
        scope: MutableMapping[str, Any] = {
            "type": "http", "asgi": _ASGI, "http_version": f"{version.major}.{version.minor}",
            "server": None, "client": (peer[0], peer[1]) if isinstance(peer, tuple) else None,
            "scheme": "http", "method": request.method, "root_path": "", "path": request.path,
            "raw_path": request.raw_path.split("?", 1)[0].encode("latin-1"),
            "query_string": request.query_string.encode("latin-1"),
            "headers": [(k.lower(), v) for k, v in request.raw_headers], "state": {},
        }  # fmt: skip
        body_done = False
        response: web.StreamResponse | None = None
        content = request.content

        async def receive() -> Message:
            nonlocal body_done
            if not body_done:
                chunk = await content.readany()
                body_done = content.is_eof()
                return {"type": "http.request", "body": chunk, "more_body": not body_done}
            await asyncio.get_running_loop().create_future()  # until cancelled: the client left
            raise AssertionError("unreachable")

        async def send(message: Message) -> None:
            nonlocal response
            if message["type"] == "http.response.start":
                response = web.StreamResponse(status=message["status"])
                for name, value in message.get("headers", ()):
                    key = name.decode("latin-1")
                    if key.lower() == "content-length":
                        response.content_length = int(value)
                    else:
                        response.headers.add(key, value.decode("latin-1"))
                await response.prepare(request)
            elif message["type"] == "http.response.body":
                assert response is not None
                body = message.get("body", b"")
                if body:
                    await response.write(body)
                if not message.get("more_body", False):
                    await response.write_eof()

        await app(scope, receive, send)
        assert response is not None, "the app returned without a response"
        return response

    return handle


def run(app: App, host: str, port: int, *, keep_alive_timeout: float = 5.0) -> None:
    """Serve `app` with aiohttp's server on host:port until SIGTERM or SIGINT (uvloop)."""
    import uvloop

    async def main() -> None:
        lifespan = _Lifespan(app, {})
        await lifespan.startup()
        server = web.Server(
            handler_for(app), handler_cancellation=True, keepalive_timeout=keep_alive_timeout, access_log=None
        )
        runner = web.ServerRunner(server, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, host, port, backlog=2048)
        await site.start()
        stop = asyncio.Event()
        import signal

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await runner.cleanup()
        await lifespan.shutdown()

    uvloop.run(main())
