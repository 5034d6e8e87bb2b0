"""Absurd amounts and counters at their limit (DESIGN §8 "bounds before effects"), on real
RabbitMQ and Redis: refused for that message alone, with a reason, nothing written."""

from __future__ import annotations

import pytest

from billingd.clients import Unguarded
from billingd.clients.ledger import SmsLedger, UsageLedger
from billingd.clients.ledger.base import LEDGER_MAX, key
from tests.seed002 import bill_event
from tests.support import amqp_source, make_settings, running, unique, wait_for

pytestmark = [pytest.mark.anyio, pytest.mark.redis_backends, pytest.mark.usefixtures("redis_backend")]


async def _reasons(amqp, queue: str) -> dict[str, str]:
    return {m.message_id: m.headers["x-billingd-reason"] for m in await amqp.drain_queue(f"{queue}.dlq")}


async def test_absurd_bill_amounts_and_a_refund_past_the_ledger_limit_are_refused_alone(amqp, redis):
    source = amqp.track(amqp_source("sms_billing"))
    ledger = SmsLedger(redis, Unguarded("redis"))
    full, other = unique("acct-full"), unique("acct")
    await redis.set(key("sms", "refunds", tag=full), LEDGER_MAX - 5_000)
    messages = {
        "huge": bill_event("b-huge", other, "ESME_RTHROTTLED", amount=10**400),
        "exp": b'{"bid": "b-exp", "user": {"uid": "u"}, "amounts": {"submit_sm_resp": 1e400}, "status": "ESME_ROK"}',
        "digits": b'{"bid": "b-digits", "user": {"uid": "u"}, "amounts": {"submit_sm_resp": 1'
        + b"0" * 5000
        + b'}, "status": "ESME_RINVDSTADR"}',
        "overflow": bill_event("b-overflow", full, "ESME_RTHROTTLED", amount=0.01),
        "fine": bill_event("b-fine", other, "ESME_RTHROTTLED", amount=0.01),
    }
    async with running(make_settings([source])) as daemon:
        for message_id, body in messages.items():
            await amqp.publish(source["exchange"], "bill_request.submit_sm_resp.x", body, message_id=message_id)
        processed = daemon.metrics.processed
        await wait_for(lambda: processed.labels(source["name"], "dead_letter")._value.get() == 4, what="4 refused")
        await wait_for(lambda: processed.labels(source["name"], "ack")._value.get() == 1, what="1 applied")
        assert daemon.metrics.restarts.labels(source["name"])._value.get() == 0
    reasons = await _reasons(amqp, source["queue"])
    assert "above the limit" in reasons["huge"]
    assert "above the limit" in reasons["exp"]
    assert "above the limit" in reasons["digits"]
    assert len(reasons["digits"]) < 500  # the 5,000 digits are not copied into the reason
    assert "ledger limit" in reasons["overflow"]
    assert await ledger.refunds_micros(full) == LEDGER_MAX - 5_000  # untouched
    assert await ledger.charge(full, "b-overflow") == {}  # nothing half-written
    assert await ledger.refunds_micros(other) == 10_000  # the valid refund, alone


async def test_a_usage_counter_at_its_limit_refuses_the_event_and_keeps_counting_others(amqp, redis):
    source = amqp.track(amqp_source("usage"))
    usage = UsageLedger(redis, Unguarded("redis"))
    workspace = unique("ws")
    event = {"event_type": "ai_credits", "workspace_id": workspace, "value": 2, "idempotency_key": "k1"}
    async with running(make_settings([source])) as daemon:
        await amqp.publish(source["exchange"], "usage", event, message_id="first")
        acked = daemon.metrics.processed.labels(source["name"], "ack")
        await wait_for(lambda: acked._value.get() == 1, what="first event counted")
        await redis.hset(key("usage", tag=workspace), "ai_credits", LEDGER_MAX - 1)
        await amqp.publish(source["exchange"], "usage", {**event, "idempotency_key": "k2"}, message_id="second")
        await amqp.publish(source["exchange"], "usage", {**event, "event_type": "emails", "idempotency_key": "k3"})
        dead = daemon.metrics.processed.labels(source["name"], "dead_letter")
        await wait_for(lambda: dead._value.get() == 1 and acked._value.get() == 2, what="one refused, one counted")
    reasons = await _reasons(amqp, source["queue"])
    assert "ledger limit" in reasons["second"]
    assert (await usage.counter(workspace, "ai_credits"))[0] == LEDGER_MAX - 1
    assert await usage.event(workspace, "k2") == {}  # not recorded as applied: a replay after a fix can apply it
    assert (await usage.counter(workspace, "emails"))[0] == 2_000_000
