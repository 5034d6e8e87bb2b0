"""Each Stripe event type changes exactly the keys it should; a replay changes nothing."""

from __future__ import annotations

import time

import msgspec
import pytest

from billingd.sources.base import Delivery
from tests.signing import stripe_event
from tests.stripe_fixtures import MONTH, product, renewal_invoice, subscription
from tests.support import build_handler_for, make_settings, sqs_source

pytestmark = [pytest.mark.anyio, pytest.mark.redis_backends, pytest.mark.usefixtures("redis_backend")]


async def snapshot(redis) -> dict[str, object]:
    """Every billingd key and its value (once-only step records, request budgets and leases
    excluded: bookkeeping, not state)."""
    state: dict[str, object] = {}
    async for raw in redis.scan_iter(match="billingd:*"):
        name = raw.decode()
        if name.startswith(("billingd:once:", "billingd:budget:", "billingd:lease:")):
            continue
        kind = (await redis.type(name)).decode()
        if kind == "hash":
            state[name] = await redis.hgetall(name)
        elif kind == "set":
            state[name] = await redis.smembers(name)
        else:
            state[name] = await redis.get(name)
    return state


def changed(before: dict, after: dict) -> set[str]:
    return {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}


async def test_each_event_type_changes_exactly_its_keys_and_replays_change_nothing(redis, stripe_double):
    stripe_double.add("products", product("prod_pro", AI_CREDITS="1000/month", SEATS="5/month"))
    source = sqs_source("stripe_events", "u", "d", "e")
    settings = make_settings([source], stripe={"api_key": "sk_test", "api_base": stripe_double.url})
    handler, clients = build_handler_for(settings)
    start = int(time.time()) - 3600
    ws, cus = "ws_fx", "cus_fx"
    sub = subscription("sub_fx", cus, ["prod_pro"], start=start)
    summary = {
        "object": "entitlements.active_entitlement_summary",
        "customer": cus,
        "entitlements": {"data": [{"feature": "f1", "lookup_key": "campaigns"}]},
    }
    steps = [
        (
            stripe_event("customer.created", {"id": cus, "object": "customer", "metadata": {"workspace_id": ws}}, 1),
            {f"billingd:customer:{{{ws}}}", f"billingd:subject:{{{cus}}}"},
        ),
        (
            stripe_event("customer.subscription.created", sub, 2),
            {
                f"billingd:sub:{{{ws}}}",
                f"billingd:period:{{{ws}}}",
                f"billingd:ent:{{{ws}}}:AI_CREDITS",
                f"billingd:ent:{{{ws}}}:SEATS",
            },
        ),
        (
            stripe_event("invoice.paid", renewal_invoice("in_fx", cus, start + MONTH, start + 2 * MONTH), 3),
            {
                f"billingd:sub:{{{ws}}}",
                f"billingd:period:{{{ws}}}",
                f"billingd:ent:{{{ws}}}:AI_CREDITS",
                f"billingd:ent:{{{ws}}}:SEATS",
            },
        ),
        (
            stripe_event("entitlements.active_entitlement_summary.updated", summary, 4),
            {f"billingd:sub:{{{ws}}}", f"billingd:features:{{{ws}}}"},
        ),
        (
            stripe_event("customer.subscription.deleted", {**sub, "status": "canceled"}, 5),
            {f"billingd:sub:{{{ws}}}", f"billingd:ent:{{{ws}}}:AI_CREDITS", f"billingd:ent:{{{ws}}}:SEATS"},
        ),
        (
            stripe_event(
                "invoice.paid", {"id": "in_manual", "object": "invoice", "customer": cus, "billing_reason": "manual"}, 6
            ),
            set(),
        ),
        (stripe_event("payment_intent.succeeded", {"id": "pi_1"}, 7), set()),
    ]
    try:
        for event, expected in steps:
            before = await snapshot(redis)
            await handler.handle(Delivery(msgspec.json.encode(event), event["id"], 1, {}, None))
            assert changed(before, await snapshot(redis)) == expected, event["type"]
        settled = await snapshot(redis)
        for event, _ in steps:  # replays, in order and reversed
            await handler.handle(Delivery(msgspec.json.encode(event), event["id"], 1, {}, None))
        for event, _ in reversed(steps):
            await handler.handle(Delivery(msgspec.json.encode(event), f"again-{event['id']}", 1, {}, None))
        assert await snapshot(redis) == settled
    finally:
        await clients.aclose()
