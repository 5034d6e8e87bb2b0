"""Where a delivery is handled: partition lanes and FIFO holds (DESIGN §2 `partition_by`).

* With `partition_by`, deliveries with the same key go to the same worker lane (CRC32 of the key
  modulo the lanes), so they are handled in order while other keys run in parallel. The key is a
  field of the JSON body (a dotted path), the SQS `MessageGroupId`, or `message_id` (the broker's
  id). A body that is not JSON or lacks the field goes to lane 0: the handler judges it.
* An *ordered* source (SQS FIFO) also holds a group back: once a delivery of a group is retried
  or released, the later ones of that group already in hand are released too rather than handled
  out of order, until nothing of the group is in hand (then the broker orders the rest).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from typing import Any

import msgspec

from billingd.sources.base import Delivery, Disposition, Settlement

#: Longest partition key kept (a longer field value is cut).
MAX_KEY = 256


def partition_key(field: str, delivery: Delivery) -> str:
    """The partition key of `delivery` for `partition_by = field` ("" when it has none)."""
    if field == "MessageGroupId":
        return delivery.partition_key or ""
    if field == "message_id":  # the broker's id: Jasmin's msgid on its native receipts
        return delivery.message_id
    try:
        value: Any = msgspec.json.decode(delivery.body)
        for part in field.split("."):
            value = value[part]
        return str(value)[:MAX_KEY]
    except Exception:  # noqa: BLE001 — any body: unpartitionable goes to lane 0; the handler judges it
        return ""


class Lanes:
    """Lane choice and FIFO holds of one source actor (see module docstring)."""

    def __init__(self, partition_by: str | None, count: int, ordered: bool) -> None:
        self.partition_by = partition_by
        self.count = count if partition_by else 1
        self.ordered = ordered
        self._held: dict[str, int] = {}
        self._blocked: set[str] = set()

    def lane_of(self, delivery: Delivery) -> int:
        """The worker lane of `delivery`."""
        if self.count == 1 or self.partition_by is None:
            return 0
        return zlib.crc32(partition_key(self.partition_by, delivery).encode()) % self.count

    def hold(self, batch: Iterable[Delivery]) -> None:
        """`batch` is now in hand (ordered sources count it per group)."""
        if self.ordered:
            for delivery in batch:
                key = delivery.partition_key or ""
                self._held[key] = self._held.get(key, 0) + 1

    def may_start(self, delivery: Delivery) -> bool:
        """Whether `delivery` may be handled now (False: an earlier one of its group went back)."""
        return not self.ordered or (delivery.partition_key or "") not in self._blocked

    def handled(self, settlement: Settlement) -> None:
        """A worker is done with a delivery: a retry or release blocks the rest of its group."""
        if self.ordered and settlement.disposition in (Disposition.RETRY, Disposition.RELEASE):
            self._blocked.add(settlement.delivery.partition_key or "")

    def settled(self, batch: Iterable[Settlement]) -> None:
        """`batch` has left billingd: a group with nothing left in hand is unblocked."""
        if not self.ordered:
            return
        for settlement in batch:
            key = settlement.delivery.partition_key or ""
            left = self._held.get(key, 1) - 1
            if left > 0:
                self._held[key] = left
            else:
                self._held.pop(key, None)
                self._blocked.discard(key)
