"""The ai_tokens handler on billingd's test kit: the real actor, a real Redis, the Stripe double."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from billingd.testing import HandlerHarness, StripeDouble

pytestmark = pytest.mark.anyio

PRICES = {"gpt-4o": {"input": "2.50", "output": "10.00"}, "small": {"input": "0.15", "output": "0.60"}}


def request(request_id: str, workspace: str = "ws_1", **fields: Any) -> dict[str, Any]:
    return {"request_id": request_id, "workspace_id": workspace, "model": "gpt-4o", "input_tokens": 1200,
            "output_tokens": 300, "stripe_customer_id": "cus_Q1", **fields}  # fmt: skip


def month() -> str:
    return time.strftime("%Y-%m", time.gmtime())


async def test_a_request_is_counted_once_however_many_copies_arrive(
    handler_harness: Callable[..., HandlerHarness], billingd_redis: Any
) -> None:
    async with handler_harness("ai_tokens", {"prices": PRICES}) as harness:
        results = [await harness.send(request("req-1")) for _ in range(3)]
        other = await harness.send(request("req-1", workspace="ws_2"))  # another tenant's id space
    assert all(r.acked for r in results) and other.acked
    usage = await billingd_redis.hgetall(f"billingd:aitokens:{{ws_1}}:usage:{month()}")
    # 1200 × 2.50 + 300 × 10.00 = 6000 micro-units
    assert usage == {b"gpt-4o:input": b"1200", b"gpt-4o:output": b"300", b"cost_micros": b"6000"}
    assert await billingd_redis.hget(f"billingd:aitokens:{{ws_2}}:usage:{month()}", "cost_micros") == b"6000"


async def test_fractions_of_a_micro_unit_round_half_even(
    handler_harness: Callable[..., HandlerHarness], billingd_redis: Any
) -> None:
    async with handler_harness("ai_tokens", {"prices": PRICES}) as harness:
        # 7 × 0.15 + 1 × 0.60 = 1.65 micro-units → 2
        assert (await harness.send(request("r", model="small", input_tokens=7, output_tokens=1))).acked
    assert await billingd_redis.hget(f"billingd:aitokens:{{ws_1}}:usage:{month()}", "cost_micros") == b"2"


async def test_what_cannot_be_priced_is_dead_lettered_with_its_reason(
    handler_harness: Callable[..., HandlerHarness], billingd_redis: Any
) -> None:
    async with handler_harness("ai_tokens", {"prices": PRICES}) as harness:
        unknown = await harness.send(request("a", model="gpt-9"))
        negative = await harness.send(request("b", input_tokens=-1))
        broken = await harness.send(b"{not json")
    assert unknown.disposition == "dead_letter" and "no price for model 'gpt-9'" in unknown.reason
    assert negative.disposition == "dead_letter" and "$.input_tokens" in negative.reason
    assert broken.disposition == "dead_letter" and broken.reason.startswith("malformed JSON")
    assert await billingd_redis.keys("billingd:aitokens:*") == []


async def test_the_cost_reaches_the_stripe_meter_once_after_an_outage(
    handler_harness: Callable[..., HandlerHarness], stripe_double: StripeDouble
) -> None:
    stripe_double.add_meter("ai_spend")
    stripe = {**stripe_double.stripe_settings(), "meter_api": "v1"}
    options = {"prices": PRICES, "meter": "ai_spend"}
    async with handler_harness("ai_tokens", options, stripe=stripe) as harness:
        stripe_double.fail_next(2, status=503)
        first = await harness.send(request("req-9"))
        again = await harness.send(request("req-9"))
        missing = await harness.send(request("req-10", stripe_customer_id=None))
    assert first.acked and first.deliveries >= 2 and again.acked  # retried through the outage, then applied
    events = [e for e in stripe_double.meter_events if e["event_name"] == "ai_spend"]
    assert len(events) == 1 and events[0]["payload"]["value"] == "6000"
    assert events[0]["payload"]["stripe_customer_id"] == "cus_Q1"
    assert missing.disposition == "dead_letter" and "stripe_customer_id" in missing.reason
