"""A producer's key is unique only within its scope (issue 24, items 3, 4, 5, 7): what billingd
derives from it is scoped, two identical key-less bodies are not one event, and a Stripe that is
misconfigured holds usage instead of dead-lettering it."""

from __future__ import annotations

import time

import msgspec
import pytest
from structlog.testing import capture_logs

from billingd.clients import Unguarded
from billingd.clients.ledger import MICROS, UsageLedger
from tests.hostile import WithoutMessageId
from tests.integration.test_usage import METERS, month_entitlement
from tests.support import amqp_source, make_settings, meter_id, running, unique, wait_for

pytestmark = [pytest.mark.anyio]


def settings_for(source, stripe_double, **stripe):
    base = {"api_key": "sk_test_billingd", "api_base": stripe_double.url, "meters": METERS, "timeout": "2s"}
    if stripe.get("meter_api") == "v1":
        base["meter_delivery"] = "inline"  # the outbox streams
    return make_settings([source], stripe={**base, **stripe})


async def recorded(stripe_double, count: int) -> None:
    await wait_for(lambda: len(stripe_double.meter_events) >= count, timeout=20, what=f"{count} meter events")


def processed(daemon, source, outcome):
    return daemon.metrics.processed.labels(source["name"], outcome)._value.get()


@pytest.mark.redis_backends
async def test_one_key_on_two_entitlements_of_one_user_is_two_events(amqp, redis, redis_backend, stripe_double):
    """Item 4. Before: the second entitlement's event was acked as a duplicate of the first's, unapplied."""
    ledger = UsageLedger(redis, Unguarded("redis"))
    user = unique("user")
    for name in ("AI_TUTOR_ACCESS", "ACCESS_DASHBOARD"):
        await month_entitlement(ledger, user, name, 10)
    await ledger.set_customer(user, "cus_scopes")
    source = amqp.track(amqp_source("usage"))
    events = [
        {"userId": user, "entitlementKey": name, "amount": 2, "idempotencyKey": "evt-7"}
        for name in ("AI_TUTOR_ACCESS", "ACCESS_DASHBOARD", "AI_TUTOR_ACCESS")  # the last: a true duplicate
    ]
    async with running(settings_for(source, stripe_double)) as daemon:
        for i, event in enumerate(events):
            await amqp.publish(source["exchange"], "usage", event, message_id=f"m-{i}")
        await wait_for(lambda: processed(daemon, source, "ack") == 3, what="acked")
        await recorded(stripe_double, 1)
    for name in ("AI_TUTOR_ACCESS", "ACCESS_DASHBOARD"):
        assert (await ledger.entitlement(user, name))["used"] == str(2 * MICROS)
        assert (await ledger.counter(user, name))[0] == 2 * MICROS
    [billed] = stripe_double.meter_events  # AI_TUTOR_ACCESS is metered once; ACCESS_DASHBOARD is not metered
    assert billed["identifier"] == meter_id(events[0])


async def test_tenants_sharing_a_key_on_v1_are_both_billed(amqp, redis, stripe_double):
    """Item 3, v1. Before: the second tenant's event was dead-lettered ("An event already exists
    with identifier 1") after Redis had counted it."""
    ledger = UsageLedger(redis, Unguarded("redis"))
    source = amqp.track(amqp_source("usage"))
    workspaces = [unique("ws") for _ in range(2)]
    for i, workspace in enumerate(workspaces):
        await ledger.set_customer(workspace, f"cus_v1_{i}")
    async with running(settings_for(source, stripe_double, meter_api="v1")) as daemon:
        for i, workspace in enumerate(workspaces):
            body = {"event_type": "ai_credits", "workspace_id": workspace, "value": 1, "idempotency_key": "1"}
            await amqp.publish(source["exchange"], "usage", body, message_id=f"v1-{i}")
        await wait_for(lambda: processed(daemon, source, "ack") == 2, what="both acked")
        assert processed(daemon, source, "dead_letter") == 0
    assert {e["payload"]["stripe_customer_id"] for e in stripe_double.meter_events} == {"cus_v1_0", "cus_v1_1"}


async def test_identical_key_less_bodies_on_amqp_are_refused_not_counted_once(amqp, redis, stripe_double):
    """Item 7. Before: the message id fell back to a digest of the body, so two identical usage
    events without a key or message_id were counted once."""
    ledger = UsageLedger(redis, Unguarded("redis"))
    workspace = unique("ws")
    source = amqp.track(amqp_source("usage"))
    body = {"event_type": "email_send", "workspace_id": workspace, "value": 1}
    async with running(settings_for(source, stripe_double)) as daemon:
        underlay = await amqp.channel.get_underlay_channel()
        for _ in range(2):  # no message_id property (aio-pika's Message would make one up)
            await underlay.basic_publish(
                msgspec.json.encode(body),
                exchange=source["exchange"],
                routing_key="usage",
                properties=WithoutMessageId(),
            )
        await amqp.publish(source["exchange"], "usage", body, message_id="has-an-id")  # the broker's id is a key
        await wait_for(lambda: processed(daemon, source, "dead_letter") == 2, what="two refused")
        await wait_for(lambda: processed(daemon, source, "ack") == 1, what="one applied")
    assert (await ledger.counter(workspace, "email_send"))[0] == MICROS
    letters = await amqp.drain_queue(source["queue"] + ".dlq")
    assert all("without `idempotency_key` and without an AMQP message_id" in m.headers["x-billingd-reason"]
               for m in letters)  # fmt: skip


