"""`Window`: how many more messages a source may hold unsettled (its `prefetch`)."""

from __future__ import annotations

import anyio


class Window:
    """A counting window: the receiver takes slots before receiving, the settler gives them back.

    Unlike a semaphore it hands out up to `most` slots at once (an SQS receive asks for 10).
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.free = size
        self._opened = anyio.Event()

    async def acquire(self, most: int) -> int:
        """Wait until a slot is free; take up to `most` free slots and return how many."""
        while self.free <= 0:
            await self._opened.wait()
        taken = min(most, self.free)
        self.free -= taken
        return taken

    def take(self, count: int) -> None:
        """Take `count` slots without waiting (for deliveries that arrived outside `acquire`)."""
        self.free -= count

    def release(self, count: int) -> None:
        """Give back `count` slots."""
        if count <= 0:
            return
        self.free += count
        self._opened.set()
        self._opened = anyio.Event()
