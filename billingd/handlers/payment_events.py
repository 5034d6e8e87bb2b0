"""`payment_events`: payments collected outside Stripe reconcile Stripe invoices (seed 004).

Three gateways, in the envelopes of DESIGN §5 (amounts in integer minor units):

* `razorpay` — a relayed webhook (`X-Razorpay-Signature`, `x-razorpay-event-id`, raw body),
  verified with the razorpay SDK; `payment.captured` names its Stripe invoice in
  `payload.payment.entity.notes.stripe_invoice_id` (`notes` may arrive as an empty list); other
  Razorpay events are acked without effect;
* `manual` — `{stripe_invoice_id, reference, amount, currency}` from finance's bank transfers;
* `zoho` — `{stripe_invoice_id, payment_id, amount, currency}`.

For each: fetch the invoice; not open → dead-letter; amount or currency not matching its
`amount_remaining` → dead-letter with both figures, for finance; else claim the invoice in Redis
(`PaymentLedger`: one pay call at a time per invoice, across workers and replicas), write the
gateway and payment id into the invoice's metadata, and only then pay it out of band
(`invoices.pay(paid_out_of_band=True)`). Every Stripe key is bounded (`stripe_ids`).

An invoice found paid is either this payment's own — its metadata names this payment, written
before the pay call (and its `paid_at` is not older than this payment's first call) — or a
**double collection**: the customer paid twice and finance must refund one. So a retry after a
lost reply, a crash between Stripe paying and billingd recording it, or a duplicate of the
capture handled meanwhile by another replica all end acked, with exactly one successful pay
call; a payment that met an invoice someone else paid is dead-lettered with both payments and
the amount ("invoice X already paid by Y; razorpay payment Z of 1,500.00 INR needs a refund") and
counted in `billingd_payments_double_collected_total{source,gateway}` — never acked silently.

A pay call whose outcome is unknown (timeout, 5xx) leaves the claim pending; the next attempt
decides by the invoice (paid with this payment's mark → done; still open → pay again, with a new
`Idempotency-Key`: Stripe v1 replays a saved 500 for 24 hours, and an invoice cannot be paid
twice, so the key is not what prevents a double payment).
"""

from __future__ import annotations

import contextlib
import uuid
from typing import TYPE_CHECKING, Annotated, Any

import anyio
import msgspec
import structlog

from billingd.clients import Busy, DownstreamError, DownstreamRejected
from billingd.clients.ledger import OnceLedger
from billingd.clients.ledger.payments import Claim, PaymentLedger, PaymentRecord
from billingd.clients.stripe_ids import bounded, idempotency_key
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
    """`(gateway, payment id)` of the payment billingd marked an invoice with, if any (the id as
    written: bounded to Stripe's 500 characters of a metadata value)."""
    metadata = invoice.get("metadata") or {}
    gateway, payment = metadata.get("billingd_gateway"), metadata.get("billingd_payment_id")
    return (str(gateway), str(payment)) if gateway and payment else None


#: How much older than a payment's first pay call an invoice's `paid_at` may be and still be
#: that call's (seconds): clocks of billingd and Stripe differ a little.
CLOCK_SKEW = 120


def _mark(gateway: str, payment_id: str) -> dict[str, str]:
    """The invoice metadata naming the payment that pays it (written before the pay call)."""
    return {"billingd_gateway": gateway, "billingd_payment_id": bounded(payment_id, 500)}


def _mark_of(gateway: str, payment_id: str) -> tuple[str, str]:
    return gateway, bounded(payment_id, 500)


def _ours(invoice: dict[str, Any], gateway: str, payment_id: str, first: int) -> bool:
    """Whether a paid invoice was paid by this payment's own call: it carries this payment's mark,
    and was paid no earlier than the payment's first call (`first`, Unix seconds; 0: unknown)."""
    if paid_by(invoice) != _mark_of(gateway, payment_id):
        return False
    paid_at = (invoice.get("status_transitions") or {}).get("paid_at")
    return not (first and isinstance(paid_at, int) and paid_at < first - CLOCK_SKEW)


