"""Memory-stream hops that only yield to the event loop when they must.

anyio's awaiting `send`/`receive` yield on every item, which is most of the per-message cost of a
pipeline whose handler does little; these try the non-blocking call first."""

from __future__ import annotations

from typing import TypeVar

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

T = TypeVar("T")


async def send(stream: MemoryObjectSendStream[T], item: T) -> bool:
    """Send `item`; False when the receiving side is gone (the pipeline is being torn down, and
    what was not handed on goes back to the broker when the source closes)."""
    try:
        stream.send_nowait(item)
    except anyio.WouldBlock:
        try:
            await stream.send(item)
        except anyio.BrokenResourceError:
            return False
    except anyio.BrokenResourceError:
        return False
    return True


async def receive(stream: MemoryObjectReceiveStream[T]) -> T:
    """The next item.

    Raises:
        anyio.EndOfStream: every sender is closed and the stream is empty.
    """
    try:
        return stream.receive_nowait()
    except anyio.WouldBlock:
        return await stream.receive()
