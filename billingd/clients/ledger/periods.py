"""Billing periods: `day`, `week`, `month`, `year` anchored at a start instant, or `none`.

Months are calendar months anchored at the start's day and time (a period starting on the 31st
continues on the last day of shorter months, as Stripe's billing anchors do). All instants are
Unix seconds, UTC.
"""

from __future__ import annotations

import calendar
import functools
from datetime import UTC, datetime, timedelta

PERIODS = ("day", "week", "month", "year", "none")
FOREVER = 2**53  # the end of a `none` period


def _add_months(anchor: datetime, months: int) -> datetime:
    index = anchor.month - 1 + months
    year, month = anchor.year + index // 12, index % 12 + 1
    day = min(anchor.day, calendar.monthrange(year, month)[1])
    return anchor.replace(year=year, month=month, day=day)


def nth_boundary(period: str, anchor: int, n: int) -> int:
    """The start of the `n`-th period after the one starting at `anchor` (n may be negative).

    Raises:
        ValueError: unknown period.
    """
    start = datetime.fromtimestamp(anchor, UTC)
    if period == "day":
        moved = start + timedelta(days=n)
    elif period == "week":
        moved = start + timedelta(weeks=n)
    elif period == "month":
        moved = _add_months(start, n)
    elif period == "year":
        moved = _add_months(start, 12 * n)
    else:
        raise ValueError(f"unknown period {period!r}: expected one of {', '.join(PERIODS)}")
    return int(moved.timestamp())


def period_containing(period: str, anchor: int, now: int) -> tuple[int, int]:
    """`(start, end)` of the period (anchored at `anchor`) that contains `now`; `end` is exclusive."""
    if period == "none":
        return anchor, FOREVER
    n = 0
    if period in ("day", "week"):
        length = 86400 if period == "day" else 7 * 86400
        n = (now - anchor) // length
    else:
        # estimate from the average month, then correct: at most a couple of steps
        n = int((now - anchor) // (86400 * (30.436875 if period == "month" else 365.2425)))
    while nth_boundary(period, anchor, n) > now:
        n -= 1
    while nth_boundary(period, anchor, n + 1) <= now:
        n += 1
    return nth_boundary(period, anchor, n), nth_boundary(period, anchor, n + 1)


def calendar_month(now: int) -> tuple[int, int]:
    """`(start, end)` of the UTC calendar month containing `now` (Unix seconds)."""
    return _month_of_day(now // 86_400)  # months begin at a UTC midnight: the day decides


@functools.lru_cache(maxsize=8)
def _month_of_day(day: int) -> tuple[int, int]:
    """`calendar_month` of day `day` since the epoch (UTC), cached: every event of a day asks the same."""
    moment = datetime.fromtimestamp(day * 86_400, UTC)
    start = moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return int(start.timestamp()), int(_add_months(start, 1).timestamp())
