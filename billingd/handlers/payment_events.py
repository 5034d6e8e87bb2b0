"""`payment_events`: payments collected outside Stripe reconcile Stripe invoices (seed 004).

Three gateways, in the envelopes of DESIGN §5 (amounts in integer minor units):

* `razorpay` — a relayed webhook (`X-Razorpay-Signature`, `x-razorpay-event-id`, raw body),
  verified with the razorpay SDK; `payment.captured` names its Stripe invoice in
  `payload.payment.entity.notes.stripe_invoice_id` (`notes` may arrive as an empty list); other
  Razorpay events are acked without effect;
* `manual` — `{stripe_invoice_id, reference, amount, currency}` from finance's bank transfers;
* `zoho` — `{stripe_invoice_id, payment_id, amount, currency}`.

For each: fetch the invoice; not open → dead-letter; amount or currency not matching its
`amount_remaining` → dead-letter with both figures, for finance; else pay it out of band
(`invoices.pay(paid_out_of_band=True)`, `Idempotency-Key` from the gateway's payment id), then
record the gateway and payment id in the invoice metadata. Both steps run once (`OnceLedger`,
keyed by the payment id), so a capture delivered three times — or retried after Stripe failed
between the steps — pays the invoice exactly once.

An invoice already paid is either our own earlier payment (its metadata names this gateway and
payment id: a replay, acked) or a **double collection**: the customer paid twice and finance must
refund one. That is dead-lettered with both payments and the amount ("invoice X already paid by
Y; razorpay payment Z of 1,500.00 INR needs a refund") and counted in
`billingd_payments_double_collected_total{source,gateway}` — never acked silently.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Annotated, Any

import msgspec
import structlog

from billingd.clients import DownstreamRejected
from billingd.clients.ledger import OnceLedger
from billingd.config.durations import Duration
from billingd.handlers.base import HandlerContext, HandlerSpec, JsonDecoder, Message
from billingd.handlers.money import MAX_MINOR_UNITS
from billingd.handlers.outcome import ACK, DeadLetter, InvalidMessage, Outcome
from billingd.handlers.webhooks import header

if TYPE_CHECKING:
    from billingd.clients.razorpay import RazorpayVerifier
    from billingd.clients.stripe import StripeGateway

log = structlog.get_logger("billingd.payments")


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


class _AlreadyPaid(Exception):
    """Stripe refused to pay an invoice that was open when we read it: paid meanwhile?"""

    def __init__(self, rejection: DownstreamRejected) -> None:
        super().__init__(str(rejection))
        self.rejection = rejection


#: Stripe's zero- and three-decimal currencies ("Supported currencies", special cases): the rest
#: have two decimals.
ZERO_DECIMAL = frozenset(
    ["bif", "clp", "djf", "gnf", "jpy", "kmf", "krw", "mga", "pyg", "rwf", "ugx", "vnd", "vuv", "xaf", "xof", "xpf"]
)
THREE_DECIMAL = frozenset("bhd jod kwd omr tnd".split())  # noqa: SIM905


def major_units(amount: int, currency: str) -> str:
    """Minor units as a person reads them: 150000 inr → "1,500.00 INR", 500 jpy → "500 JPY"."""
    code = currency.lower()
    places = 0 if code in ZERO_DECIMAL else 3 if code in THREE_DECIMAL else 2
    return f"{amount / 10**places:,.{places}f} {currency.upper()}" if amount < 10**15 else f"{amount} minor units"


def paid_by(invoice: dict[str, Any]) -> tuple[str, str] | None:
    """`(gateway, payment id)` of the payment billingd recorded on a paid invoice, if any."""
    metadata = invoice.get("metadata") or {}
    gateway, payment = metadata.get("billingd_gateway"), metadata.get("billingd_payment_id")
    return (str(gateway), str(payment)) if gateway and payment else None


class PaymentEventsHandler:
    """Reconciles out-of-band payments. Downstreams: `redis`, `stripe`."""

    downstreams = ("redis", "stripe")

    def __init__(
        self,
        once: OnceLedger,
        stripe_gateway: StripeGateway,
        razorpay: RazorpayVerifier,
        options: PaymentOptions,
        double_collected: Any,
    ) -> None:
        self._once = once
        self._double_collected = double_collected
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
            if status == "paid":
                if paid_by(invoice) == (gateway, payment_id):
                    return ACK  # our own earlier payment, replayed after its once-record expired
                return self._double_collection(invoice, gateway, payment_id, amount, currency)
            if status != "open":
                return DeadLetter(
                    f"invoice {invoice_id} is {status}, not open: {gateway} payment {payment_id} "
                    f"of {major_units(amount, currency)} needs finance"
                )
            remaining, invoice_currency = invoice.get("amount_remaining"), str(invoice.get("currency", ""))
            if amount != remaining or currency.lower() != invoice_currency.lower():
                return DeadLetter(
                    f"amount mismatch: {gateway} payment {payment_id} is {amount} {currency.upper()}, "
                    f"invoice {invoice_id} has {remaining} {invoice_currency.upper()} remaining"
                )
            pay = partial(self._pay, invoice_id, f"billingd-pay-{gateway}-{payment_id}")
            try:
                await self._once.run_once(invoice_id, pay_step, pay, lease=lease, ttl=ttl)
            except _AlreadyPaid as refused:  # paid between our read and our payment: by whom?
                invoice = await self._stripe.retrieve("invoices", invoice_id)
                if invoice.get("status") != "paid":
                    raise refused.rejection from None
                return self._double_collection(invoice, gateway, payment_id, amount, currency)
        metadata = {"billingd_gateway": gateway, "billingd_payment_id": payment_id}
        note = partial(
            self._stripe.update_invoice_metadata, invoice_id, metadata, f"billingd-note-{gateway}-{payment_id}"
        )
        await self._once.run_once(invoice_id, note_step, note, lease=lease, ttl=ttl)
        return ACK

    def _double_collection(
        self, invoice: dict[str, Any], gateway: str, payment_id: str, amount: int, currency: str
    ) -> Outcome:
        earlier = paid_by(invoice)
        by = f"{earlier[0]} payment {earlier[1]}" if earlier else "a payment billingd did not record"
        self._double_collected.labels(gateway).inc()
        log.warning("double collection", invoice=invoice.get("id"), gateway=gateway, payment_id=payment_id, paid_by=by)
        return DeadLetter(
            f"invoice {invoice.get('id')} already paid by {by}; {gateway} payment {payment_id} of "
            f"{major_units(amount, currency)} needs a refund"
        )

    async def _pay(self, invoice_id: str, idempotency_key: str) -> None:
        try:
            await self._stripe.pay_invoice_out_of_band(invoice_id, idempotency_key)
        except DownstreamRejected as exc:
            raise _AlreadyPaid(exc) from None


def _build(ctx: HandlerContext, options: PaymentOptions) -> PaymentEventsHandler:
    double_collected = ctx.counter(
        "billingd_payments_double_collected",
        "Payments for invoices another payment had already settled (dead-lettered for a refund).",
        ["gateway"],
    )
    from billingd.clients.razorpay import RazorpayVerifier  # the razorpay SDK, only when used

    verifier = RazorpayVerifier(ctx.razorpay)
    return PaymentEventsHandler(ctx.clients.once, ctx.clients.stripe, verifier, options, double_collected)


SPEC = HandlerSpec(
    "payment_events", PaymentOptions, _build, "Razorpay/manual/Zoho payments → Stripe invoices (seed 004)"
)
