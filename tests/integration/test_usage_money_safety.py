"""Issue 10 on `usage`: unmetered usage made visible, and a replayed dead letter applied once."""

from __future__ import annotations

import argparse

import anyio
import pytest
from structlog.testing import capture_logs

from billingd.clients import Unguarded
from billingd.clients.ledger import MICROS, UsageLedger
from billingd.daemon.tools_cli import run_tool
from tests.integration.test_usage import settings_for
from tests.support import meter_id, settings_tree, sqs_source, to_toml, unique, wait_for

pytestmark = [pytest.mark.anyio, pytest.mark.redis_backends, pytest.mark.usefixtures("redis_backend")]


async def _usage(sqs, stripe_double, events, *, ack, dead=0, metered=0, **options):
    url, dlq = await sqs.queue()
    source = sqs_source("usage", url, dlq, sqs.endpoint, handler_options=options)
    for event in events:
        await sqs.send(url, event)
    from tests.support import running

    with capture_logs() as logs:
        async with running(settings_for(source, stripe_double)) as daemon:
            processed = daemon.metrics.processed
            await wait_for(lambda: processed.labels(source["name"], "ack")._value.get() == ack, timeout=20, what="ack")
            await wait_for(lambda: processed.labels(source["name"], "dead_letter")._value.get() == dead, what="dead")
            await wait_for(lambda: len(stripe_double.meter_events) >= metered, what="meter events sent")
            registry = daemon.metrics.registry
            unmetered = {
                t: registry.get_sample_value(
                    "billingd_usage_unmetered_total", {"source": source["name"], "event_type": t}
                )
                for t in ("email_send", "ai_credits")
            }
    letters = await sqs.take(dlq)
    return unmetered, [e for e in logs if "without a Stripe meter" in e["event"]], letters


async def test_an_unmapped_event_type_is_counted_warned_once_and_never_billed(sqs, redis, stripe_double):
    workspace = unique("ws")
    events = [
        {"event_type": "email_send", "workspace_id": workspace, "value": 1, "idempotency_key": f"e{i}"}
        for i in range(3)
    ] + [  # seed 004 writes AI_CREDITS: matched case-insensitively to the ai_credits meter
        {
            "event_type": "AI_CREDITS",
            "workspace_id": workspace,
            "value": 2,
            "idempotency_key": "a1",
            "stripe_customer_id": "cus_1",
        }
    ]
    unmetered, warnings, _ = await _usage(sqs, stripe_double, events, ack=4, metered=1)
    assert unmetered["email_send"] == 3
    assert len(warnings) == 1 and warnings[0]["event_type"] == "email_send"
    ledger = UsageLedger(redis, Unguarded("redis"))
    assert (await ledger.counter(workspace, "email_send"))[0] == 3 * MICROS  # counted in Redis
    assert [e["event_name"] for e in stripe_double.meter_events] == ["ai_credits"]  # billed: AI_CREDITS only


async def test_with_dead_letter_an_unmapped_type_reaches_the_dlq_unapplied(sqs, redis, stripe_double):
    workspace = unique("ws")
    events = [{"event_type": "email_send", "workspace_id": workspace, "value": 1, "idempotency_key": "e1"}]
    _, _, letters = await _usage(sqs, stripe_double, events, ack=0, dead=1, unmapped="dead_letter")
    [letter] = letters
    assert "has no Stripe meter" in letter["MessageAttributes"]["reason"]["StringValue"]
    assert (await UsageLedger(redis, Unguarded("redis")).counter(workspace, "email_send"))[0] == 0
    assert stripe_double.requests == []


async def test_a_dead_letter_replayed_twice_applies_its_redis_step_and_its_meter_event_once(
    sqs, redis, stripe_double, tmp_path
):
    """No idempotency key: the key falls back to the message id, which a replay must keep."""
    from tests.support import running

    url, dlq = await sqs.queue()
    source = sqs_source("usage", url, dlq, sqs.endpoint, max_attempts=1)
    workspace = unique("ws")
    event = {"event_type": "ai_credits", "workspace_id": workspace, "value": 3, "stripe_customer_id": "cus_r"}
    await sqs.send(url, event)
    settings = settings_for(source, stripe_double, delivery="inline")  # the message waits for Stripe's answer
    stripe_double.set_mode("error", 400)  # the Stripe step fails for good: dead letter after the Redis step
    async with running(settings) as daemon:
        dead = daemon.metrics.processed.labels(source["name"], "dead_letter")
        await wait_for(lambda: dead._value.get() == 1, timeout=20, what="dead-lettered after the Redis step")
    stripe_double.set_mode("ok")
    [letter] = await sqs.take(dlq)
    for _ in range(2):  # the same letter twice in the DLQ: replayed twice
        await sqs.client.send_message(
            QueueUrl=dlq, MessageBody=letter["Body"], MessageAttributes=letter["MessageAttributes"]
        )
    config = tmp_path / "billingd.toml"
    tree = settings_tree(settings)
    tree["stripe"].pop("api_key")  # a secret comes from the environment; the replay tool needs none
    config.write_text(to_toml(tree))
    args = argparse.Namespace(command="dlq", action="replay", source=source["name"], limit=None)
    assert await anyio.to_thread.run_sync(run_tool, args, str(config)) == 0
    async with running(settings) as daemon:
        acked = daemon.metrics.processed.labels(source["name"], "ack")
        await wait_for(lambda: acked._value.get() == 2, timeout=20, what="both replays handled")
    ledger = UsageLedger(redis, Unguarded("redis"))
    assert (await ledger.counter(workspace, "ai_credits"))[0] == 3 * MICROS  # once
    events = [e for e in stripe_double.meter_events if e["payload"]["stripe_customer_id"] == "cus_r"]
    assert len(events) == 1
    original = letter["MessageAttributes"]["original_message_id"]["StringValue"]
    assert events[0]["identifier"] == meter_id({**event, "idempotency_key": original})  # the first message id
