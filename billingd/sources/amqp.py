"""RabbitMQ transport (aio-pika): topology, a watched consumer, confirmed retries and dead-letters.

Topology per source (DESIGN §2 "AMQP specifics"):

* the exchange (`exchange_type`, durable) and the queue with `queue_arguments`, bound with each
  of `routing_keys`;
* `<queue>.retry` — messages wait there for their per-message TTL (`expiration` = the retry
  delay), then dead-letter through the default exchange straight back to `<queue>`;
* `<queue>.dlq` — dead letters, with headers `x-billingd-reason`, `x-billingd-handler`,
  `x-billingd-attempts`.

Retries and dead-letters are published with publisher confirms before the original is acked, so
a crash between the two duplicates a message (harmless: effects are idempotent) but never loses
one. Note on per-message TTL: RabbitMQ expires messages only at the head of a queue, so a short
retry can wait behind a longer one; a retry is never early, sometimes late.

The consumer is not left to aio-pika's restore logic: a watchdog checks every second that our
consumer tag is registered on the channel's current underlying channel and consumes again when
the broker cancelled it or a reconnect lost it (a known aio-pika failure mode). Consuming on the
underlying aiormq channel also spares each delivery aio-pika's `IncomingMessage` wrapper, the
largest per-message cost of the transport.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections import deque
from collections.abc import Sequence
from typing import Any

import aio_pika
import aiormq
import anyio
import structlog
from aio_pika.abc import AbstractRobustChannel, AbstractRobustConnection
from aiormq.abc import DeliveredMessage
from pamqp.commands import Basic
from yarl import URL

from billingd.config.model import AmqpSourceSettings
from billingd.sources.acks import AckPlan
from billingd.sources.base import (
    DEPTH_INTERVAL,
    Delivery,
    Disposition,
    Settlement,
    SourceEvents,
    SourceMisconfigured,
    SourceUnavailable,
)
from billingd.sources.codecs import UndecodableBody, decode_body

log = structlog.get_logger("billingd.sources.amqp")

ATTEMPTS_HEADER = "x-billingd-attempts"
CONNECT_TIMEOUT = 10.0
PUBLISH_TIMEOUT = 10.0
WATCH_INTERVAL = 1.0
_CONNECT_ERRORS = (OSError, asyncio.TimeoutError, aiormq.exceptions.AMQPError, ConnectionError)


def redact(url: str) -> str:
    """`url` with its password replaced, safe to log."""
    parsed = URL(url)
    return str(parsed.with_password("***")) if parsed.password else url


def explain_precondition(exc: Exception, settings: AmqpSourceSettings) -> str:
    """A PRECONDITION_FAILED from a declare, as a config error naming the object, argument and fix."""
    text = str(exc)
    arg = re.search(r"inequivalent arg '([^']+)'", text)
    what = re.search(r"for (queue|exchange) '([^']+)'", text)
    kind, name = (what.group(1), what.group(2)) if what else ("queue", settings.queue)
    argument = arg.group(1) if arg else "arguments"
    fix = (
        f"make sources.{settings.name} queue_arguments match the existing queue, or delete it "
        f"(rabbitmqctl delete_queue {name}) so billingd can declare it"
        if kind == "queue"
        else f"make exchange_type match the existing exchange, or delete it (rabbitmqadmin delete exchange name={name})"
    )
    return f"{kind} {name!r} already exists with a different {argument!r} ({text}); fix: {fix}"


def persistent_copy(
    body: bytes, properties: Basic.Properties, headers: dict[str, Any], expiration: float | None = None
) -> aio_pika.Message:
    """A persistent copy of a message with new `headers` (and a per-message TTL in seconds), its
    other properties kept: what retries, dead letters and DLQ replays publish."""
    return aio_pika.Message(
        body,
        headers=headers,
        content_type=properties.content_type,
        content_encoding=properties.content_encoding,
        message_id=properties.message_id,
        correlation_id=properties.correlation_id,
        timestamp=properties.timestamp,
        type=properties.message_type,
        app_id=properties.app_id,
        priority=properties.priority,
        reply_to=properties.reply_to,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        expiration=expiration,
    )


class AmqpSource:
    """One RabbitMQ queue as a `Source` (see module docstring)."""

    receivers = 1
    ordered = False
    partition_default = None
    settle_linger = 0.0

    def __init__(self, settings: AmqpSourceSettings, events: SourceEvents) -> None:
        self.name = settings.name
        self.receive_max = settings.prefetch
        self.settle_batch = max(64, settings.prefetch)
        self._settings = settings
        self._events = events
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractRobustChannel | None = None
        self._publisher: AbstractRobustChannel | None = None
        self._buffer: deque[Delivery] = deque()
        self._arrived = asyncio.Event()
        self._consumer_lock = anyio.Lock()
        self._tag: str | None = None
        self._consumer_channel: aiormq.abc.AbstractChannel | None = None
        self._paused = False
        self._stopped = False
        self._plans: dict[aiormq.abc.AbstractChannel, AckPlan] = {}

    # -- lifecycle ---------------------------------------------------------------------------

    async def open(self) -> None:
        """Connect (robustly) and declare the topology.

        Raises:
            SourceUnavailable: the broker cannot be reached or refused the login.
            SourceMisconfigured: PRECONDITION_FAILED — an existing queue or exchange differs.
        """
        s = self._settings
        try:
            self._connection = await aio_pika.connect_robust(
                s.url, timeout=CONNECT_TIMEOUT, client_properties={"connection_name": f"billingd {s.name}"}
            )
        except _CONNECT_ERRORS as exc:
            raise SourceUnavailable(f"cannot connect to {redact(s.url)}: {exc or type(exc).__name__}") from exc
        self._connection.close_callbacks.add(self._on_connection_close)
        self._connection.reconnect_callbacks.add(self._on_reconnect)
        try:
            await self._declare()
        except aiormq.exceptions.ChannelPreconditionFailed as exc:
            await self.close()
            raise SourceMisconfigured(explain_precondition(exc, s)) from exc
        except _CONNECT_ERRORS as exc:
            await self.close()
            raise SourceUnavailable(f"declaring {s.queue!r} failed: {exc or type(exc).__name__}") from exc
        self._events.connection_changed(True, "")

    async def _declare(self) -> None:
        s = self._settings
        assert self._connection is not None
        channel = await self._connection.channel(publisher_confirms=False)
        await channel.set_qos(prefetch_count=s.prefetch)
        queue = await channel.declare_queue(s.queue, durable=True, arguments=s.queue_arguments or None)
        if s.exchange:
            exchange = await channel.declare_exchange(s.exchange, s.exchange_type, durable=True)
            for routing_key in s.routing_keys:
                await queue.bind(exchange, routing_key)
        await channel.declare_queue(
            f"{s.queue}.retry",
            durable=True,
            arguments={"x-dead-letter-exchange": "", "x-dead-letter-routing-key": s.queue},
        )
        await channel.declare_queue(f"{s.queue}.dlq", durable=True)
        self._publisher = await self._connection.channel(publisher_confirms=True)
        self._channel = channel

    async def close(self) -> None:
        """Close the connection; unacked deliveries return to the queue."""
        connection, self._connection = self._connection, None
        if connection is not None:
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await connection.close()

    def _on_connection_close(self, _connection: Any, exc: BaseException | None = None) -> None:
        if self._connection is None:
            return
        self._events.connection_changed(False, f"connection lost: {exc or 'closed'}")

    def _on_reconnect(self, *_args: Any) -> None:
        self._events.connection_changed(True, "")

    # -- intake ------------------------------------------------------------------------------

    async def run_background(self) -> None:
        """The consumer watchdog (every `WATCH_INTERVAL`) and the queue-depth sample."""
        sampled = -DEPTH_INTERVAL
        while True:
            await self._ensure_consumer()
            if anyio.current_time() - sampled >= DEPTH_INTERVAL:
                sampled = anyio.current_time()
                await self._sample_depth()
            await anyio.sleep(WATCH_INTERVAL)

    async def _sample_depth(self) -> None:
        channel = self._channel
        if channel is None or channel.is_closed or self._connection is None or not self._connection.connected.is_set():
            return
        try:
            with anyio.fail_after(5):
                underlay = await channel.get_underlay_channel()
                declared = await underlay.queue_declare(self._settings.queue, passive=True)
        except (TimeoutError, *_CONNECT_ERRORS):
            return
        self._events.broker_request("queue_declare")
        self._events.queue_depth(declared.message_count or 0)

    async def _ensure_consumer(self) -> None:
        connection, channel = self._connection, self._channel
        if connection is None or channel is None or not connection.connected.is_set():
            return
        async with self._consumer_lock:
            if self._paused or self._stopped or channel.is_closed:
                return
            try:
                with anyio.fail_after(5):
                    underlay = await channel.get_underlay_channel()
                if self._tag is not None and underlay is self._consumer_channel and self._tag in underlay.consumers:
                    return
                if self._tag is not None:
                    log.warning("amqp consumer lost, consuming again", source=self.name, queue=self._settings.queue)
                await self._consume()
            except (TimeoutError, *_CONNECT_ERRORS) as exc:
                log.info("amqp consumer not yet restored", source=self.name, error=str(exc))

    async def _consume(self) -> None:
        assert self._channel is not None
        underlay = await self._channel.get_underlay_channel()
        ok = await underlay.basic_consume(self._settings.queue, self._on_message, no_ack=False)
        self._tag, self._consumer_channel = ok.consumer_tag, underlay
        self._events.broker_request("consume")
        log.info("amqp consuming", source=self.name, queue=self._settings.queue)

    async def _on_message(self, message: DeliveredMessage) -> None:
        properties = message.header.properties
        headers = properties.headers or {}
        previous = headers.get(ATTEMPTS_HEADER, 0)
        try:
            attempt = int(previous) + 1
        except (TypeError, ValueError):
            attempt = 1
        message_id = properties.message_id or "sha256:" + hashlib.sha256(message.body).hexdigest()[:32]
        body, error = message.body, None
        if properties.content_encoding:
            try:
                body = decode_body(body, properties.content_encoding, text_transport=False)
            except UndecodableBody as exc:
                error = str(exc)
        self._buffer.append(Delivery(body, message_id, attempt, headers, message, None, error))
        self._arrived.set()

    async def receive(self, max_messages: int) -> list[Delivery]:
        """Wait for deliveries pushed by the consumer; skip those whose channel has closed
        (the broker requeued them already)."""
        while True:
            while not self._buffer:
                self._arrived.clear()
                await self._arrived.wait()
            out: list[Delivery] = []
            while self._buffer and len(out) < max_messages:
                delivery = self._buffer.popleft()
                if not delivery.handle.channel.is_closed:
                    out.append(delivery)
            if out:
                return out

    async def stop_intake(self) -> list[Delivery]:
        """Cancel the consumer; return deliveries not yet handed out (to be nacked with requeue)."""
        async with self._consumer_lock:
            self._stopped = True
            await self._cancel_consumer()
        pending = [d for d in self._buffer if not d.handle.channel.is_closed]
        self._buffer.clear()
        return pending

    async def pause(self) -> None:
        """Cancel the consumer until `resume`."""
        async with self._consumer_lock:
            self._paused = True
            await self._cancel_consumer()

    async def resume(self) -> None:
        """Consume again after `pause`."""
        async with self._consumer_lock:
            self._paused = False
        await self._ensure_consumer()

    async def _cancel_consumer(self) -> None:
        tag, self._tag = self._tag, None
        channel = self._consumer_channel
        if tag is None or channel is None or channel.is_closed:
            return
        try:
            with anyio.fail_after(5):
                await channel.basic_cancel(tag)
            self._events.broker_request("cancel")
        except (TimeoutError, *_CONNECT_ERRORS) as exc:
            log.info("amqp cancel failed; the consumer ends with its channel", source=self.name, error=str(exc))

    # -- settlement --------------------------------------------------------------------------

    async def settle(self, settlements: Sequence[Settlement]) -> None:
        """Publish retries and dead-letters (confirmed), then ack / nack per channel with one
        `multiple=True` ack for the settled prefix. Broker errors are logged, never raised."""
        acks: dict[aiormq.abc.AbstractChannel, list[int]] = {}
        nacks: dict[aiormq.abc.AbstractChannel, list[int]] = {}
        for s in settlements:
            message: DeliveredMessage = s.delivery.handle
            channel, tag = message.channel, message.delivery.delivery_tag
            if s.disposition is Disposition.ACK or (
                s.disposition is not Disposition.RELEASE and await self._republish(s)
            ):
                acks.setdefault(channel, []).append(tag)
            else:
                nacks.setdefault(channel, []).append(tag)
        for channel in acks.keys() | nacks.keys():
            await self._acknowledge(channel, acks.get(channel, []), nacks.get(channel, []))

    async def _acknowledge(self, channel: aiormq.abc.AbstractChannel, acks: list[int], nacks: list[int]) -> None:
        if channel.is_closed:
            self._plans.pop(channel, None)
            return
        plan = self._plans.get(channel)
        if plan is None:
            self._plans = {c: p for c, p in self._plans.items() if not c.is_closed}
            plan = self._plans[channel] = AckPlan()
        upto, singles = plan.plan(acks, nacks)
        try:
            for tag in nacks:
                await channel.basic_nack(tag, requeue=True)
            if upto is not None:
                await channel.basic_ack(upto, multiple=True)
            for tag in singles:
                await channel.basic_ack(tag)
        except _CONNECT_ERRORS as exc:
            log.info("amqp ack failed; the broker redelivers", source=self.name, error=str(exc))
            return
        if nacks:
            self._events.broker_request("nack", len(nacks))
        self._events.broker_request("ack", len(singles) + (upto is not None))

    async def _republish(self, s: Settlement) -> bool:
        """Publish the retry copy or the dead letter with confirms. False when not confirmed."""
        message: DeliveredMessage = s.delivery.handle
        properties = message.header.properties
        queue = self._settings.queue
        headers = dict(properties.headers or {})
        expiration = None
        if s.disposition is Disposition.RETRY:
            headers[ATTEMPTS_HEADER] = s.delivery.attempt if s.counted else s.delivery.attempt - 1
            routing_key, operation = f"{queue}.retry", "publish_retry"
            expiration = max(s.delay, 0.001)
        else:
            headers.update(
                {
                    "x-billingd-reason": s.reason[:2000],
                    "x-billingd-handler": self._settings.handler,
                    ATTEMPTS_HEADER: s.delivery.attempt,
                    "x-billingd-source": self.name,
                    "x-billingd-original-message-id": s.delivery.message_id,
                    "x-billingd-original-exchange": message.exchange or "",
                    "x-billingd-original-routing-key": message.routing_key or "",
                }
            )
            routing_key, operation = f"{queue}.dlq", "publish_dead_letter"
        copy = persistent_copy(message.body, properties, headers, expiration)
        try:
            assert self._publisher is not None
            await self._publisher.default_exchange.publish(
                copy, routing_key=routing_key, mandatory=True, timeout=PUBLISH_TIMEOUT
            )
        except (aio_pika.exceptions.DeliveryError, aio_pika.exceptions.PublishError, *_CONNECT_ERRORS) as exc:
            log.error(
                "amqp publish not confirmed; message requeued",
                source=self.name,
                routing_key=routing_key,
                error=str(exc) or type(exc).__name__,
            )
            return False
        finally:
            self._events.broker_request(operation)
        return True
