"""`payment_events` (seed 004): Razorpay, manual and Zoho payments reconcile Stripe invoices."""

from __future__ import annotations

import anyio
import pytest

from tests.signing import razorpay_relay
from tests.support import make_settings, running, sqs_source, unique, wait_for

pytestmark = [pytest.mark.anyio, pytest.mark.redis_backends, pytest.mark.usefixtures("redis_backend")]

SECRET = "rzp_whsec_test"


def captured(payment_id: str, amount: int, notes) -> dict:
    """A Razorpay `payment.captured` webhook (Razorpay docs, "Payment Webhook Payloads")."""
    return {
        "entity": "event",
        "account_id": "acc_1",
        "event": "payment.captured",
        "contains": ["payment"],
        "payload": {
            "payment": {
                "entity": {
                    "id": payment_id,
                    "entity": "payment",
                    "amount": amount,
                    "currency": "INR",
                    "status": "captured",
                    "method": "upi",
                    "notes": notes,
                }
            }
        },
        "created_at": 1700000000,
    }


async def reconcile(sqs, stripe_double, messages, *, ack, dead=0, _flush_once=False, **overrides):
    if _flush_once:  # forget billingd's once-records, as dedup_ttl would
        from tests.support import RedisTarget

        client = RedisTarget.client()
        for pattern in ("billingd:once:*", "billingd:payment:*"):
            async for key in client.scan_iter(match=pattern):
                await client.delete(key)
        await client.aclose()
    url, dlq = await sqs.queue()
    source = sqs_source("payment_events", url, dlq, sqs.endpoint, **overrides)
    for message in messages:
        await sqs.send(url, message)
    settings = make_settings(
        [source],
        stripe={"api_key": "sk_test_billingd", "api_base": stripe_double.url, "timeout": "2s"},
        razorpay={"key_id": "rzp_test", "key_secret": "s", "webhook_secret": SECRET},
    )
    async with running(settings) as daemon:
        processed = daemon.metrics.processed
        await wait_for(lambda: processed.labels(source["name"], "ack")._value.get() == ack, timeout=30, what="acked")
        await wait_for(lambda: processed.labels(source["name"], "dead_letter")._value.get() == dead, what="dead")
        await wait_for(lambda: _depth(sqs, dlq, dead), what="DLQ depth")
        registry = daemon.metrics.registry
        doubles = {
            gateway: registry.get_sample_value(
                "billingd_payments_double_collected_total", {"source": source["name"], "gateway": gateway}
            )
            for gateway in ("razorpay", "manual", "zoho")
        }
    reasons = [m["MessageAttributes"]["reason"]["StringValue"] for m in await sqs.take(dlq)]
    return reasons, {gateway: n for gateway, n in doubles.items() if n}


async def _depth(sqs, url, n) -> bool:
    return await sqs.depth(url) == n


async def test_a_capture_delivered_three_times_with_stripe_failing_pays_once(sqs, stripe_double):
    invoice = unique("in").replace("-", "_")
    stripe_double.invoice(invoice, 150000, "inr")
    capture = razorpay_relay(captured("pay_abc", 150000, {"stripe_invoice_id": invoice}), SECRET, "evt_rzp_1")
    stripe_double.fail_next(2, 500)  # Stripe fails between the steps: the retries must not pay twice
    await reconcile(sqs, stripe_double, [capture, capture, capture], ack=3)
    assert stripe_double.payments == [invoice]
    paid = stripe_double.objects["invoices"][invoice]
    assert (paid["status"], paid["paid_out_of_band"], paid["amount_remaining"]) == ("paid", True, 0)
    assert paid["metadata"] == {"billingd_gateway": "razorpay", "billingd_payment_id": "pay_abc"}
    pay_keys = {r.headers.get("Idempotency-Key") for r in stripe_double.requests if r.path.endswith("/pay")}
    assert pay_keys and all(k.startswith(f"billingd-pay-{invoice}-") for k in pay_keys)  # one per claim


