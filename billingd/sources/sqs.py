"""AWS SQS transport: long polls, batched settlement, a visibility heartbeat.

* Calls go through aiobotocore, except — with `sqs_client = "lean"`, the default — the three
  that carry the traffic (ReceiveMessage, DeleteMessageBatch, ChangeMessageVisibilityBatch):
  `billingd.sources.sqs_lean` sends those, signed by botocore, at about half the CPU per call.

* `receive` long-polls (`wait_time` ≤ 20 s, up to 10 messages); the actor runs
  `ceil(prefetch / 10)` receivers so that `prefetch` messages can be in hand.
* `settle` batches up to 10 entries per call: acks are `DeleteMessageBatch`, retries and
  releases `ChangeMessageVisibilityBatch` (retry = visibility set to the delay, release = 0),
  dead-letters `SendMessageBatch` to `dead_letter_queue_url` with attributes `reason`,
  `handler`, `attempts`, `original_message_id`, then delete. Failed entries are retried one by
  one. Without a configured DLQ a dead letter is made visible again for the queue's own redrive
  policy to move (logged). Every API call is counted in `billingd_broker_requests_total`.
* Messages are received with a short visibility lease (`RECEIVE_LEASE`); the heartbeat extends
  every message still in hand to `visibility_timeout` once half of its current visibility has
  elapsed, and keeps extending it, so a slow handler is never redelivered to another consumer
  (Shoryuken does this; Broadway, FastStream and Celery do not). The short first lease is for
  shutdown: a long poll cancelled at SIGTERM stays open on the SQS side for the rest of its wait,
  and a message handed to that abandoned poll would otherwise stay invisible for the whole
  visibility timeout; with the lease it is back within seconds. Messages settled within half
  the lease (the common case) cost no extension call.
* `ApproximateReceiveCount` is only a hint of the attempt (it also counts releases, uncounted
  retries and other replicas' receives): a message received before is marked `redelivered`, and
  the actor reads the attempts billingd counted for it (`AttemptLedger`).
* FIFO queues (`.fifo`): deliveries carry `MessageGroupId` as their partition key and the
  source is *ordered*, so the actor keeps each group in order.
* The `content_encoding` message attribute is decoded before the handler (seed 000).
* A message carrying an `original_message_id` attribute (a dead letter replayed by `billingd dlq
  replay`) keeps that id: an idempotency key that falls back to the message id stays the same
  however often a letter is dead-lettered and replayed.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import structlog
from botocore.exceptions import ClientError, NoCredentialsError, NoRegionError

from billingd.config.model import SQS_MAX_BATCH, SQS_MAX_VISIBILITY, SqsSourceSettings
from billingd.sources.base import (
    DEPTH_INTERVAL,
    Delivery,
    Disposition,
    Settlement,
    SourceEvents,
    SourceMisconfigured,
    SourceUnavailable,
    text_carrier,
)
from billingd.sources.codecs import UndecodableBody, decode_body
from billingd.sources.deadlines import CallDeadlines
from billingd.sources.sqs_calls import SqsCalls
from billingd.sources.sqs_client import open_source_clients
from billingd.sources.sqs_lean import LEAN_OPERATIONS, LeanSqs
from billingd.sources.sqs_wire import TRANSIENT as _TRANSIENT
from billingd.sources.sqs_wire import read_attributes, receive_count, settleable
from billingd.telemetry.redact import redact_url, scrub

log = structlog.get_logger("billingd.sources.sqs")

MAX_BATCH = SQS_MAX_BATCH
MAX_VISIBILITY = SQS_MAX_VISIBILITY
RECEIVE_LEASE = 3  # seconds: the visibility a message is received with, before the heartbeat extends it
CLOSE_TIMEOUT = 2.0  # seconds: the longest close() spends releasing what it holds
_MISSING_QUEUE = {"AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist"}


@dataclass(slots=True, eq=False)
class _Held:
    """A message in hand: when its visibility runs out (monotonic seconds) and for how long it
    was last set (seconds)."""

    message: dict[str, Any]
    deadline: float
    lease: float


class SqsSource:
    """One SQS queue as a `Source` (see module docstring)."""

    receive_max = MAX_BATCH
    settle_batch = MAX_BATCH

    def __init__(self, settings: SqsSourceSettings, events: SourceEvents) -> None:
        self.name = settings.name
        self.receivers = max(1, math.ceil(settings.prefetch / MAX_BATCH))
        self.settle_linger = float(settings.ack_flush)
        self.ordered = settings.fifo
        self.partition_default = "MessageGroupId" if self.ordered else None
        self._settings = settings
        self._events = events
        self._visibility = int(settings.visibility_timeout)
        self._lease = min(RECEIVE_LEASE, self._visibility)
        self._stack = contextlib.AsyncExitStack()
        self._client: Any = None
        self._lean: LeanSqs | None = None
        self._held: dict[str, _Held] = {}
        self._resumed = anyio.Event()
        self._resumed.set()
        self._deadlines = CallDeadlines()
        self._calls = SqsCalls(settings, self._call, lambda: self._deadlines.stopping)

    # -- lifecycle ---------------------------------------------------------------------------

    async def open(self) -> None:
        """Create the client and check that the queue exists.

        Raises:
            SourceUnavailable: the endpoint cannot be reached.
            SourceMisconfigured: the queue does not exist, or there are no AWS credentials.
        """
        s = self._settings
        self._deadlines = CallDeadlines()  # a failed open's close() stopped the last one: calls get their full bound
        try:
            self._client, self._lean = await open_source_clients(self._stack, s, connections=self.receivers + 8)
            attributes = (await self._call("GetQueueAttributes", QueueUrl=s.queue_url, AttributeNames=["All"]))[
                "Attributes"
            ]
        except BaseException as exc:
            await self.close()
            raise self._explain_open_error(exc) from exc
        if not s.dead_letter_queue_url and "RedrivePolicy" not in attributes:
            log.warning(
                "no dead_letter_queue_url and no redrive policy: dead letters will be redelivered",
                source=self.name,
                queue_url=redact_url(s.queue_url),
            )
        self._events.connection_changed(True, "")

    def _explain_open_error(self, exc: BaseException) -> BaseException:
        s = self._settings
        if isinstance(exc, ClientError) and exc.response.get("Error", {}).get("Code") in _MISSING_QUEUE:
            return SourceMisconfigured(
                f"queue {redact_url(s.queue_url)} does not exist: create it, or fix sources.{s.name}.queue_url"
            )
        if isinstance(exc, NoCredentialsError | NoRegionError):
            return SourceMisconfigured(f"{exc}: set AWS credentials (AWS_ACCESS_KEY_ID, a profile or a role)")
        if isinstance(exc, ClientError | _TRANSIENT):
            where = redact_url(s.endpoint_url) or f"SQS in {s.region}"
            return SourceUnavailable(f"cannot reach {where}: {scrub(str(exc))}")
        return exc

    async def close(self) -> None:
        """Release every message still held (visibility 0: back at once, never deleted), then close.

        After a drain nothing is held; after an abort (drain timeout) this is how the messages of
        the cancelled handlers go back to the queue. Each release call takes at most
        `DRAIN_CALL_TIMEOUT` and the whole close at most `CLOSE_TIMEOUT`: what SQS did not
        answer for comes back when its visibility ends."""
        self._deadlines.stop()
        with anyio.CancelScope(shield=True), anyio.move_on_after(CLOSE_TIMEOUT):
            held, self._held = list(self._held.values()), {}
            if held and self._client is not None:
                released = 0
                for start in range(0, len(held), MAX_BATCH):
                    chunk = held[start : start + MAX_BATCH]
                    released += len(await self._calls.change_visibility([(h.message, 0) for h in chunk]))
                log.info("released messages still held", source=self.name, count=len(held), released=released)
            await self._stack.aclose()
        self._client = self._lean = None

    async def _call(self, operation: str, **kwargs: Any) -> dict[str, Any]:
        """One API call. Every call but a long poll is bounded by `CALL_TIMEOUT`, and by
        `DRAIN_CALL_TIMEOUT` once intake has stopped (calls under way included).

        Raises:
            TimeoutError: past its bound (transient, like any unanswered call).
        """
        self._events.broker_request(operation)
        method: Callable[..., Awaitable[dict[str, Any]]]
        if self._lean is not None and operation in LEAN_OPERATIONS:
            method = functools.partial(self._lean.call, operation)
        else:
            method = getattr(self._client, _snake(operation))
        if operation == "ReceiveMessage":  # bounded by its wait time; cancelled when intake stops
            response: dict[str, Any] = await method(**kwargs)
            return response
        with self._deadlines.bound(f"SQS {operation}"):
            response = await method(**kwargs)
        return response

    # -- intake ------------------------------------------------------------------------------

    async def receive(self, max_messages: int) -> list[Delivery]:
        """Long-poll until at least one message arrives (waiting while paused).

        Raises:
            SourceUnavailable: SQS could not be reached (the actor backs off and polls again).
        """
        s = self._settings
        while True:
            await self._resumed.wait()
            try:
                response = await self._call(
                    "ReceiveMessage",
                    QueueUrl=s.queue_url,
                    MaxNumberOfMessages=min(MAX_BATCH, max_messages),
                    WaitTimeSeconds=int(s.wait_time),
                    VisibilityTimeout=self._lease,
                    MessageSystemAttributeNames=["ApproximateReceiveCount", "MessageGroupId", "AWSTraceHeader"],
                    MessageAttributeNames=["All"],
                )
            except (ClientError, *_TRANSIENT) as exc:
                raise SourceUnavailable(f"ReceiveMessage failed: {exc}") from exc
            self._events.connection_changed(True, "")
            messages, dropped = settleable(response.get("Messages"))
            if dropped:
                log.error("sqs answer held entries without a receipt handle; skipped", source=self.name, count=dropped)
            if messages:
                deadline = anyio.current_time() + self._lease
                return [self._delivery(m, deadline) for m in messages]

    def _delivery(self, message: dict[str, Any], deadline: float) -> Delivery:
        self._held[message["ReceiptHandle"]] = _Held(message, deadline, self._lease)
        message_id = str(message.get("MessageId") or message["ReceiptHandle"][:64])
        try:
            attributes = read_attributes(message.get("MessageAttributes"))
            original = attributes.get("original_message_id")  # a dead letter replayed: keep its first id
            if isinstance(original, str) and 0 < len(original) <= 512:
                message_id = original
            system = message.get("Attributes") or {}
            received = receive_count(system.get("ApproximateReceiveCount"))
            again = received > 1 or original is not None
            raw = str(message.get("Body", "")).encode("utf-8", "surrogatepass")
            body, error = raw, None
            encoding = attributes.get("content_encoding")
            try:
                if encoding is not None and not isinstance(encoding, str):
                    raise UndecodableBody("the content_encoding attribute must be of DataType String, not Binary")
                body = decode_body(raw, encoding, text_transport=True)
            except UndecodableBody as exc:
                error = str(exc)
            group = system.get("MessageGroupId")
            return Delivery(
                body, message_id, received, attributes, message, group, error, again, False, "", message_id, again
            )
        except Exception as exc:  # noqa: BLE001 — an unreadable message is its own dead letter, never a crash
            return Delivery(b"", message_id, 1, {}, message, None, f"unreadable SQS message: {exc!r}"[:500], True)

    async def stop_intake(self) -> list[Delivery]:
        """Stop polling (a long poll in progress is cancelled by the actor) and bound every call
        from now on, those under way too, by `DRAIN_CALL_TIMEOUT`. Nothing is buffered."""
        self._deadlines.stop()
        return []

    def trace_carrier(self, delivery: Delivery) -> tuple[dict[str, Any], dict[str, str]]:
        """SQS's messaging attributes; the `traceparent` / `tracestate` message attributes and the
        `AWSTraceHeader` system attribute (X-Ray) as `X-Amzn-Trace-Id`."""
        attributes = {
            "messaging.system": "aws_sqs",
            "messaging.destination.name": self._settings.queue_url.rsplit("/", 1)[-1],
            "messaging.message.id": delivery.message_id,
        }
        carrier = text_carrier(delivery.attributes)
        system = delivery.handle.get("Attributes") if isinstance(delivery.handle, dict) else None
        xray = (system or {}).get("AWSTraceHeader")
        if isinstance(xray, str) and len(xray) <= 512:
            carrier["X-Amzn-Trace-Id"] = xray
        return attributes, carrier

    async def pause(self) -> None:
        """Stop starting long polls until `resume`."""
        if self._resumed.is_set():
            self._resumed = anyio.Event()

    async def resume(self) -> None:
        """Start long polls again."""
        self._resumed.set()

    # -- heartbeat ---------------------------------------------------------------------------

    async def run_background(self) -> None:
        """The visibility heartbeat (extend messages in hand once half their visibility is gone)
        and the queue-depth sample."""
        interval = max(0.2, self._lease / 4)
        sampled = -DEPTH_INTERVAL
        while True:
            await anyio.sleep(interval)
            now = anyio.current_time()
            if now - sampled >= DEPTH_INTERVAL:
                sampled = now
                await self._sample_depth()
            due = [h for h in self._held.values() if h.deadline - now < h.lease / 2]
            for start in range(0, len(due), MAX_BATCH):
                chunk = due[start : start + MAX_BATCH]
                extended = await self._calls.change_visibility([(h.message, self._visibility) for h in chunk])
                for held in chunk:
                    if held.message["ReceiptHandle"] in extended:
                        held.deadline, held.lease = now + self._visibility, self._visibility

    async def _sample_depth(self) -> None:
        try:
            attributes = await self._call(
                "GetQueueAttributes", QueueUrl=self._settings.queue_url, AttributeNames=["ApproximateNumberOfMessages"]
            )
        except (ClientError, *_TRANSIENT):
            return
        self._events.queue_depth(int(attributes["Attributes"].get("ApproximateNumberOfMessages", 0)))

    # -- settlement --------------------------------------------------------------------------

    async def settle(self, settlements: Sequence[Settlement]) -> None:
        """Delete, change visibility and dead-letter in batches of up to 10 (never raises)."""
        deletes: list[dict[str, Any]] = []
        visibility: list[tuple[dict[str, Any], int]] = []
        dead: list[Settlement] = []
        for s in settlements:
            message = s.delivery.handle
            self._held.pop(message["ReceiptHandle"], None)
            if s.disposition is Disposition.ACK:
                deletes.append(message)
            elif s.disposition is Disposition.DEAD_LETTER:
                dead.append(s)
            else:
                seconds = 0 if s.disposition is Disposition.RELEASE else min(MAX_VISIBILITY, math.ceil(s.delay))
                visibility.append((message, seconds))
        if dead:
            if self._settings.dead_letter_queue_url:
                sent = await self._calls.send_dead_letters(dead)
                for i, s in enumerate(dead):
                    if i in sent:
                        deletes.append(s.delivery.handle)
                    else:  # the DLQ refused it: try again after the retry delay
                        visibility.append((s.delivery.handle, math.ceil(self._settings.retry_initial)))
            else:
                for s in dead:
                    log.warning(
                        "dead letter left to the queue's redrive policy (no dead_letter_queue_url)",
                        source=self.name,
                        message_id=s.delivery.message_id,
                    )
                    visibility.append((s.delivery.handle, 0))
        for start in range(0, len(deletes), MAX_BATCH):
            await self._calls.delete(deletes[start : start + MAX_BATCH])
        for start in range(0, len(visibility), MAX_BATCH):
            await self._calls.change_visibility(visibility[start : start + MAX_BATCH])


def _snake(operation: str) -> str:
    return "".join("_" + c.lower() if c.isupper() else c for c in operation).lstrip("_")
