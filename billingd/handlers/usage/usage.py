"""`usage`: usage events (seed 001 entitlement usage; seed 004 metered usage) applied exactly once.

Two message shapes (and both as CloudEvents 1.0 — structured, batch or binary — mapped onto them
by `billingd.handlers.usage.cloudevents` with `handler_options.cloudevents`):

* seed 001 — `{userId, entitlementKey, amount = 1, idempotencyKey?, metadata?}`: consume the
  user's entitlement (lazy period reset, limit check) and count the usage;
* seed 004 — `{event_type, workspace_id, value, idempotency_key, stripe_customer_id?}`: count
  the usage.

Either way, an event type (seed 001: the entitlement key) mapped in `[stripe].meters` (matched
case-insensitively, see `billingd.handlers.usage.meters`) is also reported to Stripe as a meter event;
an unmapped one is counted in Redis and in `billingd_usage_unmetered_total`, or dead-lettered
(`handler_options.unmapped = "dead_letter"`). The idempotency key is the message's own field, else the
broker's message id — never a digest of the body (an AMQP message without a `message_id`): two
identical events without a key are two events, so such an event is dead-lettered rather than
counted once. A producer's key is unique within its subject (seed 001: within its subject and
entitlement key), so everything derived from it is scoped: the Redis record, and the meter
event's `identifier` = `meter_identifier(subject, event type, key)` (`billingd.clients.stripe_ids`:
68 characters whatever the key; Stripe's identifiers are unique per account). The Redis step is
atomic and recorded; a retry after it redoes only the Stripe step, which runs once across
workers (`OnceLedger`: two copies of one event delivered at the same time do not both call
Stripe) with that `identifier` and an `Idempotency-Key` header, so every effect happens once.

Outcomes (seed 001 "Behaviour after send"): a missing entitlement is retried (the subscription
sync may not have written it yet), then dead-lettered; an inactive entitlement, one without
usage tracking, or usage over the limit is dead-lettered with that reason. Stripe only accepts
whole meter values (Stripe docs, "Record usage with the API": "only accepts whole number
values"): `handler_options.value_scale` reports an event type in a smaller unit (e.g. 10 →
tenths of a credit); a value still not whole is dead-lettered, never rounded.

Meter events are checked before any effect against what Stripe would refuse (the v2 stream
refuses nothing synchronously: a bad event would be reported later and never billed): a whole
value of at most 15 significant digits (API version 2026-04-22.dahlia), a timestamp within
Stripe's window (the past 35 days, less `TIMESTAMP_MARGIN`, to 5 minutes ahead), a customer id
of Stripe's form (`cus_…`). A 400 "An event already exists with identifier X" for this event's own
identifier (v1) proves Stripe holds it: acked, counted in `billingd_stripe_duplicates_total`.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from decimal import Decimal
from functools import partial
from typing import TYPE_CHECKING, Annotated, Any, Literal

import msgspec
import structlog

from billingd.clients.errors import Busy, DownstreamRejected, DownstreamUnavailable
from billingd.clients.ledger import Applied, OnceLedger, UsageLedger
from billingd.clients.ledger.base import LEDGER_MAX
from billingd.clients.ledger.outbox import JOURNAL_ONE, OutboxEvent, OutboxLedger, encode, journal_key
from billingd.clients.stripe_ids import meter_identifier
from billingd.config.durations import Duration
from billingd.handlers.kit.base import HandlerContext, HandlerSpec, JsonDecoder, Message, OptionalId
from billingd.handlers.kit.money import to_micros
from billingd.handlers.kit.outcome import ACK, DeadLetter, InvalidMessage, Outcome, Retry
from billingd.handlers.usage.cloudevents import CloudEventsOptions, cloud_events
from billingd.handlers.usage.meters import MeterMap
from billingd.telemetry import SourceCounter

if TYPE_CHECKING:
    from billingd.clients.stripe import StripeGateway

log = structlog.get_logger("billingd.usage")

#: Marks an inline meter step done and journals its event, in one script.
JOURNAL_STEP = OnceLedger.completing(JOURNAL_ONE)

#: Stripe's meter event rules ("Record usage with the API"; API reference, meter events):
#: timestamps within the past 35 days and at most 5 minutes ahead, at most 15 significant digits.
STRIPE_MAX_AGE = 35 * 86400
STRIPE_MAX_AHEAD = 300
STRIPE_MAX_DIGITS = 15
#: How far inside Stripe's 35 days an event must be (seconds): it still has to reach Stripe.
TIMESTAMP_MARGIN = 3600
_CUSTOMER_ID = re.compile(r"^cus_[A-Za-z0-9_-]{1,250}$")


class UsageOptions(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """`handler_options` of `usage`."""

    value_scale: dict[str, Annotated[int, msgspec.Meta(ge=1, le=10**6)]] = msgspec.field(default_factory=dict)
    """Event type → factor applied before reporting to Stripe (Stripe takes whole numbers). It
    changes what Stripe bills: the meter then counts in that smaller unit."""
    dedup_ttl: Duration = Duration(15 * 86400)
    """How long an event's idempotency record is kept: at least the longest a message can wait
    (queue retention + DLQ retention; `billingd check` compares them)."""
    unmapped: Literal["count", "dead_letter"] = "count"
    """An event type without a Stripe meter: counted in Redis and in
    `billingd_usage_unmetered_total` (`count`), or dead-lettered unapplied (`dead_letter`)."""
    cloudevents: CloudEventsOptions = CloudEventsOptions()
    """How CloudEvents map onto usage events (recognised unless `enabled = false`)."""


class UsageEvent(msgspec.Struct, frozen=True):
    """Both seed shapes; unknown fields are ignored (producers may add some)."""

    userId: OptionalId | None = None  # the seed's own field names
    entitlementKey: OptionalId | None = None
    amount: Decimal | None = None
    idempotencyKey: OptionalId | None = None
    metadata: dict[str, Any] | None = None
    event_type: OptionalId | None = None
    workspace_id: OptionalId | None = None
    value: Decimal | None = None
    idempotency_key: OptionalId | None = None
    stripe_customer_id: OptionalId | None = None
    timestamp: int | None = None


class UsageHandler:
    """Applies usage events. Downstreams: `redis`, and `stripe` when meters are configured."""

    def __init__(
        self,
        ledger: UsageLedger,
        once: OnceLedger,
        stripe: StripeGateway | None,
        meters: MeterMap,
        options: UsageOptions,
        duplicates: SourceCounter | None = None,
        max_wait: float = 10.0,
        outbox: OutboxLedger | None = None,
        shards: int = 16,
        journal: OutboxLedger | None = None,
        keep: int = 45 * 86400,
    ) -> None:
        self._outbox = outbox
        self._shards = shards
        self._journal = journal
        self._keep = keep
        self._ledger = ledger
        self._once = once
        self._stripe = stripe
        self._meters = meters
        self._options = options
        self._duplicates = duplicates.labels() if duplicates is not None else None
        self._decoder = JsonDecoder(UsageEvent)
        # outlives one Stripe step: waits for a call in flight, a lease and a budget slot, then the
        # call (and a session renewal)
        self._lease = 3 * max_wait + 2 * stripe.timeout + 5 if stripe is not None else 30.0
        stripe_side = "stripe-outbox" if outbox is not None else "stripe"  # what holds the meter events up
        self.downstreams: tuple[str, ...] = ("redis", stripe_side) if meters else ("redis",)

    async def handle(self, message: Message) -> Outcome:
        """Apply one usage event, or the events of a CloudEvents message (see module docstring)."""
        found = cloud_events(message.body, message.attributes, self._options.cloudevents)
        if found is None:
            return await self._effect(self._prepare(self._decoder.decode(message.body), message))
        if len(found) == 1:
            return await self._effect(self._prepare(_convert_cloud_event(found[0], None), message))
        return await self._batch(found, message)

    async def _batch(self, found: list[dict[str, Any]], message: Message) -> Outcome:
        """A CloudEvents batch: every event is checked before any is applied (one invalid event
        dead-letters the batch, nothing applied); then each is applied whatever the others'
        outcomes. Events refused by state (over a limit, inactive) are named in one dead letter
        after the rest were applied; an event waiting (a missing entitlement, a downstream
        unavailable) retries the message — the applied events are duplicates then, never counted
        twice (each has its own key)."""
        prepared: list[_Prepared] = []
        for i, usage in enumerate(found):
            try:
                prepared.append(self._prepare(_convert_cloud_event(usage, i), message))
            except InvalidMessage as exc:
                reason = exc.reason.removeprefix("cloudevents: ")
                prefix = "" if reason.startswith(f"event [{i}]") else f"event [{i}]: "
                raise InvalidMessage(f"cloudevents: {prefix}{reason} (no event of the batch was applied)") from None
        refused: list[str] = []
        waiting: Retry | None = None
        failure: DownstreamUnavailable | Busy | None = None  # raised after the rest: the policy judges it
        for i, one in enumerate(prepared):
            try:
                outcome = await self._effect(one)
            except DownstreamRejected as exc:
                outcome = DeadLetter(str(exc))
            except (DownstreamUnavailable, Busy) as exc:
                failure = failure or exc
                continue
            if isinstance(outcome, DeadLetter):
                refused.append(f"event [{i}] (key {one.key[:80]!r}): {outcome.reason}")
            elif isinstance(outcome, Retry):
                waiting = waiting or outcome
        if failure is not None:
            raise failure
        if waiting is not None:
            return waiting
        if refused:
            applied = len(prepared) - len(refused)
            return DeadLetter(
                f"cloudevents: {len(refused)} of {len(prepared)} events not applied, the other {applied} applied "
                f"(a replay applies none twice): " + "; ".join(refused)
            )
        return ACK

    def _prepare(self, event: UsageEvent, message: Message) -> _Prepared:
        """What one decoded usage event would do, checked before any effect.

        Raises:
            InvalidMessage: it can never be applied (shape, value, timestamp, customer id, an
                unmapped event type with `unmapped = "dead_letter"`).
        """
        if event.userId is not None or event.entitlementKey is not None:
            subject = _required(event.userId, "userId")
            name = _required(event.entitlementKey, "entitlementKey")
            quantity, field, consume = event.amount if event.amount is not None else Decimal(1), "amount", True
            key = event.idempotencyKey or _broker_id(message, "idempotencyKey")
        elif event.event_type is not None or event.workspace_id is not None:
            subject = _required(event.workspace_id, "workspace_id")
            name = _required(event.event_type, "event_type")
            if event.value is None:
                raise InvalidMessage("invalid message: Object missing required field `value`")
            quantity, field, consume = event.value, "value", False
            key = event.idempotency_key or _broker_id(message, "idempotency_key")
        else:
            raise InvalidMessage(
                "not a usage event: expected userId and entitlementKey (seed 001) "
                "or event_type and workspace_id (seed 004)"
            )
        meter = self._meters.meter(name)
        metered_value = self._meter_value(name, quantity) if meter else 0
        if meter and event.timestamp is not None:
            _check_timestamp(event.timestamp, int(time.time()))
        if meter and event.stripe_customer_id:
            _check_customer(event.stripe_customer_id)  # before any effect: a producer's own id
        micros = to_micros(quantity, field)
        if meter is None:
            if self._options.unmapped == "dead_letter":
                raise InvalidMessage(
                    f"event type {name!r} has no Stripe meter in [stripe].meters (matched case-insensitively): "
                    'not applied; map it, or set handler_options.unmapped = "count"'
                )
            self._meters.unmetered(name)
        return _Prepared(event, subject, name, quantity, consume, key, meter, metered_value, micros)

    async def _effect(self, prepared: _Prepared) -> Outcome:
        """Apply one prepared usage event: the Redis step (with its outbox entry), then the meter."""
        event, subject, name, quantity, consume, key, meter, metered_value, micros = prepared.fields()
        now = int(time.time())
        customer = (event.stripe_customer_id or await self._ledger.customer(subject)) if meter else None
        queued = None
        if meter and self._outbox is not None and customer and _CUSTOMER_ID.match(customer):
            entry = OutboxEvent(meter, customer, metered_value, event.timestamp or now, key, now)
            queued = (meter_identifier(subject, name, key), encode(entry))
        result = await self._ledger.apply(
            subject, name, micros, key, consume=consume, now=now, dedup_ttl=int(self._options.dedup_ttl), outbox=queued
        )
        if result.status is Applied.MISSING:
            return Retry(f"no entitlement {name} for {subject} (yet)")
        if result.status is Applied.INACTIVE:
            return DeadLetter(f"entitlement {name} of {subject} is inactive")
        if result.status is Applied.UNTRACKED:
            return DeadLetter(f"entitlement {name} of {subject} does not track usage")
        if result.status is Applied.OVERFLOW:
            return DeadLetter(
                f"usage {quantity} of {name} for {subject} would take its counter past the ledger limit "
                f"({_units(LEDGER_MAX)} units): check the producer"
            )
        if result.status is Applied.OVER_LIMIT:
            return DeadLetter(
                f"over the limit of {name} for {subject}: {_units(result.used)} used + {quantity} "
                f"> {_units(result.limit)}"
            )
        if not meter:
            return ACK
        if result.legacy:  # applied by an earlier billingd: its Stripe step had the names of then
            step, identifier = f"meter:{key}", key
        else:
            step = f"meter:{len(name)}:{name}:{key}" if consume else f"meter:{key}"  # scoped as the key is
            identifier = meter_identifier(subject, name, key)
        if (queued is not None and result.status is Applied.APPLIED) or result.outboxed:
            return await self._indexed(subject, now, True)  # its meter event is in the outbox
        if await self._once.done(subject, step):
            return ACK  # sent inline, by this billingd or an earlier one
        if not customer:
            return Retry(f"no Stripe customer known for {subject} (yet): counted in Redis, not yet billed")
        if not _CUSTOMER_ID.match(customer):  # the mapping's (from Stripe's own events)
            return DeadLetter(f"{customer[:80]!r} is not a Stripe customer id (cus_…): counted in Redis, not billed")
        timestamp = event.timestamp or result.at
        if event.timestamp is None:  # the time of the Redis step: a retry weeks later can pass 35 days
            _check_timestamp(timestamp, int(time.time()))
        if self._outbox is not None:
            if queued is None or result.status is Applied.DUPLICATE:  # the Redis step went without it
                late = encode(OutboxEvent(meter, customer, metered_value, timestamp, key, now))
                await self._ledger.enqueue_late(
                    subject, name, key, consume=consume, legacy=result.legacy, outbox=(identifier, late)
                )
            return await self._indexed(subject, now, True)
        send = partial(self._send, meter, customer, metered_value, identifier, timestamp, key)
        ttl, day = int(self._options.dedup_ttl), timestamp // 86400
        journal = None
        if self._journal is not None:  # what Stripe accepted inline is journaled with the step, once
            await self._journal.index_journal_day(subject, day, self._keep)
            field = f"{customer}|{meter}|{timestamp // 3600}"
            journal = (JOURNAL_STEP, journal_key(subject, day), (field, metered_value, self._keep))
        await self._once.run_once(subject, step, send, lease=self._lease, ttl=ttl, also=journal)
        return ACK

    async def _indexed(self, subject: str, now: int, queued: bool) -> Outcome:
        """Ack, once the subject's outbox is named in its shard's index (when it holds the event)."""
        if queued and self._outbox is not None:
            await self._outbox.index(subject, now, self._shards)
        return ACK

    async def _send(self, meter: str, customer: str, value: int, identifier: str, timestamp: int, key: str) -> None:
        """Report one meter event; Stripe already holding this identifier counts as sent."""
        log.debug("meter event", meter=meter, identifier=identifier, idempotency_key=key[:200], customer=customer)
        from billingd.clients.stripe import MeterEventExists  # the SDK loads only with a meter

        assert self._stripe is not None
        try:
            await self._stripe.create_meter_event(
                event_name=meter, customer=customer, value=value, identifier=identifier, timestamp=timestamp
            )
        except MeterEventExists as exc:
            if exc.identifier != identifier:
                raise
            if self._duplicates is not None:
                self._duplicates.inc()
            log.info(
                "Stripe already holds this meter event: acked as a duplicate",
                identifier=identifier,
                idempotency_key=key[:200],
                meter=meter,
            )

    def _meter_value(self, name: str, quantity: Decimal) -> int:
        scale = self._meters.scale(name)
        if not quantity.is_finite() or quantity.adjusted() > STRIPE_MAX_DIGITS + 1:
            raise InvalidMessage(f"Stripe meter values take at most {STRIPE_MAX_DIGITS} significant digits: {name} "
                                 f"value {str(quantity)[:40]}")  # fmt: skip
        scaled = quantity * scale
        if scaled != scaled.to_integral_value():
            raise InvalidMessage(
                f"Stripe meters take whole numbers: {name} value {quantity} × scale {scale} = {scaled}; "
                f"set handler_options.value_scale.{name} so that values are whole"
            )
        digits = len(scaled.normalize().as_tuple().digits)
        if digits > STRIPE_MAX_DIGITS:
            raise InvalidMessage(
                f"Stripe meter values take at most {STRIPE_MAX_DIGITS} significant digits: {name} value {quantity} "
                f"× scale {scale} = {scaled:f} has {digits}"
            )
        return int(scaled)


@dataclass(frozen=True, slots=True)
class _Prepared:
    """A usage event checked and resolved: its subject, event type, quantity (seed 001 consumes an
    entitlement), idempotency key, meter (None: unmetered), Stripe value and micro-units."""

    event: UsageEvent
    subject: str
    name: str
    quantity: Decimal
    consume: bool
    key: str
    meter: str | None
    metered_value: int
    micros: int

    def fields(self) -> tuple[UsageEvent, str, str, Decimal, bool, str, str | None, int, int]:
        return (self.event, self.subject, self.name, self.quantity, self.consume, self.key, self.meter,
                self.metered_value, self.micros)  # fmt: skip


def _convert_cloud_event(usage: dict[str, Any], index: int | None) -> UsageEvent:
    """A CloudEvent's usage fields as a `UsageEvent`, with the native format's checks.

    Raises:
        InvalidMessage: a field breaks the native schema (an id with braces, too long).
    """
    try:
        return msgspec.convert(usage, UsageEvent)
    except msgspec.ValidationError as exc:
        where = f"event [{index}]: " if index is not None else ""
        raise InvalidMessage(f"cloudevents: {where}invalid usage event: {exc}") from None


def _check_customer(customer: str) -> None:
    """Raise `InvalidMessage` unless `customer` has the form of a Stripe customer id (`cus_…`)."""
    if not _CUSTOMER_ID.match(customer):
        raise InvalidMessage(f"stripe_customer_id {customer[:80]!r} is not a Stripe customer id (cus_…): not applied")


def _check_timestamp(timestamp: int, now: int) -> None:
    """Raise `InvalidMessage` unless Stripe would take a meter event at `timestamp` (Unix seconds)."""
    if timestamp < now - STRIPE_MAX_AGE + TIMESTAMP_MARGIN:
        days = (now - timestamp) / 86400
        raise InvalidMessage(
            f"meter event timestamp {timestamp} is {days:.1f} days old: Stripe takes events of the past 35 days "
            f"only (billingd refuses them {TIMESTAMP_MARGIN // 3600} h before that)"
        )
    if timestamp > now + STRIPE_MAX_AHEAD:
        raise InvalidMessage(
            f"meter event timestamp {timestamp} is {timestamp - now} s ahead: Stripe takes at most "
            f"{STRIPE_MAX_AHEAD} s in the future; check the producer's clock"
        )


def _broker_id(message: Message, field: str) -> str:
    """The broker's id of `message`, for an event without its own idempotency key.

    Raises:
        InvalidMessage: the id is a digest of the body (an AMQP message without `message_id`):
            two identical events would count once.
    """
    if message.derived_id:
        raise InvalidMessage(
            f"usage event without `{field}` and without an AMQP message_id: two identical events could not be "
            f"told from one delivered twice, so it is not applied; set `{field}` (or the message_id property)"
        )
    return message.message_id


def _required(value: str | None, name: str) -> str:
    if not value:
        raise InvalidMessage(f"invalid message: Object missing required field `{name}`")
    return value


def _units(micros: int) -> str:
    """Micro-units as plain decimal units for people: 50000000 → "50", 2500000 → "2.5"."""
    return format(Decimal(micros).scaleb(-6).normalize(), "f")


def _build(ctx: HandlerContext, options: UsageOptions) -> UsageHandler:
    unmetered = ctx.counter(
        "billingd_usage_unmetered",
        "Usage events of a type without a Stripe meter: counted in Redis, never billed.",
        ["event_type"],
    )
    meters = MeterMap(ctx.stripe.meters, options.value_scale, unmetered)
    duplicates = SourceCounter(ctx.metrics.stripe_duplicates, ctx.source.name)
    clients = ctx.clients
    stripe = clients.stripe if meters else None
    outbox = clients.outbox if meters and ctx.stripe.meter_delivery == "outbox" else None
    return UsageHandler(
        clients.usage_ledger, clients.once, stripe, meters, options, duplicates, float(ctx.stripe.max_wait),
        outbox, ctx.stripe.outbox_shards, clients.outbox if meters else None, int(ctx.journal_keep),
    )  # fmt: skip


SPEC = HandlerSpec("usage", UsageOptions, _build, "entitlements, usage counters, Stripe meters (seeds 001, 004)")
