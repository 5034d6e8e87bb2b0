"""`stripe_events`: Stripe events keep billingd's Redis true (seed 004 "Stripe is the source of truth").

The body is a Stripe Event: bare, in an EventBridge envelope (`detail`), or a relayed webhook
`{"headers": {"Stripe-Signature": …}, "body": "<raw>"}` verified with
`stripe.Webhook.construct_event` against `[stripe].webhook_secret` (a bad or stale signature is
dead-lettered and never applied). Each event is applied once (`OnceLedger`, keyed by `event.id`).

* `customer.created/updated` — map the customer's `metadata.workspace_id` (or `user_id`) and the
  customer id, both ways;
* `customer.subscription.created/updated/resumed` — rebuild the subject's entitlements from the
  subscription's products' metadata `billingd.entitlement.<KEY>`;
* `customer.subscription.deleted/paused` — mark them inactive;
* `invoice.paid` with `billing_reason = subscription_cycle` — a renewal: the new period's
  counters start at zero;
* `entitlements.active_entitlement_summary.updated` — replace the subject's active features;
* `v1.billing.meter.error_report_triggered` (a v2 event; thin ones are fetched) — meter events
  Stripe refused after accepting them: counted in `billingd_meter_errors_total{source,meter,code}`
  and logged with Stripe's sample identifiers (`billingd.handlers.stripe.meter_errors`);
* anything else — acked, counted in `billingd_stripe_events_ignored_total{source,type}`.

Every write is versioned by `event.created`: an older event never rolls state back. Products are
fetched through the API and cached for `handler_options.product_cache_ttl`. This module routes
and verifies; what each event changes is `billingd.handlers.stripe.entitlements`.
"""

from __future__ import annotations

import time
from functools import partial
from typing import TYPE_CHECKING, Any

import msgspec

from billingd.clients.ledger import OnceLedger
from billingd.clients.ledger.outbox import OutboxLedger
from billingd.clients.ledger.subscriptions import SubscriptionLedger
from billingd.config.durations import Duration
from billingd.config.model import StripeSettings
from billingd.handlers.kit.base import HandlerContext, HandlerSpec, JsonDecoder, Message
from billingd.handlers.kit.outcome import ACK, Outcome
from billingd.handlers.stripe import meter_errors
from billingd.handlers.stripe.entitlements import EntitlementEffects
from billingd.handlers.stripe.stripe_objects import StripeEvent
from billingd.handlers.stripe.webhooks import Envelope, WebhookAge, verify_relayed
from billingd.telemetry import SourceCounter

if TYPE_CHECKING:
    from billingd.clients.stripe import StripeGateway


