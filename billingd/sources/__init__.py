"""Message sources: SQS and AMQP transports behind one `Source` interface."""

from __future__ import annotations

from billingd.config.model import AmqpSourceSettings, AnySource
from billingd.sources.base import (
    Delivery,
    Disposition,
    Settlement,
    Source,
    SourceEvents,
    SourceMisconfigured,
    SourceUnavailable,
)
from billingd.sources.tools import QueueTools


def queue_tools(settings: AnySource) -> QueueTools:
    """The operator tools (`billingd dlq`, `billingd publish`) for `settings`' transport."""
    if isinstance(settings, AmqpSourceSettings):
        from billingd.sources.amqp_tools import AmqpTools

        return AmqpTools(settings)
    from billingd.sources.sqs_tools import SqsTools

    return SqsTools(settings)


def make_source(settings: AnySource, events: SourceEvents) -> Source:
    """The transport for `settings` (`type = "amqp"` or `"sqs"`), not yet opened."""
    if isinstance(settings, AmqpSourceSettings):
        from billingd.sources.amqp import AmqpSource

        return AmqpSource(settings, events)
    from billingd.sources.sqs import SqsSource

    return SqsSource(settings, events)


__all__ = [
    "Delivery",
    "Disposition",
    "Settlement",
    "Source",
    "SourceEvents",
    "SourceMisconfigured",
    "SourceUnavailable",
    "make_source",
    "queue_tools",
]
