"""`billing_sync` (seed 000): gzip+base64 bodies, org billing status, once-only marketplace submissions."""

from __future__ import annotations

import msgspec
import pytest

from billingd.clients import Unguarded
from billingd.clients.ledger.sync import SyncLedger
from billingd.sources.codecs import encode_body
from tests.support import make_settings, running, sqs_source, unique, wait_for

pytestmark = [pytest.mark.anyio, pytest.mark.redis_backends, pytest.mark.usefixtures("redis_backend")]

ENCODED = {"content_encoding": "gzip"}  # seed 000: "gzip-compressed and base64-encoded"


def packed(message: dict) -> str:
    return encode_body(msgspec.json.encode(message), "gzip", text_transport=True).decode()


async def test_gzip_base64_messages_decode_and_take_effect_and_submit_once(sqs, redis, sink):
    url, dlq = await sqs.queue()
    source = sqs_source(
        "billing_sync", url, dlq, sqs.endpoint, handler_options={"marketplace_url": f"{sink.url}/marketplace"}
    )
    org = unique("org")
    update = {
        "type": "billing_customer_update",
        "organization_id": org,
        "customer": {"plan": "scale"},
        "updated_at": 1700000000,
    }
    invoice = {
        "type": "invoice_finalized",
        "organization_id": org,
        "invoice_id": "inv_456",
        "period_start": 1699488000,
        "period_end": 1702080000,
    }  # seed 000 "Message format"
    await sqs.send(url, packed(update), attributes=ENCODED)
    await sqs.send(url, packed(invoice), attributes=ENCODED)
    await sqs.send(url, packed(invoice), attributes=ENCODED)  # redelivered by the producer
    await sqs.send(
        url,
        packed(
            {
                "type": "marketplace.usage.submit",
                "organization_id": org,
                "usage": {"events": 5},
                "idempotency_key": "usage-2026-11",
            }
        ),
        attributes=ENCODED,
    )
    async with running(make_settings([source])) as daemon:
        acked = daemon.metrics.processed.labels(source["name"], "ack")
        await wait_for(lambda: acked._value.get() == 4, timeout=20, what="4 acked")
    stored = await SyncLedger(redis, Unguarded("redis")).billing(org)
    assert msgspec.json.decode(stored["billing"]) == update
    assert stored["updated_at"] == "1700000000"
    posted = [msgspec.json.decode(r.body) for r in sink.requests]
    assert sorted(p["type"] for p in posted) == ["invoice_finalized", "marketplace.usage.submit"]
    assert {r.headers["Idempotency-Key"] for r in sink.requests} == {"invoice_finalized:inv_456", "usage-2026-11"}
    assert next(p for p in posted if p["type"] == "invoice_finalized") == invoice


async def test_corrupt_bodies_unknown_types_and_4xx_go_to_the_dlq_with_reasons(sqs, sink):
    url, dlq = await sqs.queue()
    source = sqs_source(
        "billing_sync", url, dlq, sqs.endpoint, handler_options={"marketplace_url": f"{sink.url}/marketplace"}
    )
    await sqs.send(url, "H4sI-not-base64-gzip", attributes=ENCODED)
    await sqs.send(url, packed({"type": "invoice_voided", "organization_id": "o"}), attributes=ENCODED)
    sink.set_mode("error", 422)
    await sqs.send(url, packed({"type": "marketplace.invoice.submit", "invoice_id": "inv_9"}), attributes=ENCODED)
    async with running(make_settings([source])) as daemon:
        dead = daemon.metrics.processed.labels(source["name"], "dead_letter")
        await wait_for(lambda: dead._value.get() == 3, timeout=20, what="3 dead-lettered")
        await wait_for(lambda: _depth(sqs, dlq, 3), what="3 in the DLQ")
    letters = await sqs.take(dlq)
    reasons = sorted(m["MessageAttributes"]["reason"]["StringValue"] for m in letters)
    assert reasons[0].startswith("body does not decode as 'gzip'")
    assert reasons[1].startswith("forward:marketplace: POST") and "HTTP 422" in reasons[1]
    assert reasons[2].startswith("unknown message type 'invoice_voided'")
    # the DLQ keeps the original (still encoded) body and its content_encoding, ready for a replay
    encoded = [m for m in letters if "content_encoding" in m["MessageAttributes"]]
    assert len(encoded) == 3


async def test_marketplace_503_is_retried_until_it_answers(sqs, sink):
    url, dlq = await sqs.queue()
    source = sqs_source(
        "billing_sync",
        url,
        dlq,
        sqs.endpoint,
        handler_options={"marketplace_url": f"{sink.url}/marketplace"},
        max_attempts=5,
    )
    sink.fail_next(2, 503)
    await sqs.send(url, packed({"type": "marketplace.invoice.submit", "invoice_id": "inv_retry"}), attributes=ENCODED)
    async with running(make_settings([source])) as daemon:
        acked = daemon.metrics.processed.labels(source["name"], "ack")
        await wait_for(lambda: acked._value.get() == 1, timeout=30, what="acked after two 503s")
        assert daemon.metrics.processed.labels(source["name"], "retry")._value.get() == 2
    assert len(sink.requests) == 3


async def _depth(sqs, url, n) -> bool:
    return await sqs.depth(url) == n
