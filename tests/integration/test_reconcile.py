"""Reconciliation (issue 25): billingd's journal against the Stripe double's event summaries, with
the double refusing events later (error reports with samples), dropping some silently and
holding events of another producer. Every injected difference is found and nothing else; a fix
brings the open period's drift to 0; a second fix sends nothing new; a closed period's bucket is
reported for a credit note; billingd's own correction found wrong is cancelled."""

from __future__ import annotations

import random
import time
from collections import defaultdict

import anyio
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
        later = now + 2 * 3600  # past settle + 1 hour: the correction is no longer "sent before"
        third = await reconciler.run(since=now - 4 * 3600, until=now, fix=True, now=later)
        [d] = third.differences
        assert (d.diff, d.action) == (-6, "cancelled")
        fourth = await reconciler.run(since=now - 4 * 3600, until=now, now=later)
        assert fourth.differences == []
    finally:
        await clients.aclose()


async def _journal(redis, subject: str, customer: str, meter: str, hour: int, value: int, touched: int = 0) -> None:
    """Write one journal bucket as the sender's acknowledgement does (`touched`: when it last grew)."""
    day = hour * 3600 // 86400
    await redis.sadd(f"billingd:journal-index:{{{day}}}", subject)
    await redis.hset(f"billingd:journal:{{{subject}}}:{day}", f"{customer}|{meter}|{hour}", value)
    if touched:
        await redis.hset(f"billingd:journal:{{{subject}}}:{day}", f"{customer}|{meter}|{hour}@", touched)


def _reconciler(clients, redis, settle: float = 0, meters=("ai_credits",)) -> Reconciler:
    return Reconciler(OutboxLedger(redis, Unguarded("redis")), clients.stripe, clients.usage_ledger, settle=settle,
                      correct_within=72 * 3600, keep=86400, meters=tuple(meters))  # fmt: skip


async def test_only_settled_hours_of_summed_meters_are_compared(redis, stripe_double):
    """An hour whose journal grew within `settle`, or with events still in the outbox, is left to a
    later run; a meter whose formula is not `sum` is not compared (Stripe counts events there)."""
    from billingd.clients.ledger.outbox import OutboxEvent, encode, outbox_key

    now = int(time.time())
    hour = now // 3600 - 3
    stripe_double.add_meter("ai_credits")
    stripe_double.add_meter("api_calls", formula="count")
    await _journal(redis, "ws-settle", "cus_settle", "ai_credits", hour, 5)  # settled: Stripe has none
    await _journal(redis, "ws-settle", "cus_settle", "ai_credits", hour - 1, 7, touched=now - 60)  # just grew
    await _journal(redis, "ws-settle", "cus_settle", "ai_credits", hour - 2, 2)
    await _journal(redis, "ws-settle", "cus_settle", "api_calls", hour, 3)
    waiting = OutboxEvent("ai_credits", "cus_settle", 4, (hour - 2) * 3600 + 5, "k-late", now - 30)
    await redis.hset(outbox_key("ws-settle"), "bd1-waiting", encode(waiting))  # sent, not journaled yet
    settings = make_settings([], stripe={"api_key": "sk_test_rec", "api_base": stripe_double.url,
                                         "meters": {"ai_credits": "ai_credits", "api_calls": "api_calls"}})  # fmt: skip
    clients = Clients(settings.redis, settings.stripe, Unguarded)
    try:
        report = await _reconciler(clients, redis, settle=3600, meters=("ai_credits", "api_calls")).run(
            since=now - 6 * 3600, until=now
        )
    finally:
        await clients.aclose()
    assert [(d.meter, d.hour, d.diff) for d in report.differences] == [("ai_credits", hour, 5)]
    assert report.unsettled == 2 and report.compared == 1
    assert report.skipped == {"api_calls": "formula count: Stripe does not add values up as the journal does"}


