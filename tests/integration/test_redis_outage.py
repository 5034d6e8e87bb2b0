"""Redis stopped for a few seconds: the `redis` breaker opens, intake pauses, nothing is
dead-lettered, and every message is applied once Redis is back (DESIGN §3)."""

from __future__ import annotations

import anyio
import pytest
import redis.asyncio as aioredis

from billingd.supervisors.breaker import BreakerState
from tests.seed002 import dlr
from tests.support import RedisServer, amqp_source, cdr_ids, make_settings, running, wait_for

pytestmark = pytest.mark.anyio

N = 300


@pytest.fixture
async def own_redis(tmp_path):
    server = RedisServer(str(tmp_path))
    await server.start()
    yield server
    await server.stop()


async def test_redis_outage_pauses_intake_and_dead_letters_nothing(amqp, own_redis):
    source = amqp.track(amqp_source("sms_dlr", max_attempts=3))
    settings = make_settings([source], redis={"url": own_redis.url})
    seen = {"open": False, "paused": False}
    async with running(settings) as daemon:
        breaker = daemon.board.get("redis")
        status = daemon.statuses[source["name"]]

        async def watch() -> None:
            while True:
                seen["open"] |= breaker.state is BreakerState.OPEN
                seen["paused"] |= status.paused_by == ["redis"]
                await anyio.sleep(0.01)

        async def publish() -> None:
            for i in range(N):
                await amqp.publish(source["exchange"], "dlr.x", dlr(f"out-{i}", "DELIVRD"), message_id=f"out-{i}")
                await anyio.sleep(0.01)

        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            tg.start_soon(publish)
            acked = daemon.metrics.processed.labels(source["name"], "ack")
            await wait_for(lambda: acked._value.get() >= 50, what="traffic flowing")
            await own_redis.stop()
            await wait_for(lambda: seen["open"] and seen["paused"], timeout=10, what="breaker open, intake paused")
            await anyio.sleep(2)  # a few seconds of outage while messages keep arriving
            await own_redis.start()
            await wait_for(lambda: breaker.state is BreakerState.CLOSED, timeout=15, what="breaker closed")
            await wait_for(lambda: acked._value.get() >= N, timeout=30, what="every message acked")
            tg.cancel_scope.cancel()
        assert status.paused_by == []
        assert daemon.metrics.processed.labels(source["name"], "dead_letter")._value.get() == 0
        assert daemon.metrics.breaker_state.labels("redis")._value.get() == 0
    client = aioredis.Redis.from_url(own_redis.url)
    try:
        assert await cdr_ids(client) == {f"out-{i}" for i in range(N)}
    finally:
        await client.aclose()
    assert await amqp.depth(source["queue"] + ".dlq") == 0
    assert await amqp.depth(source["queue"]) == 0
