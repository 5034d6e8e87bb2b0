"""`webhook_forward` (seed 003): Stripe events relayed to a webhook endpoint once per event id."""

from __future__ import annotations

import anyio
import msgspec
import pytest

from billingd.supervisors.breaker import BreakerState
from billingd.testing.server import Sink
from tests.signing import stripe_event, stripe_relay
from tests.support import free_port, make_settings, running, sqs_source, unique, wait_for

pytestmark = [pytest.mark.anyio, pytest.mark.redis_backends, pytest.mark.usefixtures("redis_backend")]

PATH = "/api/v1/Stripe/Webhook"


def forward_source(sqs, url, dlq, endpoint, **overrides):
    return sqs_source(
        "webhook_forward",
        url,
        dlq,
        sqs.endpoint,
        handler_options={"url": f"{endpoint}{PATH}", "timeout": "1s"},
        **overrides,
    )


async def test_each_event_is_forwarded_once_with_its_original_headers(sqs, sink):
    url, dlq = await sqs.queue()
    source = forward_source(sqs, url, dlq, sink.url)
    relayed = stripe_relay(stripe_event("invoice.paid", {"id": "in_1", "object": "invoice"}, 10), "whsec_x")
    bare = stripe_event("customer.updated", {"id": "cus_1", "object": "customer"}, 11)
    bridged = {"version": "0", "source": "aws.partner/stripe.com", "detail": stripe_event("charge.succeeded", {}, 12)}
    for body in (relayed, relayed, bare, bridged, bare):
        await sqs.send(url, body)
    async with running(make_settings([source])) as daemon:
        acked = daemon.metrics.processed.labels(source["name"], "ack")
        await wait_for(lambda: acked._value.get() == 5, timeout=20, what="5 acked")
    by_event = {r.headers["X-Billingd-Event-Id"]: r for r in sink.requests}
    assert len(sink.requests) == 3 == len(by_event)  # duplicates were not forwarded again
    forwarded = by_event["evt_invoice_paid_10"]
    assert forwarded.path == PATH
    assert forwarded.body == relayed["body"].encode()  # byte for byte: the receiver can verify the signature
    assert forwarded.headers["Stripe-Signature"] == relayed["headers"]["Stripe-Signature"]
    assert msgspec.json.decode(by_event["evt_charge_succeeded_12"].body)["type"] == "charge.succeeded"


async def test_endpoint_down_opens_the_breaker_pauses_and_forwards_everything_once_when_back(sqs):
    url, dlq = await sqs.queue()
    port = free_port()  # nothing listens there yet: connection refused
    source = forward_source(sqs, url, dlq, f"http://127.0.0.1:{port}", max_attempts=2)
    ids = [f"evt_{unique('down')}" for _ in range(6)]
    for event_id in ids:
        await sqs.send(url, {"id": event_id, "object": "event", "type": "invoice.paid", "created": 1, "data": {}})
    seen = {"open": False, "paused": False}
    async with running(make_settings([source])) as daemon:
        breaker, status = daemon.board.get(f"forward:{source['name']}"), daemon.statuses[source["name"]]

        async def watch() -> None:
            while True:
                seen["open"] |= breaker.state is BreakerState.OPEN
                seen["paused"] |= breaker.name in status.paused_by
                await anyio.sleep(0.01)

        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            await wait_for(lambda: seen["open"] and seen["paused"], timeout=20, what="breaker open, paused (refused)")
            endpoint = Sink()
            async with endpoint.running(port):
                endpoint.set_mode("error", 503)  # up, but failing
                await wait_for(lambda: len(endpoint.requests) >= 1, timeout=20, what="a probe answered 503")
                endpoint.set_mode("ok")
                acked = daemon.metrics.processed.labels(source["name"], "ack")
                await wait_for(lambda: acked._value.get() == 6, timeout=40, what="all forwarded")
                tg.cancel_scope.cancel()
        assert daemon.metrics.processed.labels(source["name"], "dead_letter")._value.get() == 0
    accepted = [r.headers["X-Billingd-Event-Id"] for r in endpoint.requests if r.status == 200]
    assert sorted(accepted) == sorted(ids)  # every event accepted exactly once after recovery
    assert any(r.status == 503 for r in endpoint.requests)
    assert await sqs.depth(dlq) == 0


