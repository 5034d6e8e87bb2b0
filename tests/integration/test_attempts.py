"""What an attempt is (DESIGN §2, §10; issue 24 items 12, 14, 16, 17): only a failure that is the
message's own counts. Releases, uncounted retries, other replicas' receives, a producer's header
and an outage that every message meets never bring a valid message nearer its dead letter; a
poison message alone on its downstream still reaches it."""

from __future__ import annotations

import pytest

from tests.flaky import Journal, registry
from tests.support import amqp_source, make_settings, running, sqs_source, wait_for

pytestmark = pytest.mark.anyio


def forward(handler_url: str, **overrides):
    return {"handler_options": {"url": f"{handler_url}/hook", "timeout": "1s"}, **overrides}


async def test_an_outage_shorter_than_the_breaker_threshold_spends_no_attempt(amqp, sink):
    """Before: the two 500s were counted, and with max_attempts = 1 both events were dead-lettered."""
    source = amqp.track(amqp_source("webhook_forward", max_attempts=1, **forward(sink.url)))
    sink.fail_next(2)  # a blip every message meets: two requests answered 500, under the threshold of 3
    async with running(make_settings([source])) as daemon:
        for i in range(2):
            await amqp.publish(source["exchange"], "k", {"id": f"evt_blip_{i}", "object": "event"})
        acked = daemon.metrics.processed.labels(source["name"], "ack")
        await wait_for(lambda: acked._value.get() == 2, what="both forwarded after the blip")
        assert daemon.metrics.processed.labels(source["name"], "dead_letter")._value.get() == 0
    assert [r.status for r in sink.requests].count(500) == 2
    assert await amqp.depth(source["queue"] + ".dlq") == 0


async def test_a_poison_message_alone_on_its_downstream_reaches_its_dead_letter(amqp, sink):
    """Before: its failures opened the breaker and its failed probes were never counted — it
    looped forever, pausing intake each cycle."""
    source = amqp.track(amqp_source("webhook_forward", max_attempts=4, **forward(sink.url)))
    sink.poison = b"evt_poison"  # the endpoint answers 500 to this payload, and only to it
    breakers = {"default": {"failure_threshold": 3, "reset_timeout": "200ms", "reset_timeout_max": "400ms"}}
    async with running(make_settings([source], breakers=breakers)) as daemon:
        await amqp.publish(source["exchange"], "k", {"id": "evt_poison", "object": "event"})
        dead = daemon.metrics.processed.labels(source["name"], "dead_letter")
        await wait_for(lambda: dead._value.get() == 1, timeout=30, what="the poison message dead-lettered")
        await amqp.publish(source["exchange"], "k", {"id": "evt_fine", "object": "event"})
        acked = daemon.metrics.processed.labels(source["name"], "ack")
        await wait_for(lambda: acked._value.get() == 1, timeout=20, what="the next message forwarded")
    [letter] = await amqp.drain_queue(source["queue"] + ".dlq")
    assert letter.headers["x-billingd-reason"].startswith("gave up after 4 attempts: forward:")


async def test_a_producers_attempts_header_is_not_believed(amqp):
    """Before: a message arriving with `x-billingd-attempts: 99` was dead-lettered at its first failure."""
    journal = Journal()
    options = {"fail_attempts": 0, "own_calls": 1}
    source = amqp.track(amqp_source("flaky", max_attempts=3, handler_options=options))
    async with running(make_settings([source]), registry(journal)) as daemon:
        await amqp.publish(source["exchange"], "k", b"{}", message_id="forged", headers={"x-billingd-attempts": 99})
        acked = daemon.metrics.processed.labels(source["name"], "ack")
        await wait_for(lambda: acked._value.get() == 1, what="acked after one counted retry")
    assert [attempt for attempt, _ in journal.calls["forged"]] == [1, 2]
    assert await amqp.depth(source["queue"] + ".dlq") == 0


async def test_sqs_receives_that_were_no_attempt_never_count_across_restarts(sqs, redis):
    """Before: a second process read ApproximateReceiveCount 4 after three outage retries and
    dead-lettered the message at its first failure of its own (max_attempts = 2)."""
    journal = Journal()
    url, dlq = await sqs.queue()
    options = {"fail_attempts": 0, "shared_calls": 3, "own_calls": 1}
    source = sqs_source("flaky", url, dlq, sqs.endpoint, max_attempts=2, handler_options=options)
    message_id = await sqs.send(url, {"n": 1})
    settings = make_settings([source])
    async with running(settings, registry(journal)):
        await wait_for(lambda: len(journal.calls[message_id]) >= 3, timeout=30, what="three outage retries")
    async with running(settings, registry(journal)) as daemon:  # another process: no memory of them
        acked = daemon.metrics.processed.labels(source["name"], "ack")
        await wait_for(lambda: acked._value.get() == 1, timeout=30, what="acked")
        assert daemon.metrics.processed.labels(source["name"], "dead_letter")._value.get() == 0
    attempts = [attempt for attempt, _ in journal.calls[message_id]]
    assert attempts[-2:] == [1, 2]  # its own failure was attempt 1; the ack came on attempt 2
    assert await sqs.depth(dlq) == 0