async def test_a_correction_stripe_never_counted_is_followed_by_the_next_and_a_failure_stays_its_hours(
    redis, stripe_double
):
    """A correction Stripe dropped (an asynchronous refusal) is "sent before" until settle + 1 hour
    has passed, then followed by the next correction, with a new identifier (Stripe would keep the
    first's). A fix that fails (Stripe's adjustments endpoint not served) is that hour's; the other
    hour is corrected in the same run, and the failed one on the next."""
    now = int(time.time())
    hour = now // 3600 - 2
    stripe_double.add_meter("ai_credits")
    await _journal(redis, "ws-drop", "cus_drop", "ai_credits", hour, 10)
    stripe_double.book.foreign("ai_credits", "cus_drop", 4, hour * 3600 + 60)
    settings = make_settings([], stripe={"api_key": "sk_test_rec", "api_base": stripe_double.url,
                                         "meters": {"ai_credits": "ai_credits"}, "timeout": "2s"})  # fmt: skip
    clients = Clients(settings.redis, settings.stripe, Unguarded)
    reconciler = _reconciler(clients, redis)
    window = {"since": now - 4 * 3600, "until": now, "fix": True}
    try:
        [first] = (await reconciler.run(**window)).differences
        assert (first.diff, first.action) == (6, "corrected")
        [event] = [e for e in stripe_double.meter_events if e["identifier"] == first.correction]
        stripe_double.meter_events.remove(event)  # Stripe refused it later: never counted
        [again] = (await reconciler.run(**window)).differences
        assert (again.diff, again.action, again.correction) == (6, "sent before", first.correction)
        [later] = (await reconciler.run(**window, now=now + 2 * 3600)).differences
        assert (later.diff, later.action) == (6, "corrected") and later.correction != first.correction
        assert (await reconciler.run(**window, now=now + 2 * 3600 + 60)).differences == []  # Stripe counted it

        # Stripe now holds 6 too much (the dropped original turned up), and another hour differs
        stripe_double.book.foreign("ai_credits", "cus_drop", 6, hour * 3600 + 120)
        await _journal(redis, "ws-drop", "cus_other", "ai_credits", hour, 3)
        stripe_double.unserved = ("/v1/billing/meter_event_adjustments",)
        posts = len(stripe_double.meter_events)
        report = await reconciler.run(**window, now=now + 4 * 3600)
        actions = {d.customer: d.action for d in report.differences}
        assert actions["cus_other"] == "corrected" and len(stripe_double.meter_events) == posts + 1
        assert actions["cus_drop"].startswith("failed: "), actions
        stripe_double.unserved = ()
        retried = await reconciler.run(**window, now=now + 4 * 3600 + 60)
        [d] = [d for d in retried.differences if d.customer == "cus_drop"]
        assert (d.diff, d.action, d.correction) == (-6, "cancelled", later.correction)
    finally:
        await clients.aclose()


async def test_periods_roll_forward_and_an_hour_older_than_stripes_35_days_needs_an_invoice_item(redis, stripe_double):
    """A stored period that has passed is rolled forward by its interval (as the usage script
    rolls it on the next event); an open yearly period's hour older than Stripe's 35 days for meter
    events is reported, never sent (Stripe would refuse it)."""
    now = int(time.time())
    ledger = UsageLedger(redis, Unguarded("redis"))
    await ledger.set_period("ws-roll", now - 70 * 86400, now - 40 * 86400, "month")
    start, end = await ledger.period("ws-roll")
    assert start <= now < end and now - start < 32 * 86400
    await ledger.set_period("ws-year", now - 100 * 86400, now + 265 * 86400, "year")
    old = (now - 40 * 86400) // 3600
    await _journal(redis, "ws-year", "cus_year", "ai_credits", old, 9)
    stripe_double.add_meter("ai_credits")
    settings = make_settings([], stripe={"api_key": "sk_test_rec", "api_base": stripe_double.url,
                                         "meters": {"ai_credits": "ai_credits"}})  # fmt: skip
    clients = Clients(settings.redis, settings.stripe, Unguarded)
    try:
        report = await _reconciler(clients, redis).run(since=now - 41 * 86400, until=now, fix=True)
    finally:
        await clients.aclose()
    [d] = report.differences
    assert (d.hour, d.diff, d.action) == (old, 9, "needs an invoice item")
    assert stripe_double.meter_events == []