class PaymentEventsHandler:
    """Reconciles out-of-band payments. Downstreams: `redis`, `stripe`."""

    downstreams = ("redis", "stripe")

    def __init__(
        self,
        once: OnceLedger,
        payments: PaymentLedger,
        stripe_gateway: StripeGateway,
        razorpay: RazorpayVerifier,
        options: PaymentOptions,
        double_collected: Any,
    ) -> None:
        self._once = once
        self._payments = payments
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
        who, ttl = f"{gateway}:{payment_id}", int(self._options.dedup_ttl)
        if await self._once.done(invoice_id, f"pay:{gateway}:{payment_id}"):  # an earlier billingd paid it
            return ACK
        record = await self._payments.record(invoice_id)
        if record.who == who and record.state == "paid":
            return ACK  # a duplicate of a payment billingd made
        invoice = await self._stripe.retrieve("invoices", invoice_id)
        status = invoice.get("status")
        if status == "paid":
            return await self._found_paid(invoice, record, gateway, payment_id, amount, currency)
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
        # the invoice is open: another payment's call that ended with no known outcome did nothing
        stale = record.who if record.who and record.who != who and not record.leased else ""
        token = uuid.uuid4().hex
        claim, holder, tries, first = await self._payments.claim(
            invoice_id, who, token, lease=4 * self._stripe.timeout + 5, ttl=ttl, take_over=stale
        )
        if claim is Claim.PAID:
            return ACK
        if claim in (Claim.BUSY, Claim.OTHER_PENDING):
            raise Busy(f"invoice {invoice_id} is being paid by {holder}")
        if claim is Claim.OTHER_PAID:
            return DeadLetter(
                f"invoice {invoice_id} is open but billingd recorded it paid by {holder}: {gateway} payment "
                f"{payment_id} of {major_units(amount, currency)} needs finance to check the invoice"
            )
        return await self._pay(invoice_id, gateway, payment_id, tries, first, amount, currency)

    async def _pay(
        self, invoice_id: str, gateway: str, payment_id: str, tries: int, first: int, amount: int, currency: str
    ) -> Outcome:
        """Mark the invoice as this payment's, then pay it (the claim is held)."""
        who, ttl = f"{gateway}:{payment_id}", int(self._options.dedup_ttl)
        try:
            await self._stripe.update_invoice_metadata(
                invoice_id, _mark(gateway, payment_id), idempotency_key("mark", gateway, payment_id, str(tries))
            )
            await self._stripe.pay_invoice_out_of_band(
                invoice_id, idempotency_key("pay", gateway, payment_id, str(tries))
            )
        except DownstreamRejected as refused:  # nothing happened by this call: paid meanwhile, or not payable
            invoice = await self._stripe.retrieve("invoices", invoice_id)
            if invoice.get("status") == "paid" and tries > 1 and _ours(invoice, gateway, payment_id, first):
                await self._payments.settle(invoice_id, who, "paid", ttl)  # an earlier call of ours landed late
                return ACK
            await self._payments.settle(invoice_id, who, "refused", ttl)
            if invoice.get("status") != "paid":
                raise
            if paid_by(invoice) == _mark_of(gateway, payment_id):  # our mark on someone else's payment: take it off
                await self._stripe.update_invoice_metadata(
                    invoice_id, {"billingd_gateway": "", "billingd_payment_id": ""},
                    idempotency_key("unmark", gateway, payment_id, str(tries)),
                )  # fmt: skip
            log.info("pay refused: invoice paid meanwhile", invoice=invoice_id, error=str(refused))
            return self._double_collection(invoice, gateway, payment_id, amount, currency)
        except BaseException:  # no answer, or a 5xx: the outcome is unknown; the next attempt reads the invoice
            with anyio.CancelScope(shield=True), anyio.move_on_after(5), contextlib.suppress(DownstreamError):
                await self._payments.settle(invoice_id, who, "pending", ttl)  # gives the lease up at once
            raise
        await self._payments.settle(invoice_id, who, "paid", ttl)
        return ACK

    async def _found_paid(
        self,
        invoice: dict[str, Any],
        record: PaymentRecord,
        gateway: str,
        payment_id: str,
        amount: int,
        currency: str,
    ) -> Outcome:
        """The invoice is paid before this payment's call: its own earlier call, or a double collection."""
        who = f"{gateway}:{payment_id}"
        if record.who == who and record.leased:
            raise Busy(f"invoice {invoice.get('id')} is being paid by {who}")  # its reply is on its way
        if _ours(invoice, gateway, payment_id, record.first if record.who == who else 0):
            if record.who == who:
                await self._payments.settle(str(invoice.get("id")), who, "paid", int(self._options.dedup_ttl))
            return ACK  # paid by this payment's own earlier call (its reply lost, or its record not written)
        if record.who and record.who != who and record.state in ("paid", "pending") and paid_by(invoice) is None:
            recorded = record.who.split(":", 1)
            invoice = {**invoice, "metadata": {"billingd_gateway": recorded[0], "billingd_payment_id": recorded[-1]}}
        return self._double_collection(invoice, gateway, payment_id, amount, currency)

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


def _build(ctx: HandlerContext, options: PaymentOptions) -> PaymentEventsHandler:
    double_collected = ctx.counter(
        "billingd_payments_double_collected",
        "Payments for invoices another payment had already settled (dead-lettered for a refund).",
        ["gateway"],
    )
    from billingd.clients.razorpay import RazorpayVerifier  # the razorpay SDK, only when used

    verifier = RazorpayVerifier(ctx.razorpay)
    clients = ctx.clients
    return PaymentEventsHandler(clients.once, clients.payments, clients.stripe, verifier, options, double_collected)


SPEC = HandlerSpec(
    "payment_events", PaymentOptions, _build, "Razorpay/manual/Zoho payments → Stripe invoices (seed 004)"
)
