"""Poison-message bookkeeping: crash counts per message id across actor restarts."""

from __future__ import annotations

from billingd.supervisors.poison import PoisonLog


def test_a_message_is_poison_after_the_threshold_of_crashes():
    log = PoisonLog(threshold=2)
    log.record(["m1", "m2"], "RuntimeError: boom")
    assert log.verdict("m1") is None
    log.record(["m1"], "RuntimeError: boom again")
    verdict = log.verdict("m1")
    assert verdict is not None
    assert "crashed 2 times" in verdict
    assert "boom again" in verdict
    assert log.verdict("m2") is None  # in hand once only: innocent
    assert log.verdict("m3") is None


def test_memory_is_bounded_oldest_first():
    log = PoisonLog(threshold=1, memory=3)
    log.record(["a", "b", "c", "d"], "x")
    assert log.verdict("a") is None
    assert all(log.verdict(m) for m in "bcd")
