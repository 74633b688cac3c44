"""The gateway's HTTP client to replicas and remote APIs, behind one small interface.

The gateway has one HTTP client, aiohttp: measured on this project's hardware, an aiohttp proxy hop
cost well under 1 ms of CPU per request where httpx's pure-Python HTTP/1.1 stack (h11, anyio) cost
several, which decides whether one gateway core carries 500 requests/s (docs/benchmarks.md). aiohttp
also comes with kubernetes_asyncio already. Tests that replace the network with an in-memory
transport pass their own `Upstream` to `create_app` (tests/httpx_upstream.py wraps httpx's
`MockTransport`); httpx is not a dependency of the product.

Every implementation gives the proxy the same thing: the status and headers once the upstream answered (or
`UpstreamError` before any byte, which the proxy may retry elsewhere), then the raw body chunks as
they arrive (`UpstreamError` mid-body), and `close()`, which also aborts an unfinished response, so
the engine stops generating for a client that is gone.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

import aiohttp

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
