"""An in-memory `Source`, for tests of the source actor without a broker (what Dramatiq's
`StubBroker` and Broadway's `DummyProducer` are to them).

`put()` enqueues a message; the actor receives it like any delivery. Settlements are recorded in
`settled`, and behave like a broker's: an ack or a dead letter is final (`acked`, `dead`); a retry
comes back after its delay with the attempt counted (or not); a release comes back at once with
the same attempt.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

import anyio
import anyio.abc

from billingd.sources.base import Delivery, Disposition, Settlement, SourceEvents, text_carrier


class MemorySource:
    """A `Source` over a deque (see module docstring). `ordered` makes it behave like SQS FIFO
    (deliveries carry their `group` as partition key)."""

    receivers = 1
    settle_linger = 0.0

    def __init__(self, events: SourceEvents | None = None, *, ordered: bool = False, receive_max: int = 10) -> None:
        self.name = "memory"
        self.ordered = ordered
        self.partition_default = "MessageGroupId" if ordered else None
        self.receive_max = receive_max
        self.settle_batch = receive_max
        self._events = events
        self._queue: deque[Delivery] = deque()
        self._arrived = anyio.Event()
        self._ids = itertools.count(1)
        self._paused = False
        self.settled: list[Settlement] = []
        self.opened = self.closed = 0
        self._pending: anyio.abc.TaskGroup | None = None

    # -- what a test does --------------------------------------------------------------------

    def bind(self, events: SourceEvents) -> MemorySource:
        """Attach the actor's events; returns the source (for `SourceActor(..., source.bind, ...)`)."""
        self._events = events
        return self

    def put(
        self,
        body: bytes,
        message_id: str | None = None,
        *,
        group: str | None = None,
        attributes: Mapping[str, Any] | None = None,
        attempt: int = 1,
        delivery_id: str | None = None,
    ) -> Delivery:
        """Enqueue a message; returns its delivery (`delivery_id`: the message id unless given —
        give each copy of one message id its own to tell their settlements apart)."""
        identity = message_id or f"m-{next(self._ids)}"
        delivery = Delivery(
            body, identity, attempt, dict(attributes or {}), None, group, redelivered=attempt > 1,
            delivery_id=delivery_id or identity,
        )  # fmt: skip
        self._queue.append(delivery)
        self._arrived.set()
        return delivery

    def outcomes(self, disposition: Disposition) -> list[str]:
        """Message ids settled with `disposition`, in settlement order."""
        return [s.delivery.message_id for s in self.settled if s.disposition is disposition]

    @property
    def waiting(self) -> int:
        """Messages in the queue, not yet received."""
        return len(self._queue)

    # -- Source ------------------------------------------------------------------------------

    async def open(self) -> None:
        self.opened += 1
        if self._events is not None:
            self._events.connection_changed(True, "")

    async def close(self) -> None:
        self.closed += 1

    async def run_background(self) -> None:
        await anyio.sleep_forever()

    async def receive(self, max_messages: int) -> list[Delivery]:
        while not self._queue or self._paused:
            self._arrived = anyio.Event()
            await self._arrived.wait()
        out: list[Delivery] = []
        while self._queue and len(out) < max_messages:
            out.append(self._queue.popleft())
        return out

    async def stop_intake(self) -> list[Delivery]:
        return []

    async def settle(self, settlements: Sequence[Settlement]) -> None:
        for settlement in settlements:
            self.settled.append(settlement)
            delivery = settlement.delivery
            if settlement.disposition is Disposition.RELEASE:
                self._requeue(delivery, delivery.attempt, 0.0)
            elif settlement.disposition is Disposition.RETRY:
                self._requeue(delivery, delivery.attempt + (1 if settlement.counted else 0), settlement.delay)

    def _requeue(self, delivery: Delivery, attempt: int, delay: float) -> None:
        copy = Delivery(
            delivery.body, delivery.message_id, attempt, delivery.attributes, None, delivery.partition_key, None, True,
            delivery_id=delivery.delivery_id, copied=True,
        )  # fmt: skip
        if delay <= 0:
            self._queue.appendleft(copy)
            self._arrived.set()
            return
        if self._pending is None:
            raise RuntimeError("a retry with a delay needs the source entered: `async with MemorySource() as source`")

        async def later() -> None:
            await anyio.sleep(delay)
            self._queue.append(copy)
            self._arrived.set()

        self._pending.start_soon(later)

    def trace_carrier(self, delivery: Delivery) -> tuple[dict[str, Any], dict[str, str]]:
        """Attributes of an in-memory message, and the trace context among its attributes."""
        attributes = {"messaging.system": "memory", "messaging.destination.name": self.name,
                      "messaging.message.id": delivery.message_id}  # fmt: skip
        return attributes, text_carrier(delivery.attributes)

    async def pause(self) -> None:
        self._paused = True

    async def resume(self) -> None:
        self._paused = False
        self._arrived.set()

    # -- retries that wait -------------------------------------------------------------------

    async def __aenter__(self) -> MemorySource:
        self._group = anyio.create_task_group()
        self._pending = await self._group.__aenter__()
        return self

    async def __aexit__(self, *exc: Any) -> bool | None:
        assert self._pending is not None
        self._pending.cancel_scope.cancel()
        return await self._group.__aexit__(*exc)
