"""Out-of-order Stripe subscription events never leave an older state in Redis (hypothesis)."""

from __future__ import annotations

import itertools

import anyio
import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from billingd.clients.ledger import MICROS
from billingd.handlers.stripe.stripe_objects import ACTIVE_STATUSES
from billingd.sources.base import Delivery
from billingd.testing.stripe import StripeDouble
from tests.signing import stripe_event
from tests.stripe_fixtures import product, subscription
from tests.support import build_handler_for, make_settings, sqs_source

PRODUCTS = {
    "prod_a": {"A": "10/month"},
    "prod_b": {"B": "20/month", "A": "5/month"},
    "prod_c": {"C": "unlimited"},
}
_ids = itertools.count()

event_spec = st.fixed_dictionaries(
    {
        "kind": st.sampled_from(["created", "updated", "updated", "resumed", "deleted", "paused"]),
        "products": st.lists(st.sampled_from(sorted(PRODUCTS)), min_size=1, max_size=2, unique=True),
        "status": st.sampled_from(["active", "trialing", "past_due", "unpaid", "incomplete"]),
        "quantity": st.integers(1, 3),
    }
)


def expected_active(spec: dict) -> dict[str, str]:
    """Active entitlement → limit, as the newest event alone says."""
    if spec["kind"] in ("deleted", "paused") or spec["status"] not in ACTIVE_STATUSES:
        return {}
    limits: dict[str, int | None] = {}
    for p in spec["products"]:
        for key, value in PRODUCTS[p].items():
            if value == "unlimited":
                limits[key] = None
            else:
                amount = int(value.split("/")[0]) * MICROS * spec["quantity"]
                limits[key] = None if limits.get(key, 0) is None else limits.get(key, 0) + amount
    return {k: "-1" if v is None else str(v) for k, v in limits.items()}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(event_spec, min_size=2, max_size=6), st.data())
def test_any_arrival_order_ends_in_the_newest_events_state(specs, data):
    order = data.draw(st.permutations(range(len(specs))))
    run = next(_ids)
    workspace, customer = f"ws-order-{run}", f"cus-order-{run}"

    async def main() -> None:
        double = StripeDouble()
        for product_id, grants in PRODUCTS.items():
            double.add("products", product(product_id, **grants))
        async with double.running():
            source = sqs_source("stripe_events", "u", "d", "e")
            cfg = make_settings([source], stripe={"api_key": "sk_test", "api_base": double.url})
            handler, clients = build_handler_for(cfg)
            try:
                events = []
                for created, spec in enumerate(specs, start=1):
                    status = "canceled" if spec["kind"] == "deleted" else spec["status"]
                    sub = subscription(
                        "sub_o",
                        customer,
                        spec["products"],
                        status=status,
                        start=1_700_000_000,
                        workspace=workspace,
                        quantity=spec["quantity"],
                    )
                    events.append(
                        stripe_event(
                            f"customer.subscription.{spec['kind']}", sub, created, event_id=f"evt_{run}_{created}"
                        )
                    )
                for index in order:
                    body = msgspec.json.encode(events[index])
                    await handler.handle(Delivery(body, f"m{index}", 1, {}, None))
                ledger = clients.usage_ledger
                active = {}
                for key in ("A", "B", "C"):
                    record = await ledger.entitlement(workspace, key)
                    if record.get("active") == "1":
                        active[key] = record["limit"]
                newest = specs[-1]
                assert active == expected_active(newest), (order, specs)
                stored = await clients.subscription_ledger.subscription(workspace)
                want = {"deleted": "canceled", "paused": "paused"}.get(newest["kind"], newest["status"])
                assert stored["status"] == want
                assert stored["version"] == str(len(specs))
            finally:
                await clients.aclose()

    anyio.run(main, backend="asyncio")
