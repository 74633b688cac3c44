"""An `Upstream` over an httpx transport, for tests that play the replicas in memory
(`httpx.MockTransport`). The product's gateway has only the aiohttp client; this adapter lives with the
tests so httpx stays out of the product's dependencies."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import httpx

from kubeinfer.gateway.state import GatewaySettings
from kubeinfer.gateway.upstream import Upstream, UpstreamError, UpstreamResponse


class _HttpxResponse:
    def __init__(self, resp: httpx.Response) -> None:
        self._resp = resp
        self.status = resp.status_code
        self.headers = list(resp.headers.items())

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            if self._resp.is_stream_consumed:  # a transport that returned a whole body
                yield self._resp.content
                return
            async for chunk in self._resp.aiter_raw():
                yield chunk
        except httpx.HTTPError as exc:
            raise UpstreamError(f"{type(exc).__name__}: {exc}") from exc

    async def close(self) -> None:
        await self._resp.aclose()


class HttpxUpstream:
    def __init__(self, transport: httpx.AsyncBaseTransport, connect_timeout: float, read_timeout: float):
        timeout = httpx.Timeout(read_timeout, connect=connect_timeout)
        self._client = httpx.AsyncClient(transport=transport, timeout=timeout)

    async def post(self, url: str, headers: dict[str, str], body: bytes) -> UpstreamResponse:
        try:
            request = self._client.build_request("POST", url, content=body, headers=headers)
            return _HttpxResponse(await self._client.send(request, stream=True))
        except httpx.HTTPError as exc:
            raise UpstreamError(f"{type(exc).__name__}: {exc}") from exc

    async def get_text(self, url: str, timeout: float) -> tuple[int, str]:
        try:
            resp = await self._client.get(url, timeout=timeout)
        except httpx.HTTPError as exc:
            raise UpstreamError(f"{type(exc).__name__}: {exc}") from exc
        return resp.status_code, resp.text

    async def aclose(self) -> None:
        await self._client.aclose()


def mock_upstream(handler: Callable[..., object]) -> Callable[[GatewaySettings], Upstream]:
    """`create_app(..., upstream=mock_upstream(handler))`: replicas answered by `handler`, as
    `httpx.MockTransport` calls it (a plain or async function of the request)."""
    return transport_upstream(httpx.MockTransport(handler))


def transport_upstream(transport: httpx.AsyncBaseTransport) -> Callable[[GatewaySettings], Upstream]:
    return lambda s: HttpxUpstream(transport, s.connect_timeout, s.read_timeout)
