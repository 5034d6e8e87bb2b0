"""The CloudEvents mapping of `usage`: any body and any properties end as usage events, "not a
CloudEvent", or `InvalidMessage` — never another exception; valid events map field by field."""

from __future__ import annotations

import datetime
import json
from decimal import Decimal

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from billingd.handlers.kit.outcome import InvalidMessage
from billingd.handlers.usage.cloudevents import CloudEventsOptions, cloud_events
from billingd.handlers.usage.usage import UsageEvent

OPTIONS = CloudEventsOptions(type_prefix="com.acme.")
VALID = {"specversion": "1.0", "id": "e-1", "source": "/gw", "type": "com.acme.ai_credits", "subject": "ws_1",
         "time": "2026-12-06T10:00:00Z", "data": {"value": 2.5, "stripe_customer_id": "cus_1"}}  # fmt: skip

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
attribute_names = st.sampled_from(["specversion", "id", "source", "type", "subject", "time", "datacontenttype", "x"])
prefixes = st.sampled_from(["cloudEvents:", "cloudEvents_", "ce-", ""])


def test_a_structured_event_maps_onto_the_native_usage_event():
    [usage] = cloud_events(json.dumps(VALID).encode(), {}, OPTIONS)
    event = msgspec.convert(usage, UsageEvent)
    assert (event.event_type, event.workspace_id, event.idempotency_key) == ("ai_credits", "ws_1", "3:/gw:e-1")
    assert event.value == Decimal("2.5") and event.stripe_customer_id == "cus_1"
    assert event.timestamp == int(datetime.datetime(2026, 12, 6, 10, tzinfo=datetime.UTC).timestamp())


def test_seed_001_mapping_and_source_scoped_keys():
    options = CloudEventsOptions(subject="userId", value="usage.amount")
    body = {**VALID, "type": "AI_CREDITS", "data": {"usage": {"amount": "3"}}}
    [usage] = cloud_events(json.dumps(body).encode(), {}, options)
    expected = {"userId": "ws_1", "entitlementKey": "AI_CREDITS", "amount": Decimal(3), "idempotencyKey": "3:/gw:e-1",
                "timestamp": 1796551200}  # fmt: skip
    assert usage == expected
    # length-prefixed: source "a b" + id "c" is not source "a" + id "b c"
    one = cloud_events(json.dumps({**VALID, "source": "a b", "id": "c"}).encode(), {}, OPTIONS)
    two = cloud_events(json.dumps({**VALID, "source": "a", "id": "b c"}).encode(), {}, OPTIONS)
    assert one[0]["idempotency_key"] != two[0]["idempotency_key"]
    bare = cloud_events(json.dumps(VALID).encode(), {}, CloudEventsOptions(type_prefix="com.acme.", key="id"))
    assert bare[0]["idempotency_key"] == "e-1"


def test_a_missing_quantity_is_never_a_default_one():
    body = {**VALID, "data": {"tokens": 250000}}
    with pytest.raises(InvalidMessage, match=r"data\.value is missing"):
        cloud_events(json.dumps(body).encode(), {}, CloudEventsOptions(subject="userId", type_prefix="com.acme."))


def test_one_attribute_under_two_prefixes_with_different_values_is_refused():
    attributes = {"cloudEvents_specversion": "1.0", "cloudEvents_id": "A", "ce-id": "B", "ce-source": "/s",
                  "ce-type": "com.acme.x", "ce-subject": "ws"}  # fmt: skip
    with pytest.raises(InvalidMessage, match="given twice with different values"):
        cloud_events(b'{"value": 1}', attributes, OPTIONS)
    with pytest.raises(InvalidMessage, match="not UTF-8"):
        cloud_events(b'{"value": 1}', {**attributes, "ce-id": b"\xff", "cloudEvents_id": b"\xff"}, OPTIONS)


def test_time_is_rfc3339_text_in_structured_mode():
    for good in ("2026-12-06t10:00:00z", "2026-12-06T10:00:00.123456789+00:00"):
        [usage] = cloud_events(json.dumps({**VALID, "time": good}).encode(), {}, OPTIONS)
        assert usage["timestamp"] == 1796551200
    for bad in (1796551200, "2026-12-06", "20261206T100000Z", "2026-12-06T10:00:00"):
        with pytest.raises(InvalidMessage, match="RFC 3339"):
            cloud_events(json.dumps({**VALID, "time": bad}).encode(), {}, OPTIONS)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"specversion": "0.3"}, "specversion '0.3' is not supported (only 1.0)"),
        ({"id": ""}, "required attribute `id` is not a non-empty string (a string)"),
        ({"id": 7}, "required attribute `id` is not a non-empty string (a number)"),
        ({"data": [1]}, "`data` must be a JSON object, not an array"),
        ({"data": {"value": True}}, "data.value must be a number, not a boolean"),
        ({"data": {"value": "lots"}}, "data.value 'lots' is not a number"),
        ({"type": "org.other.x"}, "type 'org.other.x' does not start with 'com.acme.'"),
        ({"time": "2026-12-06T10:00:00"}, "is not an RFC 3339 timestamp"),
        ({"datacontenttype": "application/xml"}, "datacontenttype 'application/xml' is not JSON"),
        ({"subject": None}, "`subject` (the workspace_id) is missing or empty"),
    ],
)
def test_malformed_events_are_refused_with_their_reason(change, reason):
    body = {**VALID, **change}
    with pytest.raises(InvalidMessage) as refused:
        cloud_events(json.dumps(body).encode(), {}, OPTIONS)
    assert refused.value.reason.startswith("cloudevents: ") and reason in refused.value.reason


def test_binary_mode_takes_an_amqp_timestamp_and_every_prefix():
    for prefix in ("cloudEvents:", "cloudEvents_", "ce-"):
        attributes = {f"{prefix}{k}": v for k, v in VALID.items() if k != "data"}
        attributes[f"{prefix}time"] = 1_796_551_200_000  # AMQP 1.0: milliseconds since the epoch
        [usage] = cloud_events(b'{"value": 4}', attributes, OPTIONS)
        assert usage["timestamp"] == 1_796_551_200 and usage["value"] == 4


def test_a_native_event_mentioning_specversion_is_left_to_the_native_decoder():
    body = {"event_type": "x", "workspace_id": "w", "value": 1, "metadata": {"specversion": "1.0"}}
    assert cloud_events(json.dumps(body).encode(), {}, OPTIONS) is None


@given(st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()))
def test_any_body_is_a_usage_list_none_or_invalid(body):
    try:
        result = cloud_events(body, {}, OPTIONS)
    except InvalidMessage:
        return
    assert result is None or isinstance(result, list)


@given(st.dictionaries(st.tuples(prefixes, attribute_names).map("".join), json_values, max_size=8), json_values)
def test_any_properties_and_data_are_a_usage_list_none_or_invalid(attributes, data):
    attributes.setdefault("cloudEvents_specversion", "1.0")
    try:
        result = cloud_events(json.dumps(data).encode(), attributes, OPTIONS)
    except InvalidMessage:
        return
    for usage in result or []:
        try:
            msgspec.convert(usage, UsageEvent)
        except msgspec.ValidationError:
            pass  # the handler turns this into InvalidMessage (an id with braces, too long)
