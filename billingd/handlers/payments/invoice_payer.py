"""Paying one Stripe invoice out of band with one payment, exactly once (seed 004; DESIGN §10).

`InvoicePayer.reconcile(gateway, payment id, invoice, amount, currency)`:

1. the invoice is fetched; not open → dead letter for finance; amount or currency not matching
   `amount_remaining` → dead letter with both figures;
2. the invoice is claimed in Redis (`PaymentLedger`): one pay call at a time per invoice, across
   workers and replicas; a copy of the capture or a second payment of the invoice waits, uncounted;
3. the payment is written on the invoice (`metadata.billingd_gateway`, `billingd_payment_id`),
   the call is recorded (its `Idempotency-Key`, derived from the claim's token: never reused),
   and only then `invoices.pay(paid_out_of_band)` is called.

An invoice found **paid** is this payment's own only when Stripe says so: the payment's latest pay
call is replayed with the same `Idempotency-Key` (Stripe keeps a key's answer 24 hours): its saved
success proves it ours (acked); a refusal ("already paid") proves it someone else's — a **double
collection**, dead-lettered with both payments for a refund and counted in
`billingd_payments_double_collected_total`. A call that never reached Stripe is executed by the
replay and refused the same way. Past Stripe's 24 hours the evidence is the invoice: paid out of
band, carrying this payment's mark, paid after its call; anything less is dead-lettered for a
check, never as "needs a refund".

A call with an unknown outcome (timeout, 5xx) keeps its lease twice the request timeout longer
(Stripe may still be running it); a call refused before it was sent (an open breaker, a 429, no
budget slot) gives the lease up at once. When the replay itself cannot answer (Stripe saved a
500 for the key: its call began and failed), the invoice is the evidence, as past 24 hours.
"""

from __future__ import annotations

import contextlib
import re
import uuid
from typing import Any

import anyio
import structlog

from billingd.clients import Busy, DownstreamError, DownstreamRejected, DownstreamUnavailable, Throttled
from billingd.clients.errors import CircuitOpen
from billingd.clients.ledger import OnceLedger
from billingd.clients.ledger.payments import Claim, PaymentLedger, PaymentRecord
from billingd.clients.stripe_ids import bounded, idempotency_key
from billingd.handlers.kit.outcome import ACK, DeadLetter, InvalidMessage, Outcome

log = structlog.get_logger("billingd.payments")

#: Stripe keeps an idempotency key's answer at least this long (seconds, less an hour's margin).
KEY_LIFETIME = 23 * 3600
#: How much earlier than our call an invoice's `paid_at` may be and still be our call's (seconds).
CLOCK_SKEW = 120
#: A Stripe invoice id (`in_…`): anything else never reaches a URL.
INVOICE_ID = re.compile(r"^in_[A-Za-z0-9_-]{1,250}$")
#: Zero- and three-decimal currencies (Stripe, "Supported currencies", special cases).
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


def mark_of(gateway: str, payment_id: str) -> tuple[str, str]:
    """What `paid_by` reads for this payment's mark."""
    return gateway, bounded(payment_id, 500)


