"""What `billingd check` says beyond "valid": the meter map each `usage` source will use, and
whether idempotency records outlive the longest a message can wait (read from the brokers).

The rule (DESIGN §5, issue 10): a handler's idempotency record — `dedup_ttl` (usage, billing_sync,
stripe_events, webhook_forward, payment_events) or `retention` (sms_billing, sms_dlr) — must
outlive the longest path of a message: for SQS, the queue's `MessageRetentionPeriod` plus the
dead-letter queue's (up to 14 days each; a replay keeps the original id); for AMQP, the `.dlq`
never expires, so dead letters must be replayed within that time. Warnings never fail the check.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import anyio

from billingd.config import Settings, convert
from billingd.config.model import AmqpSourceSettings, AnySource, SqsSourceSettings
from billingd.handlers.kit.base import HandlerSpec
from billingd.handlers.registry import HandlerRegistry
from billingd.handlers.usage.meters import MeterMap


def _options(source: AnySource, handlers: Mapping[str, HandlerSpec[Any]]) -> Any:
    return convert(source.handler_options, handlers[source.handler].options)


def _record_ttl(options: Any) -> tuple[str, float] | None:
    """`(option name, seconds)` of the idempotency record lifetime a handler's options set."""
    for name in ("dedup_ttl", "retention"):
        value = getattr(options, name, None)
        if value is not None:
            return name, float(value)
    return None


def describe(settings: Settings, handlers: Mapping[str, HandlerSpec[Any]]) -> list[str]:
    """Lines about each source: the meter map of `usage` sources (case-insensitive matching)."""
    lines = []
    for source in settings.sources:
        if isinstance(source, AmqpSourceSettings):
            lines.append(_amqp_line(source))
        if source.handler != "usage":
            continue
        options = _options(source, handlers)
        meters = MeterMap(settings.stripe.meters, options.value_scale)
        mapped = ", ".join(meters.describe()) or "none"
        lines.append(
            f"  {source.name}: Stripe meters (event types matched case-insensitively, ×value_scale): {mapped}; "
            f"other event types: {options.unmapped}"
        )
    return lines


def _amqp_line(source: AmqpSourceSettings) -> str:
    """The queue type of an AMQP source, and what RabbitMQ may remove from it."""
    from billingd.sources.amqp_topology import at_most_once

    line = f"  {source.name}: {source.kind} queues ({source.queue}, .retry, .dlq)"
    if source.kind == "classic":
        return line + "; a classic queue lives on one node: its death takes the queue's messages with it"
    if at_most_once(source):
        return line + (
            f"; WARNING: x-overflow = {source.queue_arguments.get('x-overflow')!r} makes RabbitMQ dead-letter at "
            "most once (a node dying mid-way loses the message): use reject-publish"
        )
    return line + "; what RabbitMQ removes (delivery limit, expiry, overflow) is dead-lettered at least once into .dlq"


async def broker_warnings(
    settings: Settings, handlers: Mapping[str, HandlerSpec[Any]], within: float = 5.0
) -> list[str]:
    """Warnings where an idempotency record can expire before its message is done (see module
    docstring). SQS retention periods are read from the queues; a broker that does not answer
    within `within` seconds is reported and skipped."""
    warnings: list[str] = []

    async def check(source: AnySource) -> None:
        ttl = _record_ttl(_options(source, handlers))
        if ttl is None:
            return
        name, seconds = ttl
        days = seconds / 86400
        if isinstance(source, AmqpSourceSettings):
            warnings.append(
                f"  {source.name}: {source.queue}.dlq keeps dead letters until they are replayed; replay them "
                f"within handler_options.{name} ({days:g} days) or a replay may apply them twice"
            )
            return
        assert isinstance(source, SqsSourceSettings)
        try:
            waits = await _sqs_retention(source)
        except Exception as exc:  # noqa: BLE001 — a check reports what it could not read
            warnings.append(f"  {source.name}: could not read the queue's retention ({type(exc).__name__}): skipped")
            return
        if waits > seconds:
            warnings.append(
                f"  {source.name}: a message can wait {waits / 86400:g} days (queue + dead-letter queue retention) "
                f"but handler_options.{name} is {days:g} days: raise it to at least {waits / 86400:g}d, or a "
                "replay after that may apply an event twice"
            )
        max_age = float(settings.stripe.webhook_max_age)
        if source.handler in ("stripe_events", "webhook_forward") and waits > max_age:
            warnings.append(
                f"  {source.name}: a message can wait {waits / 86400:g} days but [stripe].webhook_max_age is "
                f"{max_age / 86400:g} days: a relayed webhook without received_at that waited longer is dead-lettered; "
                f"raise it to at least {waits / 86400:g}d"
            )

    with anyio.move_on_after(within) as scope:
        async with anyio.create_task_group() as tg:
            for source in settings.sources:
                tg.start_soon(check, source)
    if scope.cancelled_caught:
        warnings.append(f"  (some brokers did not answer within {within:g}s: their retention was not checked)")
    return warnings


