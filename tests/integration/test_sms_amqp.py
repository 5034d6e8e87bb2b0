"""Seed 002 end to end: Jasmin events on real RabbitMQ → billingd → effects in real Redis."""

from __future__ import annotations

import msgspec
import pytest

from billingd.clients import Unguarded
from billingd.clients.ledger import SmsLedger
from tests.seed002 import STATUS_TABLE, bill_event, dlr
from tests.support import amqp_source, make_settings, running, unique, wait_for

pytestmark = [pytest.mark.anyio, pytest.mark.redis_backends, pytest.mark.usefixtures("redis_backend")]


async def test_every_status_row_sets_its_cdr_status(amqp, redis):
    source = amqp.track(amqp_source("sms_dlr"))
    ledger = SmsLedger(redis, Unguarded("redis"))
    async with running(make_settings([source])) as daemon:
        ids = {}
        for jasmin, _cdr in STATUS_TABLE.items():
            ids[jasmin] = unique("msg")
            pdu = "submit_sm_resp" if jasmin.startswith("ESME_") else "deliver_sm"
            await amqp.publish(source["exchange"], "dlr.deliver_sm", dlr(ids[jasmin], jasmin, pdu))
        processed = daemon.metrics.processed.labels(source["name"], "ack")
        await wait_for(lambda: processed._value.get() == len(STATUS_TABLE), what="all DLRs acked")
    for jasmin, expected in STATUS_TABLE.items():
        cdr = await ledger.cdr(ids[jasmin])
        assert cdr["status"] == expected, jasmin
        assert cdr["jasmin_status"] == jasmin
        assert msgspec.json.decode(cdr["dlr"])["id"] == f"op-dlr-{ids[jasmin]}"
    assert await amqp.depth(source["queue"]) == 0
    assert await amqp.depth(f"{source['queue']}.dlq") == 0


async def test_bill_events_confirm_and_refund_exactly_once(amqp, redis):
    source = amqp.track(amqp_source("sms_billing"))
    ledger = SmsLedger(redis, Unguarded("redis"))
    uid = unique("acct")
    async with running(make_settings([source])) as daemon:
        await amqp.publish(source["exchange"], "bill_request.submit_sm_resp.x", bill_event("b-ok", uid, "ESME_ROK"))
        failed = bill_event("b-fail", uid, "ESME_RTHROTTLED", amount=0.015)
        for _ in range(2):  # the same refund delivered twice
            await amqp.publish(source["exchange"], "bill_request.submit_sm_resp.x", failed)
        acked = daemon.metrics.processed.labels(source["name"], "ack")
        await wait_for(lambda: acked._value.get() == 3, what="3 bill events acked")
    assert (await ledger.charge(uid, "b-ok"))["state"] == "confirmed"
    refund = await ledger.charge(uid, "b-fail")
    assert refund["state"] == "refunded"
    assert refund["amount_micros"] == "15000"
    assert await ledger.refunds_micros(uid) == 15000  # once, not 30000


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"{not json", "malformed JSON"),
        (b'{"status": "DELIVRD"}', "missing required field `message_id`"),
        (b'{"message_id": "m-1", "status": "SHRUGGED"}', "unknown status 'SHRUGGED'"),
    ],
)
async def test_invalid_dlr_goes_to_dlq_with_reason_and_daemon_stays_ready(amqp, redis, body, reason):
    source = amqp.track(amqp_source("sms_dlr"))
    async with running(make_settings([source])) as daemon:
        await amqp.publish(source["exchange"], "dlr.x", body, message_id="bad-1")
        dlq = f"{source['queue']}.dlq"
        await wait_for(lambda: amqp.depth(dlq), what="message in .dlq")
        assert daemon.readiness()[0]
        assert daemon.metrics.processed.labels(source["name"], "dead_letter")._value.get() == 1
    [dead] = await amqp.drain_queue(dlq)
    assert dead.body == body
    assert reason in dead.headers["x-billingd-reason"]
    assert dead.headers["x-billingd-handler"] == "sms_dlr"
    assert dead.headers["x-billingd-attempts"] == 1
    assert dead.headers["x-billingd-original-message-id"] == "bad-1"
    assert await amqp.depth(source["queue"]) == 0
