"""Exponential backoff with full jitter."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from billingd.supervisors.backoff import backoff_cap, full_jitter


@given(st.integers(0, 200), st.floats(0.001, 10), st.floats(0.001, 600), st.integers())
def test_delay_stays_between_initial_and_the_growing_cap(attempt, initial, maximum, seed):
    delay = full_jitter(attempt, initial, maximum, random.Random(seed))
    assert min(initial, maximum) <= delay <= backoff_cap(attempt, initial, maximum) <= maximum


def test_cap_doubles_until_the_maximum():
    assert [backoff_cap(n, 0.5, 30) for n in range(8)] == [0.5, 1, 2, 4, 8, 16, 30, 30]
