"""`usage`: usage events (seed 001 entitlement usage; seed 004 metered usage) applied exactly once.

Two message shapes:

* seed 001 — `{userId, entitlementKey, amount = 1, idempotencyKey?, metadata?}`: consume the
  user's entitlement (lazy period reset, limit check) and count the usage;
* seed 004 — `{event_type, workspace_id, value, idempotency_key, stripe_customer_id?}`: count
  the usage.

Either way, an event type (seed 001: the entitlement key) mapped in `[stripe].meters` (matched
case-insensitively, see `billingd.handlers.meters`) is also reported to Stripe as a meter event;
an unmapped one is counted in Redis and in `billingd_usage_unmetered_total`, or dead-lettered
(`handler_options.unmapped = "dead_letter"`). The idempotency key is the message's own field, else the
SQS message id. The Redis step is atomic and recorded; a retry after it redoes only the Stripe
step, which runs once across workers (`OnceLedger`: two copies of one event delivered at the
same time do not both call Stripe) with `identifier` = the idempotency key and an
`Idempotency-Key` header, so every effect happens once.

Outcomes (seed 001 "Behaviour after send"): a missing entitlement is retried (the subscription
sync may not have written it yet), then dead-lettered; an inactive entitlement, one without
usage tracking, or usage over the limit is dead-lettered with that reason. Stripe only accepts
whole meter values (Stripe docs, "Record usage with the API": "only accepts whole number
values"): `handler_options.value_scale` reports an event type in a smaller unit (e.g. 10 →
tenths of a credit); a value still not whole is dead-lettered, never rounded.
"""

from __future__ import annotations

import time
from decimal import Decimal
from functools import partial
from typing import TYPE_CHECKING, Annotated, Any, Literal

import msgspec

from billingd.clients.ledger import Applied, OnceLedger, UsageLedger
from billingd.clients.ledger.base import LEDGER_MAX
from billingd.config.durations import Duration
from billingd.handlers.base import HandlerContext, HandlerSpec, JsonDecoder, Message, OptionalId
from billingd.handlers.meters import MeterMap
from billingd.handlers.money import to_micros
from billingd.handlers.outcome import ACK, DeadLetter, InvalidMessage, Outcome, Retry

if TYPE_CHECKING:
    from billingd.clients.stripe import StripeGateway


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
    ) -> None:
        self._ledger = ledger
        self._once = once
        self._stripe = stripe
        self._meters = meters
        self._options = options
        self._decoder = JsonDecoder(UsageEvent)
        self._lease = 2 * stripe.timeout + 5 if stripe is not None else 30.0  # outlives one Stripe call
        self.downstreams: tuple[str, ...] = ("redis", "stripe") if meters else ("redis",)

    async def handle(self, message: Message) -> Outcome:
        """Apply one usage event (see module docstring)."""
        event = self._decoder.decode(message.body)
        if event.userId is not None or event.entitlementKey is not None:
            subject = _required(event.userId, "userId")
            name = _required(event.entitlementKey, "entitlementKey")
            quantity, field, consume = event.amount if event.amount is not None else Decimal(1), "amount", True
            key = event.idempotencyKey or message.message_id
        elif event.event_type is not None or event.workspace_id is not None:
            subject = _required(event.workspace_id, "workspace_id")
            name = _required(event.event_type, "event_type")
            if event.value is None:
                raise InvalidMessage("invalid message: Object missing required field `value`")
            quantity, field, consume = event.value, "value", False
            key = event.idempotency_key or message.message_id
        else:
            raise InvalidMessage(
                "not a usage event: expected userId and entitlementKey (seed 001) "
                "or event_type and workspace_id (seed 004)"
            )
        micros = to_micros(quantity, field)
        meter = self._meters.meter(name)
        if meter is None:
            if self._options.unmapped == "dead_letter":
                return DeadLetter(
                    f"event type {name!r} has no Stripe meter in [stripe].meters (matched case-insensitively): "
                    'not applied; map it, or set handler_options.unmapped = "count"'
                )
            self._meters.unmetered(name)
        metered_value = self._meter_value(name, quantity) if meter else 0
        result = await self._ledger.apply(
            subject, name, micros, key, consume=consume, now=int(time.time()), dedup_ttl=int(self._options.dedup_ttl)
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
        if meter and not await self._once.done(subject, f"meter:{key}"):
            customer = event.stripe_customer_id or await self._ledger.customer(subject)
            if not customer:
                return Retry(f"no Stripe customer known for {subject} (yet)")
            assert self._stripe is not None
            send = partial(
                self._stripe.create_meter_event,
                event_name=meter,
                customer=customer,
                value=metered_value,
                identifier=key,
                timestamp=event.timestamp or result.at,
            )
            ttl = int(self._options.dedup_ttl)
            await self._once.run_once(subject, f"meter:{key}", send, lease=self._lease, ttl=ttl)
        return ACK

    def _meter_value(self, name: str, quantity: Decimal) -> int:
        scale = self._meters.scale(name)
        scaled = quantity * scale
        if scaled != scaled.to_integral_value():
            raise InvalidMessage(
                f"Stripe meters take whole numbers: {name} value {quantity} × scale {scale} = {scaled}; "
                f"set handler_options.value_scale.{name} so that values are whole"
            )
        return int(scaled)


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
    clients = ctx.clients
    return UsageHandler(clients.usage_ledger, clients.once, clients.stripe if meters else None, meters, options)


SPEC = HandlerSpec("usage", UsageOptions, _build, "entitlements, usage counters, Stripe meters (seeds 001, 004)")
