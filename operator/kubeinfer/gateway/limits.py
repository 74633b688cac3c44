"""Resource limits of a shared gateway: header size, in-flight requests per client, body read deadline.

Each costs the request path a few dict operations and no per-chunk work (docs/gateway.md, "Limits"):

- `header_bytes`: the request head's size as the server parsed it (uvicorn's httptools parser has no
  limit of its own), checked once per request against `maxHeaderBytes` (431).
- `ClientSlots`: requests in flight per API key, or per client address when anonymous (429); a slot
  is taken after the request is checked and given back when its handler ends, however it ends.
- `BodyDeadlines`: a body must be in within `bodyTimeout` of the start of its reading (408). One
  sweeper task per process cancels the reads that are late, so a request pays a dict insert and pop,
  not a timer of its own (an `asyncio.timeout` per request costs 3-5 µs, a per-chunk timer more).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable


def header_bytes(headers: Iterable[tuple[bytes, bytes]]) -> int:
    """Bytes of the header names and values (what a server's header-size limit counts, near enough)."""
    size = 0
    for name, value in headers:
        size += len(name) + len(value)
    return size


class ClientSlots:
    """In-flight requests per client (an API key's digest, or an address when anonymous)."""

    __slots__ = ("counts", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.counts: dict[str, int] = {}
        """Clients with a request in flight only: an entry goes when its count drops to zero."""

    def take(self, client: str) -> bool:
        """Take a slot for `client`; False (and nothing taken) when it already holds `limit`."""
        n = self.counts.get(client, 0)
        if n >= self.limit:
            return False
        self.counts[client] = n + 1
        return True

    def give_back(self, client: str) -> None:
        n = self.counts[client] - 1
        if n:
            self.counts[client] = n
        else:
            del self.counts[client]


class BodyDeadlines:
    """Tasks reading a request body, by the monotonic time their body must be in by."""

    __slots__ = ("expired", "reading", "timeout")

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.reading: dict[asyncio.Task[object], float] = {}
        self.expired: set[asyncio.Task[object]] = set()
        """Tasks cancelled by `sweep`: the reader turns their CancelledError into a 408."""

    def start(self, task: asyncio.Task[object]) -> None:
        self.reading[task] = time.monotonic() + self.timeout

    def finish(self, task: asyncio.Task[object]) -> None:
        self.reading.pop(task, None)

    def timed_out(self, task: asyncio.Task[object]) -> bool:
        """Whether `task` was cancelled for its deadline (then it is un-cancelled: the caller answers)."""
        if task not in self.expired:
            return False
        self.expired.discard(task)
        task.uncancel()
        return True

    def sweep(self, now: float) -> None:
        if not self.reading:
            return
        late = [task for task, deadline in self.reading.items() if deadline <= now]
        for task in late:
            del self.reading[task]
            self.expired.add(task)
            task.cancel()

    async def run(self) -> None:
        """Sweep for the app's lifetime, every tenth of the timeout (at most a second): a late body
        is cut off within 10% of `timeout` (or a second) after its deadline."""
        interval = min(1.0, self.timeout / 10)
        while True:
            await asyncio.sleep(interval)
            self.sweep(time.monotonic())