@pytest.mark.parametrize("delivery", ["inline", "outbox"])
async def test_a_meter_stripe_does_not_have_holds_its_events_uncounted(amqp, redis, stripe_double, delivery):
    """Item 5: an event type mapped to a meter Stripe does not have (or has deactivated) would be
    refused later as `no_meter` / `archived_meter`: counted, never billed. It waits instead —
    inline its message is retried, never counted; through the outbox its event waits there."""
    ledger = UsageLedger(redis, Unguarded("redis"))
    workspace = unique("ws")
    await ledger.set_customer(workspace, "cus_meterless")
    stripe_double.add_meter("whatsapp_messages", status="inactive")
    source = amqp.track(amqp_source("usage", max_attempts=1))
    body = {"event_type": "whatsapp_message", "workspace_id": workspace, "value": 1, "idempotency_key": "w1"}
    with capture_logs() as logs:
        async with running(settings_for(source, stripe_double, meter_delivery=delivery)) as daemon:
            await amqp.publish(source["exchange"], "usage", body, message_id="w1")
            if delivery == "inline":
                await wait_for(lambda: processed(daemon, source, "retry") >= 3, timeout=20, what="held, retried")
            else:
                await wait_for(lambda: processed(daemon, source, "ack") == 1, what="acked into the outbox")
                await wait_for(lambda: _logged(logs, "Stripe meter missing: meter events held"), what="held")
            assert processed(daemon, source, "dead_letter") == 0  # max_attempts = 1: no attempt was counted
            assert stripe_double.meter_events == []
            stripe_double.add_meter("whatsapp_messages")  # reactivated in Stripe
            await wait_for(lambda: processed(daemon, source, "ack") == 1, timeout=60, what="acked")
            await recorded(stripe_double, 1)
    assert [e["event_name"] for e in stripe_double.meter_events] == ["whatsapp_messages"]
    missing = [e for e in logs if e["event"] == "Stripe meter missing: meter events held"]
    assert missing and "create or reactivate it in Stripe" in missing[0]["detail"]


def _logged(logs: list, event: str) -> bool:
    return any(e["event"] == event for e in logs)


async def test_step_names_do_not_collide_and_an_earlier_billingds_record_keeps_its_identifier(
    amqp, redis, stripe_double
):
    """From the review of issue 24: `meter:{name}:{key}` let entitlement `ai` with key `credits:1`
    and entitlement `ai:credits` with key `1` share one Stripe step (the second never billed); and
    an event applied by an earlier billingd (its record has no `scope`) whose Stripe step had not
    been marked done must keep the bare-key identifier it may already have reached Stripe with."""
    ledger = UsageLedger(redis, Unguarded("redis"))
    user, old_user = unique("user"), unique("user")
    for subject in (user, old_user):
        for name in ("ai", "ai:credits"):
            await month_entitlement(ledger, subject, name, 10)
        await ledger.set_customer(subject, "cus_steps")
    # an earlier billingd's record of old_user's event "legacy-1": Redis step done, Stripe step not
    legacy = {"applied": 1, "period": 0, "at": int(time.time()) - 60}
    await redis.hset(f"billingd:usage-event:{{{old_user}}}:legacy-1", mapping=legacy)
    source = amqp.track(amqp_source("usage"))
    meters = {"ai": "ai_credits", "ai:credits": "ai_credits"}
    events = [
        {"userId": user, "entitlementKey": "ai", "amount": 1, "idempotencyKey": "credits:1"},
        {"userId": user, "entitlementKey": "ai:credits", "amount": 1, "idempotencyKey": "1"},
        {"userId": old_user, "entitlementKey": "ai", "amount": 1, "idempotencyKey": "legacy-1"},
    ]
    async with running(settings_for(source, stripe_double, meters=meters)) as daemon:
        for i, event in enumerate(events):
            await amqp.publish(source["exchange"], "usage", event, message_id=f"s-{i}")
        await wait_for(lambda: processed(daemon, source, "ack") == 3, what="acked")
        await recorded(stripe_double, 3)
    identifiers = sorted(e["identifier"] for e in stripe_double.meter_events)
    assert identifiers == sorted([meter_id(events[0]), meter_id(events[1]), "legacy-1"])
    assert (await ledger.entitlement(old_user, "ai"))["used"] == "0"  # the earlier billingd's duplicate
