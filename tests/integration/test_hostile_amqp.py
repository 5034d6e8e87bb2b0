"""Hostile AMQP input on a real RabbitMQ (DESIGN §8): one message never stops a source.

Each test publishes every kind of hostile message from `tests.hostile` between valid ones and
checks the effects: valid messages applied, hostile ones dead-lettered with a reason (or handled
when they are valid after all), no actor restart, nothing left behind.
"""

from __future__ import annotations

import aiormq
import pytest

from tests.flaky import Journal, registry
from tests.hostile import amqp_messages, publish_raw
from tests.seed002 import dlr
from tests.support import AMQP_URL, amqp_source, cdr_ids, make_settings, running, wait_for

pytestmark = pytest.mark.anyio

HOSTILE = 48  # six rounds of the eight kinds


async def _publish_all(exchange: str, valid: list[tuple[str, bytes]]) -> list:
    connection = await aiormq.connect(AMQP_URL)
    try:
        channel = await connection.channel(publisher_confirms=True)
        messages = list(amqp_messages(seed=8, count=HOSTILE))
        for msg in messages:
            await publish_raw(channel, exchange, "dlr.x", msg)
        for message_id, body in valid:
            await channel.basic_publish(
                body,
                exchange=exchange,
                routing_key="dlr.x",
                properties=aiormq.spec.Basic.Properties(message_id=message_id),
            )
    finally:
        await connection.close()
    return messages


async def test_hostile_messages_are_dead_lettered_alone_and_valid_ones_applied(amqp, redis):
    source = amqp.track(amqp_source("sms_dlr", routing_keys=["dlr.#"], prefetch=20))
    valid = [(f"valid-{i}", _json(dlr(f"valid-{i}", "DELIVRD"))) for i in range(20)]
    async with running(make_settings([source])) as daemon:
        await _publish_all(source["exchange"], valid)
        processed = daemon.metrics.processed
        ack = processed.labels(source["name"], "ack")
        dead = processed.labels(source["name"], "dead_letter")
        await wait_for(
            lambda: ack._value.get() + dead._value.get() == HOSTILE + len(valid), timeout=30, what="all settled"
        )
        restarts = daemon.metrics.restarts.labels(source["name"])._value.get()
        assert daemon.health()[0]
    assert restarts == 0
    assert {f"valid-{i}" for i in range(20)} <= await cdr_ids(redis)
    letters = await amqp.drain_queue(f"{source['queue']}.dlq")
    print(f"dead-lettered {len(letters)} of {HOSTILE} hostile messages")
    assert len(letters) == dead._value.get() >= HOSTILE - 8  # every hostile body but the valid ones
    assert all(m.headers.get("x-billingd-reason") for m in letters)
    assert await amqp.depth(source["queue"]) == 0


async def test_hostile_headers_survive_a_retry_copy_and_come_back(amqp):
    """The retry path republishes the message with its headers: values pamqp cannot encode, a
    table near frame_max and poison attempt counts must not crash the settler."""
    journal = Journal()
    source = amqp.track(amqp_source("flaky", routing_keys=["dlr.#"], prefetch=20, handler_options={"fail_attempts": 1}))
    async with running(make_settings([source]), registry(journal)) as daemon:
        messages = await _publish_all(source["exchange"], [("after", b"{}")])
        processed = daemon.metrics.processed
        ack = processed.labels(source["name"], "ack")
        dead = processed.labels(source["name"], "dead_letter")
        await wait_for(lambda: ack._value.get() + dead._value.get() == HOSTILE + 1, timeout=30, what="all settled")
        restarts = daemon.metrics.restarts.labels(source["name"])._value.get()
    assert restarts == 0
    assert [attempt for attempt, _ in journal.calls["after"]] == [1, 2]  # retried once, then acked
    forged = [m for m in messages if m.kind.startswith("attempts:")]
    # a forged count that is not a small number reads as 0 (retried) or is clamped high (dead-lettered)
    assert dead._value.get() <= len(forged)
    assert await amqp.depth(source["queue"]) == 0
    assert await amqp.depth(f"{source['queue']}.retry") == 0


def _json(value: dict) -> bytes:
    import msgspec

    return msgspec.json.encode(value)
