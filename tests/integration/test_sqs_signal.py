"""SIGTERM on the real `billingd` process while it long-polls SQS (20 s): it exits at once."""

from __future__ import annotations

import signal
import time

import anyio
import pytest

from tests.support import http_get, make_settings, scrape, sqs_source, start_billingd, wait_for

pytestmark = pytest.mark.anyio


async def test_sigterm_during_a_long_poll_exits_promptly_and_loses_nothing(sqs, tmp_path):
    url, dlq = await sqs.queue()
    source = sqs_source("sms_dlr", url, dlq, sqs.endpoint, wait_time="20s")
    settings = make_settings([source])
    process = start_billingd(tmp_path, settings)
    port = settings.http.port
    try:

        async def polling() -> bool:
            try:
                samples = await scrape(port)
            except OSError:
                return False
            key = ("billingd_broker_requests_total", (("operation", "ReceiveMessage"), ("source", source["name"])))
            return samples.get(key, 0) >= 1 and (await http_get(port, "/readyz"))[0] == 200

        await wait_for(polling, timeout=20, what="long poll in progress")
        await anyio.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        started = time.monotonic()
        code = await anyio.to_thread.run_sync(process.wait, 15)
        took = time.monotonic() - started
    finally:
        if process.poll() is None:
            process.kill()
    assert code == 0, process.stderr.read().decode()[-2000:] if process.stderr else ""
    assert took < 3, f"exit took {took:.1f}s with a 20 s long poll in progress"
    for i in range(3):
        await sqs.send(url, {"message_id": f"after-{i}", "status": "DELIVRD"})
    # the cancelled poll stays open on the SQS side for the rest of its 20 s wait and may be handed
    # a message; received with a 3 s lease, such a message is visible again within seconds
    await wait_for(lambda: _all_visible(sqs, url, 3), timeout=6, interval=0.2, what="all 3 visible")


async def _all_visible(sqs, url, n) -> bool:
    return await sqs.counts(url) == (n, 0)
