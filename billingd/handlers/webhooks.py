"""Relayed webhooks: the envelopes producers put webhooks in, their headers, their signatures.

DESIGN §5: a relayed webhook is `{"headers": {…}, "body": "<raw body>"}` (optionally with a
`gateway`); an EventBridge event wraps a Stripe event in `detail`. Shared by `stripe_events`,
`webhook_forward` and `payment_events`.
"""

from __future__ import annotations

import msgspec

from billingd.handlers.outcome import InvalidMessage


class Envelope(msgspec.Struct, frozen=True):
    """Any of the accepted shapes: a bare event, an EventBridge envelope (`detail`), or a relayed
    webhook (`headers` + raw `body`, optionally with `gateway = "stripe"`)."""

    detail: msgspec.Raw = msgspec.Raw(b"")  # msgspec cannot decode `Raw | None`: empty means absent
    headers: dict[str, str] | None = None
    body: str | None = None


def header(headers: dict[str, str], name: str) -> str | None:
    """A header by case-insensitive name."""
    wanted = name.lower()
    return next((v for k, v in headers.items() if k.lower() == wanted), None)


def verify_relayed(envelope: Envelope, secret: str, tolerance: int) -> None:
    """Check a relayed webhook's `Stripe-Signature` against its raw body (stripe-python's
    `Webhook.construct_event`: HMAC-SHA256 with the endpoint secret, timestamp within `tolerance`
    seconds; Stripe docs "Verify webhook signatures").

    Raises:
        InvalidMessage: no secret configured, no signature, a forged or stale one, or a body that
            is not an event.
    """
    import stripe  # the SDK is large: imported when a webhook is first verified

    if not secret:
        raise InvalidMessage("cannot verify a relayed Stripe webhook: [stripe].webhook_secret is not set")
    if envelope.headers is None or envelope.body is None:
        raise InvalidMessage("not a relayed Stripe webhook: expected {headers: {Stripe-Signature}, body}")
    try:
        stripe.Webhook.construct_event(envelope.body, header(envelope.headers, "Stripe-Signature"), secret, tolerance)
    except stripe.SignatureVerificationError as exc:
        raise InvalidMessage(f"Stripe-Signature verification failed: {exc.user_message or exc}") from None
    except ValueError as exc:  # not JSON, or numbers past Python's int digits limit
        raise InvalidMessage(f"relayed Stripe webhook body is not an event: {exc}"[:300]) from None
    except RecursionError:
        raise InvalidMessage("relayed Stripe webhook body is nested too deeply") from None
