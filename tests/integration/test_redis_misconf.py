"""Redis that cannot persist answers every write `MISCONF` (issue 24, item 11), end to end through
`billingd run` on a real `redis-server` whose snapshot directory is gone: nothing is
dead-lettered, the `redis` breaker opens and intake pauses with a log naming the fix, and every
message is applied once Redis can persist again. Before: every message of the source was
dead-lettered at full speed with the breaker closed."""

from __future__ import annotations

import shutil

import anyio
import pytest
import redis.asyncio as aioredis

from tests.seed002 import dlr
from tests.support import RedisServer, amqp_source, cdr_ids, http_ready, make_settings, scrape, start_billingd, wait_for

pytestmark = pytest.mark.anyio

N = 60


async def test_misconf_is_an_outage_not_a_dead_letter(amqp, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    server = RedisServer(str(data), "--save", "3600 1", "--appendonly", "no", "--enable-protected-configs", "yes")
    await server.start()
    client = aioredis.Redis.from_url(server.url)
    source = amqp.track(amqp_source("sms_dlr", max_attempts=2))
    settings = make_settings([source], redis={"url": server.url}, daemon={"log_level": "info"})
    port = settings.http.port
    process = start_billingd(tmp_path, settings)

    async def metric(name: str, **labels: str) -> float:
        return (await scrape(port)).get((name, tuple(sorted(labels.items()))), 0)

    try:
        await wait_for(lambda: http_ready(port), timeout=20, what="billingd ready")
        for i in range(N // 2):
            await amqp.publish(source["exchange"], "dlr.x", dlr(f"before-{i}", "DELIVRD"), message_id=f"before-{i}")
        await wait_for(lambda: cdr_ids_count(client, N // 2), timeout=20, what="first half applied")
        shutil.rmtree(data)  # the snapshot directory is gone: BGSAVE fails, Redis refuses writes
        await client.bgsave()
        await wait_for(lambda: _refuses_writes(client), timeout=10, what="Redis answering MISCONF")
        for i in range(N // 2):
            await amqp.publish(source["exchange"], "dlr.x", dlr(f"during-{i}", "DELIVRD"), message_id=f"during-{i}")
        await wait_for(
            lambda: _equals(metric("billingd_circuit_breaker_state", breaker="redis"), 2), timeout=20, what="open"
        )
        await anyio.sleep(2)  # a few breaker cycles of probes meeting MISCONF
        assert await metric("billingd_messages_processed_total", source=source["name"], outcome="dead_letter") == 0
        fixed = tmp_path / "fixed"
        fixed.mkdir()
        await client.config_set("dir", str(fixed))
        await client.bgsave()
        await wait_for(lambda: cdr_ids_count(client, N), timeout=30, what="every message applied after the fix")
    finally:
        process.terminate()
        await anyio.to_thread.run_sync(process.wait, 20)
        stderr = process.stderr.read().decode() if process.stderr else ""
        await client.aclose()
        await server.stop()
    assert await amqp.depth(source["queue"] + ".dlq") == 0
    opened = [line for line in stderr.splitlines() if "circuit breaker open" in line]
    assert opened and "MISCONF" in opened[0] and "fix: Redis cannot persist" in opened[0], stderr[-3000:]
    assert "intake paused" in stderr


async def cdr_ids_count(client: aioredis.Redis, n: int) -> bool:
    return len(await cdr_ids(client)) >= n


async def _refuses_writes(client: aioredis.Redis) -> bool:
    try:
        await client.set("probe", "1")
    except aioredis.ResponseError as exc:
        return str(exc).startswith("MISCONF")
    return False


async def _equals(value: object, expected: float) -> bool:
    return await value == expected  # type: ignore[misc]