async def test_a_4xx_is_dead_lettered_with_the_status_and_a_snippet(sqs, sink):
    url, dlq = await sqs.queue()
    source = forward_source(sqs, url, dlq, sink.url)
    sink.set_mode("error", 400)
    await sqs.send(url, {"id": "evt_bad", "object": "event", "type": "x", "created": 1, "data": {}})
    async with running(make_settings([source])) as daemon:
        dead = daemon.metrics.processed.labels(source["name"], "dead_letter")
        await wait_for(lambda: dead._value.get() == 1, timeout=20, what="dead-lettered")
        await wait_for(lambda: _depth(sqs, dlq, 1), what="in the DLQ")
    [letter] = await sqs.take(dlq)
    reason = letter["MessageAttributes"]["reason"]["StringValue"]
    assert "HTTP 400" in reason and "double failing with 400" in reason


async def _depth(sqs, url, n) -> bool:
    return await sqs.depth(url) == n


async def test_with_verify_signature_forged_and_unsigned_events_are_dead_lettered_never_forwarded(sqs, sink):
    """Seed 003's validation: only relayed webhooks signed with the endpoint secret go through."""
    url, dlq = await sqs.queue()
    options = {"url": f"{sink.url}{PATH}", "timeout": "1s", "verify_signature": True}
    source = sqs_source("webhook_forward", url, dlq, sqs.endpoint, handler_options=options)
    genuine = stripe_relay(stripe_event("invoice.paid", {"id": "in_ok"}, 20), "whsec_forward")
    forged = stripe_relay(stripe_event("invoice.paid", {"id": "in_forged"}, 21), "whsec_attacker")
    unsigned = stripe_event("invoice.paid", {"id": "in_bare"}, 22)
    for body in (genuine, forged, unsigned):
        await sqs.send(url, body)
    settings = make_settings([source], stripe={"webhook_secret": "whsec_forward"})
    async with running(settings) as daemon:
        processed = daemon.metrics.processed
        await wait_for(lambda: processed.labels(source["name"], "ack")._value.get() == 1, timeout=20, what="ack")
        await wait_for(lambda: processed.labels(source["name"], "dead_letter")._value.get() == 2, what="dead")
    assert [r.headers["X-Billingd-Event-Id"] for r in sink.requests] == ["evt_invoice_paid_20"]
    reasons = sorted(m["MessageAttributes"]["reason"]["StringValue"] for m in await sqs.take(dlq))
    assert reasons[0].startswith("Stripe-Signature verification failed")
    assert reasons[1].startswith("not a relayed Stripe webhook")


async def test_an_event_type_allow_list_forwards_those_and_acks_and_counts_the_rest(sqs, sink):
    url, dlq = await sqs.queue()
    options = {"url": f"{sink.url}{PATH}", "timeout": "1s", "event_types": ["invoice.paid"]}
    source = sqs_source("webhook_forward", url, dlq, sqs.endpoint, handler_options=options)
    for n, kind in enumerate(("invoice.paid", "charge.succeeded", "charge.succeeded", "customer.updated")):
        await sqs.send(url, stripe_event(kind, {"id": f"o{n}"}, 30 + n))
    async with running(make_settings([source])) as daemon:
        acked = daemon.metrics.processed.labels(source["name"], "ack")
        await wait_for(lambda: acked._value.get() == 4, timeout=20, what="all acked")
        registry = daemon.metrics.registry
        skipped = {
            kind: registry.get_sample_value(
                "billingd_webhook_events_skipped_total", {"source": source["name"], "type": kind}
            )
            for kind in ("charge.succeeded", "customer.updated")
        }
    assert [r.headers["X-Billingd-Event-Id"] for r in sink.requests] == ["evt_invoice_paid_30"]
    assert skipped == {"charge.succeeded": 2, "customer.updated": 1}
