"""The topology of an AMQP source, declared and explained (DESIGN §2 "AMQP specifics").

* the exchange (`exchange_type`; durable, transient — as Jasmin declares its own — or passive,
  per `exchange_declare`) and the durable queue with its arguments, bound with each of
  `routing_keys`; aio-pika's robust channel declares and binds them again after a reconnect, so a
  transient exchange lost in a broker restart comes back;
* `<queue>.retry` — retry copies wait there for their per-message TTL, then dead-letter through
  the default exchange straight back to `<queue>`;
* `<queue>.dlq` — dead letters (`billingd.sources.letters`), and what RabbitMQ removes itself: a
  queue whose arguments let it expire or overflow messages dead-letters them there
  (`queue_arguments`), and so does every quorum queue, whose delivery limit (`x-delivery-limit`;
  20 by default since RabbitMQ 4.0) removes a message redelivered too often.

The three queues share one type (`queue_type`, or `queue_arguments."x-queue-type"`): a quorum
source gets quorum `.retry` and `.dlq` too, so the death of one node takes none of them. Quorum
queues dead-letter with `x-dead-letter-strategy = at-least-once` (RabbitMQ docs, "Dead
Lettering": a message leaves the source queue only once `.dlq` has confirmed it), which RabbitMQ
honours only with `x-overflow = reject-publish`: billingd sets both unless `queue_arguments`
choose otherwise (then RabbitMQ dead-letters at most once, and `billingd check` warns).

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
        f"a queue's type cannot change in place. To move {name} to {settings.kind}: declare a new queue "
        f'(sources.{settings.name}.queue = "{name}.q", say) so billingd creates it and its .retry and .dlq '
        f"with the new type, let the producers' bindings reach it, then drain the old queue "
        f"(or shovel its messages over) and delete it (rabbitmqctl delete_queue {name})"
        if kind == "queue" and argument == "x-queue-type"
        else f"the queue predates billingd's dead-letter route for expired and overflowed messages "
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
    messages (a TTL, a length limit, a quorum queue's delivery limit) and name no dead-letter
    exchange of their own — a dead-letter route into `<queue>.dlq`, so a message RabbitMQ removes
    lands there (RabbitMQ records why in `x-death`: `expired`, `maxlen`, `delivery_limit`) instead
    of vanishing; a quorum queue's dead-lettering is at least once (see module docstring)."""
    arguments = dict(settings.queue_arguments)
    quorum = settings.kind == "quorum"
    if quorum:
        arguments["x-queue-type"] = "quorum"
    dropping = quorum or any(name in arguments for name in DROPPING_ARGUMENTS)
    if dropping and "x-dead-letter-exchange" not in arguments:
        arguments["x-dead-letter-exchange"] = ""
        arguments["x-dead-letter-routing-key"] = f"{settings.queue}.dlq"
    if quorum:
        _at_least_once(arguments)
    return arguments


def _at_least_once(arguments: dict[str, Any]) -> None:
    """Quorum dead-lettering at least once, unless the arguments chose another overflow."""
    if "x-overflow" not in arguments and "x-dead-letter-strategy" not in arguments:
        arguments["x-overflow"] = "reject-publish"
        arguments["x-dead-letter-strategy"] = "at-least-once"
    elif arguments.get("x-overflow", "reject-publish") == "reject-publish":
        arguments.setdefault("x-overflow", "reject-publish")
        arguments.setdefault("x-dead-letter-strategy", "at-least-once")


def at_most_once(settings: AmqpSourceSettings) -> bool:
    """Whether RabbitMQ would dead-letter this quorum source's messages only at most once (an
    `x-overflow` other than `reject-publish`): a node's death during dead-lettering loses them."""
    arguments = queue_arguments(settings)
    return settings.kind == "quorum" and arguments.get("x-dead-letter-strategy") != "at-least-once"


def side_queue_arguments(settings: AmqpSourceSettings, dead_letter_to: str | None) -> dict[str, Any]:
    """Arguments of `.retry` (`dead_letter_to` = the source queue) or `.dlq` (None): the source's type."""
    arguments: dict[str, Any] = {}
    if dead_letter_to is not None:
        arguments = {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": dead_letter_to}
    if settings.kind == "quorum":
        arguments["x-queue-type"] = "quorum"
        if dead_letter_to is not None:
            _at_least_once(arguments)
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
    dlq_arguments = side_queue_arguments(s, None) or None
    await channel.declare_queue(f"{s.queue}.dlq", durable=True, arguments=dlq_arguments)  # first: the queue needs it
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
    await channel.declare_queue(f"{s.queue}.retry", durable=True, arguments=side_queue_arguments(s, s.queue))
    publisher: AbstractRobustChannel = await connection.channel(publisher_confirms=True)
    return channel, publisher
