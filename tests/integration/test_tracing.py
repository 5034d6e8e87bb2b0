"""OpenTelemetry traces against a real OTLP/HTTP receiver the test starts: one CONSUMER span per
message, linked to its producer's context (AMQP `traceparent`; SQS `traceparent` attribute and
`AWSTraceHeader`), with the messaging attributes, the outcome, child spans for Redis; exemplars
in the OpenMetrics exposition; a collector that is down costs nothing but the spans."""

from __future__ import annotations

import secrets
import time

import aiohttp
import pytest

from tests.doubles.otlp import OtlpReceiver
from tests.seed002 import dlr
from tests.support import amqp_source, make_settings, running, sqs_source, unique, wait_for

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(90)]


def traceparent() -> tuple[str, str]:
    """A producer's `traceparent` (sampled) and its trace id."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id


@pytest.fixture
async def receiver(monkeypatch):
    otlp = OtlpReceiver()
    async with otlp.running():
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.url)
        monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
        monkeypatch.setenv("OTEL_SERVICE_NAME", "billingd-test")
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
        yield otlp


async def test_amqp_messages_get_consumer_spans_linked_to_their_producers(amqp, redis, receiver):
    source = amqp.track(amqp_source("sms_dlr"))
    producers: dict[str, str] = {}
    async with running(make_settings([source])) as daemon:
        for _ in range(50):
            header, trace_id = traceparent()
            message_id = unique("tr")
            producers[message_id] = trace_id
            await amqp.publish(source["exchange"], "dlr.x", dlr(message_id, "DELIVRD"), message_id=message_id,
                               headers={"traceparent": header, "tracestate": "vendor=1"})  # fmt: skip
        await amqp.publish(source["exchange"], "dlr.x", b"{not json", message_id="broken",
                           headers={"traceparent": "00-garbage"})  # fmt: skip
        acked = daemon.metrics.processed.labels(source["name"], "ack")
        await wait_for(lambda: acked._value.get() == 50, what="50 acked")
        async with (
            aiohttp.ClientSession() as session,
            session.get(
                f"http://127.0.0.1:{daemon.settings.http.port}/metrics",
                headers={"Accept": "application/openmetrics-text; version=1.0.0"},
            ) as response,
        ):
            exposition = await response.text()
    # the drain flushed the queued spans
    consumers = {s.attributes.get("messaging.message.id"): s for s in receiver.spans if s.kind == "CONSUMER"}
    assert set(producers) <= set(consumers)
    for message_id, trace_id in producers.items():
        span = consumers[message_id]
        assert span.name == f"process {source['queue']}"
        assert [t for t, _ in span.links] == [trace_id]  # linked to the producer, in a trace of its own
        assert span.trace_id != trace_id
        assert span.attributes["messaging.system"] == "rabbitmq"
        assert span.attributes["messaging.destination.name"] == source["exchange"]
        assert span.attributes["messaging.rabbitmq.destination.routing_key"] == "dlr.x"
        assert span.attributes["messaging.operation.type"] == "process"
        assert span.attributes["billingd.outcome"] == "ack"
        assert span.service == "billingd-test"
    broken = consumers["broken"]
    assert broken.links == []  # a garbage traceparent is no link, and no failure
    assert broken.attributes["billingd.outcome"] == "dead_letter"
    assert broken.attributes["error.type"] == "dead_letter"
    assert "malformed JSON" in broken.attributes["billingd.dead_letter.reason"]
    redis_children = [s for s in receiver.spans if s.name == "redis EVALSHA"]
    parents = {s.span_id for s in consumers.values()}
    assert len(redis_children) >= 50
    assert all(s.parent_span_id in parents for s in redis_children)
    assert 'billingd_message_duration_seconds_bucket{le="' in exposition
    assert "# {span_id=" in exposition or "# {trace_id=" in exposition  # an exemplar with the trace id


async def test_sqs_messages_link_to_traceparent_and_aws_trace_header(sqs, receiver):
    url, dlq = await sqs.queue()
    source = sqs_source("usage", url, dlq, sqs.endpoint)
    w3c, w3c_trace = traceparent()
    xray_trace = secrets.token_hex(16)
    xray = f"Root=1-{xray_trace[:8]}-{xray_trace[8:]};Parent={secrets.token_hex(8)};Sampled=1"
    await sqs.client.send_message(
        QueueUrl=url,
        MessageBody='{"event_type": "calls", "workspace_id": "ws-w3c", "value": 1, "idempotency_key": "w3c"}',
        MessageAttributes={"traceparent": {"DataType": "String", "StringValue": w3c}},
    )
    await sqs.client.send_message(
        QueueUrl=url,
        MessageBody='{"event_type": "calls", "workspace_id": "ws-xray", "value": 1, "idempotency_key": "xray"}',
        MessageSystemAttributes={"AWSTraceHeader": {"DataType": "String", "StringValue": xray}},
    )
    async with running(make_settings([source])) as daemon:
        acked = daemon.metrics.processed.labels(source["name"], "ack")
        await wait_for(lambda: acked._value.get() == 2, timeout=20, what="2 acked")
    consumers = [s for s in receiver.spans if s.kind == "CONSUMER"]
    assert len(consumers) == 2
    links = sorted(t for s in consumers for t, _ in s.links)
    assert links == sorted([w3c_trace, xray_trace])
    assert {s.attributes["messaging.system"] for s in consumers} == {"aws_sqs"}
    assert {s.attributes["messaging.destination.name"] for s in consumers} == {url.rsplit("/", 1)[-1]}


async def test_a_collector_that_is_down_costs_spans_only(amqp, monkeypatch):
    from tests.support import free_port

    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nothing listens
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "1")
    source = amqp.track(amqp_source("sms_dlr", prefetch=20))
    async with running(make_settings([source])) as daemon:
        await amqp.publish_many(
            source["exchange"], "dlr.x", [(f"d-{i}", dlr(unique("d"), "DELIVRD")) for i in range(300)]
        )
        acked = daemon.metrics.processed.labels(source["name"], "ack")
        await wait_for(lambda: acked._value.get() == 300, timeout=20, what="all handled")
        started = time.monotonic()
    assert time.monotonic() - started < 5  # the flush at exit is bounded, whatever the collector does