class StripeEventsOptions(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """`handler_options` of `stripe_events`."""

    product_cache_ttl: Duration = Duration(600)
    dedup_ttl: Duration = Duration(15 * 86400)


class StripeEventsHandler:
    """Applies Stripe events (see module docstring). Downstreams: `redis`, `stripe`."""

    downstreams = ("redis", "stripe")

    def __init__(
        self,
        ledger: SubscriptionLedger,
        once: OnceLedger,
        stripe_gateway: StripeGateway,
        settings: StripeSettings,
        options: StripeEventsOptions,
        ignored: Any,
        meter_errors_counter: Any = None,
        source: str = "",
        outbox: OutboxLedger | None = None,
    ) -> None:
        self._outbox = outbox
        self._ledger = ledger
        self._once = once
        self._stripe = stripe_gateway
        self._secret = settings.webhook_secret
        self._age = WebhookAge(float(settings.webhook_tolerance), float(settings.webhook_max_age))
        self._options = options
        self._ignored = ignored
        self._meter_errors = meter_errors_counter
        self._source = source
        self._kind = JsonDecoder(_Kind)
        self._envelope = JsonDecoder(Envelope)
        self._event = JsonDecoder(StripeEvent)
        effects = EntitlementEffects(ledger, stripe_gateway, float(options.product_cache_ttl), ignored)
        self._apply = {
            "customer.created": effects.customer,
            "customer.updated": effects.customer,
            "customer.subscription.created": effects.subscription,
            "customer.subscription.updated": effects.subscription,
            "customer.subscription.resumed": effects.subscription,
            "customer.subscription.deleted": effects.subscription_ended,
            "customer.subscription.paused": effects.subscription_ended,
            "invoice.paid": effects.invoice_paid,
            "entitlements.active_entitlement_summary.updated": effects.features,
        }

    async def handle(self, message: Message) -> Outcome:
        """Verify, decode and apply one event, once."""
        raw = self.unwrap(message.body)
        if self._kind.decode(raw).object == "v2.core.event":
            return await self._v2_event(meter_errors.V2_EVENT.decode(raw))
        event = self._event.decode(raw)
        apply = self._apply.get(event.type)
        if apply is None:
            self._ignored.labels(event.type).inc()
            return ACK
        lease = 2 * self._stripe.timeout + 5
        await self._once.run_once(
            event.id, "stripe-event", partial(apply, event), lease=lease, ttl=int(self._options.dedup_ttl)
        )
        return ACK

    def decode(self, body: bytes) -> StripeEvent:
        """The (v1) Stripe Event in `body`, from whichever envelope it came in.

        Raises:
            InvalidMessage: not JSON, not an event, or a relayed webhook whose signature fails.
        """
        return self._event.decode(self.unwrap(body))

    def unwrap(self, body: bytes) -> bytes:
        """The event's own JSON in `body`: a relayed webhook's verified body, an EventBridge
        `detail`, or `body` itself.

        Raises:
            InvalidMessage: not JSON, or a relayed webhook whose signature fails.
        """
        envelope = self._envelope.decode(body)
        if envelope.headers is not None and envelope.body is not None:
            verify_relayed(envelope, self._secret, self._age)
            return envelope.body.encode()
        if envelope.detail:
            return bytes(envelope.detail)
        return body

    async def _v2_event(self, event: meter_errors.V2Event) -> Outcome:
        """A v2 event: meter error reports are counted once; other types are ignored."""
        if event.type != meter_errors.ERROR_REPORT:
            self._ignored.labels(event.type[:64]).inc()
            return ACK
        lease = 2 * self._stripe.timeout + 5
        step = partial(self._meter_error_report, event)
        await self._once.run_once(event.id, "stripe-event", step, lease=lease, ttl=int(self._options.dedup_ttl))
        return ACK

    async def _meter_error_report(self, event: meter_errors.V2Event) -> None:
        data = bytes(event.data)
        if not data or data == b"null":  # a thin event notification: fetch the event for its data
            fetched = await self._stripe.retrieve_v2_event(event.id)
            data = msgspec.json.encode(fetched.get("data") or {})
        report = meter_errors.REPORT.decode(data)
        if self._meter_errors is not None:
            meter_errors.record(event, report, self._meter_errors, self._source)
        codes = {kind.code for kind in report.reason.error_types}
        if codes & {"no_meter", "archived_meter"}:
            self._stripe.catalogue.forget()  # a meter went away: read the catalogue before sending more
        if self._outbox is not None:  # tie the sample identifiers to the buckets they were sent in
            samples = [(s.request.identifier, kind.code[:64]) for kind in report.reason.error_types
                       for s in kind.sample_errors if s.request is not None and s.request.identifier][:200]  # fmt: skip
            today = int(time.time()) // 86400
            await self._outbox.refused(samples, {today, today - 1, today - 2})


class _Kind(msgspec.Struct, frozen=True):
    """Enough of an event to tell a v2 event (`object = "v2.core.event"`) from a v1 one."""

    object: str = "event"


def _build(ctx: HandlerContext, options: StripeEventsOptions) -> StripeEventsHandler:
    ignored = ctx.counter("billingd_stripe_events_ignored", "Stripe events acked without effect, by type.", ["type"])
    errors = SourceCounter(ctx.metrics.meter_errors, ctx.source.name)
    clients = ctx.clients
    return StripeEventsHandler(
        clients.subscription_ledger,
        clients.once,
        clients.stripe,
        ctx.stripe,
        options,
        ignored,
        errors,
        ctx.source.name,
        clients.outbox,
    )


SPEC = HandlerSpec("stripe_events", StripeEventsOptions, _build, "Stripe events → entitlements, features (seed 004)")
