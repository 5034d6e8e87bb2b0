"""Stripe's asynchronous meter event error reports (`v1.billing.meter.error_report_triggered`).

The v2 meter event stream answers `{}` and validates afterwards; events it then finds invalid are
never billed, and Stripe says so in a v2 event (a *thin* event notification, or a snapshot with
`data`, as event destinations deliver them; stripe-python's
`V1BillingMeterErrorReportTriggeredEvent`):

    {"id": "evt_…", "object": "v2.core.event", "type": "v1.billing.meter.error_report_triggered",
     "related_object": {"id": "mtr_…", "type": "billing.meter"},
     "data": {"developer_message_summary": "…", "validation_start": "…", "validation_end": "…",
              "reason": {"error_count": 3, "error_types": [
                  {"code": "meter_event_customer_not_found", "error_count": 3,
                   "sample_errors": [{"error_message": "…", "request": {"identifier": "…"}}]}]}}}

`stripe_events` counts each error type per meter (`billingd_meter_errors_total{source,meter,code}`)
and logs the report with Stripe's sample identifiers, so finance can find the usage that was not
billed (docs/handlers.md says what to do).
"""

from __future__ import annotations

import re
from typing import Annotated, Any

import msgspec
import structlog

from billingd.handlers.kit.base import JsonDecoder

log = structlog.get_logger("billingd.stripe_events")

ERROR_REPORT = "v1.billing.meter.error_report_triggered"
#: Longest label value taken from a report (meter id, error code); other characters become `_`.
_LABEL = re.compile(r"[^A-Za-z0-9_]")
_MAX_LABEL = 64
#: Most sample identifiers logged per error type.
MAX_SAMPLES = 20

Count = Annotated[int, msgspec.Meta(ge=0, le=10**12)]


class V2Event(msgspec.Struct, frozen=True):
    """A v2 event (`object = "v2.core.event"`): the fields billingd reads; `data` may be absent (thin)."""

    id: Annotated[str, msgspec.Meta(min_length=1, max_length=255)]
    type: Annotated[str, msgspec.Meta(max_length=255)]
    related_object: dict[str, Any] | None = None
    data: msgspec.Raw = msgspec.Raw(b"")


class _Request(msgspec.Struct, frozen=True):
    identifier: str = ""


class _Sample(msgspec.Struct, frozen=True):
    error_message: str = ""
    request: _Request | None = None


class _ErrorType(msgspec.Struct, frozen=True):
    code: str
    error_count: Count = 0
    sample_errors: list[_Sample] = msgspec.field(default_factory=list)


class _Reason(msgspec.Struct, frozen=True):
    error_count: Count = 0
    error_types: list[_ErrorType] = msgspec.field(default_factory=list)


class ErrorReport(msgspec.Struct, frozen=True):
    """`data` of an error report event."""

    reason: _Reason
    developer_message_summary: str = ""
    validation_start: str = ""
    validation_end: str = ""


V2_EVENT = JsonDecoder(V2Event)
REPORT = JsonDecoder(ErrorReport)


def label(value: str) -> str:
    """A bounded, safe metric label value from Stripe's text."""
    return _LABEL.sub("_", value[:_MAX_LABEL]) or "unknown"


def record(event: V2Event, report: ErrorReport, counter: Any, source: str) -> int:
    """Count and log one error report; returns the number of invalid events it reports.

    `counter` is `billingd_meter_errors_total` with its `source` bound (`.labels(meter, code)`)."""
    meter = label(str((event.related_object or {}).get("id") or "unknown"))
    total = 0
    for kind in report.reason.error_types:
        counter.labels(meter, label(kind.code)).inc(kind.error_count)
        total += kind.error_count
        samples = [s.request.identifier[:200] for s in kind.sample_errors if s.request is not None][:MAX_SAMPLES]
        log.error(
            "Stripe refused meter events it had accepted: that usage is not billed",
            source=source,
            event_id=event.id,
            meter=meter,
            code=kind.code[:_MAX_LABEL],
            count=kind.error_count,
            sample_identifiers=samples,
            sample_message=kind.sample_errors[0].error_message[:300] if kind.sample_errors else "",
            summary=report.developer_message_summary[:300],
            window=f"{report.validation_start[:40]}..{report.validation_end[:40]}",
        )
    return total
