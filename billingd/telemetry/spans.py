"""The CONSUMER span of one message (see `billingd.telemetry.tracing`), linked to its producer.

The producer's context comes from the carrier the transport hands over (`Source.trace_carrier`):
W3C `traceparent` / `tracestate` (AMQP headers, SQS message attributes) and `X-Amzn-Trace-Id`
(SQS's `AWSTraceHeader` system attribute, X-Ray format). Each valid one becomes a **link** of
the span (messaging conventions: a consumer's span starts its own trace and links to the
producer's), so one usage event can be followed from its producer through billingd to its
Stripe call. A carrier with garbage in it gives no link, never an error.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from opentelemetry import trace
from opentelemetry.propagators.aws import AwsXRayPropagator
from opentelemetry.trace import Link, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

_W3C = TraceContextTextMapPropagator()
_XRAY = AwsXRayPropagator()


def producer_links(carrier: Mapping[str, str]) -> list[Link]:
    """Links to the producer contexts found in `carrier` (W3C first, then X-Ray)."""
    links: list[Link] = []
    seen: set[int] = set()
    for propagator, present in ((_W3C, "traceparent" in carrier), (_XRAY, "X-Amzn-Trace-Id" in carrier)):
        if not present:
            continue
        try:
            context = trace.get_current_span(propagator.extract(dict(carrier))).get_span_context()
        except Exception:  # noqa: BLE001 — a hostile header is no link, never a failure
            continue
        if context.is_valid and context.trace_id not in seen:
            seen.add(context.trace_id)
            links.append(Link(context))
    return links


@contextmanager
def process_span(
    tracer: Any, queue: str, attributes: Mapping[str, Any], carrier: Mapping[str, str]
) -> Iterator[trace.Span]:
    """The current span while a message is handled: `process <queue>`, CONSUMER, linked to the
    producer (a new trace: the message's own work, however many times it is retried)."""
    span = tracer.start_span(
        f"process {queue}",
        context=trace.set_span_in_context(trace.INVALID_SPAN),  # a root: the producer is a link
        kind=SpanKind.CONSUMER,
        attributes={"messaging.operation.type": "process", "messaging.operation.name": "process", **attributes},
        links=producer_links(carrier),
    )
    with trace.use_span(span, end_on_exit=True, record_exception=False, set_status_on_exception=False):
        yield span


def annotate(span: trace.Span, disposition: str, reason: str) -> None:
    """Record how the message was settled (`ack`, `retry`, `dead_letter`, `release`) and why."""
    span.set_attribute("billingd.outcome", disposition)
    if disposition == "dead_letter":
        span.set_attribute("billingd.dead_letter.reason", reason[:500])
        span.set_attribute("error.type", "dead_letter")
        span.set_status(Status(StatusCode.ERROR, reason[:200]))
    elif disposition == "retry":
        span.set_attribute("billingd.retry.reason", reason[:500])
        span.set_attribute("error.type", "retry")


def exemplar(span: trace.Span) -> dict[str, str] | None:
    """The exemplar labels (trace id) for a metric observed under `span`, when it is sampled."""
    context = span.get_span_context()
    if not context.is_valid or not context.trace_flags.sampled:
        return None
    return {"trace_id": format(context.trace_id, "032x"), "span_id": format(context.span_id, "016x")}
