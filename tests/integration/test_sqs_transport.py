"""The SQS transport on moto's SQS server (the real wire protocol): settle, retry, DLQ, heartbeat."""

from __future__ import annotations

import itertools

import anyio
import pytest

from tests.flaky import Journal, registry
from tests.support import make_settings, running, sqs_source, wait_for

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("client", ["lean", "botocore"])
async def test_acks_delete_in_batches_and_every_call_is_counted(sqs, client):
    url, dlq = await sqs.queue()
    journal = Journal()
    source = sqs_source("flaky", url, dlq, sqs.endpoint, handler_options={"fail_attempts": 0}, sqs_client=client)
    ids = [await sqs.send(url, {"n": i}) for i in range(10)]
    async with running(make_settings([source]), registry(journal)) as daemon:
        acked = daemon.metrics.processed.labels(source["name"], "ack")
        await wait_for(lambda: acked._value.get() == 10, what="10 acked")
        await wait_for(lambda: _empty(sqs, url), what="queue empty")
        requests = daemon.metrics.broker_requests
        deletes = requests.labels(source["name"], "DeleteMessageBatch")._value.get()
        receives = requests.labels(source["name"], "ReceiveMessage")._value.get()
    assert set(journal.calls) == set(ids)
    assert 1 <= deletes <= 3  # batched, not one call per message
    assert receives >= 1
    assert await sqs.depth(dlq) == 0


async def _empty(sqs, url) -> bool:
    return await sqs.depth(url) == 0


async def test_retry_changes_visibility_and_attempts_come_from_the_receive_count(sqs):
    url, dlq = await sqs.queue()
    journal = Journal()
    source = sqs_source("flaky", url, dlq, sqs.endpoint, handler_options={"fail_attempts": 2}, max_attempts=5)
    message_id = await sqs.send(url, {"n": 1})
    async with running(make_settings([source]), registry(journal)) as daemon:
        acked = daemon.metrics.processed.labels(source["name"], "ack")
        await wait_for(lambda: acked._value.get() == 1, timeout=20, what="acked on attempt 3")
        changes = daemon.metrics.broker_requests.labels(source["name"], "ChangeMessageVisibilityBatch")
        assert changes._value.get() >= 2
    calls = journal.calls[message_id]
    assert [attempt for attempt, _ in calls] == [1, 2, 3]
    gaps = [later - earlier for (_, earlier), (_, later) in itertools.pairwise(calls)]
    assert all(gap >= 0.9 for gap in gaps)  # visibility set to the retry delay (≥ retry_initial = 1 s)
    assert await sqs.depth(url) == 0


@pytest.mark.parametrize("client", ["lean", "botocore"])
async def test_past_max_attempts_goes_to_the_dlq_with_its_attributes(sqs, client):
    url, dlq = await sqs.queue()
    journal = Journal()
    options = {"fail_attempts": 99}
    source = sqs_source("flaky", url, dlq, sqs.endpoint, handler_options=options, max_attempts=2, sqs_client=client)
    message_id = await sqs.send(url, "original body", attributes={"trace": "abc"})
    async with running(make_settings([source]), registry(journal)) as daemon:
        dead = daemon.metrics.processed.labels(source["name"], "dead_letter")
        await wait_for(lambda: dead._value.get() == 1, timeout=20, what="dead-lettered")
        await wait_for(lambda: _depth_is(sqs, dlq, 1), what="in the DLQ")
    [letter] = await sqs.take(dlq)
    attributes = {k: v["StringValue"] for k, v in letter["MessageAttributes"].items()}
    assert letter["Body"] == "original body"
    assert attributes["reason"].startswith("gave up after 2 attempts: test: scripted failure")
    assert attributes["handler"] == "flaky"
    assert attributes["attempts"] == "2"
    assert attributes["original_message_id"] == message_id
    assert attributes["trace"] == "abc"
    assert await sqs.depth(url) == 0


async def _depth_is(sqs, url, n) -> bool:
    return await sqs.depth(url) == n


async def test_a_handler_slower_than_the_visibility_timeout_is_not_redelivered(sqs):
    url, dlq = await sqs.queue(visibility=2)
    journal = Journal()
    source = sqs_source(
        "flaky", url, dlq, sqs.endpoint, handler_options={"fail_attempts": 0, "sleep": 5}, visibility_timeout="2s"
    )
    message_id = await sqs.send(url, {"slow": True})
    async with running(make_settings([source]), registry(journal)) as daemon:
        acked = daemon.metrics.processed.labels(source["name"], "ack")
        await wait_for(lambda: acked._value.get() == 1, timeout=20, what="slow message acked")
        extended = daemon.metrics.broker_requests.labels(source["name"], "ChangeMessageVisibilityBatch")._value.get()
    assert [attempt for attempt, _ in journal.calls[message_id]] == [1]  # handled once, never redelivered
    assert extended >= 2  # the heartbeat kept it invisible for 5 s with a 2 s visibility timeout
    assert await sqs.depth(url) == 0


