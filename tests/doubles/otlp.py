"""An OTLP/HTTP trace receiver (a collector's `/v1/traces`, protobuf), for tests and benchmarks:
it decodes `ExportTraceServiceRequest` with opentelemetry-proto and keeps the spans.

    uv run python -m tests.doubles.otlp [--port 4318]    # counts spans, prints a line every 5 s
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from billingd.testing.server import Double

KINDS = {0: "UNSPECIFIED", 1: "INTERNAL", 2: "SERVER", 3: "CLIENT", 4: "PRODUCER", 5: "CONSUMER"}


@dataclass
class Span:
    """One received span, ids as hex."""

    name: str
    kind: str
    trace_id: str
    span_id: str
    parent_span_id: str
    links: list[tuple[str, str]]
    attributes: dict[str, Any]
    status: int
    service: str
    events: list[str] = field(default_factory=list)


def _value(any_value: Any) -> Any:
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind else None


class OtlpReceiver(Double):
    """`POST /v1/traces`; `spans` holds what arrived (`keep=False`: only counted)."""

    def __init__(self, keep: bool = True) -> None:
        super().__init__()
        self.spans: list[Span] = []
        self.count = 0
        self.keep = keep

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/traces", self._traces)
        return app

    async def _traces(self, request: web.Request) -> web.Response:
        body = await request.read()
        if request.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        export = ExportTraceServiceRequest()
        export.ParseFromString(body)
        for resource_spans in export.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                self.count += len(scope_spans.spans)
                if not self.keep:
                    continue
                for s in scope_spans.spans:
                    self.spans.append(
                        Span(
                            name=s.name,
                            kind=KINDS.get(s.kind, str(s.kind)),
                            trace_id=s.trace_id.hex(),
                            span_id=s.span_id.hex(),
                            parent_span_id=s.parent_span_id.hex(),
                            links=[(link.trace_id.hex(), link.span_id.hex()) for link in s.links],
                            attributes={a.key: _value(a.value) for a in s.attributes},
                            status=s.status.code,
                            service=str(resource.get("service.name", "")),
                        )
                    )
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(), content_type="application/x-protobuf"
        )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=4318)
    args = parser.parse_args()
    receiver = OtlpReceiver(keep=False)
    async with receiver.running(args.port):
        print(f"otlp receiver on {receiver.url}", flush=True)
        while True:
            await asyncio.sleep(5)
            print(f"spans received: {receiver.count}", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
