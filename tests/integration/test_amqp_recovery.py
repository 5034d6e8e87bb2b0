"""The AMQP consumer survives broker-side trouble: connections closed, consumers cancelled."""

from __future__ import annotations

import pytest

from tests.seed002 import dlr
from tests.support import amqp_source, cdr_ids, make_settings, rabbitmqctl, running, wait_for

pytestmark = pytest.mark.anyio

N = 10_000


async def test_close_all_connections_mid_stream_every_message_is_processed(amqp, redis):
    source = amqp.track(amqp_source("sms_dlr", prefetch=50))
    messages = [(f"rc-{i}", dlr(f"rc-{i}", "DELIVRD")) for i in range(N)]
    async with running(make_settings([source])) as daemon:
        await amqp.publish_many(source["exchange"], "dlr.x", messages)
        acked = daemon.metrics.processed.labels(source["name"], "ack")
        await wait_for(lambda: acked._value.get() >= 2000, timeout=30, what="2,000 processed")
        consumes = daemon.metrics.broker_requests.labels(source["name"], "consume")
        assert consumes._value.get() == 1
        await rabbitmqctl("close_all_connections", "billingd test: broker restart drill")
        await wait_for(lambda: consumes._value.get() >= 2, timeout=30, what="consumer re-established")
        await wait_for(lambda: daemon.readiness()[0], timeout=30, what="source ready again")
        await wait_for(lambda: _count(redis, N), timeout=60, interval=0.2, what="every CDR written")
        assert daemon.metrics.processed.labels(source["name"], "dead_letter")._value.get() == 0
    assert await cdr_ids(redis) == {message_id for message_id, _ in messages}
    assert await amqp.depth(source["queue"]) == 0


async def _count(redis, n: int) -> bool:
    return len(await cdr_ids(redis)) >= n


async def test_consumer_cancelled_by_the_broker_is_restored(amqp, redis):
    source = amqp.track(amqp_source("sms_dlr"))
    async with running(make_settings([source])) as daemon:
        # deleting the queue makes RabbitMQ cancel our consumer (basic.cancel)
        await amqp.delete(source["queue"])
        await wait_for(lambda: _consumers(source["queue"]), timeout=15, what="consumer restored")
        await amqp.publish(source["exchange"], "dlr.x", dlr("after-cancel", "DELIVRD"))
        await wait_for(lambda: _has_cdr(redis, "after-cancel"), timeout=10, what="processed after restore")
        assert daemon.readiness()[0]


async def _consumers(queue: str) -> bool:
    out = await rabbitmqctl("list_queues", "-q", "--no-table-headers", "name", "consumers")
    return any(line.split() == [queue, "1"] for line in out.splitlines())


async def _has_cdr(redis, message_id: str) -> bool:
    return await redis.exists(f"billingd:cdr:{{{message_id}}}") == 1
