"""`usage` (seeds 001 and 004) end to end: SQS (moto) → billingd → Redis and the Stripe double."""

from __future__ import annotations

import time

import anyio
import pytest

from billingd.clients import Unguarded
from billingd.clients.ledger import MICROS, UsageLedger
from billingd.supervisors.breaker import BreakerState
from tests.support import make_settings, meter_id, running, sqs_source, unique, wait_for

pytestmark = [pytest.mark.anyio, pytest.mark.redis_backends, pytest.mark.usefixtures("redis_backend")]

METERS = {"ai_credits": "ai_credits", "whatsapp_message": "whatsapp_messages", "AI_TUTOR_ACCESS": "ai_tutor_uses"}


def settings_for(source, stripe_double, meter_api="stream", delivery=None):
    """Settings reporting to the Stripe double; `v1` implies inline delivery (the outbox streams)."""
    stripe = {"api_key": "sk_test_billingd", "api_base": stripe_double.url, "meters": METERS, "timeout": "2s"}
    delivery = delivery or ("inline" if meter_api == "v1" else "outbox")
    return make_settings([source], stripe={**stripe, "meter_api": meter_api, "meter_delivery": delivery})


async def recorded(stripe_double, count: int) -> None:
    """Wait until the double recorded `count` meter events (the outbox sends after the ack)."""
    await wait_for(lambda: len(stripe_double.meter_events) >= count, timeout=20, what=f"{count} meter events")


@pytest.fixture
def ledger(redis):
    return UsageLedger(redis, Unguarded("redis"))


async def month_entitlement(ledger, user, key, limit, **kwargs):
    start = int(time.time()) - 3600
    await ledger.put_entitlement(
        user, key, limit=None if limit is None else limit * MICROS, period="month", period_start=start, **kwargs
    )


async def test_seed_001_examples_consume_entitlements_and_refusals_reach_the_dlq(sqs, redis, ledger, stripe_double):
    url, dlq = await sqs.queue()
    source = sqs_source("usage", url, dlq, sqs.endpoint)
    user, other, idle = unique("user"), unique("user"), unique("user")
    await month_entitlement(ledger, user, "ACCESS_DASHBOARD", 10)
    await month_entitlement(ledger, other, "ACCESS_DASHBOARD", 2)
    await month_entitlement(ledger, idle, "ACCESS_DASHBOARD", 10, active=False)
    # seed 001 "Message body" and batch examples
    await sqs.send(url, {"userId": user, "entitlementKey": "ACCESS_DASHBOARD", "amount": 1})
    await sqs.send(
        url, {"userId": user, "entitlementKey": "ACCESS_DASHBOARD", "amount": 2, "metadata": {"source": "api"}}
    )
    await sqs.send(url, {"userId": user, "entitlementKey": "ACCESS_DASHBOARD"})  # amount defaults to 1
    await sqs.send(url, {"userId": other, "entitlementKey": "ACCESS_DASHBOARD", "amount": 3})  # over the limit of 2
    await sqs.send(url, {"userId": idle, "entitlementKey": "ACCESS_DASHBOARD", "amount": 1})  # inactive
    await sqs.send(url, {"entitlementKey": "ACCESS_DASHBOARD", "amount": 1})  # missing userId
    async with running(settings_for(source, stripe_double)) as daemon:
        processed = daemon.metrics.processed
        await wait_for(lambda: processed.labels(source["name"], "ack")._value.get() == 3, timeout=20, what="3 acked")
        await wait_for(lambda: processed.labels(source["name"], "dead_letter")._value.get() == 3, what="3 refused")
        await wait_for(lambda: _depth(sqs, dlq, 3), what="3 in the DLQ")
    assert (await ledger.entitlement(user, "ACCESS_DASHBOARD"))["used"] == str(4 * MICROS)
    assert (await ledger.counter(user, "ACCESS_DASHBOARD"))[0] == 4 * MICROS
    assert (await ledger.entitlement(other, "ACCESS_DASHBOARD"))["used"] == "0"
    reasons = sorted(m["MessageAttributes"]["reason"]["StringValue"] for m in await sqs.take(dlq))
    assert reasons[0].startswith(f"entitlement ACCESS_DASHBOARD of {idle} is inactive")
    assert reasons[1].startswith("invalid message: Object missing required field `userId`")
    assert reasons[2] == f"over the limit of ACCESS_DASHBOARD for {other}: 0 used + 3 > 2"
    assert stripe_double.requests == []  # ACCESS_DASHBOARD is not a metered event type


