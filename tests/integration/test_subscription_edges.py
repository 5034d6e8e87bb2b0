"""Subscription events at the edges of their versions (issue 24, item 9), on the ledger and real
Redis (single and Cluster): a tie with a deletion, two events of one subject at once, and an event
older than an applied renewal."""

from __future__ import annotations

import time
from functools import partial

import anyio
import pytest

from billingd.clients import Unguarded
from billingd.clients.ledger import MICROS, UsageLedger, key
from billingd.clients.ledger.subscriptions import Grant, SubscriptionLedger
from tests.support import unique

pytestmark = [pytest.mark.anyio, pytest.mark.redis_backends, pytest.mark.usefixtures("redis_backend")]

MONTH = 30 * 86400


def grant(key: str, start: int, limit: int = 10) -> Grant:
    return Grant(key, limit * MICROS, "month", start, start + MONTH)


async def apply(ledger: SubscriptionLedger, subject: str, version: int, grants: list[Grant], start: int,
                subscription: str = "sub_1", status: str = "active", created: int = 0) -> bool:  # fmt: skip
    return await ledger.apply_subscription(
        subject, version=version, subscription_id=subscription, status=status, active=status == "active",
        period_start=start, period_end=start + MONTH, interval="month", grants=grants, created=created,
    )  # fmt: skip


async def test_an_update_in_the_same_second_as_the_deletion_does_not_bring_it_back(redis):
    """Before: a `subscription.updated` (active) arriving after the `deleted` with the same
    `created` second reactivated every entitlement of the cancelled subscription."""
    ledger, subject, start = SubscriptionLedger(redis, Unguarded("redis")), unique("ws"), int(time.time())
    await apply(ledger, subject, 100, [grant("A", start)], start)
    await ledger.deactivate(subject, version=200, subscription_id="sub_1", status="canceled")
    assert not await apply(ledger, subject, 200, [grant("A", start)], start)  # the tie: changes nothing
    assert (await UsageLedger(redis, Unguarded("redis")).entitlement(subject, "A"))["active"] == "0"
    assert await apply(ledger, subject, 200, [grant("B", start)], start, subscription="sub_2")  # a new one may
    assert await apply(ledger, subject, 201, [grant("A", start)], start)  # a newer event of the old one may


async def test_two_events_of_one_subject_at_once_leave_nothing_active_after_the_cancellation(redis):
    """Before: each read the keys to grant or deactivate outside its script, so a deactivation
    racing an update that granted a new key left that key active forever."""
    subject, start = unique("ws"), int(time.time())
    first = SubscriptionLedger(redis, Unguarded("redis"))
    await apply(first, subject, 100, [grant("A", start)], start)
    for round_ in range(20):  # two replicas: an upgrade granting B and the cancellation, at once
        replica_a, replica_b = (
            SubscriptionLedger(redis, Unguarded("redis")),
            SubscriptionLedger(redis, Unguarded("redis")),
        )
        version = 1000 + 10 * round_
        async with anyio.create_task_group() as tg:
            tg.start_soon(partial(apply, replica_a, subject, version, [grant("A", start), grant("B", start)], start))
            tg.start_soon(
                partial(replica_b.deactivate, subject, version=version + 1, subscription_id="sub_1", status="paused")
            )
        usage = UsageLedger(redis, Unguarded("redis"))
        for name in ("A", "B"):
            assert (await usage.entitlement(subject, name)).get("active") == "0", (round_, name)
        await apply(first, subject, version + 2, [grant("A", start)], start)  # resumed with A alone


async def test_a_subscription_event_older_than_a_renewal_keeps_the_renewals_period_and_usage(redis):
    """Before: an older `subscription.updated` reset `used` to the old period's start, granting the
    new period's quota a second time."""
    ledger, usage = SubscriptionLedger(redis, Unguarded("redis")), UsageLedger(redis, Unguarded("redis"))
    subject = unique("ws")
    old = int(time.time()) - MONTH // 2
    new = old + MONTH
    await apply(ledger, subject, 100, [grant("A", old)], old)
    await ledger.renew(subject, version=300, start=new, end=new + MONTH, interval="month")  # invoice.paid
    await usage.apply(subject, "A", 7 * MICROS, "u1", consume=True, now=new + 60, dedup_ttl=60)
    assert await apply(ledger, subject, 200, [grant("A", old, limit=12)], old)  # older than the renewal
    entitlement = await usage.entitlement(subject, "A")
    assert (entitlement["period_start"], entitlement["used"]) == (str(new), str(7 * MICROS))
    assert entitlement["limit"] == str(12 * MICROS)  # the event's grant still applies
    assert await redis.hget(key("period", tag=subject), "start") == str(new).encode()  # the billing period too


async def test_a_new_subscription_and_the_old_ones_cancellation_in_any_order(redis):
    """From the review of issue 24: one version per subject dropped a new subscription whose
    creation arrived after the old one's (later) deletion, and let a late update of the old
    subscription take the subject back from the new one."""
    ledger, usage = SubscriptionLedger(redis, Unguarded("redis")), UsageLedger(redis, Unguarded("redis"))
    subject, start = unique("ws"), int(time.time())
    await apply(ledger, subject, 50, [grant("OLD", start)], start, subscription="sub_old", created=40)
    # the old one deleted at 102, the new one (created at 100) arrives after it
    await ledger.deactivate(subject, version=102, subscription_id="sub_old", status="canceled")
    assert await apply(ledger, subject, 100, [grant("NEW", start)], start, subscription="sub_new", created=100)
    assert (await usage.entitlement(subject, "NEW"))["active"] == "1"
    # a late update of the old subscription (before its deletion) never takes the subject back
    assert not await apply(ledger, subject, 101, [grant("OLD", start)], start, subscription="sub_old", created=40)
    # nor does an update of another, older live subscription
    assert not await apply(ledger, subject, 105, [grant("OLD", start)], start, subscription="sub_other", created=60)
    assert (await usage.entitlement(subject, "NEW"))["active"] == "1"
    assert (await usage.entitlement(subject, "OLD"))["active"] == "0"
    # the new subscription's own deletion still ends it
    assert await ledger.deactivate(subject, version=110, subscription_id="sub_new", status="canceled")
    assert (await usage.entitlement(subject, "NEW"))["active"] == "0"
