"""Operator tools on a source's queues (seed 001: "monitor this queue and fix or replay messages").

* `count` / `sample` — how many dead letters there are, and why (their reasons);
* `replay` — move dead letters back to the source queue, body and attributes preserved, minus
  billingd's dead-letter annotations (so attempts start afresh). A letter leaves the DLQ only
  after its copy is confirmed in the source queue: an interrupted replay may duplicate a
  message (handlers are idempotent) but never loses one. At most the depth seen at the start is
  replayed, so a handler still failing cannot make a replay loop forever;
* `publish` — send one message to the source, as seed 000's `SQSProducer` does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from billingd.config.model import AmqpSourceSettings, AnySource

#: billingd's own dead-letter annotations, dropped on replay (AMQP headers; SQS attributes).
AMQP_ANNOTATIONS = (
    "x-billingd-reason",
    "x-billingd-handler",
    "x-billingd-attempts",
    "x-billingd-source",
    "x-billingd-original-message-id",
    "x-billingd-original-exchange",
    "x-billingd-original-routing-key",
)
SQS_ANNOTATIONS = ("reason", "handler", "attempts", "original_message_id", "source")


@dataclass(frozen=True)
class Letter:
    """One dead letter as `dlq list` shows it."""

    message_id: str
    reason: str
    attempts: str
    body: bytes


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

    async def publish(self, body: bytes, *, routing_key: str | None, encoding: str | None, group: str | None) -> str:
        """Send one message to the source; returns its message id."""
        ...


def queue_tools(settings: AnySource) -> QueueTools:
    """The tools for `settings`' transport."""
    if isinstance(settings, AmqpSourceSettings):
        from billingd.sources.amqp_tools import AmqpTools

        return AmqpTools(settings)
    from billingd.sources.sqs_tools import SqsTools

    return SqsTools(settings)
