"""RabbitMQ transport (aio-pika): topology, a watched consumer, confirmed retries and dead-letters.

Topology (`amqp_topology`): the exchange, the queue bound with `routing_keys`, `<queue>.retry`
(per-message TTL back to `<queue>`) and `<queue>.dlq`.

Settlement (`amqp_settle`): retries and dead letters are published with publisher confirms
before the original is acked, so a crash between the two duplicates a message (harmless:
effects are idempotent) but never loses one. Note on per-message TTL: RabbitMQ expires
messages only at the head of a queue, so a short retry can wait behind a longer one; a retry is
never early, sometimes late.

The consumer is not left to aio-pika's restore logic: a watchdog checks every second that our
consumer tag is registered on the channel's current underlying channel and consumes again when
the broker cancelled it or a reconnect lost it (a known aio-pika failure mode). Consuming on the
underlying aiormq channel also spares each delivery aio-pika's `IncomingMessage` wrapper, the
largest per-message cost of the transport.
"""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections import deque
from collections.abc import Sequence
from functools import partial
from typing import Any

import aio_pika
import aiormq
import anyio
import structlog
from aio_pika.abc import AbstractRobustChannel, AbstractRobustConnection
from aiormq.abc import DeliveredMessage
from yarl import URL

from billingd.config.model import AmqpSourceSettings, TlsSettings
from billingd.config.tls import ContextSource
from billingd.sources.amqp_nodes import NodeConnection, with_tls_hint
from billingd.sources.amqp_settle import Acknowledger
from billingd.sources.amqp_topology import declare, explain_precondition, redact
from billingd.sources.amqp_wire import CONNECT_ERRORS, install_lenient_decoders, parse_attempts
from billingd.sources.base import (
    DEPTH_INTERVAL,
    DRAIN_CALL_TIMEOUT,
    Delivery,
    Settlement,
    SourceEvents,
    SourceMisconfigured,
    SourceUnavailable,
    text_carrier,
)
from billingd.sources.codecs import UndecodableBody, decode_body
from billingd.sources.deadlines import CallDeadlines
from billingd.sources.letters import ATTEMPTS_HEADER, DELIVERY_HEADER, ORIGINAL_ID_HEADER

#: Seconds between two attempts to reach a lost broker (the next node of a cluster each time).
RECONNECT_INTERVAL = 1.0
#: The longest `close()` waits for the broker once intake has stopped (seconds).
CLOSE_TIMEOUT = DRAIN_CALL_TIMEOUT
log = structlog.get_logger("billingd.sources.amqp")
install_lenient_decoders()  # one hostile header must not close the connection (see amqp_wire)

CONNECT_TIMEOUT = 10.0
WATCH_INTERVAL = 1.0


