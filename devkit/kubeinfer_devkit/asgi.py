"""The two ASGI chores every small server of the dev kit does (the simulator, the bench's echo replicas
and floor proxy, test replicas): answer the lifespan protocol, and read a request's whole body."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from starlette.types import Receive, Send


class Disconnected(Exception):
    """The client went away before its body was all in."""


async def read_body(receive: Receive) -> bytes:
    """The request's whole body; Disconnected when the client leaves first."""
    parts = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise Disconnected
        parts.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(parts)


async def lifespan(
    receive: Receive,
    send: Send,
    on_startup: Callable[[], Any] | None = None,
    on_shutdown: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Answer the server's lifespan messages until shutdown, calling the hooks on the way."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            if on_startup is not None:
                on_startup()
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            if on_shutdown is not None:
                await on_shutdown()
            await send({"type": "lifespan.shutdown.complete"})
            return
