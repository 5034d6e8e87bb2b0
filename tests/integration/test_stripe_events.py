"""`stripe_events` (seed 004) end to end: SQS (moto) → billingd → Redis, products from the Stripe double."""

from __future__ import annotations

import time

import msgspec
import pytest

from billingd.clients import Unguarded
from billingd.clients.ledger import MICROS, UsageLedger
from billingd.clients.ledger.subscriptions import SubscriptionLedger
from tests.signing import stripe_event, stripe_relay
from tests.stripe_fixtures import MONTH, product, renewal_invoice, subscription
from tests.support import make_settings, running, sqs_source, unique, wait_for

pytestmark = [pytest.mark.anyio, pytest.mark.redis_backends, pytest.mark.usefixtures("redis_backend")]

SECRET = "whsec_test_billingd"


def settings_for(source, stripe_double):
    return make_settings(
        [source],
        stripe={
            "api_key": "sk_test_billingd",
            "api_base": stripe_double.url,
            "webhook_secret": SECRET,
            "timeout": "2s",
        },
    )


@pytest.fixture
def subs(redis):
    return SubscriptionLedger(redis, Unguarded("redis"))


@pytest.fixture
def usage(redis):
    return UsageLedger(redis, Unguarded("redis"))


async def deliver(sqs, stripe_double, events, *, expect_ack, expect_dead=0):
    url, dlq = await sqs.queue()
    source = sqs_source("stripe_events", url, dlq, sqs.endpoint, concurrency=1)
    for event in events:
        await sqs.send(url, event)
    async with running(settings_for(source, stripe_double)) as daemon:
        processed = daemon.metrics.processed
        await wait_for(
            lambda: processed.labels(source["name"], "ack")._value.get() == expect_ack,
            timeout=30,
            what=f"{expect_ack} acked",
        )
        await wait_for(
            lambda: processed.labels(source["name"], "dead_letter")._value.get() == expect_dead,
            what=f"{expect_dead} dead-lettered",
        )
        ignored = daemon.registry.get_sample_value(
            "billingd_stripe_events_ignored_total", {"source": source["name"], "type": "charge.refunded"}
        )
    return url, dlq, ignored


async def test_subscription_lifecycle_keeps_entitlements_true(sqs, stripe_double, subs, usage):
    workspace, customer = unique("ws"), unique("cus")
    stripe_double.add(
        "products", product("prod_pro", AI_CREDITS="1000/month", WHATSAPP="unlimited", DASHBOARD="access")
    )
    stripe_double.add("products", product("prod_lite", AI_CREDITS="100/month"))
    stripe_double.add("customers", {"id": customer, "metadata": {"workspace_id": workspace}})
    start = int(time.time()) - 86400
    created = subscription("sub_1", customer, ["prod_pro"], start=start)
    downgraded = subscription("sub_1", customer, ["prod_lite"], start=start)
    events = [
        stripe_event(
            "customer.created", {"id": customer, "object": "customer", "metadata": {"workspace_id": workspace}}, 100
        ),
        stripe_event("customer.subscription.created", created, 101),
    ]
    await deliver(sqs, stripe_double, events, expect_ack=2)
    assert await subs.subject_of(customer) == workspace
    assert await usage.customer(workspace) == customer
    ai = await usage.entitlement(workspace, "AI_CREDITS")
    assert (ai["active"], ai["limit"], ai["period"], ai["period_start"]) == (
        "1",
        str(1000 * MICROS),
        "month",
        str(start),
    )
    assert (await usage.entitlement(workspace, "WHATSAPP"))["limit"] == "-1"
    assert (await usage.entitlement(workspace, "DASHBOARD"))["tracked"] == "0"
    # usage counted against it, then a downgrade: usage in the same period is kept, dropped keys deactivated
    await usage.apply(workspace, "AI_CREDITS", 40 * MICROS, "u1", consume=True, now=int(time.time()), dedup_ttl=60)
    await deliver(sqs, stripe_double, [stripe_event("customer.subscription.updated", downgraded, 102)], expect_ack=1)
    ai = await usage.entitlement(workspace, "AI_CREDITS")
    assert (ai["limit"], ai["used"]) == (str(100 * MICROS), str(40 * MICROS))
    assert (await usage.entitlement(workspace, "WHATSAPP"))["active"] == "0"
    # cancelled: everything inactive; a late, older update changes nothing
    deleted = {**downgraded, "status": "canceled"}
    late = stripe_event("customer.subscription.updated", created, 101, event_id="evt_late")
    await deliver(sqs, stripe_double, [stripe_event("customer.subscription.deleted", deleted, 103), late], expect_ack=2)
    assert (await usage.entitlement(workspace, "AI_CREDITS"))["active"] == "0"
    assert (await subs.subscription(workspace))["status"] == "canceled"
    assert (await usage.entitlement(workspace, "WHATSAPP"))["active"] == "0"
    fetched = {r.path for r in stripe_double.requests}
    assert fetched == {"/v1/products/prod_pro", "/v1/products/prod_lite"}  # the customer was mapped from its event