class AmqpSource:
    """One RabbitMQ queue as a `Source` (see module docstring)."""

    receivers = 1
    ordered = False
    partition_default: str | None = None
    settle_linger: float = 0.0

    def __init__(self, settings: AmqpSourceSettings, events: SourceEvents) -> None:
        self.name = settings.name
        self.receive_max = settings.prefetch
        self.settle_batch = max(64, settings.prefetch)
        self._settings = settings
        self._tls = ContextSource(settings.tls if isinstance(settings.tls, TlsSettings) else TlsSettings())
        """How `amqps://` nodes are verified (`tls`; a name was resolved by the loader)."""
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
        self._deadlines = CallDeadlines()
        self._acknowledger = Acknowledger(settings, events, self._deadlines, self._unblocked)
        self._node_index = 0
        self._blocked = False

    # -- lifecycle ---------------------------------------------------------------------------

    async def open(self) -> None:
        """Connect (robustly) and declare the topology.

        Raises:
            SourceUnavailable: the broker cannot be reached or refused the login.
            SourceMisconfigured: PRECONDITION_FAILED — an existing queue or exchange differs.
        """
        s = self._settings
        self._connection = await self._connect_any(s.urls)
        self._connection.close_callbacks.add(self._on_connection_close)
        self._connection.reconnect_callbacks.add(self._on_reconnect)
        try:
            await self._declare()
        except aiormq.exceptions.ChannelPreconditionFailed as exc:
            await self.close()
            raise SourceMisconfigured(explain_precondition(exc, s)) from exc
        except aiormq.exceptions.ChannelNotFoundEntity as exc:
            await self.close()
            raise SourceUnavailable(
                f"waiting for exchange {s.exchange!r} to exist (exchange_declare = passive: its producer declares it)"
            ) from exc
        except CONNECT_ERRORS as exc:
            await self.close()
            raise SourceUnavailable(f"declaring {s.queue!r} failed: {exc or type(exc).__name__}") from exc
        self._events.connection_changed(True, "")

    async def _connect_any(self, urls: list[str]) -> NodeConnection:
        """A robust connection to the first node of `urls` that answers, starting after the node
        last in use (a cluster: see `billingd.sources.amqp_nodes`).

        Raises:
            SourceUnavailable: no node could be reached.
        """
        errors: list[str] = []
        start = self._node_index
        for step in range(len(urls)):
            index = (start + step) % len(urls)
            try:
                connection = await aio_pika.connect_robust(
                    urls[index],
                    timeout=CONNECT_TIMEOUT,
                    reconnect_interval=RECONNECT_INTERVAL,
                    client_properties={"connection_name": f"billingd {self.name}"},
                    connection_class=partial(NodeConnection, tls=self._tls),
                )
            except CONNECT_ERRORS as exc:
                text = with_tls_hint(str(exc) or type(exc).__name__, urls[index].startswith("amqps:"))
                errors.append(f"{redact(urls[index])}: {text}")
                continue
            assert isinstance(connection, NodeConnection)
            connection.nodes = [URL(u) for u in urls]
            connection.source = self.name
            self._node_index = index
            self._events.node_changed(connection.node)
            return connection
        raise SourceUnavailable("cannot connect to " + "; ".join(errors))

    def _unblocked(self) -> asyncio.Event | None:
        connection = self._connection
        return connection.unblocked() if isinstance(connection, NodeConnection) else None

    def _watch_blocked(self) -> None:
        """Report a change of RabbitMQ's publishing block (`billingd_broker_blocked`, `/readyz`)."""
        connection = self._connection
        blocked = isinstance(connection, NodeConnection) and connection.blocked
        if blocked != self._blocked:
            self._blocked = blocked
            self._events.blocked_changed(
                "connection.blocked: a RabbitMQ resource alarm (memory or disk)" if blocked else None
            )

    async def _declare(self) -> None:
        assert self._connection is not None
        self._channel, self._publisher = await declare(self._connection, self._settings)

    async def close(self) -> None:
        """Close the connection; unacked deliveries return to the queue."""
        connection, self._connection = self._connection, None
        if connection is not None:
            # a broker that stopped answering (a blackholed connection) cannot hold the stop: past
            # the bound the socket is dropped and the broker requeues what was unacked
            with anyio.CancelScope(shield=True), anyio.move_on_after(CLOSE_TIMEOUT if self._stopped else 5):
                await connection.close()

    def _on_connection_close(self, _connection: Any, exc: BaseException | None = None) -> None:
        if self._connection is None:
            return
        self._events.connection_changed(False, f"connection lost: {exc or 'closed'}")

    def _on_reconnect(self, *_args: Any) -> None:
        if isinstance(self._connection, NodeConnection):
            self._events.node_changed(self._connection.node)
        self._events.connection_changed(True, "")

    # -- intake ------------------------------------------------------------------------------

    async def run_background(self) -> None:
        """The consumer watchdog (every `WATCH_INTERVAL`) and the queue-depth sample."""
        sampled = -DEPTH_INTERVAL
        while True:
            self._watch_blocked()
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
        except (TimeoutError, *CONNECT_ERRORS):
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
                with anyio.fail_after(5):  # the lock must never be held long: stop_intake needs it
                    underlay = await channel.get_underlay_channel()
                    if (
                        self._tag is not None
                        and underlay is self._consumer_channel
                        and isinstance(underlay, aiormq.Channel)
                        and self._tag in underlay.consumers
                    ):
                        return
                    if self._tag is not None:
                        log.warning("amqp consumer lost, consuming again", source=self.name, queue=self._settings.queue)
                    await self._consume()
            except (TimeoutError, *CONNECT_ERRORS) as exc:
                log.info("amqp consumer not yet restored", source=self.name, error=str(exc))

    async def _consume(self) -> None:
        assert self._channel is not None
        underlay = await self._channel.get_underlay_channel()
        ok = await underlay.basic_consume(self._settings.queue, self._on_message, no_ack=False)
        self._tag, self._consumer_channel = ok.consumer_tag, underlay
        self._events.broker_request("consume")
        log.info("amqp consuming", source=self.name, queue=self._settings.queue)

    async def _on_message(self, message: DeliveredMessage) -> None:
        self._buffer.append(self._delivery(message))
        self._arrived.set()

    def _delivery(self, message: DeliveredMessage) -> Delivery:
        """The delivery of `message`; one that cannot be read carries its `error` (→ dead letter)."""
        properties = message.header.properties
        derived = not properties.message_id
        message_id = properties.message_id or "sha256:" + hashlib.sha256(message.body).hexdigest()[:32]
        try:
            headers = properties.headers or {}
            if not isinstance(headers, dict):
                raise TypeError(f"headers are a {type(headers).__name__}, not a table")
            # a hint only: any producer can set the header; the actor reads billingd's own count
            # (`AttemptLedger`) for a message that is not a fresh publish
            attempt = parse_attempts(headers.get(ATTEMPTS_HEADER)) + 1
            again = bool(message.redelivered) or ATTEMPTS_HEADER in headers or ORIGINAL_ID_HEADER in headers
            body, error = message.body, None
            if properties.content_encoding:
                try:
                    body = decode_body(body, properties.content_encoding, text_transport=False)
                except UndecodableBody as exc:
                    error = str(exc)
            identity = message_id if derived else f"{message_id}:{hashlib.sha256(message.body).hexdigest()[:16]}"
            copy_of = headers.get(DELIVERY_HEADER)
            if isinstance(copy_of, bytes):
                copy_of = copy_of.decode("ascii", "replace")
            copied = isinstance(copy_of, str) and 0 < len(copy_of) <= 64
            delivery_id = str(copy_of) if copied else uuid.uuid4().hex
            return Delivery(
                body, message_id, attempt, headers, message, None, error, again, derived, identity, delivery_id, copied
            )
        except Exception as exc:  # noqa: BLE001 — an unreadable message is its own dead letter, never a crash
            reason = f"unreadable AMQP message: {exc!r}"[:500]
            return Delivery(message.body, message_id, 1, {}, message, None, reason, bool(message.redelivered), derived)

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
        self._stopped = True
        self._deadlines.stop()
        with anyio.move_on_after(DRAIN_CALL_TIMEOUT * 2):  # the lock, then the cancel: never the drain's time
            async with self._consumer_lock:
                await self._cancel_consumer()
        pending = [d for d in self._buffer if not d.handle.channel.is_closed]
        self._buffer.clear()
        return pending

    def trace_carrier(self, delivery: Delivery) -> tuple[dict[str, Any], dict[str, str]]:
        """RabbitMQ's messaging attributes and the `traceparent` / `tracestate` headers."""
        message: DeliveredMessage = delivery.handle
        attributes = {
            "messaging.system": "rabbitmq",
            "messaging.destination.name": message.exchange or "",
            "messaging.rabbitmq.destination.routing_key": message.routing_key or "",
            "messaging.message.id": delivery.message_id,
            "messaging.consumer.group.name": self._settings.queue,
        }
        return attributes, text_carrier(delivery.attributes)

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
            with anyio.fail_after(DRAIN_CALL_TIMEOUT if self._stopped else 5):
                await channel.basic_cancel(tag)
            self._events.broker_request("cancel")
        except (TimeoutError, *CONNECT_ERRORS) as exc:
            log.info("amqp cancel failed; the consumer ends with its channel", source=self.name, error=str(exc))

    # -- settlement --------------------------------------------------------------------------

    async def settle(self, settlements: Sequence[Settlement]) -> None:
        """Publish retries and dead letters (confirmed), then ack / nack (see `amqp_settle`)."""
        await self._acknowledger.settle(settlements, self._publisher)
