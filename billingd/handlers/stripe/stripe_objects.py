"""Reading the Stripe objects billingd acts on: events, subscriptions, product entitlement
metadata. Pure functions; the handler does the I/O. (Envelopes: `billingd.handlers.stripe.webhooks`.)"""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Any

import msgspec

from billingd.handlers.kit.money import to_micros
from billingd.handlers.kit.outcome import InvalidMessage

#: Product metadata key prefix: `billingd.entitlement.<KEY>` = `"<limit>/<period>"`, `"unlimited"`
#: or `"access"` (a feature without usage tracking).
ENTITLEMENT_PREFIX = "billingd.entitlement."
_LIMIT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(day|week|month|year)\s*$")
ACTIVE_STATUSES = frozenset({"active", "trialing", "past_due"})


class EventData(msgspec.Struct, frozen=True):
    """`event.data`: the object as it was when the event happened."""

    object: dict[str, Any]


class StripeEvent(msgspec.Struct, frozen=True):
    """A Stripe Event (API reference "The Event object"): the fields billingd reads."""

    id: str
    type: str
    created: int
    data: EventData


def parse_entitlement(product_id: str, name: str, value: str, interval: str) -> tuple[int | None, str, bool]:
    """`(limit in micro-units or None, period, tracked)` from one metadata value.

    Raises:
        InvalidMessage: the value is none of `"<limit>/<period>"`, `"unlimited"`, `"access"`.
    """
    text = value.strip().lower()
    if text == "unlimited":
        return None, interval, True
    if text == "access":
        return None, "none", False
    match = _LIMIT.match(text)
    if match is None:
        raise InvalidMessage(
            f"product {product_id} metadata {ENTITLEMENT_PREFIX}{name} = {value!r}: expected "
            f'"<limit>/<period>" (period day, week, month or year), "unlimited" or "access"'
        )
    limit = to_micros(Decimal(match.group(1)), f"product {product_id} metadata {ENTITLEMENT_PREFIX}{name} limit")
    return limit, match.group(2), True


def subscription_period(subscription: dict[str, Any]) -> tuple[int, int, str]:
    """`(current_period_start, current_period_end, interval)` of a subscription; the period moved
    from the subscription to its items in newer Stripe API versions, so both are read."""
    items = (subscription.get("items") or {}).get("data") or [{}]
    first = items[0]
    start = subscription.get("current_period_start") or first.get("current_period_start")
    end = subscription.get("current_period_end") or first.get("current_period_end")
    if start is None or end is None:
        raise InvalidMessage(f"subscription {subscription.get('id')} has no current period")
    recurring = (first.get("price") or first.get("plan") or {}).get("recurring") or first.get("plan") or {}
    interval = recurring.get("interval") or "month"
    return int(start), int(end), interval


def subscription_products(subscription: dict[str, Any]) -> list[tuple[str, int, dict[str, str] | None]]:
    """`(product id, quantity, metadata if expanded)` of each subscription item."""
    result = []
    for item in (subscription.get("items") or {}).get("data") or []:
        product = (item.get("price") or item.get("plan") or {}).get("product")
        quantity = item.get("quantity") or 1
        if not isinstance(quantity, int) or isinstance(quantity, bool) or not 0 <= quantity <= 10**9:
            raise InvalidMessage(f"subscription {subscription.get('id')}: item quantity {str(quantity)[:40]!r}")
        if isinstance(product, dict):
            result.append((str(product["id"]), quantity, product.get("metadata") or {}))
        elif isinstance(product, str):
            result.append((product, quantity, None))
    return result


def customer_of(obj: dict[str, Any]) -> str | None:
    """The customer id of an object whose `customer` may be expanded."""
    customer = obj.get("customer")
    return customer.get("id") if isinstance(customer, dict) else customer


def subject_in(metadata: dict[str, Any] | None) -> str | None:
    """The workspace (or user) an object's metadata names."""
    metadata = metadata or {}
    return metadata.get("workspace_id") or metadata.get("user_id") or None


def renewal_period(invoice: dict[str, Any]) -> tuple[int, int | None]:
    """The new period a renewal invoice opens: the subscription line's period when present
    (licensed prices are billed in advance), else it starts at the invoice's `period_end`."""
    for line in (invoice.get("lines") or {}).get("data") or []:
        period = line.get("period") or {}
        if (line.get("type") == "subscription" or line.get("subscription")) and period.get("start"):
            return int(period["start"]), int(period["end"])
    return int(invoice["period_end"]), None