async def test_renewal_resets_counters_of_the_new_period_and_features_are_replaced(sqs, stripe_double, subs, usage):
    workspace, customer = unique("ws"), unique("cus")
    stripe_double.add("products", product("prod_pro", AI_CREDITS="1000/month"))
    stripe_double.add("customers", {"id": customer, "metadata": {"workspace_id": workspace}})
    old_start = int(time.time()) - MONTH - 3600
    new_start = old_start + MONTH
    sub = subscription("sub_1", customer, ["prod_pro"], start=old_start)
    await deliver(sqs, stripe_double, [stripe_event("customer.subscription.created", sub, 200)], expect_ack=1)
    await usage.apply(workspace, "whatsapp_message", 7 * MICROS, "w1", consume=False, now=old_start + 10, dedup_ttl=60)
    summary = {
        "object": "entitlements.active_entitlement_summary",
        "customer": customer,
        "entitlements": {
            "data": [
                {"feature": "feat_1", "lookup_key": "whatsapp_campaigns"},
                {"feature": "feat_2", "lookup_key": "ai_tutor"},
            ]
        },
    }
    events = [
        stripe_event("invoice.paid", renewal_invoice("in_r1", customer, new_start, new_start + MONTH), 300),
        stripe_event("entitlements.active_entitlement_summary.updated", summary, 301),
        stripe_event("charge.refunded", {"id": "ch_1", "object": "charge"}, 302),
    ]
    _, _, ignored = await deliver(sqs, stripe_double, events, expect_ack=3)
    assert await usage.counter(workspace, "whatsapp_message") == (0, new_start)
    ai = await usage.entitlement(workspace, "AI_CREDITS")
    assert (ai["used"], ai["period_start"], ai["period_end"]) == ("0", str(new_start), str(new_start + MONTH))
    assert await subs.features(workspace) == {"whatsapp_campaigns", "ai_tutor"}
    assert ignored == 1
    # a replay of the renewal after new usage leaves the new period's usage alone
    await usage.apply(workspace, "whatsapp_message", 2 * MICROS, "w2", consume=False, now=new_start + 60, dedup_ttl=60)
    replay = stripe_event("invoice.paid", renewal_invoice("in_r1", customer, new_start, new_start + MONTH), 300)
    await deliver(sqs, stripe_double, [replay], expect_ack=1)
    assert await usage.counter(workspace, "whatsapp_message") == (2 * MICROS, new_start)


async def test_signed_relays_and_eventbridge_envelopes_apply_and_forged_or_replayed_ones_are_dead_lettered(
    sqs, stripe_double, subs
):
    """Issue 24, item 8: a valid relay that waited an hour on the queue (retried, backlogged,
    replayed) is applied — before, it was dead-lettered 5 minutes after signing and no replay
    could ever pass. What the 5 minutes still bound is signing → the relay's receipt."""
    good, forged, late, replayed, ancient, bridged = (unique("ws") for _ in range(6))

    def customer_event(workspace: str, n: int) -> dict:
        return stripe_event(
            "customer.updated",
            {"id": f"cus_{workspace}", "object": "customer", "metadata": {"workspace_id": workspace}},
            n,
        )

    now = int(time.time())
    forged_relay = stripe_relay(customer_event(forged, 2), "whsec_not_ours")
    late_relay = stripe_relay(customer_event(late, 3), SECRET, timestamp=now - 3600)  # an hour on the queue
    replayed_relay = {**stripe_relay(customer_event(replayed, 6), SECRET, timestamp=now - 3600), "received_at": now}
    ancient_relay = stripe_relay(customer_event(ancient, 7), SECRET, timestamp=now - 40 * 86400)
    tampered = stripe_relay(customer_event(good, 4), SECRET)
    tampered["body"] = tampered["body"].replace(good, forged)
    events = [
        {**stripe_relay(customer_event(good, 1), SECRET), "received_at": now},
        forged_relay,
        late_relay,
        replayed_relay,
        ancient_relay,
        tampered,
        {
            "version": "0",
            "detail-type": "customer.updated",
            "source": "aws.partner/stripe.com/ed_1",
            "detail": customer_event(bridged, 5),
        },
    ]
    _, dlq, _ = await deliver(sqs, stripe_double, events, expect_ack=3, expect_dead=4)
    for applied in (good, late, bridged):
        assert await subs.subject_of(f"cus_{applied}") == applied
    for refused in (forged, replayed, ancient):
        assert await subs.subject_of(f"cus_{refused}") is None
    reasons = sorted(m["MessageAttributes"]["reason"]["StringValue"] for m in await sqs.take(dlq))
    assert len(reasons) == 4
    assert sum(r.startswith("Stripe-Signature verification failed") for r in reasons) == 2  # forged, tampered
    assert any("the relay received this webhook 3600 s after Stripe signed it" in r for r in reasons)
    assert any("40.0 days old, more than [stripe].webhook_max_age (30 days)" in r for r in reasons)


async def test_a_customer_without_a_workspace_is_dead_lettered_with_the_fix(sqs, stripe_double):
    customer = unique("cus")
    stripe_double.add("customers", {"id": customer, "metadata": {}})
    stripe_double.add("products", product("prod_pro", AI_CREDITS="10/month"))
    event = stripe_event("customer.subscription.created", subscription("sub_9", customer, ["prod_pro"], start=1), 1)
    _, dlq, _ = await deliver(sqs, stripe_double, [event], expect_ack=0, expect_dead=1)
    [letter] = await sqs.take(dlq)
    reason = letter["MessageAttributes"]["reason"]["StringValue"]
    assert reason.startswith(f"customer {customer} has no metadata.workspace_id")
    assert msgspec.json.decode(letter["Body"])["id"] == event["id"]
