"""SIGTERM on the real `billingd` process in the middle of a burst (DESIGN §3 graceful drain)."""

from __future__ import annotations

import signal
import time

import anyio
import pytest

from tests.seed002 import dlr
from tests.support import amqp_source, cdr_ids, http_ready, make_settings, scrape, start_billingd, wait_for

pytestmark = pytest.mark.anyio

N = 1000


async def test_sigterm_mid_burst_loses_nothing_and_exits_0(amqp, redis, tmp_path):
    source = amqp.track(amqp_source("sms_dlr", prefetch=20))
    settings = make_settings([source], daemon={"drain_timeout": "10s", "log_level": "info"})
    port = settings.http.port
    process = start_billingd(tmp_path, settings)
    try:
        await wait_for(lambda: http_ready(port), timeout=20, what="billingd ready")
        ids = [f"burst-{i}" for i in range(N)]
        signalled: list[float] = []
        exited: list[tuple[int, float]] = []

        async def processed() -> float:
            return (await scrape(port)).get(
                ("billingd_messages_processed_total", (("outcome", "ack"), ("source", source["name"]))), 0
            )

        async def burst() -> None:
            for i, message_id in enumerate(ids):
                await amqp.publish(source["exchange"], "dlr.x", dlr(message_id, "DELIVRD"), message_id=message_id)
                if i % 50 == 0:
                    await anyio.sleep(0.02)  # ~1,000 messages over a second or so: a burst, not a preload

        async with anyio.create_task_group() as tg:
            tg.start_soon(burst)

            async def wait_then_signal() -> None:
                await wait_for(lambda: _at_least(processed, 200), timeout=20, what="200 processed")
                process.send_signal(signal.SIGTERM)
                signalled.append(time.monotonic())
                code = await anyio.to_thread.run_sync(process.wait, 20)
                exited.append((code, time.monotonic() - signalled[0]))

            tg.start_soon(wait_then_signal)
        [(code, stopped)] = exited
    finally:
        if process.poll() is None:
            process.kill()
        stderr = process.stderr.read().decode() if process.stderr else ""
    assert code == 0, stderr[-3000:]
    assert stopped < 10, f"drain took {stopped:.1f}s, drain_timeout is 10s"
    assert '"drain started"' in stderr
    applied = await cdr_ids(redis)
    queued = {m.message_id for m in await amqp.drain_queue(source["queue"])}
    print(f"applied={len(applied)} queued={len(queued)} drain={stopped:.3f}s")
    assert 200 <= len(applied) < N, "SIGTERM should land mid-burst"
    assert applied | queued == set(ids), "every message is applied or still queued"
    # nothing acked unprocessed: whatever left the queue has its effect in Redis
    assert set(ids) - queued <= applied


async def _at_least(fetch, n: int) -> bool:
    return (await fetch()) >= n
