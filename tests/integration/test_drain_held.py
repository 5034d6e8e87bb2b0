"""A drain behind a broker that stops answering ends at once: every broker call made while
draining is bounded by DRAIN_CALL_TIMEOUT, calls under way included. SQS behind an HTTP proxy
that holds answers (long polls and batch calls); AMQP behind a TCP proxy that stops forwarding."""

from __future__ import annotations

import time

import anyio
import pytest

from billingd.clients import Unguarded
from billingd.clients.ledger import MICROS, UsageLedger
from tests.proxies import BlackholeProxy, HoldingProxy
from tests.seed002 import dlr
from tests.support import amqp_source, cdr_ids, make_settings, running, sqs_source, unique, wait_for

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(90)]

#: The drain of an idle source (or one whose last settlement is held) must end this fast (seconds).
DRAIN_BOUND = 1.5


def usage(workspace: str, i: int) -> dict:
    return {"event_type": "calls", "workspace_id": workspace, "value": 1, "idempotency_key": f"{workspace}-{i}"}


@pytest.mark.parametrize("held", ["*", "DeleteMessageBatch"])
async def test_an_sqs_drain_behind_a_proxy_holding_its_answers_ends_at_once(sqs, redis, moto_endpoint, held):
    workspace = unique("ws")
    async with HoldingProxy(moto_endpoint).running() as proxy:
        url, dlq = await sqs.queue()
        source = sqs_source("usage", url, dlq, proxy.url, wait_time="2s")
        settings = make_settings([source], daemon={"drain_timeout": "10s"})
        if held != "*":
            proxy.hold(held)  # the settlement of what billingd handles is what hangs
        for i in range(10):
            await sqs.send(url, usage(workspace, i))
        async with running(settings) as daemon:
            acked = daemon.metrics.processed.labels(source["name"], "ack")
            await wait_for(lambda: acked._value.get() == 10, timeout=30, what="10 handled")
            if held == "*":
                await wait_for(lambda: proxy.received.get("DeleteMessageBatch", 0) >= 1, what="deletes sent")
                await anyio.sleep(0.3)  # idle: long polls in progress, nothing in flight
                proxy.hold("*")
            else:
                await wait_for(lambda: proxy.received.get("DeleteMessageBatch", 0) >= 1, what="the delete held")
            started = time.monotonic()
        took = time.monotonic() - started  # `running` asserted exit code 0
        assert took < DRAIN_BOUND, f"the drain took {took:.2f}s"
        proxy.release()
    ledger = UsageLedger(redis, Unguarded("redis"))
    assert (await ledger.counter(workspace, "calls"))[0] == 10 * MICROS  # each applied once


async def test_an_amqp_drain_over_a_blackholed_connection_ends_at_once(amqp, redis):
    async with BlackholeProxy("127.0.0.1", 5672).running() as proxy:
        source = amqp.track(amqp_source("sms_dlr", url=f"amqp://guest:guest@127.0.0.1:{proxy.port}/"))
        settings = make_settings([source], daemon={"drain_timeout": "10s"})
        async with running(settings) as daemon:
            ids = [unique("m") for _ in range(20)]
            for message_id in ids:
                await amqp.publish(source["exchange"], "dlr.x", dlr(message_id, "DELIVRD"))
            acked = daemon.metrics.processed.labels(source["name"], "ack")
            await wait_for(lambda: acked._value.get() == 20, timeout=20, what="20 handled")
            proxy.blackhole()  # the broker stops answering: cancel, acks and close get no reply
            started = time.monotonic()
        took = time.monotonic() - started
        assert took < DRAIN_BOUND, f"the drain took {took:.2f}s"
    # the proxy is gone: RabbitMQ requeues whatever it had not seen acked; nothing is lost
    assert set(ids) <= await cdr_ids(redis)
    await wait_for(lambda: _ready_at_most(amqp, source["queue"], 20), what="the queue holds only requeued ones")


async def _ready_at_most(amqp, queue: str, n: int) -> bool:
    return await amqp.depth(queue) <= n


async def test_an_sqs_source_reopened_after_a_failed_open_is_not_left_draining(sqs, moto_endpoint):
    """A failed `open()` closes the source, which bounds its calls as a drain does; the actor then
    opens the same source again: its calls must get their full bound and single-entry retries."""
    from billingd.sources.sqs import SqsSource
    from tests.support import make_settings

    url, dlq = await sqs.queue()

    class Events:
        def __getattr__(self, _name: str):
            return lambda *args, **kwargs: None

    source = SqsSource(make_settings([sqs_source("usage", url, dlq, moto_endpoint)]).sources[0], Events())
    await source.close()  # what a failed open does
    await source.open()
    try:
        assert source._calls._draining() is False
        with source._deadlines.bound("probe") as _:
            await anyio.sleep(DRAIN_BOUND)  # longer than a drain's bound, well within the normal one
    finally:
        await source.close()