async def _sqs_retention(source: SqsSourceSettings) -> float:
    """Seconds a message can wait: the queue's retention plus its DLQ's."""
    from billingd.sources.sqs_client import client_config, sqs_client

    config = client_config(connect_timeout=2, read_timeout=3, retries={"max_attempts": 1})
    async with sqs_client(source, config) as client:
        total = 0.0
        for url in filter(None, (source.queue_url, source.dead_letter_queue_url)):
            attributes = await client.get_queue_attributes(QueueUrl=url, AttributeNames=["MessageRetentionPeriod"])
            total += float(attributes["Attributes"].get("MessageRetentionPeriod", 345600))
        return total


async def redis_warnings(settings: Settings, within: float = 3.0) -> list[str]:
    """Warnings about the ledger's durability (see `redis_durability`)."""
    return (await redis_durability(settings, within))[0]


async def redis_durability(settings: Settings, within: float = 3.0) -> tuple[list[str], bool]:
    """`(warnings, volatile)` about the ledger's durability: a Redis (the node `[redis].url`
    names, or the sentinels' master) with neither persistence (`appendonly`, `save`) nor a replica
    (`volatile`) loses the ledger — every idempotency record, counter and meter event waiting in
    the outbox — when it restarts; fewer replicas than `min_replicas_acked` means nothing can be
    acked."""
    from billingd.clients.redis import connect_redis

    client = connect_redis(settings.redis, settings.tls_of(settings.redis.tls))
    try:
        with anyio.fail_after(within):
            replication = await client.info("replication")
            replicas = int(replication.get("connected_slaves", 0))
            try:
                appendonly = (await client.config_get("appendonly")).get("appendonly", "")
                save = (await client.config_get("save")).get("save", "")
            except Exception:  # noqa: BLE001 — managed Redis often disables CONFIG
                appendonly, save = "unknown", "unknown"
    except Exception as exc:  # noqa: BLE001 — a check reports what it could not read
        return [f"  redis: could not check its persistence and replicas ({type(exc).__name__}: {exc})"[:300]], False
    finally:
        await client.aclose()
    warnings = []
    volatile = appendonly in ("no", b"no") and save in ("", b"") and replicas == 0
    if volatile:
        warnings.append(
            "  redis: a restart of Redis loses the ledger: it has neither persistence (appendonly, save) nor "
            "replicas; turn on appendonly yes, or run it with a replica (and [redis] min_replicas_acked = 1)"
        )
    if settings.redis.min_replicas_acked > replicas:
        warnings.append(
            f"  redis: min_replicas_acked = {settings.redis.min_replicas_acked} but the master has {replicas} "
            "replica(s) connected: no message can be acked until enough replicas are"
        )
    return warnings, volatile


async def stripe_meter_check(settings: Settings, within: float = 10.0) -> tuple[list[str], list[str]]:
    """`(lines, errors)`: the account's meters (`GET /v1/billing/meters`) and, as errors, each
    `[stripe].meters` value that names no active meter (its events would be refused by Stripe
    after billingd acked them: `no_meter`, `archived_meter`). Nothing to check without a `usage`
    source, a meter map or an API key; Stripe not answering is a line, not an error."""
    stripe = settings.stripe
    if not stripe.meters or not stripe.api_key or not any(s.handler == "usage" for s in settings.sources):
        return [], []
    from billingd.clients import Unguarded
    from billingd.clients.stripe import StripeGateway

    gateway = StripeGateway(stripe, Unguarded("stripe"))
    try:
        with anyio.fail_after(within):
            meters = await gateway.catalogue.all()
    except Exception as exc:  # noqa: BLE001 — a check reports what it could not read
        return [f"  stripe: could not list the meters ({type(exc).__name__}: {exc})"[:400]], []
    finally:
        await gateway.aclose()
    by_name = {str(m.get("event_name")): m for m in meters}
    shown = ", ".join(f"{name} ({m.get('status')})" for name, m in sorted(by_name.items())) or "none"
    lines = [f"  stripe: meters of the account: {shown}"]
    errors = []
    for event_type, event_name in sorted(stripe.meters.items()):
        meter = by_name.get(event_name)
        if meter is None or meter.get("status") != "active":
            state = "no meter" if meter is None else f"meter {meter.get('id')} is {meter.get('status')}"
            errors.append(
                f"stripe.meters.{event_type}: Stripe has {state} with event_name {event_name!r}: its events would be "
                "refused after billingd acked them; create or reactivate the meter, or map the type to an active one"
            )
    return lines, errors


def handler_lines(settings: Settings, handlers: HandlerRegistry) -> list[str]:
    """`billingd check`'s list of installed handlers: name, distribution and version, and the
    sources using each."""
    users: dict[str, list[str]] = {}
    for source in settings.sources:
        users.setdefault(source.handler, []).append(source.name)
    lines = ["handlers (installed; entry points of billingd.handlers):"]
    for entry in handlers.entries():
        used = f"  used by {', '.join(users[entry.name])}" if entry.name in users else ""
        lines.append(f"  {entry.name:<18} {entry.origin:<28}{used}".rstrip())
    return lines
