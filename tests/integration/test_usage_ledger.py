"""The usage ledger on real Redis: lazy period reset (seed 001), counters by period."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from billingd.clients import Unguarded
from billingd.clients.ledger import MICROS, Applied, UsageLedger

pytestmark = [pytest.mark.anyio, pytest.mark.redis_backends, pytest.mark.usefixtures("redis_backend")]


def ts(*args: int) -> int:
    return int(datetime(*args, tzinfo=UTC).timestamp())


async def test_a_passed_period_is_reset_lazily_before_consuming(redis):
    ledger = UsageLedger(redis, Unguarded("redis"))
    await ledger.put_entitlement("u1", "REPORTS", limit=2 * MICROS, period="month", period_start=ts(2026, 9, 15))
    for i, day in enumerate((20, 25)):
        result = await ledger.apply("u1", "REPORTS", MICROS, f"e{i}", consume=True, now=ts(2026, 9, day), dedup_ttl=60)
        assert result.status is Applied.APPLIED
    over = await ledger.apply("u1", "REPORTS", MICROS, "e2", consume=True, now=ts(2026, 10, 1), dedup_ttl=60)
    assert (over.status, over.used, over.limit) == (Applied.OVER_LIMIT, 2 * MICROS, 2 * MICROS)
    # two months later: the period has passed twice; the first use resets it to the current one
    later = await ledger.apply("u1", "REPORTS", MICROS, "e3", consume=True, now=ts(2026, 11, 21), dedup_ttl=60)
    assert later.status is Applied.APPLIED
    assert later.period_start == ts(2026, 11, 15)
    record = await ledger.entitlement("u1", "REPORTS")
    assert (record["used"], record["period_start"], record["period_end"]) == (
        str(MICROS),
        str(ts(2026, 11, 15)),
        str(ts(2026, 12, 15)),
    )
    assert await ledger.counter("u1", "REPORTS") == (MICROS, ts(2026, 11, 15))


async def test_counters_follow_the_subjects_billing_period_else_the_calendar_month(redis):
    ledger = UsageLedger(redis, Unguarded("redis"))
    await ledger.apply("ws", "ai_credits", 5, "a", consume=False, now=ts(2026, 11, 2), dedup_ttl=60)
    assert await ledger.counter("ws", "ai_credits") == (5, ts(2026, 11, 1))
    await ledger.set_period("ws", ts(2026, 11, 10), ts(2026, 12, 10))
    await ledger.apply("ws", "ai_credits", 7, "b", consume=False, now=ts(2026, 11, 12), dedup_ttl=60)
    assert await ledger.counter("ws", "ai_credits") == (7, ts(2026, 11, 10))  # a new period: a fresh counter
    duplicate = await ledger.apply("ws", "ai_credits", 7, "b", consume=False, now=ts(2026, 11, 13), dedup_ttl=60)
    assert duplicate.status is Applied.DUPLICATE
    assert duplicate.at == ts(2026, 11, 12)  # the first application's time, for an identical Stripe retry
    assert await ledger.counter("ws", "ai_credits") == (7, ts(2026, 11, 10))


async def test_older_entitlement_writes_are_ignored(redis):
    ledger = UsageLedger(redis, Unguarded("redis"))
    assert await ledger.put_entitlement("u2", "K", limit=10, period="none", period_start=0, version=200)
    assert not await ledger.put_entitlement("u2", "K", limit=99, period="none", period_start=0, version=100)
    assert (await ledger.entitlement("u2", "K"))["limit"] == "10"


async def test_a_billing_period_that_has_passed_rolls_forward_by_its_interval(redis):
    ledger = UsageLedger(redis, Unguarded("redis"))
    await ledger.set_period("ws2", ts(2026, 9, 15), ts(2026, 10, 15), "month")
    await ledger.apply("ws2", "emails", 3, "x", consume=False, now=ts(2026, 11, 20), dedup_ttl=60)
    assert await ledger.counter("ws2", "emails") == (3, ts(2026, 11, 15))  # not the calendar month
    assert await redis.hmget("billingd:period:{ws2}", "start", "end") == [
        str(ts(2026, 11, 15)).encode(),
        str(ts(2026, 12, 15)).encode(),
    ]
