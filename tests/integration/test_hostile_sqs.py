"""Hostile SQS input on moto's SQS server (DESIGN §8): attributes of any DataType, any body."""

from __future__ import annotations

import pytest

from tests.hostile import sqs_messages
from tests.seed002 import dlr
from tests.support import cdr_ids, make_settings, running, sqs_source, wait_for

pytestmark = pytest.mark.anyio

HOSTILE = 12  # two rounds of the six attribute shapes


async def test_attributes_of_any_data_type_and_any_body_are_dead_lettered_alone(sqs, redis):
    url, dlq = await sqs.queue()
    source = sqs_source("sms_dlr", url, dlq, sqs.endpoint, prefetch=20)
    sent = []
    for msg in sqs_messages(seed=8, count=HOSTILE, max_body=60_000):
        kwargs = {"QueueUrl": url, "MessageBody": msg.body}
        if msg.attributes:
            kwargs["MessageAttributes"] = msg.attributes
        sent.append((msg.kind, (await sqs.client.send_message(**kwargs))["MessageId"]))
    for i in range(3):
        await sqs.send(url, dlr(f"valid-{i}", "DELIVRD"))
    async with running(make_settings([source])) as daemon:
        processed = daemon.metrics.processed
        ack = processed.labels(source["name"], "ack")
        dead = processed.labels(source["name"], "dead_letter")
        # `>=`, not `==`: SQS delivers at least once, and moto's server really does hand one
        # message to two concurrent long polls now and then (prefetch 20 = two receivers; its
        # receive has no lock). Such a twin is dead-lettered twice, which the DLQ count shows.
        await wait_for(lambda: ack._value.get() + dead._value.get() >= HOSTILE + 3, timeout=40, what="all settled")

        async def queue_empty() -> bool:
            return await sqs.depth(url) == 0

        await wait_for(queue_empty, timeout=20, what="every message deleted from the queue")
        restarts = daemon.metrics.restarts.labels(source["name"])._value.get()
    assert restarts == 0
    assert {f"valid-{i}" for i in range(3)} <= await cdr_ids(redis)
    letters = await sqs.take(dlq)
    reasons = {m["MessageAttributes"]["original_message_id"]["StringValue"]: m for m in letters}
    binary = [message_id for kind, message_id in sent if kind.endswith("/attr0")]
    for message_id in binary:  # a Binary content_encoding: dead-lettered with that reason
        assert "DataType String" in reasons[message_id]["MessageAttributes"]["reason"]["StringValue"]
    assert len(letters) == dead._value.get() >= HOSTILE - 2
    assert await sqs.depth(url) == 0
