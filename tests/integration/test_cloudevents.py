"""CloudEvents 1.0 usage events, made by the official `cloudevents` SDK (its AMQP and RabbitMQ
bindings and JSON format), structured (single and batch) and binary, over AMQP and SQS: applied
like the native format; malformed ones dead-lettered with their reasons."""

from __future__ import annotations

import json
from typing import Any

import pytest
from cloudevents.core.bindings import amqp as ce_amqp
from cloudevents.core.bindings import rabbitmq as ce_rabbitmq
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent

from billingd.clients import Unguarded
from billingd.clients.ledger import MICROS, UsageLedger
from billingd.clients.stripe_ids import meter_identifier
from tests.support import amqp_source, make_settings, running, sqs_source, unique, wait_for

pytestmark = pytest.mark.anyio

METERS = {"ai_credits": "ai_credits"}
SOURCE = "https://gateway.example.com/usage"
JSON = JSONFormat()


def event(subject: str, event_id: str, value: Any = 5, data: Any = None) -> CloudEvent:
    if data is None:
        data = {"value": value, "stripe_customer_id": "cus_ce1"}
    attributes = {"type": "com.example.usage.ai_credits", "source": SOURCE, "id": event_id, "subject": subject}
    return CloudEvent(attributes, data)


def structured(ce: CloudEvent) -> dict[str, Any]:
    return json.loads(JSON.write(ce))


def batch(events: list[CloudEvent]) -> bytes:
    """`application/cloudevents-batch+json`: a JSON array of the SDK's structured events."""
    return b"[" + b",".join(JSON.write(e) for e in events) + b"]"


def sqs_binary(ce: CloudEvent) -> tuple[dict[str, str], bytes]:
    """Binary mode on SQS: the attributes as `cloudEvents_x` String attributes (names take no colon)."""
    message = ce_rabbitmq.to_binary(ce, JSON)
    return {f"cloudEvents_{k[3:]}": str(v) for k, v in message.headers.items()}, message.body


OPTIONS = {"cloudevents": {"type_prefix": "com.example.usage."}}


async def test_structured_and_binary_events_over_amqp_count_once_and_reach_the_meter(amqp, redis, stripe_double):
    stripe = {"api_key": "sk_test_billingd", "api_base": stripe_double.url, "meters": METERS, "timeout": "2s"}
    source = amqp.track(amqp_source("usage", handler_options=OPTIONS))
    ws = unique("ws")
    bad_version = {**structured(event(ws, "ce-4")), "specversion": "0.3"}
    missing_id = {k: v for k, v in structured(event(ws, "ce-5")).items() if k != "id"}
    async with running(make_settings([source], stripe=stripe)) as daemon:
        exchange, queue = source["exchange"], source["queue"]
        message = ce_rabbitmq.to_structured(event(ws, "ce-1"), JSON)  # application/cloudevents+json
        await amqp.publish(exchange, "u", message.body, content_type=message.content_type)
        await amqp.publish(exchange, "u", message.body, content_type=message.content_type)  # a copy: same id
        amqp10 = ce_amqp.to_binary(event(ws, "ce-2", value=7), JSON)  # cloudEvents_x, time as a timestamp
        colon = {k.replace("cloudEvents_", "cloudEvents:"): v for k, v in amqp10.application_properties.items()}
        await amqp.publish(exchange, "u", amqp10.application_data, headers=colon)
        rabbit = ce_rabbitmq.to_binary(event(ws, "ce-3", value=11), JSON)  # the SDK's ce-x headers
        await amqp.publish(exchange, "u", rabbit.body, headers=rabbit.headers, content_type=rabbit.content_type)
        await amqp.publish(exchange, "u", json.dumps(bad_version).encode())
        await amqp.publish(exchange, "u", json.dumps(missing_id).encode())
        await amqp.publish(exchange, "u", JSON.write(event(ws, "ce-6", data="seven")))  # data: a string
        processed = daemon.metrics.processed
        await wait_for(lambda: processed.labels(queue, "ack")._value.get() == 4, timeout=20, what="4 acked")
        await wait_for(lambda: processed.labels(queue, "dead_letter")._value.get() == 3, what="3 dead letters")
        await wait_for(lambda: len(stripe_double.meter_events) >= 3, timeout=20, what="3 meter events")
        letters = await amqp.drain_queue(f"{queue}.dlq")
    ledger = UsageLedger(redis, Unguarded("redis"))
    assert (await ledger.counter(ws, "ai_credits"))[0] == 23 * MICROS  # 5 + 7 + 11; the copy counted once
    identifiers = sorted(e["identifier"] for e in stripe_double.meter_events)
    keys = (f"{len(SOURCE)}:{SOURCE}:{k}" for k in ("ce-1", "ce-2", "ce-3"))  # source+id, the default key
    assert identifiers == sorted(meter_identifier(ws, "ai_credits", k) for k in keys)
    assert sorted(int(e["payload"]["value"]) for e in stripe_double.meter_events) == [5, 7, 11]
    reasons = sorted(str(m.headers["x-billingd-reason"]) for m in letters)
    assert reasons[0].startswith("cloudevents: `data` must be a JSON object, not a string")
    assert reasons[1].startswith("cloudevents: required attribute `id` is missing")
    assert reasons[2].startswith("cloudevents: specversion '0.3' is not supported (only 1.0)")


async def test_a_batch_and_binary_attributes_over_sqs_are_applied_like_native_events(sqs, redis):
    url, dlq = await sqs.queue()
    options = {"cloudevents": {"type_prefix": "com.example.usage.", "subject": "userId"}}
    source = sqs_source("usage", url, dlq, sqs.endpoint, handler_options=options)
    user = unique("user")
    ledger = UsageLedger(redis, Unguarded("redis"))
    await ledger.put_entitlement(user, "ai_credits", limit=100 * MICROS, period="month", period_start=0)
    events = [event(user, f"b-{i}", value=i + 1) for i in range(3)]  # 1 + 2 + 3
    await sqs.send(url, batch(events))
    await sqs.send(url, batch(events))  # the whole batch again: nothing more
    attributes, data = sqs_binary(event(user, "bin-1", value=10))
    await sqs.send(url, data, attributes=attributes)
    late = structured(event(user, "b-9"))
    late["time"] = "yesterday"
    invalid = [*(structured(event(user, f"c-{i}")) for i in range(3)), late]  # an invalid member: none applied
    await sqs.send(url, json.dumps(invalid))
    refused = [event(user, "d-0", value=1), event(user, "d-1", value=500), event(user, "d-2", value=2)]
    await sqs.send(url, batch(refused))  # d-1 is over the limit: d-0 and d-2 applied all the same
    async with running(make_settings([source])) as daemon:
        processed = daemon.metrics.processed
        await wait_for(lambda: processed.labels(source["name"], "ack")._value.get() == 3, timeout=20, what="acks")
        await wait_for(lambda: processed.labels(source["name"], "dead_letter")._value.get() == 2, what="2 letters")
    assert (await ledger.entitlement(user, "ai_credits"))["used"] == str((6 + 10 + 3) * MICROS)
    reasons = sorted(m["MessageAttributes"]["reason"]["StringValue"] for m in await sqs.take(dlq))
    assert reasons[0].startswith("cloudevents: 1 of 3 events not applied, the other 2 applied")
    assert "event [1]" in reasons[0] and "over the limit of ai_credits" in reasons[0]
    assert reasons[1] == (
        "cloudevents: event [3]: `time` 'yesterday' is not an RFC 3339 timestamp (no event of the batch was applied)"
    )