async def test_the_same_idempotency_key_twice_counts_once_and_meters_once(sqs, ledger, stripe_double):
    url, dlq = await sqs.queue()
    source = sqs_source("usage", url, dlq, sqs.endpoint)
    user = unique("user")
    await month_entitlement(ledger, user, "AI_TUTOR_ACCESS", 100)
    await ledger.set_customer(user, "cus_tutor")
    event = {"userId": user, "entitlementKey": "AI_TUTOR_ACCESS", "amount": 1, "idempotencyKey": "evt-1"}
    await sqs.send(url, event)
    await sqs.send(url, event)
    async with running(settings_for(source, stripe_double)) as daemon:
        acked = daemon.metrics.processed.labels(source["name"], "ack")
        await wait_for(lambda: acked._value.get() == 2, timeout=20, what="both acked")
        await recorded(stripe_double, 1)
    assert (await ledger.entitlement(user, "AI_TUTOR_ACCESS"))["used"] == str(MICROS)
    assert (await ledger.counter(user, "AI_TUTOR_ACCESS"))[0] == MICROS
    [meter] = stripe_double.meter_events
    assert meter["event_name"] == "ai_tutor_uses"
    assert meter["identifier"] == meter_id(event)  # derived from (user, entitlement, key): no tenant shares it
    assert meter["payload"] == {"stripe_customer_id": "cus_tutor", "value": "1"}


@pytest.mark.parametrize("meter_api", ["stream", "v1"])
async def test_seed_004_usage_events_become_one_meter_event_each(sqs, ledger, stripe_double, meter_api):
    url, dlq = await sqs.queue()
    source = sqs_source("usage", url, dlq, sqs.endpoint, handler_options={"value_scale": {"ai_credits": 10}})
    workspace = unique("ws")
    await ledger.set_customer(workspace, "cus_workspace")
    # seed 004 "Publishing Usage Events" examples
    await sqs.send(
        url,
        {
            "event_type": "ai_credits",
            "workspace_id": workspace,
            "value": 2.5,
            "idempotency_key": f"msg_xyz789-{workspace}",
        },
    )
    await sqs.send(
        url,
        {
            "event_type": "whatsapp_message",
            "workspace_id": workspace,
            "value": 1,
            "idempotency_key": f"wa_msg_456-{workspace}",
        },
    )
    await sqs.send(
        url,
        {
            "event_type": "whatsapp_message",
            "workspace_id": workspace,
            "value": 3,
            "idempotency_key": f"wa_msg_457-{workspace}",
            "stripe_customer_id": "cus_explicit",
        },
    )
    await sqs.send(url, {"event_type": "email_send", "workspace_id": workspace, "value": 7})  # not metered here
    async with running(settings_for(source, stripe_double, meter_api)) as daemon:
        acked = daemon.metrics.processed.labels(source["name"], "ack")
        await wait_for(lambda: acked._value.get() == 4, timeout=20, what="4 acked")
        await recorded(stripe_double, 3)
    events = {e["identifier"]: e for e in stripe_double.meter_events}
    assert len(events) == 3

    def sent(event_type: str, key: str) -> dict:
        return events[meter_id({"workspace_id": workspace, "event_type": event_type, "idempotency_key": key})]

    ai = sent("ai_credits", f"msg_xyz789-{workspace}")
    assert (ai["event_name"], ai["payload"]) == ("ai_credits", {"stripe_customer_id": "cus_workspace", "value": "25"})
    wa = sent("whatsapp_message", f"wa_msg_456-{workspace}")
    assert (wa["event_name"], wa["payload"]) == (
        "whatsapp_messages",
        {"stripe_customer_id": "cus_workspace", "value": "1"},
    )
    assert sent("whatsapp_message", f"wa_msg_457-{workspace}")["payload"]["stripe_customer_id"] == "cus_explicit"
    paths = [r.path for r in stripe_double.requests]
    assert paths[0] == "/v1/billing/meters"  # the meters are known before anything is sent
    if meter_api == "v1":  # one call each, its Idempotency-Key derived from the identifier
        keys = {r.headers["Idempotency-Key"] for r in stripe_double.requests if r.method == "POST"}
        assert keys == {f"billingd-meter-{identifier}" for identifier in events}
    else:  # one session, then stream requests carrying every event
        paths = paths[1:]
        assert paths[0] == "/v2/billing/meter_event_session"
        assert set(paths[1:]) == {"/v2/billing/meter_event_stream"}
        assert sum(stripe_double.stream_requests) == 3
    assert (await ledger.counter(workspace, "ai_credits"))[0] == 2_500_000  # exact: 2.5 units in micro-units
    assert (await ledger.counter(workspace, "whatsapp_message"))[0] == 4 * MICROS
    assert (await ledger.counter(workspace, "email_send"))[0] == 7 * MICROS