class InvoicePayer:
    """Pays invoices out of band, once (see module docstring).

    Args:
        once: the records of an earlier billingd's payments (read only).
        payments: the per-invoice claims and outcomes.
        stripe: the gateway (its `timeout` and `max_wait` size the claim's lease).
        ttl: seconds the records are kept (`dedup_ttl`).
        double_collected: counter of double collections, by gateway.
    """

    def __init__(self, once: OnceLedger, payments: PaymentLedger, stripe: Any, ttl: int, double_collected: Any) -> None:
        self._once = once
        self._payments = payments
        self._stripe = stripe
        self._ttl = ttl
        self._double_collected = double_collected
        # two calls (mark, pay), each: a budget slot, a half-open probe's wait, the request
        self._lease = 2 * (float(stripe.max_wait) + 2 * stripe.timeout) + 10

    async def reconcile(self, gateway: str, payment_id: str, invoice_id: str, amount: int, currency: str) -> Outcome:
        """Pay `invoice_id` with this payment once, or say why not (see module docstring).

        Raises:
            InvalidMessage: not a Stripe invoice id.
            Busy: a call on this invoice is under way elsewhere (retried, uncounted).
            DownstreamError: Redis or Stripe unavailable, or Stripe refused (its words).
        """
        if not INVOICE_ID.match(invoice_id):
            raise InvalidMessage(f"stripe_invoice_id {invoice_id[:80]!r} is not a Stripe invoice id (in_…)")
        who = f"{gateway}:{payment_id}"
        if await self._once.done(invoice_id, f"pay:{gateway}:{payment_id}"):  # an earlier billingd paid it
            return ACK
        record = await self._payments.record(invoice_id, who)
        if record.who == who and record.state == "paid":
            return ACK  # a copy of a payment billingd made
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
        # the invoice is open: another payment's claim that ended with no known outcome did nothing
        stale = record.who if record.who and record.who != who and not record.leased else ""
        token = uuid.uuid4().hex
        claim, holder, _ = await self._payments.claim(
            invoice_id, who, token, lease=self._lease, ttl=self._ttl, take_over=stale
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
        return await self._pay(invoice_id, gateway, payment_id, token, amount, currency)

    async def _pay(
        self, invoice_id: str, gateway: str, payment_id: str, token: str, amount: int, currency: str
    ) -> Outcome:
        """Mark the invoice as this payment's, record the call, pay (the claim is held)."""
        who = f"{gateway}:{payment_id}"
        await self._stripe.update_invoice_metadata(
            invoice_id, _mark(gateway, payment_id), idempotency_key("mark", invoice_id, token)
        )
        pay_key = idempotency_key("pay", invoice_id, token)
        if not await self._payments.sending(invoice_id, who, token, lease=self._lease, idempotency_key=pay_key):
            raise Busy(f"invoice {invoice_id}: the claim of {who} was lost before its pay call")
        try:
            await self._stripe.pay_invoice_out_of_band(invoice_id, pay_key)
        except DownstreamRejected as refused:  # nothing happened by this call: paid meanwhile, or not payable
            await self._payments.settle(invoice_id, who, "refused", self._ttl, token=token)
            invoice = await self._stripe.retrieve("invoices", invoice_id)
            if invoice.get("status") != "paid":
                raise
            log.info("pay refused: invoice paid meanwhile", invoice=invoice_id, error=str(refused))
            return await self._not_ours(invoice, gateway, payment_id, amount, currency)
        except (CircuitOpen, Throttled):  # refused before it was sent: nothing happened
            await self._give_back(invoice_id, who, token, 0)
            raise
        except BaseException:  # no answer, a 5xx, cancelled: unknown; the call may still run at Stripe
            await self._give_back(invoice_id, who, token, 2 * self._stripe.timeout)
            raise
        await self._payments.settle(invoice_id, who, "paid", self._ttl)
        return ACK

    async def _give_back(self, invoice_id: str, who: str, token: str, hold: float) -> None:
        with anyio.CancelScope(shield=True), anyio.move_on_after(5), contextlib.suppress(DownstreamError):
            await self._payments.settle(invoice_id, who, "pending", self._ttl, token=token, hold=hold)

    async def _found_paid(
        self,
        invoice: dict[str, Any],
        record: PaymentRecord,
        gateway: str,
        payment_id: str,
        amount: int,
        currency: str,
    ) -> Outcome:
        """The invoice is paid: by this payment's own earlier call, or by someone else."""
        who, invoice_id = f"{gateway}:{payment_id}", str(invoice.get("id"))
        if record.leased and record.who == who:
            raise Busy(f"invoice {invoice_id} is being paid by {who}")  # its answer is on its way
        if not record.key:
            if not record.who and _ours_by_invoice(invoice, gateway, payment_id, 0):
                return ACK  # the records expired (dedup_ttl): the invoice still names this payment
            return await self._not_ours(invoice, gateway, payment_id, amount, currency, record)  # never called
        if record.now - record.sent < KEY_LIFETIME:
            try:  # Stripe answers the same key as it answered the call: ours, or not
                await self._stripe.pay_invoice_out_of_band(invoice_id, record.key)
            except DownstreamRejected:
                return await self._not_ours(invoice, gateway, payment_id, amount, currency, record)
            except DownstreamUnavailable as exc:
                if not _ours_by_invoice(invoice, gateway, payment_id, record.sent):
                    raise DownstreamUnavailable(
                        "stripe", f"cannot tell whether {who} paid invoice {invoice_id} yet: {exc.detail}"
                    ) from exc
            await self._payments.settle(invoice_id, who, "paid", self._ttl)
            return ACK
        if _ours_by_invoice(invoice, gateway, payment_id, record.sent):
            await self._payments.settle(invoice_id, who, "paid", self._ttl)
            return ACK
        return DeadLetter(
            f"invoice {invoice_id} is paid, and billingd's pay call for {gateway} payment {payment_id} of "
            f"{major_units(amount, currency)} is too old for Stripe to confirm: check the invoice's payment "
            "before refunding anything"
        )

    async def _not_ours(
        self,
        invoice: dict[str, Any],
        gateway: str,
        payment_id: str,
        amount: int,
        currency: str,
        record: PaymentRecord | None = None,
    ) -> Outcome:
        """A double collection: take this payment's mark off the invoice (it did not pay it)."""
        invoice_id = str(invoice.get("id"))
        if paid_by(invoice) == mark_of(gateway, payment_id):
            await self._stripe.update_invoice_metadata(
                invoice_id, {"billingd_gateway": "", "billingd_payment_id": ""},
                idempotency_key("unmark", invoice_id, gateway, payment_id),
            )  # fmt: skip
            invoice = {**invoice, "metadata": {}}
        earlier = paid_by(invoice)
        if earlier is None and record is not None and record.who and record.who != f"{gateway}:{payment_id}":
            holder = record.who.split(":", 1)
            earlier = (holder[0], holder[-1])
        by = f"{earlier[0]} payment {earlier[1]}" if earlier else "a payment billingd did not record"
        self._double_collected.labels(gateway).inc()
        log.warning("double collection", invoice=invoice_id, gateway=gateway, payment_id=payment_id, paid_by=by)
        return DeadLetter(
            f"invoice {invoice_id} already paid by {by}; {gateway} payment {payment_id} of "
            f"{major_units(amount, currency)} needs a refund"
        )


def _mark(gateway: str, payment_id: str) -> dict[str, str]:
    """The invoice metadata naming the payment that pays it (written before the pay call)."""
    gateway_, payment = mark_of(gateway, payment_id)
    return {"billingd_gateway": gateway_, "billingd_payment_id": payment}


def _ours_by_invoice(invoice: dict[str, Any], gateway: str, payment_id: str, sent: int) -> bool:
    """Past Stripe's key lifetime: paid out of band, carrying this payment's mark, and not before
    its call (`sent`, Unix s; 0: unknown, the records expired)."""
    if paid_by(invoice) != mark_of(gateway, payment_id) or invoice.get("paid_out_of_band") is not True:
        return False
    paid_at = (invoice.get("status_transitions") or {}).get("paid_at")
    return not sent or (isinstance(paid_at, int) and paid_at >= sent - CLOCK_SKEW)
