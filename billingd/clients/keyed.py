"""`KeyedLocks`: one lock per key, made on first use and dropped when nobody holds or waits."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Hashable

import anyio

from billingd.clients.errors import Throttled


class KeyedLocks:
    """At most one holder per key in this process (e.g. one Stripe call per customer and meter).

    The table holds only keys in use, so a stream of distinct keys never grows it."""

    def __init__(self, downstream: str) -> None:
        self._downstream = downstream
        self._locks: dict[Hashable, tuple[anyio.Lock, list[int]]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: Hashable, max_wait: float) -> AsyncIterator[None]:
        """Hold `key`'s lock for the block, waiting at most `max_wait` seconds for it.

        Raises:
            Throttled: not acquired within `max_wait` (back-pressure: retried later, uncounted).
        """
        entry = self._locks.get(key)
        if entry is None:
            entry = self._locks[key] = (anyio.Lock(), [0])
        lock, users = entry
        users[0] += 1
        try:
            with anyio.move_on_after(max_wait) as scope:
                await lock.acquire()
            if scope.cancelled_caught:
                raise Throttled(self._downstream, f"waited {max_wait:g}s for a call in flight to end", 1.0)
            try:
                yield
            finally:
                lock.release()
        finally:
            users[0] -= 1
            if not users[0]:
                del self._locks[key]

    def __len__(self) -> int:
        return len(self._locks)
