"""Money at the edges, end to end through `billingd run` (issue 24): a real billingd process, SQS
(moto), Redis and the Stripe double keeping Stripe's contract. Each test's "before" is what the
previous code did with the same traffic."""

from __future__ import annotations

import random

import anyio
import pytest

from tests.integration.test_payment_events import SECRET, captured
from tests.signing import razorpay_relay
from tests.support import http_ready, make_settings, scrape, sqs_source, start_billingd, unique, wait_for

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(180)]

#: Secrets come from the environment only (billingd refuses them written in the file).
SECRETS = {"STRIPE_SECRET_KEY": "sk_test_billingd", "RAZORPAY_KEY_SECRET": "s", "RAZORPAY_WEBHOOK_SECRET": SECRET,
           "STRIPE_WEBHOOK_SECRET": "whsec_edges"}  # fmt: skip
STRIPE = {"api_key": "${STRIPE_SECRET_KEY}", "webhook_secret": "${STRIPE_WEBHOOK_SECRET}", "timeout": "2s"}
RAZORPAY = {
    "key_id": "rzp_test",
    "key_secret": "${RAZORPAY_KEY_SECRET}",
    "webhook_secret": "${RAZORPAY_WEBHOOK_SECRET}",
}


class Process:
    """`billingd run` on `settings`, stopped with SIGTERM at the end; `stderr` once stopped."""

    def __init__(self, tmp_path, settings) -> None:
        self.settings, self.port = settings, settings.http.port
        self.process = start_billingd(tmp_path, settings, **SECRETS)
        self.stderr = ""

    async def __aenter__(self) -> Process:
        try:
            await wait_for(lambda: self._ready(), timeout=30, what="billingd ready")
        except BaseException:
            self.process.kill()
            raise
        return self

    async def _ready(self) -> bool:
        if self.process.poll() is not None:
            stderr = self.process.stderr.read().decode() if self.process.stderr else ""
            raise AssertionError(f"billingd exited {self.process.returncode}: {stderr[-3000:]}")
        return await http_ready(self.port)

    async def __aexit__(self, *_: object) -> None:
        self.process.terminate()
        await anyio.to_thread.run_sync(self.process.wait, 30)
        self.stderr = self.process.stderr.read().decode() if self.process.stderr else ""

    async def processed(self, source: str, outcome: str) -> float:
        sample = ("billingd_messages_processed_total", (("outcome", outcome), ("source", source)))
        return (await scrape(self.port)).get(sample, 0)

    async def metric(self, name: str, **labels: str) -> float:
        return (await scrape(self.port)).get((name, tuple(sorted(labels.items()))), 0)


async def test_payments_sent_twice_while_stripe_fails_are_each_paid_once_and_none_is_a_false_refund(
    sqs, stripe_double, redis, tmp_path
):
    """Before: with Stripe answering 500 for 4 s, 3 to 6 of 20 payments were dead-lettered as
    "already paid by a payment billingd did not record; … needs a refund"."""
    url, dlq = await sqs.queue()
    source = sqs_source("payment_events", url, dlq, sqs.endpoint, max_attempts=3)
    messages, invoices = [], []
    for i in range(20):
        invoice = unique("in")
        stripe_double.invoice(invoice, 1000 + i, "inr")
        invoices.append(invoice)
        if i % 2:
            messages.append(
                razorpay_relay(captured(f"pay_{i}", 1000 + i, {"stripe_invoice_id": invoice}), SECRET, f"e{i}")
            )
        else:
            messages.append({"gateway": "manual", "stripe_invoice_id": invoice, "reference": f"UTR{i}",
                             "amount": 1000 + i, "currency": "inr"})  # fmt: skip
    messages += random.Random(7).sample(messages, 6)  # six sent twice
    stripe_double.lose_pay_replies = 3  # three pay calls succeed and answer 500
    settings = make_settings(
        [source],
        stripe={**STRIPE, "api_base": stripe_double.url},
        razorpay=RAZORPAY,
        daemon={"log_level": "info"},
    )
    async with Process(tmp_path, settings) as billingd:
        stripe_double.set_mode("error", 500)
        for message in messages:
            await sqs.send(url, message)
        await anyio.sleep(4)  # Stripe answers 500 for 4 s
        stripe_double.set_mode("ok")
        await wait_for(
            lambda: _at_least(billingd.processed(source["name"], "ack"), len(messages)), timeout=90, what="all acked"
        )
        double_collected = sum([
            await billingd.metric("billingd_payments_double_collected_total", source=source["name"], gateway=g)
            for g in ("razorpay", "manual")
        ])  # fmt: skip
        dead = await billingd.processed(source["name"], "dead_letter")
    assert sorted(stripe_double.payments) == sorted(invoices)  # each invoice paid, and once
    assert dead == 0 and double_collected == 0
    assert await sqs.depth(dlq) == 0
    assert "needs a refund" not in billingd.stderr


async def _at_least(value, n: float) -> bool:
    return await value >= n
