"""The topology of an AMQP source, declared and explained (DESIGN §2 "AMQP specifics").

* the exchange (`exchange_type`; durable, transient — as Jasmin declares its own — or passive,
  per `exchange_declare`) and the durable queue with its arguments, bound with each of
  `routing_keys`; aio-pika's robust channel declares and binds them again after a reconnect, so a
  transient exchange lost in a broker restart comes back;
* `<queue>.retry` — retry copies wait there for their per-message TTL, then dead-letter through
  the default exchange straight back to `<queue>`;
* `<queue>.dlq` — dead letters (`billingd.sources.letters`), and what RabbitMQ drops itself: a
  queue whose arguments let it expire or overflow messages dead-letters them there
  (`queue_arguments`).

A declaration RabbitMQ refuses (PRECONDITION_FAILED: the object exists with other arguments) is
explained once as a configuration error naming the object, the argument and the fix.
"""

from __future__ import annotations

import re
from typing import Any

from aio_pika.abc import AbstractRobustChannel, AbstractRobustConnection
from yarl import URL

from billingd.config.model import AmqpSourceSettings


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
        f"the queue predates billingd's dead-letter route for expired and overflowed messages "
        f"(x-dead-letter-exchange into {settings.queue}.dlq): drain and delete it (rabbitmqctl delete_queue "
        f"{name}) so billingd can declare it, or name your own x-dead-letter-exchange in queue_arguments"
        if kind == "queue" and argument.startswith("x-dead-letter")
        else f"make sources.{settings.name} queue_arguments match the existing queue, or delete it "
        f"(rabbitmqctl delete_queue {name}) so billingd can declare it"
        if kind == "queue"
        else f"make exchange_type and exchange_declare match the existing exchange (a producer such as Jasmin "
        f'declares its exchanges non-durable: exchange_declare = "transient"), or delete it '
        f"(rabbitmqadmin delete exchange name={name})"
    )
    return f"{kind} {name!r} already exists with a different {argument!r} ({text}); fix: {fix}"


#: Queue arguments under which RabbitMQ drops messages: expiry and overflow.
DROPPING_ARGUMENTS = ("x-message-ttl", "x-max-length", "x-max-length-bytes")


def queue_arguments(settings: AmqpSourceSettings) -> dict[str, Any]:
    """The source queue's arguments: `queue_arguments`, plus — when they let RabbitMQ drop
    messages (a TTL, a length limit) and name no dead-letter exchange of their own — a dead-letter
    route into `<queue>.dlq`, so an expired or overflowed message lands there (RabbitMQ records
    why in `x-death`: `expired`, `maxlen`) instead of vanishing."""
    arguments = dict(settings.queue_arguments)
    if any(name in arguments for name in DROPPING_ARGUMENTS) and "x-dead-letter-exchange" not in arguments:
        arguments["x-dead-letter-exchange"] = ""
        arguments["x-dead-letter-routing-key"] = f"{settings.queue}.dlq"
    return arguments


async def declare(
    connection: AbstractRobustConnection, settings: AmqpSourceSettings
) -> tuple[AbstractRobustChannel, AbstractRobustChannel]:
    """Declare the source's topology; returns `(consumer channel, publisher-confirms channel)`.

    Raises:
        aiormq.exceptions.ChannelPreconditionFailed: an object exists with other arguments.
        aiormq.exceptions.ChannelNotFoundEntity: a passive exchange does not exist (yet).
    """
    s = settings
    channel: AbstractRobustChannel = await connection.channel(publisher_confirms=False)
    await channel.set_qos(prefetch_count=s.prefetch)
    await channel.declare_queue(f"{s.queue}.dlq", durable=True)  # first: the queue dead-letters into it
    queue = await channel.declare_queue(s.queue, durable=True, arguments=queue_arguments(s) or None)
    if s.exchange:
        exchange = await channel.declare_exchange(
            s.exchange,
            s.exchange_type,
            durable=s.exchange_declare == "durable",
            passive=s.exchange_declare == "passive",
        )
        for routing_key in s.routing_keys:
            await queue.bind(exchange, routing_key)
    await channel.declare_queue(
        f"{s.queue}.retry",
        durable=True,
        arguments={"x-dead-letter-exchange": "", "x-dead-letter-routing-key": s.queue},
    )
    publisher: AbstractRobustChannel = await connection.channel(publisher_confirms=True)
    return channel, publisher
