"""Relayed webhooks: the envelopes producers put webhooks in, their headers, their signatures.

DESIGN §5: a relayed webhook is `{"headers": {…}, "body": "<raw body>"}` (optionally with a
`gateway`); an EventBridge event wraps a Stripe event in `detail`. Shared by `stripe_events`,
`webhook_forward` and `payment_events`.
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass

import msgspec

from billingd.handlers.kit.outcome import InvalidMessage


class Envelope(msgspec.Struct, frozen=True):
    """Any of the accepted shapes: a bare event, an EventBridge envelope (`detail`), or a relayed
    webhook (`headers` + raw `body`, optionally with `gateway = "stripe"` and `received_at`: when
    the relay received it, Unix seconds or RFC 3339)."""

    detail: msgspec.Raw = msgspec.Raw(b"")  # msgspec cannot decode `Raw | None`: empty means absent
    headers: dict[str, str] | None = None
    body: str | None = None
    received_at: int | float | str | None = None


@dataclass(frozen=True)
class WebhookAge:
    """How old a relayed webhook's signature may be (`[stripe]`, seconds): at most `tolerance`
    between Stripe signing it and the relay receiving it (`received_at`), else — without a
    receipt time — at most `max_age` before now."""

    tolerance: float = 300.0
    max_age: float = 30 * 86400.0


def header(headers: dict[str, str], name: str) -> str | None:
    """A header by case-insensitive name."""
    wanted = name.lower()
    return next((v for k, v in headers.items() if k.lower() == wanted), None)


def verify_relayed(envelope: Envelope, secret: str, age: WebhookAge) -> None:
    """Check a relayed webhook's `Stripe-Signature` against its raw body (stripe-python's
    `Webhook.construct_event`: HMAC-SHA256 with the endpoint secret; Stripe docs "Verify webhook
    signatures"), always, and bound its age by `age`.

    Stripe's 5-minute tolerance guards a webhook *endpoint* against replays at receipt. Once the
    relay has put the event on a queue, a delivery retried, backlogged, paused by a breaker or
    replayed from the dead-letter queue is legitimately older than that, and applying it again
    is harmless (events apply once by id and never roll state back). So the 5 minutes bound the
    time from signing to the relay's receipt (`received_at`), and without a receipt time the age
    is bounded by `max_age` (at least the queue's and its dead-letter queue's retention).

    Raises:
        InvalidMessage: no secret configured, no signature, a forged one, one the relay received
            more than `tolerance` after signing, one older than `max_age`, or a body that is
            not an event.
    """
    import stripe  # the SDK is large: imported when a webhook is first verified

    if not secret:
        raise InvalidMessage("cannot verify a relayed Stripe webhook: [stripe].webhook_secret is not set")
    if envelope.headers is None or envelope.body is None:
        raise InvalidMessage("not a relayed Stripe webhook: expected {headers: {Stripe-Signature}, body}")
    signature = header(envelope.headers, "Stripe-Signature")
    try:
        stripe.Webhook.construct_event(envelope.body, signature, secret, tolerance=None)  # type: ignore[arg-type]
    except stripe.SignatureVerificationError as exc:
        raise InvalidMessage(f"Stripe-Signature verification failed: {exc.user_message or exc}") from None
    except ValueError as exc:  # not JSON, or numbers past Python's int digits limit
        raise InvalidMessage(f"relayed Stripe webhook body is not an event: {exc}"[:300]) from None
    except RecursionError:
        raise InvalidMessage("relayed Stripe webhook body is nested too deeply") from None
    _check_age(signed_at(signature or ""), receipt_time(envelope.received_at), age, time.time())


def signed_at(signature: str) -> int:
    """The `t=` of a (verified) `Stripe-Signature` header, Unix seconds."""
    for part in signature.split(","):
        name, _, value = part.strip().partition("=")
        if name == "t" and value.isdigit() and len(value) <= 12:
            return int(value)
    raise InvalidMessage("Stripe-Signature has no timestamp (t=)")


def receipt_time(value: object) -> float | None:
    """`received_at` of a relay's envelope as Unix seconds (None when absent).

    Raises:
        InvalidMessage: a value that is neither Unix seconds nor an RFC 3339 time.
    """
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool) and 0 < value < 10**11:
        return float(value)
    if isinstance(value, str) and len(value) <= 40:
        try:
            when = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            pass
        else:
            return (when if when.tzinfo else when.replace(tzinfo=dt.UTC)).timestamp()
    raise InvalidMessage(f"received_at {str(value)[:40]!r} is neither Unix seconds nor an RFC 3339 time")


def _check_age(signed: int, received: float | None, age: WebhookAge, now: float) -> None:
    if received is not None:
        lag = received - signed
        if abs(lag) > age.tolerance:
            raise InvalidMessage(
                f"Stripe-Signature: the relay received this webhook {lag:.0f} s after Stripe signed it, more than "
                f"[stripe].webhook_tolerance ({age.tolerance:g} s): a replayed request, or the relay's clock"
            )
        return
    if now - signed > age.max_age:
        raise InvalidMessage(
            f"Stripe-Signature is {(now - signed) / 86400:.1f} days old, more than [stripe].webhook_max_age "
            f"({age.max_age / 86400:g} days), and the envelope has no received_at to prove when it was relayed"
        )
    if signed - now > age.tolerance:
        raise InvalidMessage(f"Stripe-Signature is {signed - now:.0f} s in the future: check the clocks")