async def test_stripe_down_for_a_while_opens_the_breaker_pauses_and_meters_everything_once(sqs, ledger, stripe_double):
    url, dlq = await sqs.queue()
    source = sqs_source("usage", url, dlq, sqs.endpoint, max_attempts=3)
    workspace = unique("ws")
    await ledger.set_customer(workspace, "cus_outage")
    keys = [f"out-{workspace}-{i}" for i in range(10)]
    for key in keys:
        await sqs.send(
            url, {"event_type": "whatsapp_message", "workspace_id": workspace, "value": 1, "idempotency_key": key}
        )
    stripe_double.set_mode("error", 500)
    seen = {"open": False, "paused": False}
    async with running(settings_for(source, stripe_double, delivery="inline")) as daemon:
        breaker, status = daemon.board.get("stripe"), daemon.statuses[source["name"]]

        async def watch() -> None:
            while True:
                seen["open"] |= breaker.state is BreakerState.OPEN
                seen["paused"] |= "stripe" in status.paused_by
                await anyio.sleep(0.01)

        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            await wait_for(lambda: seen["open"] and seen["paused"], timeout=20, what="breaker open, intake paused")
            await anyio.sleep(3)  # Stripe stays down a while: probes fail, the timeout doubles
            stripe_double.set_mode("ok")
            acked = daemon.metrics.processed.labels(source["name"], "ack")
            await wait_for(lambda: acked._value.get() == 10, timeout=40, what="all acked after recovery")
            tg.cancel_scope.cancel()
        assert daemon.metrics.processed.labels(source["name"], "dead_letter")._value.get() == 0
    expected = [
        meter_id({"workspace_id": workspace, "event_type": "whatsapp_message", "idempotency_key": k}) for k in keys
    ]
    assert sorted(e["identifier"] for e in stripe_double.meter_events) == sorted(expected)  # each exactly once
    assert (await ledger.counter(workspace, "whatsapp_message"))[0] == 10 * MICROS  # Redis step once each
    assert await sqs.depth(dlq) == 0


async def test_missing_entitlement_is_retried_then_dead_lettered(sqs, stripe_double):
    url, dlq = await sqs.queue()
    source = sqs_source("usage", url, dlq, sqs.endpoint, max_attempts=2)
    await sqs.send(url, {"userId": unique("nobody"), "entitlementKey": "AI_TUTOR_ACCESS"})
    async with running(settings_for(source, stripe_double)) as daemon:
        dead = daemon.metrics.processed.labels(source["name"], "dead_letter")
        await wait_for(lambda: dead._value.get() == 1, timeout=20, what="dead-lettered")
        assert daemon.metrics.processed.labels(source["name"], "retry")._value.get() == 1
    [letter] = await sqs.take(dlq)
    assert (
        "gave up after 2 attempts: no entitlement AI_TUTOR_ACCESS"
        in letter["MessageAttributes"]["reason"]["StringValue"]
    )


@pytest.mark.parametrize("meter_api", ["stream", "v1"])
async def test_a_permanent_stripe_refusal_is_dead_lettered_with_stripes_message(sqs, ledger, stripe_double, meter_api):
    """Inline delivery: the message waits for Stripe's answer (the outbox holds a refused event
    for finance instead: test_meter_outbox)."""
    url, dlq = await sqs.queue()
    source = sqs_source("usage", url, dlq, sqs.endpoint)
    workspace = unique("ws")
    await ledger.set_customer(workspace, "cus_x")
    stripe_double.fail_next(1, 400)
    await sqs.send(
        url, {"event_type": "whatsapp_message", "workspace_id": workspace, "value": 1, "idempotency_key": "r1"}
    )
    await sqs.send(url, {"event_type": "ai_credits", "workspace_id": workspace, "value": 0.5})  # not whole, no scale
    async with running(settings_for(source, stripe_double, meter_api, "inline")) as daemon:
        dead = daemon.metrics.processed.labels(source["name"], "dead_letter")
        await wait_for(lambda: dead._value.get() == 2, timeout=20, what="both dead-lettered")
        await wait_for(lambda: _depth(sqs, dlq, 2), what="2 in the DLQ")
    reasons = sorted(m["MessageAttributes"]["reason"]["StringValue"] for m in await sqs.take(dlq))
    assert reasons[0].startswith("Stripe meters take whole numbers: ai_credits value 0.5")
    assert reasons[1].startswith("stripe: 400")
    assert (await ledger.counter(workspace, "ai_credits"))[0] == 0  # refused before any effect


async def _depth(sqs, url, n) -> bool:
    return await sqs.depth(url) == n


async def test_a_hanging_stripe_times_out_retries_and_meters_once_when_it_answers(sqs, ledger, stripe_double):
    url, dlq = await sqs.queue()
    source = sqs_source("usage", url, dlq, sqs.endpoint)
    workspace = unique("ws")
    await ledger.set_customer(workspace, "cus_hang")
    stripe_double.set_mode("hang")
    await sqs.send(
        url,
        {
            "event_type": "whatsapp_message",
            "workspace_id": workspace,
            "value": 1,
            "idempotency_key": f"hang-{workspace}",
        },
    )
    settings = make_settings(
        [source],
        stripe={"api_key": "sk_test_billingd", "api_base": stripe_double.url, "meters": METERS, "timeout": "500ms",
                "meter_delivery": "inline"},
    )  # fmt: skip
    async with running(settings) as daemon:
        retries = daemon.metrics.processed.labels(source["name"], "retry")
        await wait_for(lambda: retries._value.get() >= 1, timeout=20, what="a timed-out call retried")
        stripe_double.set_mode("ok")
        acked = daemon.metrics.processed.labels(source["name"], "ack")
        await wait_for(lambda: acked._value.get() == 1, timeout=30, what="metered after Stripe answers")
    hung = {"workspace_id": workspace, "event_type": "whatsapp_message", "idempotency_key": f"hang-{workspace}"}
    assert [e["identifier"] for e in stripe_double.meter_events] == [meter_id(hung)]
    assert await sqs.depth(dlq) == 0
