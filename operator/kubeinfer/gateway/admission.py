"""Per-model admission: at most `targetInflight` requests per replica, then a FIFO queue.

A request that finds every replica of its model at its in-flight target (or no ready replica at all)
waits in the model's queue, first come first served, for at most `queueTimeout`; a full queue
(`maxQueue`) is refused at once. When a request finishes, the head of the queue is woken to try
again. Arrivals never overtake waiters, so a burst cannot starve the ones already queued.

The waiting count per model is what the autoscaler reads (it is exported as a metric).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


class QueueFull(Exception):
    pass


class QueueTimeout(Exception):
    def __init__(self, waited: float, had_replicas: bool):
        super().__init__(f"waited {waited:.1f}s")
        self.waited = waited
        self.had_replicas = had_replicas


@dataclass
class _Waiter:
    future: asyncio.Future[None]


class ModelQueue(Generic[T]):
    """The queue of one model. `try_admit` is the caller's non-blocking attempt to get a replica:
    it returns the replica, or None when none has room."""

    # Replicas can become ready without any request finishing (discovery): waiters also look again
    # at this interval.
    RECHECK_SECONDS = 0.1

    def __init__(self) -> None:
        self._waiters: collections.deque[_Waiter] = collections.deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def wake(self) -> None:
        """A slot may have freed up: let the head of the queue try."""
        if self._waiters and not self._waiters[0].future.done():
            self._waiters[0].future.set_result(None)

    async def admit(
        self,
        try_admit: Callable[[], T | None],
        has_replicas: Callable[[], bool],
        max_queue: int,
        timeout: float,
    ) -> T:
        if not self._waiters:
            got = try_admit()
            if got is not None:
                return got
        if len(self._waiters) >= max_queue:
            raise QueueFull()
        loop = asyncio.get_running_loop()
        me = _Waiter(loop.create_future())
        self._waiters.append(me)
        started = time.monotonic()
        try:
            while True:
                remaining = timeout - (time.monotonic() - started)
                if remaining <= 0:
                    raise QueueTimeout(time.monotonic() - started, has_replicas())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(me.future), min(remaining, self.RECHECK_SECONDS))
                if self._waiters[0] is me:
                    got = try_admit()
                    if got is not None:
                        return got
                if me.future.done():
                    me.future = loop.create_future()
        finally:
            self._waiters.remove(me)
            self.wake()  # the next one may fit too (or the head left: let the new head try)
