"""Signing webhook bodies the way Stripe and Razorpay do, for tests."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from typing import Any


def stripe_signature(payload: str, secret: str, timestamp: int | None = None) -> str:
    """A `Stripe-Signature` header: `t=<ts>,v1=<hex HMAC-SHA256 of "<ts>.<payload>">` (Stripe docs,
    "Verify webhook signatures with your own code")."""
    timestamp = int(time.time()) if timestamp is None else timestamp
    digest = hmac.new(secret.encode(), f"{timestamp}.{payload}".encode(), hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def razorpay_signature(body: str, secret: str) -> str:
    """An `X-Razorpay-Signature`: the hex HMAC-SHA256 of the raw body with the webhook secret
    (Razorpay docs, "Validate webhooks")."""
    return hmac.new(secret.encode(), body.encode(), hashlib.sha256).hexdigest()


def stripe_relay(event: dict[str, Any], secret: str, timestamp: int | None = None) -> dict[str, Any]:
    """The relayed-webhook envelope of DESIGN §5 for `event`."""
    payload = json.dumps(event)
    return {
        "gateway": "stripe",
        "headers": {"Stripe-Signature": stripe_signature(payload, secret, timestamp)},
        "body": payload,
    }


def razorpay_relay(event: dict[str, Any], secret: str, event_id: str) -> dict[str, Any]:
    """The relayed Razorpay webhook envelope of DESIGN §5 for `event`."""
    body = json.dumps(event)
    return {
        "gateway": "razorpay",
        "headers": {"X-Razorpay-Signature": razorpay_signature(body, secret), "x-razorpay-event-id": event_id},
        "body": body,
    }


def stripe_event(event_type: str, obj: dict[str, Any], created: int, event_id: str | None = None) -> dict[str, Any]:
    """A Stripe Event object wrapping `obj`."""
    return {
        "id": event_id or f"evt_{event_type.replace('.', '_')}_{created}",
        "object": "event",
        "type": event_type,
        "created": created,
        "livemode": False,
        "api_version": "2025-04-30.basil",
        "data": {"object": obj},
    }