async def test_one_replica_reconciles_per_interval(redis, stripe_double):
    """The periodic run: a replica that finds a run finished within the interval skips its own."""
    from billingd.metering.service import _reconcile_forever
    from billingd.telemetry import Metrics

    stripe_double.add_meter("ai_credits")
    stripe = {"api_key": "sk_test_rec", "api_base": stripe_double.url, "meters": {"ai_credits": "ai_credits"}}
    settings = make_settings([], stripe=stripe, reconcile={"interval": "1h"})
    await redis.delete("billingd:lease:{reconcile}", "billingd:last-run:{reconcile}")
    clients = Clients(settings.redis, settings.stripe, Unguarded)
    replicas = [Metrics("test") for _ in range(3)]

    def runs(metrics: Metrics, result: str) -> float:
        return metrics.reconcile_runs.labels(result)._value.get()

    try:
        for n, metrics in enumerate(replicas):
            async with anyio.create_task_group() as tg:
                tg.start_soon(_reconcile_forever, settings, clients, metrics)
                await wait_for(lambda m=metrics: runs(m, "ok") + runs(m, "skipped") + runs(m, "error") > 0,
                               timeout=30, what="a first attempt")  # fmt: skip
                tg.cancel_scope.cancel()
            await redis.delete("billingd:lease:{reconcile}")  # as if the replica had stopped for good
            if n == 1:
                await redis.set("billingd:last-run:{reconcile}", time.time() - 4000)  # the interval passed
        assert [(runs(m, "ok"), runs(m, "skipped")) for m in replicas] == [(1, 0), (0, 1), (1, 0)]
    finally:
        await clients.aclose()


async def test_inline_delivery_is_journaled_once_and_reconciles_clean(amqp, redis, stripe_double):
    """`meter_delivery = "inline"`: what Stripe accepted is journaled with the message's once-step —
    a redelivered copy adds nothing — so reconciliation proves inline mode too."""
    now = int(time.time())
    workspace = f"ws-inline-{now}"
    await UsageLedger(redis, Unguarded("redis")).set_customer(workspace, "cus_inline")
    bodies = [{"event_type": "ai_credits", "workspace_id": workspace, "value": n % 4 + 1,
               "idempotency_key": f"in-{n}", "timestamp": now - 3600 - n * 300} for n in range(12)]  # fmt: skip
    source = amqp.track(amqp_source("usage", prefetch=4))
    stripe = {"api_key": "sk_test_rec", "api_base": stripe_double.url, "meters": {"ai_credits": "ai_credits"},
              "meter_delivery": "inline", "timeout": "2s"}  # fmt: skip
    settings = make_settings([source], stripe=stripe, reconcile={"settle": "0s"})
    async with running(settings) as daemon:
        copies = [(b["idempotency_key"], b) for b in bodies] * 2  # every message twice
        await amqp.publish_many(source["exchange"], "usage", copies)
        acked = daemon.metrics.processed.labels(source["name"], "ack")
        await wait_for(lambda: acked._value.get() == len(copies), timeout=60, what="every copy acked")
    assert len(stripe_double.meter_events) == len(bodies)
    outbox = OutboxLedger(redis, Unguarded("redis"))
    journaled = 0
    for day in {b["timestamp"] // 86400 for b in bodies}:
        journaled += sum(value for value, _ in (await outbox.journal(workspace, day)).values())
    assert journaled == sum(b["value"] for b in bodies)
    clients = Clients(settings.redis, settings.stripe, Unguarded)
    try:
        report = await _reconciler(clients, redis).run(since=now - 6 * 3600, until=now, customer="cus_inline")
    finally:
        await clients.aclose()
    hours = {b["timestamp"] // 3600 for b in bodies}  # one or two clock hours, by when the test runs
    assert report.differences == [] and report.compared >= len(hours)
