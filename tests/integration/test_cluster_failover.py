"""A Redis Cluster failover under load (issue 11): every master handed to its replica with
`CLUSTER FAILOVER` while bills and receipts flow — 0 lost, 0 doubled, 0 dead-lettered."""

from __future__ import annotations

import anyio
import pytest

from billingd.clients import Unguarded
from billingd.clients.ledger import SmsLedger
from tests.seed002 import bill_event, dlr
from tests.support import amqp_source, cdr_ids, make_settings, running, wait_for

pytestmark = pytest.mark.anyio

DLRS, BILLS, ACCOUNTS = 3000, 300, 20


@pytest.mark.parametrize("redis_backend", ["cluster"], indirect=True)
async def test_failover_of_every_master_mid_load_loses_and_doubles_nothing(amqp, redis, redis_cluster):
    dlr_source = amqp.track(amqp_source("sms_dlr", prefetch=50))
    bill_source = amqp.track(amqp_source("sms_billing", prefetch=20))
    dlrs = [(f"fo-{i}", dlr(f"fo-{i}", "DELIVRD")) for i in range(DLRS)]
    bills = [(f"b-{i}", bill_event(f"b-{i}", f"acct-{i % ACCOUNTS}", "ESME_RTHROTTLED", 0.01)) for i in range(BILLS)]
    settings = make_settings(
        [dlr_source, bill_source],
        breakers={"default": {"failure_threshold": 3, "reset_timeout": "200ms", "reset_timeout_max": "1s"}},
    )
    failovers: list[int] = []
    async with running(settings) as daemon:
        processed = daemon.metrics.processed
        acked = processed.labels(dlr_source["name"], "ack")
        async with anyio.create_task_group() as tg:
            tg.start_soon(amqp.publish_many, dlr_source["exchange"], "dlr.x", dlrs)
            tg.start_soon(amqp.publish_many, bill_source["exchange"], "bill_request.x", bills)
            for share in (0.2, 0.45, 0.7):  # each master in turn, mid-stream
                await wait_for(lambda s=share: acked._value.get() >= DLRS * s, timeout=60, what=f"{share:.0%} done")
                master = redis_cluster.masters()[0]
                failovers.append(await anyio.to_thread.run_sync(redis_cluster.failover, master))
        await wait_for(lambda: acked._value.get() >= DLRS, timeout=60, what="every DLR handled")
        bills_acked = processed.labels(bill_source["name"], "ack")
        await wait_for(lambda: bills_acked._value.get() >= BILLS, timeout=60, what="every bill handled")
        dead = sum(processed.labels(s["name"], "dead_letter")._value.get() for s in (dlr_source, bill_source))
        retries = processed.labels(dlr_source["name"], "retry")._value.get()
    assert len(failovers) == 3
    assert dead == 0
    assert await cdr_ids(redis) == {message_id for message_id, _ in dlrs}  # none lost
    ledger = SmsLedger(redis, Unguarded("redis"))
    for account in range(ACCOUNTS):  # 15 refunds of 0.01 each, none doubled
        assert await ledger.refunds_micros(f"acct-{account}") == (BILLS // ACCOUNTS) * 10_000
    print(f"failovers={failovers} retries during them={retries}")
