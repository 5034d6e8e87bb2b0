"""Settling AMQP deliveries (Broadway's acknowledger for RabbitMQ; DESIGN §2 outcomes table).

Retries and dead letters are published with publisher confirms before the original is acked, so
a crash between the two duplicates a message (harmless: effects are idempotent) but never loses
one. Acks go out per channel as one `multiple=True` frame for the settled prefix (`acks.AckPlan`);
releases are nacked with requeue. Broker errors are logged, never raised: an unsettled delivery
comes back.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

import aio_pika
import aiormq
import anyio
import structlog
from aio_pika.abc import AbstractRobustChannel
from aiormq.abc import DeliveredMessage

from billingd.config.model import AmqpSourceSettings
from billingd.sources.acks import AckPlan
from billingd.sources.amqp_wire import CONNECT_ERRORS, encodable_headers, persistent_copy
from billingd.sources.base import DRAIN_CALL_TIMEOUT, Disposition, Settlement, SourceEvents
from billingd.sources.deadlines import CallDeadlines
from billingd.sources.letters import ATTEMPTS_HEADER, DELIVERY_HEADER, amqp_annotations

log = structlog.get_logger("billingd.sources.amqp")

PUBLISH_TIMEOUT = 10.0
#: While RabbitMQ blocks publishing (a resource alarm), the longest a retry copy or a dead letter
#: waits for it to lift before its message is requeued instead (seconds). Acks are sent first.
BLOCKED_WAIT = 2.0


class Acknowledger:
    """Settles the deliveries of one AMQP source (see module docstring)."""

    def __init__(
        self,
        settings: AmqpSourceSettings,
        events: SourceEvents,
        deadlines: CallDeadlines | None = None,
        unblocked: Callable[[], asyncio.Event | None] = lambda: None,
    ) -> None:
        self.name = settings.name
        self._settings = settings
        self._events = events
        self._deadlines = deadlines or CallDeadlines()
        self._unblocked = unblocked
        self._plans: dict[aiormq.abc.AbstractChannel, AckPlan] = {}

    async def settle(self, settlements: Sequence[Settlement], publisher: AbstractRobustChannel | None) -> None:
        """Publish retries and dead-letters (confirmed), then ack / nack per channel with one
        `multiple=True` ack for the settled prefix. Broker errors are logged, never raised."""
        copies = [s for s in settlements if s.disposition in (Disposition.RETRY, Disposition.DEAD_LETTER)]
        plain = [s for s in settlements if s.disposition not in (Disposition.RETRY, Disposition.DEAD_LETTER)]
        await self._settle_group(plain, publisher)  # acks first: a blocked publisher must not hold them
        if copies:
            # one wait per batch, not per copy: past it the copies' messages are requeued
            await self._settle_group(copies, publisher, publish=await self._publishable())

    async def _settle_group(
        self, settlements: Sequence[Settlement], publisher: AbstractRobustChannel | None, publish: bool = True
    ) -> None:
        acks: dict[aiormq.abc.AbstractChannel, list[int]] = {}
        nacks: dict[aiormq.abc.AbstractChannel, list[int]] = {}
        for s in settlements:
            message: DeliveredMessage = s.delivery.handle
            channel, tag = message.channel, message.delivery_tag
            if tag is None:  # only a basic.return or basic.get-empty lacks one; consumers never see them
                log.error("amqp delivery without a delivery tag", message_id=s.delivery.message_id)
                continue
            if s.disposition is Disposition.ACK or (
                s.disposition is not Disposition.RELEASE and publish and await self._republish(s, publisher)
            ):
                acks.setdefault(channel, []).append(tag)
            else:
                nacks.setdefault(channel, []).append(tag)
        for channel in acks.keys() | nacks.keys():
            await self._acknowledge(channel, acks.get(channel, []), nacks.get(channel, []))

    async def _publishable(self) -> bool:
        """False when RabbitMQ blocks publishing and does not lift it within `BLOCKED_WAIT` (the
        messages are requeued instead: a publish now would stop RabbitMQ reading this connection,
        acks included, until the alarm clears)."""
        flag = self._unblocked()
        if flag is None or flag.is_set():
            return True
        with anyio.move_on_after(DRAIN_CALL_TIMEOUT if self._deadlines.stopping else BLOCKED_WAIT):
            await flag.wait()
        if not flag.is_set():
            log.warning("amqp publishing blocked: retry copies and dead letters requeued", source=self.name)
        return flag.is_set()

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
        except CONNECT_ERRORS as exc:
            log.info("amqp ack failed; the broker redelivers", source=self.name, error=str(exc))
            return
        if nacks:
            self._events.broker_request("nack", len(nacks))
        self._events.broker_request("ack", len(singles) + (upto is not None))

    async def _republish(self, s: Settlement, publisher: AbstractRobustChannel | None) -> bool:
        """Publish the retry copy or the dead letter with confirms. False when not confirmed.

        Headers go out through `encodable_headers`, so whatever the message carried (values
        pamqp cannot encode, tables near `frame_max`) the copy can be published."""
        message: DeliveredMessage = s.delivery.handle
        properties = message.header.properties
        queue = self._settings.queue
        received = properties.headers if isinstance(properties.headers, dict) else {}
        expiration = None
        if s.disposition is Disposition.RETRY:
            ours: dict[str, Any] = {
                ATTEMPTS_HEADER: s.delivery.attempt if s.counted else s.delivery.attempt - 1,
                DELIVERY_HEADER: s.delivery.delivery_id,  # the copy is this delivery, not a new one
            }
            routing_key, operation = f"{queue}.retry", "publish_retry"
            expiration = max(s.delay, 0.001)
        else:
            ours = amqp_annotations(
                reason=s.reason,
                handler=self._settings.handler,
                attempts=s.delivery.attempt,
                source=self.name,
                message_id=s.delivery.message_id,
                exchange=message.exchange or "",
                routing_key=message.routing_key or "",
            )
            routing_key, operation = f"{queue}.dlq", "publish_dead_letter"
        try:
            copy = persistent_copy(message.body, properties, encodable_headers(received, ours), expiration)
            assert publisher is not None
            with self._deadlines.bound(f"publish to {routing_key}", PUBLISH_TIMEOUT):  # a drain waits on no broker
                await publisher.default_exchange.publish(copy, routing_key=routing_key, mandatory=True)
        except (aio_pika.exceptions.DeliveryError, aio_pika.exceptions.PublishError, *CONNECT_ERRORS) as exc:
            log.error(
                "amqp publish not confirmed; message requeued",
                source=self.name,
                routing_key=routing_key,
                error=str(exc) or type(exc).__name__,
            )
            return False
        except Exception:  # a copy that cannot be built stays this message's problem
            log.exception("amqp copy could not be published; message requeued", source=self.name)
            return False
        finally:
            self._events.broker_request(operation)
        return True
