"""Operator tools on a source's queues (seed 001: "monitor this queue and fix or replay messages").

* `count` / `sample` — how many dead letters there are, and why (their reasons);
* `replay` — move dead letters back to the source queue, body and attributes preserved, minus
  billingd's dead-letter annotations and RabbitMQ's `x-death` (so attempts start afresh), keeping
  the original message id (AMQP `message_id`; SQS attribute `original_message_id`, set from the
  letter's own id when SQS's redrive policy moved it). A letter leaves the DLQ only
  after its copy is confirmed in the source queue: an interrupted replay may duplicate a
  message (handlers are idempotent) but never loses one. At most the depth seen at the start is
  replayed, so a handler still failing cannot make a replay loop forever;
* `publish` — send one message to the source, as seed 000's `SQSProducer` does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from billingd.sources.letters import Letter


class QueueTools(Protocol):
    """The operations behind `billingd dlq …` and `billingd publish` for one source."""

    async def __aenter__(self) -> QueueTools: ...

    async def __aexit__(self, *exc: object) -> None: ...

    async def dead_letter_count(self) -> int:
        """Messages in the source's dead-letter queue."""
        ...

    async def sample(self, limit: int) -> list[Letter]:
        """Up to `limit` dead letters, left in the DLQ."""
        ...

    async def replay(self, limit: int | None) -> int:
        """Move up to `limit` (default: the current depth) dead letters back; returns how many."""
        ...

    async def publish(
        self,
        body: bytes,
        *,
        routing_key: str | None,
        encoding: str | None,
        group: str | None,
        trace: Mapping[str, str] | None = None,
    ) -> str:
        """Send one message to the source, carrying `trace` (W3C `traceparent`/`tracestate`: AMQP
        headers, SQS message attributes); returns its message id."""
        ...
