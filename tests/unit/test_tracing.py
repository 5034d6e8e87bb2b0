"""When traces are on, what the OTEL_* variables may ask, and reading producers' contexts."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from billingd.sources.base import text_carrier
from billingd.telemetry.spans import producer_links
from billingd.telemetry.tracing import Tracing, TracingMisconfigured, wanted


@pytest.mark.parametrize(
    ("environ", "on"),
    [
        ({}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}, True),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, True),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, False),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}, False),
        ({"OTEL_TRACES_EXPORTER": "console"}, True),
    ],
)
def test_traces_are_off_unless_the_environment_asks(environ, on):
    assert wanted(environ) is on
    assert Tracing("t", environ).enabled is on


def test_grpc_is_refused_with_the_fix():
    with pytest.raises(TracingMisconfigured, match="http/protobuf"):
        Tracing("t", {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"})


def test_valid_w3c_and_xray_contexts_become_links():
    w3c = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
    xray = {"X-Amzn-Trace-Id": "Root=1-5759e988-bd862e3fe1be46a994272793;Parent=53995c3f42cd8ad8;Sampled=1"}
    assert [format(link.context.trace_id, "032x") for link in producer_links(w3c)] == [
        "0af7651916cd43dd8448eb211c80319c"
    ]
    assert [format(link.context.trace_id, "032x") for link in producer_links(xray)] == [
        "5759e988bd862e3fe1be46a994272793"
    ]
    assert len(producer_links({**w3c, **xray})) == 2


@given(st.dictionaries(st.sampled_from(["traceparent", "tracestate", "X-Amzn-Trace-Id", "other"]), st.text()))
def test_any_carrier_gives_links_or_none_never_an_error(carrier):
    for link in producer_links(carrier):
        assert link.context.is_valid


@given(st.dictionaries(st.text(max_size=12), st.one_of(st.text(), st.binary(), st.integers(), st.none())))
def test_text_carrier_keeps_only_short_text_trace_headers(headers):
    carrier = text_carrier(headers)
    assert set(carrier) <= {"traceparent", "tracestate"}
    assert all(isinstance(v, str) and len(v) <= 512 for v in carrier.values())
