"""The meter outbox (issue 25): usage is acked once its Redis step — which enqueues the meter
event in the same script — has run; a sender streams the outbox to Stripe; a Stripe outage never
pauses intake nor stops the counters; what Stripe can never take is held for finance."""

from __future__ import annotations

import time

import anyio
import pytest

from billingd.clients import Unguarded
from billingd.clients.ledger import MICROS, UsageLedger
from billingd.clients.ledger.outbox import OutboxLedger
from billingd.supervisors.breaker import BreakerState
from billingd.testing.stripe import StripeContract
from tests.support import amqp_source, make_settings, meter_id, running, unique, wait_for

pytestmark = [pytest.mark.anyio, pytest.mark.redis_backends, pytest.mark.usefixtures("redis_backend")]

METERS = {"ai_credits": "ai_credits"}


def settings_for(source, stripe_double, **stripe):
    base = {"api_key": "sk_test_outbox", "api_base": stripe_double.url, "meters": METERS, "timeout": "1s"}
    return make_settings([source], stripe={**base, **stripe})


def usage(workspace: str, key: str, value: int = 1, **fields) -> dict:
    return {"event_type": "ai_credits", "workspace_id": workspace, "value": value, "idempotency_key": key, **fields}


def processed(daemon, source, outcome: str) -> float:
    return daemon.metrics.processed.labels(source["name"], outcome)._value.get()


async def test_messages_are_acked_before_stripe_answers_and_every_event_reaches_it_once(amqp, redis, stripe_double):
    stripe_double.contract = StripeContract(latency=0.15)
    ledger, outbox = UsageLedger(redis, Unguarded("redis")), OutboxLedger(redis, Unguarded("redis"))
    workspaces = [unique("ws") for _ in range(5)]
    for i, workspace in enumerate(workspaces):
        await ledger.set_customer(workspace, f"cus_outbox_{i}")
    bodies = [usage(w, f"k-{i}") for w in workspaces for i in range(40)]
    source = amqp.track(amqp_source("usage", prefetch=20))
    stripe_double.set_mode("hang")  # Stripe does not answer at all: the messages are acked regardless
    async with running(settings_for(source, stripe_double)) as daemon:
        await amqp.publish_many(source["exchange"], "usage", [(f"{b['workspace_id']}-{b['idempotency_key']}", b)
                                                              for b in bodies])  # fmt: skip
        await wait_for(lambda: processed(daemon, source, "ack") == len(bodies), timeout=20, what="all acked")
        for workspace in workspaces:  # the counters that enforce entitlements are exact before Stripe answers
            assert (await ledger.counter(workspace, "ai_credits"))[0] == 40 * MICROS
        assert stripe_double.meter_events == []
        stripe_double.set_mode("ok")
        await wait_for(lambda: len(stripe_double.meter_events) == len(bodies), timeout=30, what="all metered")
        await wait_for(lambda: _empty(outbox), what="the outbox drained")
    assert sorted(e["identifier"] for e in stripe_double.meter_events) == sorted(meter_id(b) for b in bodies)
    assert set(stripe_double.recorded().values()) == {1}
    day = int(time.time()) // 86400
    journaled = 0
    for workspace in workspaces:
        journaled += sum(value for value, _ in (await outbox.journal(workspace, day)).values())
    assert journaled == len(bodies)  # the journal holds what Stripe accepted, once each


async def _empty(outbox: OutboxLedger) -> bool:
    for shard in range(16):
        _, count = await outbox.oldest(shard)
        if count:
            return False
    return True


