"""The transport contract: `Delivery` in, `Settlement` out, one `Source` per configured queue.

Transports never see handlers or outcomes: the source actor turns a handler's `Outcome` into a
`Settlement` (ack, retry after a delay, dead-letter with a reason, or release unhandled).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol


class SourceUnavailable(Exception):
    """The broker cannot be reached now. Not a crash: the actor reconnects with backoff forever."""


class SourceMisconfigured(Exception):
    """The broker refuses the source as configured (e.g. a queue declared with other arguments).

    Reported once as a configuration error naming the fix; the actor keeps the source down and
    checks again at its longest backoff, so fixing the broker side heals it without a restart.
    """


@dataclass(slots=True, eq=False)
class Delivery:
    """One received message.

    `attempt` starts at 1 and counts deliveries that ended in a counted retry (the source gives
    its broker's hint; the actor sets the count billingd keeps, `AttemptLedger`, before the
    handler sees a redelivered message); `handle` is the transport's own reference (an aio-pika
    message, an SQS receipt); `partition_key` orders messages on one worker lane (SQS FIFO
    `MessageGroupId`); `error` is set when the body could not be decoded (bad gzip/base64) and
    the message must be dead-lettered without a handler. `redelivered` is True when the broker
    has delivered this message before (AMQP's redelivered flag, an SQS receive count above 1) or
    it is billingd's own copy of an earlier delivery (a retry copy, a replayed dead letter): a
    fresh publish is False. `derived_id` is True when `message_id` is a digest of the body (an
    AMQP message without a `message_id` property): it names a content, not a delivery.
    `identity` names this message for its attempt count, the same for every copy of it (empty:
    `message_id`): producers reuse message ids (Jasmin gives every receipt of one SMS its msgid).
    `delivery_id` names this delivery: billingd's retry copies of it carry the same (`copied`
    True); a fresh publish, and a message the broker redelivered, get a new one.
    """

    body: bytes
    message_id: str
    attempt: int
    attributes: Mapping[str, Any]
    handle: Any
    partition_key: str | None = None
    error: str | None = None
    redelivered: bool = False
    derived_id: bool = False
    identity: str = ""
    delivery_id: str = ""
    copied: bool = False


class Disposition(enum.Enum):
    """How a delivery leaves billingd."""

    ACK = "ack"
    RETRY = "retry"
    DEAD_LETTER = "dead_letter"
    RELEASE = "release"  # not handled (drain, shutdown): back to the queue at once, not an attempt


@dataclass(slots=True, eq=False)
class Settlement:
    """A delivery's settlement: `delay` (seconds) for RETRY, `reason` for DEAD_LETTER, and
    `counted=False` for a retry that must not count as an attempt (open circuit breaker)."""

    delivery: Delivery
    disposition: Disposition
    reason: str = ""
    delay: float = 0.0
    counted: bool = True


class SourceEvents(Protocol):
    """What a transport reports to its actor (for `/readyz` and metrics)."""

    def connection_changed(self, up: bool, reason: str) -> None:
        """The broker connection went up or down (`reason` says why when down)."""
        ...

    def broker_request(self, operation: str, count: int = 1) -> None:
        """`count` broker API calls of kind `operation` were made."""
        ...

    def node_changed(self, node: str) -> None:
        """The source now talks to broker node `node` (`host:port`; a cluster's node in use)."""
        ...

    def blocked_changed(self, reason: str | None) -> None:
        """The broker blocks publishing (`reason`, e.g. a memory alarm), or no longer (None)."""
        ...

    def queue_depth(self, messages: int) -> None:
        """The queue holds about `messages` messages waiting (sampled every `DEPTH_INTERVAL`)."""
        ...


#: Seconds between two samples of a queue's depth.
DEPTH_INTERVAL = 15.0
#: Once intake has stopped (a drain), the longest one broker call may take, calls already under
#: way included (seconds): a broker or proxy that holds its answers must not hold the drain. What
#: could not be settled in time comes back from the broker (visibility timeout, requeue).
DRAIN_CALL_TIMEOUT = 0.5
#: The longest a broker call other than a long poll may take before it (seconds).
CALL_TIMEOUT = 10.0


class Source(Protocol):
    """A message source. One task calls each method family: the actor's receiver calls
    `receive`/`stop_intake`, its settler `settle`, its pauser `pause`/`resume`."""

    name: str
    receivers: int
    """How many `receive` calls the actor keeps running at once (SQS: one per 10 of prefetch)."""
    receive_max: int
    """Most deliveries one `receive` returns."""
    ordered: bool
    """Deliveries of one partition must be handled in order (SQS FIFO): when one is retried, the
    later ones of its partition already in hand are released rather than handled."""
    partition_default: str | None
    """The partition key when `partition_by` is not set (`MessageGroupId` for FIFO queues)."""
    settle_batch: int
    """Most settlements worth sending in one flush."""
    settle_linger: float
    """Seconds the settler may wait to fill a batch (0: flush whatever is ready)."""

    async def open(self) -> None:
        """Connect and declare. Raises SourceUnavailable or SourceMisconfigured."""
        ...

    async def close(self) -> None:
        """Close connections; every delivery not yet settled returns to the broker at once."""
        ...

    async def run_background(self) -> None:
        """Housekeeping until cancelled (consumer watchdog, visibility heartbeat)."""
        ...

    async def receive(self, max_messages: int) -> list[Delivery]:
        """Wait for and return 1..`max_messages` deliveries. Raises SourceUnavailable."""
        ...

    async def stop_intake(self) -> list[Delivery]:
        """Stop receiving (cancel the consumer / polling) and return deliveries received but
        not yet handed out by `receive`; the caller releases them. From now on every broker call
        (those under way included) takes at most `DRAIN_CALL_TIMEOUT`."""
        ...

    async def settle(self, settlements: Sequence[Settlement]) -> None:
        """Apply settlements. Never raises for broker errors: an unsettled delivery is
        redelivered by the broker, and effects are idempotent."""
        ...

    async def pause(self) -> None:
        """Stop intake until `resume` (a breaker the handler uses is open)."""
        ...

    def trace_carrier(self, delivery: Delivery) -> tuple[dict[str, Any], dict[str, str]]:
        """For the message's span (`billingd.telemetry.spans`): its messaging attributes, and the
        producer's trace context as text headers (`traceparent`, `tracestate`, `X-Amzn-Trace-Id`)."""
        ...

    async def resume(self) -> None:
        """Resume intake after `pause`."""
        ...


#: The trace-context keys a carrier may hold (W3C Trace Context; X-Ray's header).
TRACE_KEYS = ("traceparent", "tracestate")


def text_carrier(values: Mapping[str, Any]) -> dict[str, str]:
    """The W3C trace-context entries of a header or attribute table, as text (bytes decoded;
    other types, and values longer than 512 characters, ignored: a hostile header is no context)."""
    carrier: dict[str, str] = {}
    for name in TRACE_KEYS:
        value = values.get(name)
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        if isinstance(value, str) and len(value) <= 512:
            carrier[name] = value
    return carrier
