"""The lean SQS path's decoding of answers and its retry count (`billingd.sources.sqs_lean`)."""

from __future__ import annotations

import base64
import json

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from billingd.sources.sqs_lean import _decoded, total_attempts

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@given(st.binary(max_size=300))
def test_binary_attribute_values_come_back_as_bytes(value: bytes) -> None:
    attribute = {"DataType": "Binary", "BinaryValue": base64.b64encode(value).decode()}
    answer = {"Messages": [{"Body": "x", "MessageAttributes": {"blob": attribute}}]}
    decoded = _decoded("ReceiveMessage", json.dumps(answer).encode())
    assert decoded["Messages"][0]["MessageAttributes"]["blob"]["BinaryValue"] == value


@given(json_values, json_values)
def test_any_shape_of_messages_and_attributes_decodes_without_raising(messages: object, attributes: object) -> None:
    answer = {"Messages": [*messages, {"MessageAttributes": attributes}] if isinstance(messages, list) else messages}
    decoded = _decoded("ReceiveMessage", json.dumps(answer).encode())
    assert decoded.keys() == answer.keys()


def test_a_binary_value_that_is_not_base64_stays_a_string() -> None:
    answer = {"Messages": [{"MessageAttributes": {"b": {"DataType": "Binary", "BinaryValue": "not base64!"}}}]}
    decoded = _decoded("ReceiveMessage", json.dumps(answer).encode())
    assert decoded["Messages"][0]["MessageAttributes"]["b"]["BinaryValue"] == "not base64!"


@pytest.mark.parametrize("body", [b"<html>502 Bad Gateway</html>", b"[1, 2]", b'"text"'])
def test_an_answer_that_is_not_a_json_object_raises_decode_error(body: bytes) -> None:
    with pytest.raises(msgspec.DecodeError):
        _decoded("ReceiveMessage", body)


def test_an_empty_answer_is_an_empty_result() -> None:
    assert _decoded("DeleteMessageBatch", b"") == {}


@pytest.mark.parametrize(
    ("retries", "attempts"),
    [(None, 3), ({}, 3), ({"mode": "standard", "max_attempts": 3}, 4), ({"total_max_attempts": 2}, 2)],
)
def test_attempts_follow_botocores_reading_of_the_retries_config(retries: dict | None, attempts: int) -> None:
    assert total_attempts(retries) == attempts  # botocore: max_attempts counts retries, not the first try
