"""Three billingd processes on the same AMQP and SQS queues (issue 11): a mixed load with
duplicates, one replica SIGKILLed midway — every effect applied exactly once, work spread."""

from __future__ import annotations

import signal

import anyio
import pytest

from billingd.clients import Unguarded
from billingd.clients.ledger import MICROS, SmsLedger, UsageLedger
from tests.seed002 import bill_event, dlr
from tests.support import (
    amqp_source,
    cdr_ids,
    free_port,
    http_ready,
    make_settings,
    meter_id,
    scrape,
    sqs_source,
    start_billingd,
    wait_for,
)

pytestmark = [pytest.mark.anyio, pytest.mark.redis_backends, pytest.mark.usefixtures("redis_backend")]

DLRS, BILLS, USAGE = 1500, 150, 30


async def _processed(port: int, names: list[str]) -> float:
    try:
        samples = await scrape(port)
    except OSError:
        return 0.0
    return sum(
        v for (metric, labels), v in samples.items()
        if metric == "billingd_messages_processed_total" and dict(labels)["source"] in names
    )  # fmt: skip


async def test_three_replicas_one_killed_apply_every_effect_exactly_once(amqp, redis, sqs, stripe_double, tmp_path):
    url, dlq = await sqs.queue()
    dlrs = amqp.track(amqp_source("sms_dlr", prefetch=20))
    bills = amqp.track(amqp_source("sms_billing", prefetch=10))
    usage = sqs_source("usage", url, dlq, sqs.endpoint, prefetch=10)
    names = [dlrs["name"], bills["name"], usage["name"]]
    stripe = {"api_base": stripe_double.url, "meters": {"ai_credits": "ai_credits"}, "timeout": "2s"}
    processes, ports = [], []
    for i in range(3):
        settings = make_settings([dlrs, bills, usage], stripe=stripe, http={"listen": f"127.0.0.1:{free_port()}"})
        directory = tmp_path / f"replica-{i}"
        directory.mkdir()
        processes.append(start_billingd(directory, settings, STRIPE_SECRET_KEY="sk_test_replicas"))
        ports.append(settings.http.port)
    try:
        for port in ports:
            await wait_for(lambda p=port: http_ready(p), timeout=30, what="replica ready")
        for i in range(USAGE):  # every fifth event is sent twice: the same idempotency key
            event = {"event_type": "ai_credits", "workspace_id": f"ws-{i % 3}", "value": 1,
                     "idempotency_key": f"u-{i}", "stripe_customer_id": f"cus_{i % 3}"}  # fmt: skip
            for _ in range(2 if i % 5 == 0 else 1):
                await sqs.send(url, event)
        messages = [(f"r-{i}", dlr(f"r-{i}", "DELIVRD")) for i in range(DLRS)]
        refunds = [(f"rb-{i}", bill_event(f"rb-{i}", f"acct-{i % 10}", "ESME_RTHROTTLED", 0.01)) for i in range(BILLS)]
        async with anyio.create_task_group() as tg:
            tg.start_soon(amqp.publish_many, dlrs["exchange"], "dlr.x", messages + messages[:200])  # duplicates
            tg.start_soon(amqp.publish_many, bills["exchange"], "b.x", refunds + refunds[:30])
            await wait_for(lambda: _total(ports, names, 600), timeout=60, what="600 handled across replicas")
            counts_at_kill = [await _processed(p, names) for p in ports]
            processes[0].send_signal(signal.SIGKILL)  # mid-load, with messages in hand
        survivors = ports[1:]
        await wait_for(lambda: _all_in(redis, DLRS), timeout=90, interval=0.3, what="every CDR written")
        await wait_for(lambda: _total(survivors, names, 0), timeout=5, what="survivors answer")
        sms, usage_ledger = SmsLedger(redis, Unguarded("redis")), UsageLedger(redis, Unguarded("redis"))
        await wait_for(lambda: _refunds_done(sms), timeout=60, what="every refund applied")
        await wait_for(lambda: len(stripe_double.meter_events) >= USAGE, timeout=90, what="every meter event")
        final = [await _processed(p, names) for p in survivors]
    finally:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes:
            await anyio.to_thread.run_sync(process.wait, 30)
    assert await cdr_ids(redis) == {m for m, _ in messages}
    for account in range(10):  # 15 refunds of 0.01, the 30 duplicates not counted again
        assert await sms.refunds_micros(f"acct-{account}") == 15 * 10_000
    for w in range(3):
        assert (await usage_ledger.counter(f"ws-{w}", "ai_credits"))[0] == 10 * MICROS
    identifiers = [e["identifier"] for e in stripe_double.meter_events]
    expected = [
        meter_id({"workspace_id": f"ws-{i % 3}", "event_type": "ai_credits", "idempotency_key": f"u-{i}"})
        for i in range(USAGE)
    ]
    assert sorted(identifiers) == sorted(expected)  # each meter event exactly once
    per_replica = [counts_at_kill[0], *final]
    print(f"handled per replica (the first killed at {counts_at_kill[0]:.0f}): {per_replica}")
    assert sum(1 for n in per_replica if n > 0) == 3  # all three took part


async def _total(ports: list[int], names: list[str], at_least: int) -> bool:
    return sum([await _processed(p, names) for p in ports]) >= at_least


async def _all_in(redis, n: int) -> bool:
    return len(await cdr_ids(redis)) >= n


async def _refunds_done(sms: SmsLedger) -> bool:
    return all([await sms.refunds_micros(f"acct-{a}") >= 15 * 10_000 for a in range(10)])
