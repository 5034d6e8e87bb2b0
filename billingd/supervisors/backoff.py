"""Exponential backoff with full jitter (AWS Architecture Blog, "Exponential Backoff And Jitter")."""

from __future__ import annotations

import random


def backoff_cap(attempt: int, initial: float, maximum: float) -> float:
    """The ceiling of the `attempt`-th delay (0-based): `min(maximum, initial × 2**attempt)` seconds."""
    return float(min(maximum, initial * (2 ** min(attempt, 62))))


def full_jitter(attempt: int, initial: float, maximum: float, rng: random.Random) -> float:
    """A delay drawn uniformly from `[initial, backoff_cap(attempt, …)]` seconds.

    The floor is `initial` rather than 0 so a retry never comes back at once (a hot loop against
    a failing downstream); above it the draw is the usual full jitter.
    """
    return rng.uniform(min(initial, maximum), backoff_cap(attempt, initial, maximum))
