"""Billing periods anchored at a start instant."""

from __future__ import annotations

from datetime import UTC, datetime

from hypothesis import given
from hypothesis import strategies as st

from billingd.clients.ledger.periods import calendar_month, nth_boundary, period_containing

instants = st.integers(min_value=946684800, max_value=4102444800)  # 2000 … 2100


@given(st.sampled_from(["day", "week", "month", "year"]), instants, st.integers(0, 10**8))
def test_the_period_contains_now_and_is_one_step_long(period, anchor, offset):
    now = anchor + offset
    start, end = period_containing(period, anchor, now)
    assert start <= now < end
    assert start >= anchor
    n = 0
    while nth_boundary(period, anchor, n) < start:
        n += 1
    assert nth_boundary(period, anchor, n) == start
    assert nth_boundary(period, anchor, n + 1) == end


def test_monthly_anchor_on_the_31st_uses_the_last_day_of_shorter_months():
    anchor = int(datetime(2026, 1, 31, 12, tzinfo=UTC).timestamp())
    march = int(datetime(2026, 3, 5, tzinfo=UTC).timestamp())
    start, end = period_containing("month", anchor, march)
    assert datetime.fromtimestamp(start, UTC) == datetime(2026, 2, 28, 12, tzinfo=UTC)
    assert datetime.fromtimestamp(end, UTC) == datetime(2026, 3, 31, 12, tzinfo=UTC)


def test_calendar_month():
    start, end = calendar_month(int(datetime(2026, 11, 21, 10, tzinfo=UTC).timestamp()))
    assert datetime.fromtimestamp(start, UTC) == datetime(2026, 11, 1, tzinfo=UTC)
    assert datetime.fromtimestamp(end, UTC) == datetime(2026, 12, 1, tzinfo=UTC)
