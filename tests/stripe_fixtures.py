"""Stripe objects for tests: products with entitlement metadata, subscriptions, invoices."""

from __future__ import annotations

from typing import Any

MONTH = 30 * 86400


def product(product_id: str, **entitlements: str) -> dict[str, Any]:
    """A product whose metadata grants `KEY="1000/month"`-style entitlements."""
    return {
        "id": product_id,
        "name": product_id,
        "metadata": {f"billingd.entitlement.{k}": v for k, v in entitlements.items()},
    }


def subscription(
    sub_id: str,
    customer: str,
    products: list[str],
    *,
    status: str = "active",
    start: int,
    workspace: str | None = None,
    quantity: int = 1,
) -> dict[str, Any]:
    """A subscription object (items carry the period, as in recent API versions)."""
    return {
        "id": sub_id,
        "object": "subscription",
        "created": start,
        "customer": customer,
        "status": status,
        "metadata": {"workspace_id": workspace} if workspace else {},
        "items": {
            "object": "list",
            "data": [
                {
                    "id": f"si_{p}",
                    "quantity": quantity,
                    "current_period_start": start,
                    "current_period_end": start + MONTH,
                    "price": {"id": f"price_{p}", "product": p, "recurring": {"interval": "month"}},
                }
                for p in products
            ],
        },
    }


def renewal_invoice(invoice_id: str, customer: str, start: int, end: int) -> dict[str, Any]:
    """An `invoice.paid` object for a subscription renewal."""
    return {
        "id": invoice_id,
        "object": "invoice",
        "customer": customer,
        "billing_reason": "subscription_cycle",
        "status": "paid",
        "period_start": start - MONTH,
        "period_end": start,
        "lines": {"data": [{"type": "subscription", "subscription": "sub_1", "period": {"start": start, "end": end}}]},
    }