async def test_on_drain_unstarted_messages_are_visible_again_at_once(sqs):
    url, dlq = await sqs.queue(visibility=30)
    journal = Journal()
    source = sqs_source(
        "flaky", url, dlq, sqs.endpoint, handler_options={"fail_attempts": 0, "sleep": 1}, concurrency=1
    )
    for i in range(5):
        await sqs.send(url, {"n": i})
    async with running(make_settings([source]), registry(journal)) as daemon:
        await wait_for(lambda: len(journal.calls) == 1, what="one handler in flight")
        await wait_for(lambda: daemon.metrics.received.labels(source["name"])._value.get() >= 2, what="more in hand")
        daemon.request_drain("test")
    acked = daemon.metrics.processed.labels(source["name"], "ack")._value.get()
    assert acked == len(journal.calls) == 1  # the in-flight one finished and was deleted
    visible, in_flight = await sqs.counts(url)
    assert (visible, in_flight) == (4, 0)  # released with visibility 0, not left for 30 s


async def test_fifo_keeps_each_group_in_order_and_runs_groups_concurrently(sqs):
    url, dlq = await sqs.queue(fifo=True)
    journal = Journal()
    source = sqs_source(
        "flaky", url, dlq, sqs.endpoint, handler_options={"fail_attempts": 1, "only": "a2", "sleep": 0.2}
    )
    order = {}
    for i in range(1, 5):
        for group in ("a", "b"):
            order[await sqs.send(url, {"id": f"{group}{i}"}, group=group)] = f"{group}{i}"
    async with running(make_settings([source]), registry(journal)) as daemon:
        acked = daemon.metrics.processed.labels(source["name"], "ack")
        await wait_for(lambda: acked._value.get() == 8, timeout=30, what="8 acked")
    starts = sorted((calls[-1][1], order[mid]) for mid, calls in journal.calls.items())
    for group in ("a", "b"):
        handled = [name for _, name in starts if name.startswith(group)]
        assert handled == [f"{group}{i}" for i in range(1, 5)], f"group {group} out of order"
    a2 = next(mid for mid, name in order.items() if name == "a2")
    assert [attempt for attempt, _ in journal.calls[a2]] == [1, 2]  # retried, and not overtaken
    b_last_end = max(journal.ends[mid] for mid, name in order.items() if name.startswith("b"))
    a_first_start = min(journal.calls[mid][0][1] for mid, name in order.items() if name.startswith("a"))
    b_first_start = min(journal.calls[mid][0][1] for mid, name in order.items() if name.startswith("b"))
    assert max(a_first_start, b_first_start) < b_last_end  # the groups overlapped in time


async def test_without_a_dlq_url_the_queue_redrive_policy_moves_dead_letters(sqs):
    from structlog.testing import capture_logs

    url, dlq = await sqs.queue(max_receive=2)
    journal = Journal()
    source = sqs_source("flaky", url, "", sqs.endpoint, handler_options={"fail_attempts": 99}, max_attempts=1)
    await sqs.send(url, {"poison": True})
    with capture_logs() as logs:
        async with running(make_settings([source]), registry(journal)):
            await wait_for(lambda: _depth_is(sqs, dlq, 1), timeout=30, what="moved by the redrive policy")
    assert await sqs.depth(url) == 0
    assert any(e["event"].startswith("dead letter left to the queue's redrive policy") for e in logs)


async def test_at_drain_timeout_stuck_handlers_are_cancelled_and_their_messages_released(sqs):
    url, dlq = await sqs.queue(visibility=60)
    journal = Journal()
    source = sqs_source(
        "flaky", url, dlq, sqs.endpoint, handler_options={"fail_attempts": 0, "sleep": 60}, visibility_timeout="60s"
    )
    for i in range(3):
        await sqs.send(url, {"stuck": i})
    settings = make_settings([source], daemon={"drain_timeout": "2s"})
    async with running(settings, registry(journal)) as daemon:
        await wait_for(lambda: len(journal.calls) == 3, timeout=15, what="3 handlers stuck")
        await anyio.sleep(2)  # long enough for the heartbeat to extend them to the full 60 s
        daemon.request_drain("test")
    assert daemon.metrics.processed.labels(source["name"], "ack")._value.get() == 0
    assert await sqs.counts(url) == (3, 0)  # released with visibility 0, never deleted