async def test_mismatches_bad_signatures_and_missing_notes_go_to_finance_unpaid(sqs, stripe_double):
    short, dollars, forged = (unique("in").replace("-", "_") for _ in range(3))
    stripe_double.invoice(short, 150000, "inr")
    stripe_double.invoice(dollars, 150000, "usd")
    stripe_double.invoice(forged, 5000, "inr")
    bad_signature = razorpay_relay(captured("pay_forged", 5000, {"stripe_invoice_id": forged}), "not-the-secret", "e4")
    messages = [
        razorpay_relay(captured("pay_short", 149000, {"stripe_invoice_id": short}), SECRET, "e1"),
        {"gateway": "manual", "stripe_invoice_id": dollars, "reference": "UTR123", "amount": 150000, "currency": "inr"},
        razorpay_relay(captured("pay_nonotes", 100, []), SECRET, "e3"),  # notes as an empty list
        bad_signature,
    ]
    reasons = sorted((await reconcile(sqs, stripe_double, messages, ack=0, dead=4))[0])
    assert reasons == sorted(
        [
            f"amount mismatch: razorpay payment pay_short is 149000 INR, invoice {short} has 150000 INR remaining",
            f"amount mismatch: manual payment UTR123 is 150000 INR, invoice {dollars} has 150000 USD remaining",
            "Razorpay payment pay_nonotes has no notes.stripe_invoice_id: reconcile it by hand",
            "X-Razorpay-Signature verification failed",
        ]
    )
    assert stripe_double.payments == []
    assert stripe_double.objects["invoices"][forged]["status"] == "open"


async def test_manual_and_zoho_payments_reconcile(sqs, stripe_double):
    bank, zoho = (unique("in").replace("-", "_") for _ in range(2))
    stripe_double.invoice(bank, 150000, "inr")
    stripe_double.invoice(zoho, 99900, "inr")
    messages = [
        {"gateway": "manual", "stripe_invoice_id": bank, "reference": "UTR998877", "amount": 150000, "currency": "inr"},
        {"gateway": "zoho", "stripe_invoice_id": zoho, "payment_id": "zp_1", "amount": 99900, "currency": "INR"},
        razorpay_relay({"entity": "event", "event": "payment.failed", "payload": {}}, SECRET, "e9"),  # ignored
    ]
    await reconcile(sqs, stripe_double, messages, ack=3)
    assert sorted(stripe_double.payments) == sorted([bank, zoho])
    assert stripe_double.objects["invoices"][bank]["metadata"]["billingd_payment_id"] == "UTR998877"
    assert stripe_double.objects["invoices"][zoho]["metadata"]["billingd_gateway"] == "zoho"


async def test_a_second_payment_of_a_paid_invoice_is_a_double_collection_for_finance_and_a_replay_is_not(
    sqs, stripe_double
):
    """Issue 10: the customer paid twice; finance must refund one. Never acked silently."""
    invoice, elsewhere = unique("in").replace("-", "_"), unique("in").replace("-", "_")
    stripe_double.invoice(invoice, 150000, "inr")
    stripe_double.invoice(elsewhere, 5000, "inr", status="paid", amount_remaining=0)  # paid in Stripe directly
    first = razorpay_relay(captured("pay_first", 150000, {"stripe_invoice_id": invoice}), SECRET, "e1")
    await reconcile(sqs, stripe_double, [first], ack=1)
    # the once-records are gone (dedup_ttl passed): a replay of our own payment must still ack
    second = {
        "gateway": "manual",
        "stripe_invoice_id": invoice,
        "reference": "UTR555",
        "amount": 150000,
        "currency": "inr",
    }
    outside = {
        "gateway": "zoho",
        "stripe_invoice_id": elsewhere,
        "payment_id": "zp_2",
        "amount": 5000,
        "currency": "inr",
    }
    reasons, doubles = await reconcile(sqs, stripe_double, [first, second, outside], ack=1, dead=2, _flush_once=True)
    assert sorted(reasons) == sorted(
        [
            f"invoice {invoice} already paid by razorpay payment pay_first; manual payment UTR555 of "
            "1,500.00 INR needs a refund",
            f"invoice {elsewhere} already paid by a payment billingd did not record; zoho payment zp_2 of "
            "50.00 INR needs a refund",
        ]
    )
    assert stripe_double.payments == [invoice]  # paid once, by the first payment
    assert doubles == {"manual": 1, "zoho": 1}  # counted; our own replay is not


