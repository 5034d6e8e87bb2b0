"""`payment_events`: payments collected outside Stripe reconcile Stripe invoices (seed 004).

Three gateways, in the envelopes of DESIGN §5 (amounts in integer minor units):

* `razorpay` — a relayed webhook (`X-Razorpay-Signature`, `x-razorpay-event-id`, raw body),
  verified with the razorpay SDK; `payment.captured` names its Stripe invoice in
  `payload.payment.entity.notes.stripe_invoice_id` (`notes` may arrive as an empty list); other
  Razorpay events are acked without effect;
* `manual` — `{stripe_invoice_id, reference, amount, currency}` from finance's bank transfers;
* `zoho` — `{stripe_invoice_id, payment_id, amount, currency}`.

For each: fetch the invoice; paid already (by someone else) → ack; not open → dead-letter; amount
or currency not matching its `amount_remaining` → dead-letter with both figures, for finance;
else pay it out of band (`invoices.pay(paid_out_of_band=True)`, `Idempotency-Key` from the
gateway's payment id), then record the gateway and reference in the invoice metadata. Both steps
run once (`OnceLedger`, keyed by the payment id), so a capture delivered three times — or retried
after Stripe failed between the steps — pays the invoice exactly once.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import msgspec
import structlog

from billingd.clients import Clients, DownstreamRejected
from billingd.clients.ledger import OnceLedger
from billingd.clients.razorpay import RazorpayVerifier
from billingd.clients.stripe import StripeGateway
from billingd.config.durations import Duration
from billingd.config.model import SourceSettings
from billingd.handlers.base import HandlerSpec, JsonDecoder, Message
from billingd.handlers.outcome import ACK, DeadLetter, InvalidMessage, Outcome
from billingd.handlers.stripe_objects import header

log = structlog.get_logger("billingd.payments")


class PaymentOptions(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """`handler_options` of `payment_events`."""

    dedup_ttl: Duration = Duration(15 * 86400)


class PaymentEnvelope(msgspec.Struct, frozen=True):
    """DESIGN §5 envelopes: a relayed webhook, or a payment record."""

    gateway: str
    headers: dict[str, str] | None = None
    body: str | None = None
    stripe_invoice_id: str | None = None
    reference: str | None = None
    payment_id: str | None = None
    amount: int | None = None
    currency: str | None = None


class RazorpayPaymentEntity(msgspec.Struct, frozen=True):
    """`payload.payment.entity` of a Razorpay payment webhook."""

    id: str
    amount: int
    currency: str
    notes: dict[str, Any] | list[Any] = msgspec.field(default_factory=dict)


class RazorpayPayment(msgspec.Struct, frozen=True):
    entity: RazorpayPaymentEntity


class RazorpayPayload(msgspec.Struct, frozen=True):
    payment: RazorpayPayment | None = None


class RazorpayEvent(msgspec.Struct, frozen=True):
    """A Razorpay webhook (`{"event": "payment.captured", "payload": {...}}`)."""

    event: str
    payload: RazorpayPayload = msgspec.field(default_factory=RazorpayPayload)


class _AlreadyPaid(Exception):
    """Stripe refused to pay: the invoice was paid by another payment."""


class PaymentEventsHandler:
    """Reconciles out-of-band payments. Downstreams: `redis`, `stripe`."""

    downstreams = ("redis", "stripe")

    def __init__(
        self, once: OnceLedger, stripe_gateway: StripeGateway, razorpay: RazorpayVerifier, options: PaymentOptions
    ) -> None:
        self._once = once
        self._stripe = stripe_gateway
        self._razorpay = razorpay
        self._options = options
        self._envelope = JsonDecoder(PaymentEnvelope)
        self._razorpay_event = JsonDecoder(RazorpayEvent)

    async def handle(self, message: Message) -> Outcome:
        """Reconcile one payment (see module docstring)."""
        envelope = self._envelope.decode(message.body)
        if envelope.gateway == "razorpay":
            return await self._razorpay_webhook(envelope)
        if envelope.gateway in ("manual", "zoho"):
            payment_id = envelope.reference if envelope.gateway == "manual" else envelope.payment_id
            field = "reference" if envelope.gateway == "manual" else "payment_id"
            for name, value in (
                ("stripe_invoice_id", envelope.stripe_invoice_id),
                (field, payment_id),
                ("amount", envelope.amount),
                ("currency", envelope.currency),
            ):
                if value is None or value == "":
                    raise InvalidMessage(f"invalid message: Object missing required field `{name}`")
            assert envelope.stripe_invoice_id and payment_id and envelope.amount is not None and envelope.currency
            return await self._reconcile(
                envelope.gateway, payment_id, envelope.stripe_invoice_id, envelope.amount, envelope.currency
            )
        raise InvalidMessage(f"unknown gateway {envelope.gateway!r}: expected razorpay, manual or zoho")

    async def _razorpay_webhook(self, envelope: PaymentEnvelope) -> Outcome:
        if envelope.headers is None or envelope.body is None:
            raise InvalidMessage("a razorpay envelope needs `headers` and the raw `body`")
        if not self._razorpay.configured:
            raise InvalidMessage("cannot verify a Razorpay webhook: [razorpay].webhook_secret is not set")
        if not await self._razorpay.verify(envelope.body, header(envelope.headers, "X-Razorpay-Signature")):
            raise InvalidMessage("X-Razorpay-Signature verification failed")
        event = self._razorpay_event.decode(envelope.body.encode())
        if event.event != "payment.captured":
            return ACK
        if event.payload.payment is None:
            raise InvalidMessage("payment.captured without payload.payment.entity")
        payment = event.payload.payment.entity
        notes = payment.notes if isinstance(payment.notes, dict) else {}
        invoice_id = notes.get("stripe_invoice_id")
        if not invoice_id:
            return DeadLetter(f"Razorpay payment {payment.id} has no notes.stripe_invoice_id: reconcile it by hand")
        return await self._reconcile("razorpay", payment.id, str(invoice_id), payment.amount, payment.currency)

    async def _reconcile(self, gateway: str, payment_id: str, invoice_id: str, amount: int, currency: str) -> Outcome:
        ttl, lease = int(self._options.dedup_ttl), 2 * self._stripe.timeout + 5
        pay_step, note_step = f"pay:{gateway}:{payment_id}", f"note:{gateway}:{payment_id}"
        if not await self._once.done(invoice_id, pay_step):
            invoice = await self._stripe.retrieve("invoices", invoice_id)
            status = invoice.get("status")
            if status not in ("open", "paid"):
                return DeadLetter(
                    f"invoice {invoice_id} is {status}, not open: {gateway} payment {payment_id} "
                    f"of {amount} {currency.upper()} needs finance"
                )
            remaining, invoice_currency = invoice.get("amount_remaining"), str(invoice.get("currency", ""))
            if status == "open" and (amount != remaining or currency.lower() != invoice_currency.lower()):
                return DeadLetter(
                    f"amount mismatch: {gateway} payment {payment_id} is {amount} {currency.upper()}, "
                    f"invoice {invoice_id} has {remaining} {invoice_currency.upper()} remaining"
                )
            pay = partial(self._pay, invoice_id, f"billingd-pay-{gateway}-{payment_id}", status)
            try:
                await self._once.run_once(invoice_id, pay_step, pay, lease=lease, ttl=ttl)
            except _AlreadyPaid:
                log.info(
                    "invoice already paid by another payment",
                    invoice=invoice_id,
                    gateway=gateway,
                    payment_id=payment_id,
                )
                return ACK
        metadata = {"billingd_gateway": gateway, "billingd_payment_id": payment_id}
        note = partial(
            self._stripe.update_invoice_metadata, invoice_id, metadata, f"billingd-note-{gateway}-{payment_id}"
        )
        await self._once.run_once(invoice_id, note_step, note, lease=lease, ttl=ttl)
        return ACK

    async def _pay(self, invoice_id: str, idempotency_key: str, status: str) -> None:
        try:
            await self._stripe.pay_invoice_out_of_band(invoice_id, idempotency_key)
        except DownstreamRejected:
            if status == "paid":  # and not a replay of our own earlier payment (that would have succeeded)
                raise _AlreadyPaid from None
            raise


def _build(clients: Clients, options: PaymentOptions, source: SourceSettings) -> PaymentEventsHandler:
    return PaymentEventsHandler(clients.once, clients.stripe, RazorpayVerifier(clients.settings.razorpay), options)


SPEC = HandlerSpec(
    "payment_events", PaymentOptions, _build, "Razorpay/manual/Zoho payments → Stripe invoices (seed 004)"
)
