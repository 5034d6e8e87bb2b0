"""The test kit (billingd.testing) on billingd's own handlers: the harness runs the real actor
(retries with the attempt ledger, dead letters with reasons) against the kit's Redis database."""

from __future__ import annotations

import pytest

from billingd.api import ACK, HandlerContext, HandlerSpec, Message, NoOptions, Outcome, Retry
from billingd.testing import HandlerHarness

pytestmark = pytest.mark.anyio


async def test_a_builtin_handler_runs_through_the_harness_against_the_kit_redis(handler_harness, billingd_redis):
    async with handler_harness("usage") as harness:
        native = await harness.send({"event_type": "api_calls", "workspace_id": "ws_kit", "value": 3,
                                     "idempotency_key": "k-1"})  # fmt: skip
        attributes = {"cloudEvents_specversion": "1.0", "cloudEvents_id": "k-2", "cloudEvents_source": "/kit",
                      "cloudEvents_type": "api_calls", "cloudEvents_subject": "ws_kit"}  # fmt: skip
        binary = await harness.send(b'{"value": 4}', **attributes)
        again = await harness.send({"event_type": "api_calls", "workspace_id": "ws_kit", "value": 3,
                                    "idempotency_key": "k-1"})  # fmt: skip
        bad = await harness.send(b'{"specversion": "1.0", "id": "x", "source": "/kit", "type": "t"}')
    assert (native.acked, binary.acked, again.acked) == (True, True, True)
    assert await billingd_redis.hget("billingd:usage:{ws_kit}", "api_calls") == b"7000000"  # 3 + 4, in micro-units
    assert (
        bad.disposition == "dead_letter"
        and bad.reason == "cloudevents: `subject` (the workspace_id) is missing or empty"
    )


class Flaky:
    """Fails twice with a counted retry, then acks."""

    downstreams: tuple[str, ...] = ()

    async def handle(self, message: Message) -> Outcome:
        return Retry("not yet") if message.attempt < 3 else ACK


def _flaky(context: HandlerContext, options: NoOptions) -> Flaky:
    return Flaky()


async def test_a_spec_not_yet_installed_is_retried_by_the_actor_until_it_succeeds(billingd_redis_url, billingd_redis):
    spec = HandlerSpec("flaky_kit", NoOptions, _flaky)
    async with HandlerHarness("flaky_kit", redis_url=billingd_redis_url, handlers={"flaky_kit": spec}) as harness:
        result = await harness.send(b"{}", "m-1")
    assert result.acked and result.attempts == 3
    assert [s.disposition.value for s in harness.settlements("m-1")] == ["retry", "retry", "ack"]


async def test_each_copy_of_one_message_id_gets_its_own_result(billingd_redis_url, billingd_redis):
    spec = HandlerSpec("flaky_kit", NoOptions, _flaky)
    async with HandlerHarness("flaky_kit", redis_url=billingd_redis_url, handlers={"flaky_kit": spec}) as harness:
        first = harness.put(b"{}", "same")
        second = harness.put(b"{}", "same")  # a copy: its own delivery, its own settlements
        one, two = await harness.result(first), await harness.result(second)
    assert one.acked and two.acked and first != second
    assert len(harness.settlements("same")) == one.deliveries + two.deliveries