async def test_a_stripe_outage_never_pauses_intake_and_the_outbox_drains_after(amqp, redis, stripe_double):
    ledger = UsageLedger(redis, Unguarded("redis"))
    workspace = unique("ws")
    await ledger.set_customer(workspace, "cus_outage")
    source = amqp.track(amqp_source("usage", max_attempts=1))
    stripe_double.set_mode("error", 500)
    async with running(settings_for(source, stripe_double)) as daemon:
        status = daemon.statuses[source["name"]]
        for i in range(30):
            await amqp.publish(source["exchange"], "usage", usage(workspace, f"o-{i}"), message_id=f"o-{i}")
            assert status.paused_by == []
        await wait_for(lambda: processed(daemon, source, "ack") == 30, what="all acked during the outage")
        assert (await ledger.counter(workspace, "ai_credits"))[0] == 30 * MICROS
        await wait_for(lambda: daemon.board.get("stripe").state is BreakerState.OPEN, what="stripe breaker open")
        assert status.paused_by == []  # the usage source does not wait on Stripe
        stripe_double.set_mode("ok")
        await wait_for(lambda: len(stripe_double.meter_events) == 30, timeout=40, what="sent after the outage")
        assert processed(daemon, source, "dead_letter") == 0
    assert set(stripe_double.recorded().values()) == {1}


async def test_an_outbox_older_than_max_outbox_age_pauses_intake_until_it_drains(amqp, redis, stripe_double):
    ledger = UsageLedger(redis, Unguarded("redis"))
    workspace = unique("ws")
    await ledger.set_customer(workspace, "cus_age")
    source = amqp.track(amqp_source("usage"))
    stripe_double.set_mode("error", 503)
    async with running(settings_for(source, stripe_double, max_outbox_age="1s")) as daemon:
        status = daemon.statuses[source["name"]]
        await amqp.publish(source["exchange"], "usage", usage(workspace, "a-0"), message_id="a-0")
        await wait_for(lambda: status.paused_by == ["stripe-outbox"], timeout=20, what="intake paused")
        assert daemon.metrics.outbox_oldest._value.get() > 1
        stripe_double.set_mode("ok")
        await wait_for(lambda: status.paused_by == [], timeout=30, what="intake resumed")
    assert len(stripe_double.meter_events) == 1


async def test_what_stripe_can_never_take_is_held_for_finance_not_dead_lettered(amqp, redis, stripe_double, tmp_path):
    """A stream request of one event that Stripe refuses (a 4xx), and an event older than Stripe's
    35 days (enqueued by an earlier run), are held — listed by `billingd meters`, never dropped."""
    ledger, outbox = UsageLedger(redis, Unguarded("redis")), OutboxLedger(redis, Unguarded("redis"))
    workspace = unique("ws")
    await ledger.set_customer(workspace, "cus_held")
    from billingd.clients.ledger.outbox import OutboxEvent, encode, outbox_key

    old = OutboxEvent("ai_credits", "cus_held", 3, int(time.time()) - 40 * 86400, "ancient", int(time.time()))
    await redis.hset(outbox_key(workspace), "bd1-ancient", encode(old))
    await outbox.index(workspace, int(time.time()), 16)
    source = amqp.track(amqp_source("usage"))
    stripe_double.stream_failures = [400]  # the first stream request: one event, refused
    async with running(settings_for(source, stripe_double, meter_linger="0s")) as daemon:
        await amqp.publish(source["exchange"], "usage", usage(workspace, "r-0"), message_id="r-0")
        await wait_for(lambda: daemon.metrics.outbox_held_total._value.get() == 2, timeout=20, what="held")
        await amqp.publish(source["exchange"], "usage", usage(workspace, "r-1"), message_id="r-1")
        await wait_for(lambda: len(stripe_double.meter_events) == 1, timeout=20, what="the next one sent")
        assert processed(daemon, source, "dead_letter") == 0
    held = await outbox.held(workspace)
    reasons = sorted(reason for _, reason in held.values())
    assert reasons[0].startswith("older than Stripe's 35-day window")
    assert reasons[1].startswith("refused by Stripe")
    listed = await _billingd_meters(tmp_path, settings_for(source, stripe_double))
    assert "key='ancient'" in listed and "key='r-0'" in listed


async def _billingd_meters(tmp_path, settings) -> str:
    import subprocess
    import sys

    from tests.support import settings_tree, to_toml

    config = tmp_path / "billingd.toml"
    tree = settings_tree(settings)
    tree["stripe"].pop("api_key")  # a secret comes from the environment; `meters` needs none
    config.write_text(to_toml(tree))
    result = await anyio.to_thread.run_sync(
        lambda: subprocess.run(
            [sys.executable, "-m", "billingd", "meters", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    )
    assert result.returncode == 0, result.stderr
    return result.stdout
