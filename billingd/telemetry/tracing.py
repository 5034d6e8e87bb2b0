"""OpenTelemetry traces, off unless configured, configured by the standard `OTEL_*` variables.

Traces are on when `OTEL_TRACES_EXPORTER` is `otlp` (or `console`), or when it is unset and an
OTLP endpoint is (`OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`); never
when `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none`. The OTLP exporter speaks
`http/protobuf` (`OTEL_EXPORTER_OTLP_PROTOCOL`; `grpc` is refused at start with the fix). The SDK
reads the rest itself: `OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES`,
`OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG` (e.g. `parentbased_traceidratio`, `0.01`), the
endpoint, headers and timeout, and `OTEL_BSP_*` for the batch processor.

Spans are exported from a background thread through a bounded queue (`OTEL_BSP_MAX_QUEUE_SIZE`,
2,048 by default): a collector that is down costs dropped spans, never a blocked or slower
message. The provider is the daemon's own (no global tracer provider is installed), and when
traces are off nothing of the SDK is even imported: `Tracing.tracer` is None and every call site
skips its span.

Spans (OpenTelemetry messaging conventions): per message a `process <queue>` span of kind
CONSUMER, **linked** to its producer's context — W3C `traceparent`/`tracestate` from AMQP headers
or an SQS message attribute, or SQS's `AWSTraceHeader` (X-Ray) — with `messaging.system`,
`messaging.destination.name`, `messaging.message.id`, `messaging.operation.type = process`,
`messaging.rabbitmq.destination.routing_key`, the outcome (`billingd.outcome`), a dead letter's
reason and `error.type`; child spans for Redis scripts, Stripe calls and HTTP forwards.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

#: OTLP protocols the exporter here speaks.
SUPPORTED_PROTOCOLS = ("http/protobuf",)


class TracingMisconfigured(Exception):
    """The `OTEL_*` variables ask for something billingd cannot do (e.g. the grpc protocol)."""


def wanted(environ: Mapping[str, str]) -> bool:
    """Whether the environment turns traces on (see module docstring)."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = {e.strip().lower() for e in environ.get("OTEL_TRACES_EXPORTER", "").split(",") if e.strip()}
    if exporters:
        return bool(exporters & {"otlp", "console"})
    return bool(environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


class Tracing:
    """The daemon's tracer provider (or nothing, when traces are off).

    Raises (from the constructor):
        TracingMisconfigured: an OTLP protocol other than `http/protobuf`.
    """

    def __init__(self, version: str, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.tracer: Any = None
        self._provider: Any = None
        if not wanted(env):
            return
        protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or ""
        if protocol and protocol not in SUPPORTED_PROTOCOLS:
            raise TracingMisconfigured(
                f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r}: billingd exports traces over http/protobuf only; "
                "set OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf and point OTEL_EXPORTER_OTLP_ENDPOINT at the "
                "collector's HTTP port (4318)"
            )
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

        exporters = {e.strip().lower() for e in env.get("OTEL_TRACES_EXPORTER", "otlp").split(",") if e.strip()}
        resource = Resource.create(
            {"service.name": env.get("OTEL_SERVICE_NAME") or "billingd", "service.version": version}
        )
        provider = TracerProvider(resource=resource)  # the sampler comes from OTEL_TRACES_SAMPLER
        chosen: list[SpanExporter] = []
        if "otlp" in exporters or not exporters:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            chosen.append(OTLPSpanExporter())
        if "console" in exporters:
            chosen.append(ConsoleSpanExporter())
        for exporter in chosen:
            provider.add_span_processor(BatchSpanProcessor(exporter))
        self._provider = provider
        self.tracer = provider.get_tracer("billingd", version)

    @property
    def enabled(self) -> bool:
        """Whether spans are made."""
        return self.tracer is not None

    def shutdown(self, timeout: float) -> None:
        """Flush the spans still queued and stop exporting, within `timeout` seconds (a thread:
        a collector that does not answer cannot hold the exit)."""
        provider = self._provider
        if provider is None:
            return
        self._provider = None
        worker = threading.Thread(target=_flush_and_stop, args=(provider, timeout), daemon=True)
        worker.start()
        worker.join(timeout)


def _flush_and_stop(provider: Any, timeout: float) -> None:
    provider.force_flush(int(timeout * 1000))
    provider.shutdown()


@contextmanager
def child_span(tracer: Any, name: str, attributes: Mapping[str, Any] | None = None) -> Iterator[Any]:
    """A CLIENT span `name` under the current span (the message's), or nothing when traces are
    off, no message span is current (a CLI tool) or the message's span is not sampled (a child
    of an unsampled span would be dropped anyway: not making it keeps a low sampling ratio
    cheap). Exceptions are recorded and re-raised."""
    if tracer is None:
        yield None
        return
    from opentelemetry import trace

    if not trace.get_current_span().is_recording():
        yield None
        return
    with tracer.start_as_current_span(name, kind=trace.SpanKind.CLIENT, attributes=attributes) as span:
        yield span
