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
        invoice = unique("in").replace("-", "_")
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


def usage_settings(source, stripe_double, **stripe):
    return make_settings(
        [source],
        stripe={**STRIPE, "api_base": stripe_double.url, "meters": {"ai_credits": "ai_credits"}, **stripe},
        daemon={"log_level": "info"},
    )


async def test_two_tenants_with_the_same_key_are_both_billed(sqs, stripe_double, redis, tmp_path):
    """Before: Stripe's identifier was the bare key, unique per account: of two workspaces both
    sending idempotency_key "1", Stripe kept one (stream) or billingd dead-lettered the second
    after Redis had counted it (v1). A 300-character key was counted, then refused by Stripe."""
    from billingd.clients import Unguarded
    from billingd.clients.ledger import UsageLedger

    url, dlq = await sqs.queue()
    source = sqs_source("usage", url, dlq, sqs.endpoint)
    ledger = UsageLedger(redis, Unguarded("redis"))
    tenants = {unique("ws"): unique("cus").replace("-", "_") for _ in range(2)}
    bodies = []
    for workspace, customer in tenants.items():
        await ledger.set_customer(workspace, customer)
        for key in ("1", "k" * 300):
            bodies.append({"event_type": "ai_credits", "workspace_id": workspace, "value": 2, "idempotency_key": key})
    for body in bodies:
        await sqs.send(url, body)
    async with Process(tmp_path, usage_settings(source, stripe_double)) as billingd:
        await wait_for(lambda: _at_least(billingd.processed(source["name"], "ack"), 4), timeout=60, what="acked")
        dead = await billingd.processed(source["name"], "dead_letter")
        await wait_for(lambda: len(stripe_double.meter_events) >= 4, timeout=60, what="the outbox sent")
    assert dead == 0
    billed = {(e["payload"]["stripe_customer_id"], e["identifier"]) for e in stripe_double.meter_events}
    assert len(billed) == 4  # each tenant's two events, none taken for the other's
    assert {customer for customer, _ in billed} == set(tenants.values())
    assert all(len(identifier) <= 100 for _, identifier in billed)
    for workspace in tenants:
        assert (await ledger.counter(workspace, "ai_credits"))[0] == 4_000_000


async def test_a_stripe_that_does_not_serve_the_stream_holds_usage_instead_of_dead_lettering_it(
    sqs, stripe_double, redis, tmp_path
):
    """Before: a 404 for the stream endpoints (a proxy or mock without them) was a permanent
    refusal, and one run turned 4,775 valid usage events into dead letters."""
    from billingd.clients import Unguarded
    from billingd.clients.ledger import UsageLedger

    url, dlq = await sqs.queue()
    source = sqs_source("usage", url, dlq, sqs.endpoint, max_attempts=2)
    workspace = unique("ws")
    await UsageLedger(redis, Unguarded("redis")).set_customer(workspace, "cus_404")
    stripe_double.unserved = ("/v2/",)
    keys = [f"k-{i}" for i in range(8)]
    for key in keys:
        await sqs.send(url, {"event_type": "ai_credits", "workspace_id": workspace, "value": 1, "idempotency_key": key})
    async with Process(tmp_path, usage_settings(source, stripe_double)) as billingd:
        await wait_for(
            lambda: _equals(billingd.metric("billingd_circuit_breaker_state", breaker="stripe"), 2),
            timeout=30,
            what="the stripe breaker open",
        )
        await anyio.sleep(2)  # probes keep meeting the 404
        assert await billingd.processed(source["name"], "dead_letter") == 0
        stripe_double.unserved = ()  # the proxy fixed
        await wait_for(lambda: _at_least(billingd.processed(source["name"], "ack"), 8), timeout=60, what="acked")
        dead = await billingd.processed(source["name"], "dead_letter")
        await wait_for(lambda: len(stripe_double.meter_events) == 8, timeout=60, what="the outbox sent")
    assert dead == 0 and await sqs.depth(dlq) == 0
    opened = [line for line in billingd.stderr.splitlines() if "circuit breaker open" in line and "stripe" in line]
    assert opened and "Unrecognized request URL" in opened[0] and "fix:" in opened[0], billingd.stderr[-3000:]


async def _equals(value, expected: float) -> bool:
    return await value == expected


async def test_check_lists_stripes_meters_and_refuses_a_map_to_a_missing_one(stripe_double, tmp_path, sqs):
    """Item 5: `billingd check` (online) asks Stripe for its meters; a `[stripe].meters` value
    that names no active meter is a configuration error (exit 78), naming the key and the fix."""
    import os
    import subprocess
    import sys

    from tests.support import settings_tree, to_toml

    stripe_double.add_meter("email_sends", status="inactive")
    url, dlq = await sqs.queue()
    source = sqs_source("usage", url, dlq, sqs.endpoint)
    meters = {"ai_credits": "ai_credits", "email_send": "email_sends", "sms": "sms_segments"}
    config = tmp_path / "billingd.toml"
    config.write_text(to_toml(settings_tree(usage_settings(source, stripe_double, meters=meters))))
    result = await anyio.to_thread.run_sync(
        lambda: subprocess.run(
            [sys.executable, "-m", "billingd", "check", "--config", str(config)],
            capture_output=True,
            text=True,
            env={**os.environ, **SECRETS},
            timeout=60,
        )
    )
    assert result.returncode == 78, result.stdout + result.stderr
    assert "meters of the account: ai_credits (active)" in result.stdout
    assert "stripe.meters.email_send: Stripe has meter" in result.stderr and "is inactive" in result.stderr
    assert "stripe.meters.sms: Stripe has no meter with event_name 'sms_segments'" in result.stderr
    assert "stripe.meters.ai_credits" not in result.stderr


async def test_a_ten_minute_backlog_of_relayed_webhooks_is_applied(sqs, stripe_double, redis, tmp_path):
    """Item 8. Before: every relayed Stripe webhook older than 5 minutes when billingd reached it
    (a backlog, a paused source, a retry, a DLQ replay) was dead-lettered, and never could pass."""
    import time

    from billingd.clients import Unguarded
    from billingd.clients.ledger.subscriptions import SubscriptionLedger
    from tests.signing import stripe_event, stripe_relay

    url, dlq = await sqs.queue()
    source = sqs_source("stripe_events", url, dlq, sqs.endpoint)
    signed = int(time.time()) - 600
    workspaces = [unique("ws") for _ in range(6)]
    for n, workspace in enumerate(workspaces):
        customer = {"id": f"cus_{workspace}", "object": "customer", "metadata": {"workspace_id": workspace}}
        relay = stripe_relay(stripe_event("customer.updated", customer, signed + n), SECRETS["STRIPE_WEBHOOK_SECRET"],
                             timestamp=signed)  # fmt: skip
        await sqs.send(url, relay)
    settings = make_settings([source], stripe={**STRIPE, "api_base": stripe_double.url})
    async with Process(tmp_path, settings) as billingd:
        await wait_for(lambda: _at_least(billingd.processed(source["name"], "ack"), 6), timeout=60, what="applied")
        dead = await billingd.processed(source["name"], "dead_letter")
    assert dead == 0 and await sqs.depth(dlq) == 0
    subscriptions = SubscriptionLedger(redis, Unguarded("redis"))
    for workspace in workspaces:
        assert await subscriptions.subject_of(f"cus_{workspace}") == workspace
