"""What each Stripe event of seed 004 changes in Redis: the customer mapping, entitlements from
subscriptions, renewals, active features (see `billingd.handlers.stripe.stripe_events`).

Every write is versioned by `event.created` (an older event never rolls state back); the subject
(workspace or user) of an object comes from its metadata, else its customer's; products are
fetched through the Stripe gateway and cached for `product_cache_ttl` seconds.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from billingd.clients.ledger.base import LEDGER_MAX
from billingd.clients.ledger.periods import period_containing
from billingd.clients.ledger.subscriptions import Grant, SubscriptionLedger
from billingd.handlers.kit.outcome import InvalidMessage
from billingd.handlers.stripe.stripe_objects import (
    ACTIVE_STATUSES,
    ENTITLEMENT_PREFIX,
    StripeEvent,
    customer_of,
    parse_entitlement,
    renewal_period,
    subject_in,
    subscription_period,
    subscription_products,
)

if TYPE_CHECKING:
    from billingd.clients.stripe import StripeGateway


class EntitlementEffects:
    """The effects of v1 Stripe events on the subscription ledger, one method per event family.

    Raises (every method):
        InvalidMessage: the object names no subject (nor a customer that does), or a limit is
            above the ledger's.
        DownstreamUnavailable, DownstreamRejected: from Redis or Stripe.
    """

    def __init__(self, ledger: SubscriptionLedger, stripe: StripeGateway, product_cache_ttl: float, ignored: Any):
        self._ledger = ledger
        self._stripe = stripe
        self._product_cache_ttl = product_cache_ttl
        self._ignored = ignored
        self._products: dict[str, tuple[float, dict[str, str]]] = {}

    async def customer(self, event: StripeEvent) -> None:
        customer = event.data.object
        subject = subject_in(customer.get("metadata"))
        if subject:
            await self._ledger.map_customer(subject, customer["id"])

    async def subscription(self, event: StripeEvent) -> None:
        subscription = event.data.object
        subject = await self._subject(subscription)
        start, end, interval = subscription_period(subscription)
        now = int(time.time())
        grants: dict[str, Grant] = {}
        for product_id, quantity, metadata in subscription_products(subscription):
            if metadata is None:
                metadata = await self._product_metadata(product_id)
            for name, value in metadata.items():
                if not name.startswith(ENTITLEMENT_PREFIX):
                    continue
                key = name[len(ENTITLEMENT_PREFIX) :]
                limit, period, tracked = parse_entitlement(product_id, key, value, interval)
                limit = None if limit is None else limit * quantity
                earlier = grants.get(key)
                if earlier is not None and earlier.limit is not None and limit is not None:
                    limit += earlier.limit  # the same entitlement from two items adds up
                if limit is not None and limit > LEDGER_MAX:
                    raise InvalidMessage(
                        f"subscription {subscription.get('id')}: entitlement {key} limit of {limit} micro-units "
                        f"(quantity {quantity}) is above the ledger limit of {LEDGER_MAX}"
                    )
                period_start, period_end = (
                    (start, end) if period == interval else period_containing(period, start, max(now, start))
                )
                grants[key] = Grant(key, limit, period, period_start, period_end, tracked)
        status = subscription.get("status", "")
        await self._ledger.apply_subscription(
            subject,
            version=event.created,
            subscription_id=subscription["id"],
            status=status,
            active=status in ACTIVE_STATUSES,
            period_start=start,
            period_end=end,
            interval=interval,
            grants=list(grants.values()),
            created=created if isinstance(created := subscription.get("created"), int) else 0,
        )

    async def subscription_ended(self, event: StripeEvent) -> None:
        subscription = event.data.object
        subject = await self._subject(subscription)
        status = "paused" if event.type.endswith("paused") else subscription.get("status") or "canceled"
        await self._ledger.deactivate(subject, version=event.created, subscription_id=subscription["id"], status=status)

    async def invoice_paid(self, event: StripeEvent) -> None:
        invoice = event.data.object
        if invoice.get("billing_reason") != "subscription_cycle":
            self._ignored.labels("invoice.paid:" + str(invoice.get("billing_reason"))).inc()
            return
        details = invoice.get("subscription_details") or (invoice.get("parent") or {}).get("subscription_details")
        subject = await self._subject(invoice, extra_metadata=(details or {}).get("metadata"))
        start, end = renewal_period(invoice)
        interval = (await self._ledger.subscription(subject)).get("interval") or "month"
        if end is None:
            end = period_containing(interval, start, start)[1]
        await self._ledger.renew(subject, version=event.created, start=start, end=end, interval=interval)

    async def features(self, event: StripeEvent) -> None:
        summary = event.data.object
        subject = await self._subject(summary)
        entries = (summary.get("entitlements") or {}).get("data") or []
        features = sorted({e.get("lookup_key") or e.get("feature") for e in entries} - {None})
        await self._ledger.set_features(subject, features, version=event.created)

    # -- lookups -----------------------------------------------------------------------------

    async def _subject(self, obj: dict[str, Any], extra_metadata: dict[str, Any] | None = None) -> str:
        """The workspace (or user) of an object: its metadata, else its customer's (mapped in
        Redis, else fetched from Stripe and mapped).

        Raises:
            InvalidMessage: the customer names no workspace or user in its metadata.
        """
        subject = subject_in(obj.get("metadata")) or subject_in(extra_metadata)
        customer = customer_of(obj)
        if subject:
            if customer:
                await self._ledger.map_customer(subject, customer)
            return subject
        if not customer:
            raise InvalidMessage(f"{obj.get('object', 'object')} {obj.get('id')} names no customer")
        subject = await self._ledger.subject_of(customer)
        if subject:
            return subject
        subject = subject_in((await self._stripe.retrieve("customers", customer)).get("metadata"))
        if not subject:
            raise InvalidMessage(
                f"customer {customer} has no metadata.workspace_id or metadata.user_id: "
                "set one on the customer in Stripe, then replay this event"
            )
        await self._ledger.map_customer(subject, customer)
        return subject

    async def _product_metadata(self, product_id: str) -> dict[str, str]:
        now = time.monotonic()
        cached = self._products.get(product_id)
        if cached is not None and cached[0] > now:
            return cached[1]
        metadata = (await self._stripe.retrieve("products", product_id)).get("metadata") or {}
        self._products[product_id] = (now + self._product_cache_ttl, metadata)
        return metadata
