"""Retries through `<queue>.retry` with growing delays; dead-letter past `max_attempts`."""

from __future__ import annotations

import itertools

import pytest
from structlog.testing import capture_logs

from billingd.supervisors.backoff import backoff_cap
from tests.flaky import Journal, registry
from tests.support import MaxRandom, amqp_source, make_settings, running, wait_for

pytestmark = pytest.mark.anyio


async def test_transient_failures_retry_with_growing_delay_then_ack(amqp):
    journal = Journal()
    source = amqp.track(amqp_source("flaky", handler_options={"fail_attempts": 3}, max_attempts=5))
    async with running(make_settings([source]), registry(journal), rng=MaxRandom()) as daemon:
        await amqp.publish(source["exchange"], "k", b"{}", message_id="m-1")
        acked = daemon.metrics.processed.labels(source["name"], "ack")
        await wait_for(lambda: acked._value.get() == 1, what="acked after retries")
        retries = daemon.metrics.processed.labels(source["name"], "retry")._value.get()
    calls = journal.calls["m-1"]
    assert [attempt for attempt, _ in calls] == [1, 2, 3, 4]
    assert retries == 3
    gaps = [later - earlier for (_, earlier), (_, later) in itertools.pairwise(calls)]
    caps = [backoff_cap(n, 0.1, 1.0) for n in range(3)]  # 0.1 s, 0.2 s, 0.4 s
    for gap, cap in zip(gaps, caps, strict=True):
        assert cap <= gap < cap + 0.5
    assert gaps[0] < gaps[1] < gaps[2]
    assert await amqp.depth(source["queue"] + ".retry") == 0
    assert await amqp.depth(source["queue"] + ".dlq") == 0


async def test_past_max_attempts_the_message_is_dead_lettered(amqp):
    journal = Journal()
    source = amqp.track(amqp_source("flaky", handler_options={"fail_attempts": 99}, max_attempts=3))
    async with running(make_settings([source]), registry(journal)) as daemon:
        await amqp.publish(source["exchange"], "k", b'{"n": 1}', message_id="m-2")
        dlq = source["queue"] + ".dlq"
        await wait_for(lambda: amqp.depth(dlq), what="dead-lettered")
        assert daemon.metrics.processed.labels(source["name"], "retry")._value.get() == 2
    assert [attempt for attempt, _ in journal.calls["m-2"]] == [1, 2, 3]
    [dead] = await amqp.drain_queue(dlq)
    assert dead.body == b'{"n": 1}'
    assert dead.headers["x-billingd-attempts"] == 3
    assert dead.headers["x-billingd-reason"].startswith("gave up after 3 attempts: test: scripted failure")


async def test_an_unexpected_handler_exception_is_a_retry_logged_with_its_traceback(amqp):
    journal = Journal()
    source = amqp.track(amqp_source("flaky", handler_options={"fail_attempts": 1, "error": "bug"}))
    with capture_logs() as logs:
        async with running(make_settings([source]), registry(journal)) as daemon:
            await amqp.publish(source["exchange"], "k", b"{}", message_id="m-bug")
            acked = daemon.metrics.processed.labels(source["name"], "ack")
            await wait_for(lambda: acked._value.get() == 1, what="acked on the second attempt")
    assert [attempt for attempt, _ in journal.calls["m-bug"]] == [1, 2]
    [failure] = [e for e in logs if e["event"] == "handler failed unexpectedly"]
    assert failure["log_level"] == "error"
    assert failure["message_id"] == "m-bug"
    assert failure["exc_info"] is True  # the stack trace is rendered with the event
