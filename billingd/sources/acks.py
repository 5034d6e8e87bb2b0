"""Planning AMQP acknowledgements: one `basic.ack(multiple=True)` for the settled prefix.

Delivery tags on a channel are 1, 2, 3, … A `multiple=True` ack of tag T acknowledges every
unacknowledged tag ≤ T, so it is only safe once every tag ≤ T is settled. Handlers finish out of
order; `AckPlan` tracks the settled set and answers, per flush, the highest tag a single
multiple-ack may cover plus the tags above it that must be acked one by one (so one slow message
never holds the prefetch window shut).

The multiple-ack names the highest tag acked *in this flush* within the settled prefix, never
the prefix's top: that tag may have been nacked or acked singly already, and RabbitMQ closes the
channel on an unknown delivery tag (PRECONDITION_FAILED), requeueing every unacked message.
"""

from __future__ import annotations

from collections.abc import Iterable


class AckPlan:
    """Settled-tag bookkeeping of one AMQP channel (tags start at 1 on every new channel)."""

    __slots__ = ("_settled", "floor")

    def __init__(self) -> None:
        self.floor = 0
        """Every tag ≤ floor is settled at the broker."""
        self._settled: set[int] = set()

    def plan(self, acks: Iterable[int], others: Iterable[int] = ()) -> tuple[int | None, list[int]]:
        """Record `acks` (to acknowledge now) and `others` (settled some other way, e.g. nacked).

        Returns `(upto, singles)`: send `basic.ack(upto, multiple=True)` when `upto` is not None,
        then `basic.ack(tag)` for each of `singles`.
        """
        settled = self._settled
        settled.update(others)
        new = list(acks)
        settled.update(new)
        floor = self.floor
        while floor + 1 in settled:
            floor += 1
            settled.discard(floor)
        self.floor = floor
        upto = max((tag for tag in new if tag <= floor), default=None)
        return upto, sorted(tag for tag in new if tag > floor)

    @property
    def pending(self) -> int:
        """Settled tags above the floor (waiting for a lower tag to settle)."""
        return len(self._settled)
