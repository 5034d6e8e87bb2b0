"""`payment_events`: payments collected outside Stripe reconcile Stripe invoices (seed 004).

Three gateways, in the envelopes of DESIGN §5 (amounts in integer minor units):

* `razorpay` — a relayed webhook (`X-Razorpay-Signature`, `x-razorpay-event-id`, raw body),
  verified with the razorpay SDK; `payment.captured` names its Stripe invoice in
  `payload.payment.entity.notes.stripe_invoice_id` (`notes` may arrive as an empty list); other
  Razorpay events are acked without effect;
* `manual` — `{stripe_invoice_id, reference, amount, currency}` from finance's bank transfers;
* `zoho` — `{stripe_invoice_id, payment_id, amount, currency}`.

Each payment pays its Stripe invoice out of band exactly once, through `InvoicePayer`
(`billingd.handlers.payments.invoice_payer`): amount and currency checked against the invoice, one pay call
at a time per invoice across replicas, and an invoice found paid attributed by Stripe's own
answer to the payment's pay call — so a lost reply, a crash or a copy on another replica ends
acked, and only a payment that met an invoice someone else paid is dead-lettered as a **double
collection** ("invoice X already paid by Y; razorpay payment Z of 1,500.00 INR needs a refund",
counted in `billingd_payments_double_collected_total{source,gateway}`) — never acked silently.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import msgspec

from billingd.config.durations import Duration
from billingd.handlers.kit.base import HandlerContext, HandlerSpec, JsonDecoder, Message
from billingd.handlers.kit.money import MAX_MINOR_UNITS
from billingd.handlers.kit.outcome import ACK, DeadLetter, InvalidMessage, Outcome
from billingd.handlers.payments.invoice_payer import InvoicePayer
from billingd.handlers.stripe.webhooks import header

if TYPE_CHECKING:
    from billingd.clients.razorpay import RazorpayVerifier


class PaymentOptions(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """`handler_options` of `payment_events`."""

    dedup_ttl: Duration = Duration(15 * 86400)


#: An amount in integer minor units (paise, cents), bounded before any effect (DESIGN §8).
MinorUnits = Annotated[int, msgspec.Meta(ge=0, le=MAX_MINOR_UNITS)]


class PaymentEnvelope(msgspec.Struct, frozen=True):
    """DESIGN §5 envelopes: a relayed webhook, or a payment record."""

    gateway: str
    headers: dict[str, str] | None = None
    body: str | None = None
    stripe_invoice_id: str | None = None
    reference: str | None = None
    payment_id: str | None = None
    amount: MinorUnits | None = None
    currency: str | None = None


class RazorpayPaymentEntity(msgspec.Struct, frozen=True):
    """`payload.payment.entity` of a Razorpay payment webhook."""

    id: str
    amount: MinorUnits
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


class PaymentEventsHandler:
    """Reconciles out-of-band payments. Downstreams: `redis`, `stripe`."""

    downstreams = ("redis", "stripe")

    def __init__(self, payer: InvoicePayer, razorpay: RazorpayVerifier, options: PaymentOptions) -> None:
        self._payer = payer
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
        return await self._payer.reconcile(gateway, payment_id, invoice_id, amount, currency)


def _build(ctx: HandlerContext, options: PaymentOptions) -> PaymentEventsHandler:
    double_collected = ctx.counter(
        "billingd_payments_double_collected",
        "Payments for invoices another payment had already settled (dead-lettered for a refund).",
        ["gateway"],
    )
    from billingd.clients.razorpay import RazorpayVerifier  # the razorpay SDK, only when used

    verifier = RazorpayVerifier(ctx.razorpay)
    clients = ctx.clients
    payer = InvoicePayer(clients.once, clients.payments, clients.stripe, int(options.dedup_ttl), double_collected)
    return PaymentEventsHandler(payer, verifier, options)


SPEC = HandlerSpec(
    "payment_events", PaymentOptions, _build, "Razorpay/manual/Zoho payments → Stripe invoices (seed 004)"
)