@pytest.mark.parametrize("loss", ["reply", "saved_500"])
async def test_a_pay_reply_lost_after_stripe_paid_is_this_payments_own(sqs, stripe_double, loss):
    """Issue 24, item 1: Stripe paid, the reply was lost (or Stripe saved a 500 for the key after
    paying). Before: the retry found the invoice paid without billingd's note and dead-lettered
    "needs a refund"."""
    invoice = unique("in").replace("-", "_")
    stripe_double.invoice(invoice, 150000, "inr")
    if loss == "reply":
        stripe_double.lose_pay_replies = 1
    else:
        stripe_double.saved_500s = 1
    capture = razorpay_relay(captured("pay_lost", 150000, {"stripe_invoice_id": invoice}), SECRET, "evt_lost")
    reasons, doubles = await reconcile(sqs, stripe_double, [capture], ack=1)
    assert reasons == [] and doubles == {}
    assert stripe_double.payments == [invoice]


async def test_copies_of_one_capture_handled_at_once_make_one_pay_call(sqs, stripe_double):
    """Issue 24, item 1: copies on several workers at once — one pays, the others wait and ack."""
    from billingd.testing.stripe import StripeContract

    stripe_double.contract = StripeContract(latency=0.15)
    invoice = unique("in").replace("-", "_")
    stripe_double.invoice(invoice, 150000, "inr")
    capture = razorpay_relay(captured("pay_twice", 150000, {"stripe_invoice_id": invoice}), SECRET, "evt_twice")
    reasons, _ = await reconcile(sqs, stripe_double, [capture] * 4, ack=4)
    assert reasons == []
    assert stripe_double.payments == [invoice]
    assert len([r for r in stripe_double.requests if r.path.endswith("/pay") and r.status == 200]) == 1


async def test_stripe_keys_stay_within_stripes_limits_whatever_the_reference(sqs, stripe_double):
    """Issue 24, item 2: `billingd-pay-<gateway>-<reference>` took the reference whole; Stripe
    refuses an Idempotency-Key over 255 characters, so a long bank reference was dead-lettered."""
    invoice, reference = unique("in").replace("-", "_"), "UTR" + "7" * 700
    stripe_double.invoice(invoice, 150000, "inr")
    manual = {"gateway": "manual", "stripe_invoice_id": invoice, "reference": reference, "amount": 150000,
              "currency": "inr"}  # fmt: skip
    reasons, _ = await reconcile(sqs, stripe_double, [manual, manual], ack=2)
    assert reasons == [] and stripe_double.payments == [invoice]
    assert all(len(r.headers.get("Idempotency-Key", "")) <= 255 for r in stripe_double.requests)
    assert len(stripe_double.objects["invoices"][invoice]["metadata"]["billingd_payment_id"]) <= 500


async def test_a_card_payment_after_our_call_never_reached_stripe_is_a_double_collection(sqs, stripe_double):
    """The review of issue 24: billingd marked the invoice, its pay call was refused before it was
    sent (a 429), then the customer paid the invoice by card. The mark alone must not make the
    card payment billingd's own: replaying billingd's pay call proves it was not."""
    invoice = unique("in").replace("-", "_")
    stripe_double.invoice(invoice, 150000, "inr")
    stripe_double.pay_429s = 1
    manual = {"gateway": "manual", "stripe_invoice_id": invoice, "reference": "UTR-CARD", "amount": 150000,
              "currency": "inr"}  # fmt: skip

    async def card_payment_after_the_429() -> None:
        await wait_for(lambda: any(r.status == 429 for r in stripe_double.requests), what="the 429")
        stripe_double.objects["invoices"][invoice].update(status="paid", paid_out_of_band=False, amount_remaining=0)

    async with anyio.create_task_group() as tg:
        tg.start_soon(card_payment_after_the_429)
        reasons, doubles = await reconcile(sqs, stripe_double, [manual], ack=0, dead=1)
    assert reasons == [f"invoice {invoice} already paid by a payment billingd did not record; manual payment "
                       "UTR-CARD of 1,500.00 INR needs a refund"]  # fmt: skip
    assert doubles == {"manual": 1}
    assert stripe_double.payments == []  # billingd never paid it
    assert stripe_double.objects["invoices"][invoice]["metadata"].get("billingd_payment_id") in (None, "")
