"""`QueueTools` for RabbitMQ: `<queue>.dlq` → `<queue>` with publisher confirms."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from functools import partial

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection

from billingd.config.model import AmqpSourceSettings, TlsSettings
from billingd.config.tls import ContextSource
from billingd.sources.amqp_nodes import TlsConnection
from billingd.sources.amqp_wire import persistent_copy
from billingd.sources.codecs import encode_body
from billingd.sources.letters import Letter, read_amqp, replay_amqp_headers


class AmqpTools:
    """See `billingd.sources.tools`."""

    def __init__(self, settings: AmqpSourceSettings) -> None:
        self._settings = settings
        self._dlq = f"{settings.queue}.dlq"
        self._connection: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None

    async def __aenter__(self) -> AmqpTools:
        error: Exception | None = None
        for url in self._settings.urls:  # the first node that answers
            try:
                tls = ContextSource(
                    self._settings.tls if isinstance(self._settings.tls, TlsSettings) else TlsSettings()
                )
                self._connection = await aio_pika.connect(
                    url, timeout=10, connection_class=partial(TlsConnection, tls=tls)
                )
                break
            except (OSError, aio_pika.exceptions.AMQPError, TimeoutError) as exc:
                error = exc
        else:
            assert error is not None
            raise error
        self._channel = await self._connection.channel(publisher_confirms=True)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._connection is not None:
            await self._connection.close()

    async def dead_letter_count(self) -> int:
        assert self._connection is not None
        channel = await self._connection.channel()
        try:
            queue = await channel.declare_queue(self._dlq, passive=True)
            return queue.declaration_result.message_count or 0
        finally:
            await channel.close()

    async def sample(self, limit: int) -> list[Letter]:
        assert self._connection is not None
        channel = await self._connection.channel()  # closing it returns every unacked letter
        letters: list[Letter] = []
        try:
            queue = await channel.declare_queue(self._dlq, passive=True)
            while len(letters) < limit and (message := await queue.get(no_ack=False, fail=False)) is not None:
                letters.append(read_amqp(message.message_id, message.headers or {}, message.body))
        finally:
            await channel.close()
        return letters

    async def replay(self, limit: int | None) -> int:
        assert self._channel is not None
        budget = await self.dead_letter_count() if limit is None else limit
        queue = await self._channel.declare_queue(self._dlq, passive=True)
        moved = 0
        while moved < budget and (message := await queue.get(no_ack=False, fail=False)) is not None:
            headers = replay_amqp_headers(message.headers or {})
            copy = persistent_copy(message.body, message.properties, headers)
            await self._channel.default_exchange.publish(copy, routing_key=self._settings.queue)
            await message.ack()  # only once the copy is confirmed
            moved += 1
        return moved

    async def publish(
        self,
        body: bytes,
        *,
        routing_key: str | None,
        encoding: str | None,
        group: str | None,
        trace: Mapping[str, str] | None = None,
    ) -> str:
        assert self._channel is not None
        message_id = uuid.uuid4().hex
        message = aio_pika.Message(
            encode_body(body, encoding, text_transport=False),
            content_type="application/json",
            content_encoding=encoding,
            message_id=message_id,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            headers=dict(trace or {}),
        )
        if routing_key is not None and self._settings.exchange:
            exchange = await self._channel.get_exchange(self._settings.exchange)
            await exchange.publish(message, routing_key=routing_key)
        else:
            await self._channel.default_exchange.publish(message, routing_key=self._settings.queue)
        return message_id
