"""Reconciliation (issue 25): billingd's journal against the Stripe double's event summaries, with
the double refusing events later (error reports with samples), dropping some silently and
holding events of another producer. Every injected difference is found and nothing else; a fix
brings the open period's drift to 0; a second fix sends nothing new; a closed period's bucket is
reported for a credit note; billingd's own correction found wrong is cancelled."""

from __future__ import annotations

import random
import time
from collections import defaultdict

import pytest

from billingd.clients import Clients, Unguarded
from billingd.clients.ledger import UsageLedger
from billingd.clients.ledger.outbox import OutboxLedger
from billingd.metering.reconcile import Reconciler
from tests.support import amqp_source, make_settings, running, wait_for

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(180)]

METERS = {"ai_credits": "ai_credits", "email_send": "email_sends"}
CUSTOMERS = 12


def expected_differences(stripe_double, now: int) -> dict[tuple[str, str, int], int]:
    """billingd − Stripe per bucket, from what the double was told to do (independently of billingd)."""
    diff: dict[tuple[str, str, int], int] = defaultdict(int)
    for event in stripe_double.book.refused_later + stripe_double.book.dropped:
        diff[_bucket(event)] += int(event["payload"]["value"])
    for event in stripe_double.book.foreign_events:
        diff[_bucket(event)] -= int(event["payload"]["value"])
    return {k: v for k, v in diff.items() if v and k[2] < now // 3600}


def _bucket(event: dict) -> tuple[str, str, int]:
    stamp = event["timestamp"]
    if isinstance(stamp, str):
        import datetime as dt

        stamp = int(dt.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp())
    return event["payload"]["stripe_customer_id"], event["event_name"], int(stamp) // 3600


async def test_every_injected_difference_is_found_fixed_once_and_a_closed_period_is_reported(
    amqp, redis, stripe_double
):
    rng = random.Random(25)
    now = int(time.time())
    stripe_double.book.refuse_rate, stripe_double.book.drop_rate = 0.04, 0.03
    ledger = UsageLedger(redis, Unguarded("redis"))
    workspaces = [f"ws-rec-{i}" for i in range(CUSTOMERS)]
    for i, workspace in enumerate(workspaces):
        await ledger.set_customer(workspace, f"cus_rec{i}")
    closed = workspaces[0]  # its billing period began 2 hours ago: older buckets are invoiced
    await ledger.set_period(closed, now - 2 * 3600, now + 28 * 86400)
    bodies = []
    for n in range(600):
        workspace = workspaces[n % CUSTOMERS]
        event_type = "ai_credits" if n % 3 else "email_send"
        stamp = now - 3600 - rng.randrange(5 * 3600)  # spread over the 5 hours before the last one
        bodies.append({"event_type": event_type, "workspace_id": workspace, "value": rng.randint(1, 9),
                       "idempotency_key": f"r-{n}", "timestamp": stamp})  # fmt: skip
    source = amqp.track(amqp_source("usage", prefetch=50))
    stripe = {"api_key": "sk_test_rec", "api_base": stripe_double.url, "meters": METERS, "timeout": "2s"}
    settings = make_settings([source], stripe=stripe, reconcile={"settle": "0s"})
    async with running(settings) as daemon:
        await amqp.publish_many(source["exchange"], "usage", [(b["idempotency_key"], b) for b in bodies])
        await wait_for(lambda: daemon.metrics.outbox_sent._value.get() == len(bodies), timeout=60, what="sent")
    for _ in range(8):  # another producer writes to the same meters
        stripe_double.book.foreign(rng.choice(list(METERS.values())), f"cus_rec{rng.randrange(CUSTOMERS)}",
                                   rng.randint(1, 5), now - 3600 - rng.randrange(5 * 3600))  # fmt: skip
    refused = stripe_double.error_report_event()  # Stripe reports the refused events, with samples
    assert refused is not None and len(stripe_double.book.refused_later) > 0
    expected = expected_differences(stripe_double, now)
    assert len(expected) >= 10

    clients = Clients(settings.redis, settings.stripe, Unguarded)
    reconciler = Reconciler(clients.outbox, clients.stripe, clients.usage_ledger, settle=0, correct_within=72 * 3600,
                            keep=45 * 86400, meters=tuple(METERS.values()))  # fmt: skip
    try:
        report = await reconciler.run(since=now - 7 * 3600, until=now)
        found = {(d.customer, d.meter, d.hour): d.diff for d in report.differences}
        assert found == expected  # every injected difference, by customer, meter and hour — and nothing else
        assert report.customers == CUSTOMERS and report.compared >= len(found)

        fixed = await reconciler.run(since=now - 7 * 3600, until=now, fix=True)
        actions = defaultdict(int)
        for d in fixed.differences:
            actions[d.action] += 1
            if d.customer == "cus_rec0" and d.hour * 3600 < now - 2 * 3600:
                assert d.action == "needs a credit note"
        assert actions["corrected"] > 0 and actions["needs a credit note"] > 0
        sent = len(stripe_double.meter_events)

        again = await reconciler.run(since=now - 7 * 3600, until=now, fix=True)
        assert len(stripe_double.meter_events) == sent  # nothing new
        remaining = {(d.customer, d.meter, d.hour) for d in again.differences}
        assert all(d.action == "needs a credit note" for d in again.differences), remaining
        assert all(c == "cus_rec0" for c, _, _ in remaining)  # the open period's drift is 0
    finally:
        await clients.aclose()


async def test_a_second_fix_before_stripes_summaries_catch_up_sends_nothing_and_a_wrong_correction_is_cancelled(
    redis, stripe_double
):
    now = int(time.time())
    hour = now // 3600 - 2
    outbox = OutboxLedger(redis, Unguarded("redis"))
    day = hour * 3600 // 86400
    # billingd's journal says 10 for cus_lag's ai_credits in that hour; Stripe has 4 of it
    await redis.sadd(f"billingd:journal-index:{{{day}}}", "ws-lag")
    await redis.hset(f"billingd:journal:{{ws-lag}}:{day}", f"cus_lag|ai_credits|{hour}", 10)
    stripe_double.book.foreign("ai_credits", "cus_lag", 4, hour * 3600 + 60)["created"] = now - 7200  # long visible
    settings = make_settings([], stripe={"api_key": "sk_test_rec", "api_base": stripe_double.url,
                                         "meters": {"ai_credits": "ai_credits"}})  # fmt: skip
    clients = Clients(settings.redis, settings.stripe, Unguarded)
    reconciler = Reconciler(outbox, clients.stripe, clients.usage_ledger, settle=0, correct_within=72 * 3600,
                            keep=86400)  # fmt: skip
    try:
        first = await reconciler.run(since=now - 4 * 3600, until=now, fix=True)
        [d] = first.differences
        assert (d.billingd, d.stripe, d.action) == (10, 4, "corrected")
        stripe_double.book.visibility_lag = 3600.0  # the correction is not in Stripe's summaries yet
        requests = len(stripe_double.requests)
        second = await reconciler.run(since=now - 4 * 3600, until=now, fix=True)
        [d] = second.differences
        assert d.action == "sent before"
        assert not [r for r in stripe_double.requests[requests:] if r.method == "POST"]  # nothing new sent
        stripe_double.book.visibility_lag = 0.0
        # the late original arrives: Stripe now holds 6 too much — exactly billingd's correction
        stripe_double.book.foreign("ai_credits", "cus_lag", 6, hour * 3600 + 120)
        third = await reconciler.run(since=now - 4 * 3600, until=now, fix=True)
        [d] = third.differences
        assert (d.diff, d.action) == (-6, "cancelled")
        fourth = await reconciler.run(since=now - 4 * 3600, until=now)
        assert fourth.differences == []
    finally:
        await clients.aclose()
