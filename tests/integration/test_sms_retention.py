"""Issue 10: SMS charge records, CDRs and Jasmin records expire `retention` after their last
update (tested with a short one); the per-account totals never expire."""

from __future__ import annotations

import pytest

from billingd.clients.ledger.base import key
from tests.jasmin_capture import load, replay
from tests.seed002 import bill_event, dlr
from tests.support import AMQP_URL, amqp_source, make_settings, running, unique, wait_for

pytestmark = [pytest.mark.anyio, pytest.mark.redis_backends, pytest.mark.usefixtures("redis_backend")]


async def test_records_expire_after_the_retention_and_totals_stay(amqp, redis):
    options = {"retention": "1s"}
    bills = amqp.track(amqp_source("sms_billing", handler_options=options))
    dlrs = amqp.track(amqp_source("sms_dlr", handler_options=options))
    uid, message_id = unique("acct"), unique("sms")
    async with running(make_settings([bills, dlrs])) as daemon:
        await amqp.publish(bills["exchange"], "b", bill_event("b-1", uid, "ESME_RTHROTTLED", amount=0.01))
        await amqp.publish(dlrs["exchange"], "d", dlr(message_id, "DELIVRD"))
        for source in (bills, dlrs):
            acked = daemon.metrics.processed.labels(source["name"], "ack")
            await wait_for(lambda a=acked: a._value.get() == 1, what="applied")
    charge, cdr, refunds = (
        key("sms", "charge", "b-1", tag=uid),
        key("cdr", tag=message_id),
        key("sms", "refunds", tag=uid),
    )
    assert 0 < await redis.pttl(charge) <= 1000 and 0 < await redis.pttl(cdr) <= 1000
    await wait_for(lambda: _gone(redis, charge, cdr), timeout=5, what="records expired")
    assert int(await redis.get(refunds)) == 10_000  # the account's total is a balance: kept
    assert await redis.ttl(refunds) == -1


async def test_native_jasmin_records_carry_the_retention_too(amqp, redis):
    messaging = unique("jasmin-messaging")
    amqp._exchanges.append(messaging)
    common = {"exchange": messaging, "exchange_declare": "transient", "handler_options": {"retention": "1h"}}
    submits = amqp.track(amqp_source("sms_billing", routing_keys=["submit.sm.*"], **common))
    dlrs = amqp.track(amqp_source("sms_dlr", routing_keys=["dlr.#"], **common))
    captured = load()
    first = next(m for m in captured if m.routing_key == "submit.sm.fakesmsc")
    resp = next(m for m in captured if m.routing_key == "dlr.submit_sm_resp" and m.message_id == first.message_id)
    receipt = next(
        m for m in captured if m.routing_key == "dlr.deliver_sm" and m.message_id == resp.header("smpp_msgid")
    )
    story = [first, resp, receipt]
    import aiormq

    async with running(make_settings([submits, dlrs])) as daemon:
        connection = await aiormq.connect(AMQP_URL)
        await replay(await connection.channel(publisher_confirms=True), story, {"messaging": messaging})
        await connection.close()
        acked = daemon.metrics.processed.labels(dlrs["name"], "ack")
        await wait_for(lambda: acked._value.get() >= 2, what="receipts applied")
    smpp = resp.header("smpp_msgid")
    for name in (key("submit", tag=first.message_id), key("cdr", tag=first.message_id), key("smpp", tag=smpp)):
        assert 3500 < await redis.ttl(name) <= 3600, name


async def _gone(redis, *names: str) -> bool:
    return await redis.exists(*names) == 0
