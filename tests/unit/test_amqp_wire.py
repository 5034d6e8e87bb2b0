"""Hostile AMQP header tables: read without raising, written back within the frame budget."""

from __future__ import annotations

import datetime
import decimal
import struct

from hypothesis import given, settings
from hypothesis import strategies as st
from pamqp import decode, encode

from billingd.sources.amqp_wire import (
    DROPPED_HEADER,
    HEADER_BUDGET,
    MAX_ATTEMPTS_HEADER,
    encodable_headers,
    install_lenient_decoders,
    parse_attempts,
)

install_lenient_decoders()

ANY_SCALAR = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**60), max_value=10**60),
    st.floats(allow_nan=True, allow_infinity=True),
    st.decimals(allow_nan=True, allow_infinity=True),
    st.text(max_size=50),
    st.binary(max_size=50),
    st.datetimes(timezones=st.just(datetime.UTC)),
)
ANY_VALUE = st.recursive(
    ANY_SCALAR,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)


@given(ANY_VALUE)
def test_any_attempts_header_reads_as_a_small_count(value):
    attempts = parse_attempts(value)
    assert 0 <= attempts <= MAX_ATTEMPTS_HEADER


def test_attempts_header_edges():
    assert parse_attempts(4) == 4
    assert parse_attempts("4") == 4
    assert parse_attempts(b"4") == 4
    assert parse_attempts(4.0) == 4
    assert parse_attempts("9" * 40) == MAX_ATTEMPTS_HEADER  # a 40-digit string
    assert parse_attempts(3.4e38) == MAX_ATTEMPTS_HEADER
    assert parse_attempts(2**70) == MAX_ATTEMPTS_HEADER
    assert parse_attempts(float("nan")) == 0
    assert parse_attempts(-3) == 0
    assert parse_attempts(True) == 0
    assert parse_attempts("٣") == 0  # a non-ASCII digit is not a count


@settings(max_examples=300)
@given(st.dictionaries(st.text(max_size=20), ANY_VALUE, max_size=8))
def test_any_received_table_can_be_published_with_our_annotations(headers):
    ours = {"x-billingd-reason": "bad \udcff input", "x-billingd-attempts": 3}
    result = encodable_headers(headers, ours)
    wire = encode.field_table(result)  # raises if anything is not encodable
    assert len(wire) <= HEADER_BUDGET + 4096
    assert result["x-billingd-attempts"] == 3
    assert result["x-billingd-reason"].startswith("bad ")


def test_an_oversized_table_keeps_ours_and_names_what_it_dropped():
    headers = {f"h{i}": "x" * 15_000 for i in range(10)} | {"small": "kept", "big": "y" * 100_000}
    result = encodable_headers(headers, {"x-billingd-reason": "why"})
    assert len(encode.field_table(result)) <= HEADER_BUDGET + 1024
    assert result["small"] == "kept"
    assert result["x-billingd-reason"] == "why"
    assert result["big"].startswith("<header of")  # a single value over the budget is summarised
    assert result[DROPPED_HEADER]  # some of the 15 KB ones did not fit and are named


def test_values_pamqp_decodes_but_cannot_encode_are_repaired():
    headers = {"raw": b"\xff\xfe", "huge": 2**70, "dec": decimal.Decimal("1e-300"), "nested": {"b": b"\x00"}}
    result = encodable_headers(headers, {})
    encode.field_table(result)
    assert result["raw"] == bytearray(b"\xff\xfe")
    assert result["huge"] == str(2**70)


def _table(pairs: list[tuple[bytes, bytes]]) -> bytes:
    body = b"".join(struct.pack(">B", len(k)) + k + v for k, v in pairs)
    return struct.pack(">I", len(body)) + body


def test_a_key_that_is_not_utf8_and_a_timestamp_past_year_9999_decode():
    string = b"S" + struct.pack(">I", 1) + b"v"
    stamp = b"T" + struct.pack(">Q", 0x7FFFFFFFFFFFFFFF)
    _, table = decode.field_table(_table([(b"\xffkey", string), (b"t", stamp)]))
    assert table == {"\\xffkey": "v", "t": 0x7FFFFFFFFFFFFFFF}
    _, value = decode.by_type(b"\x02\xff\xfe", "shortstr")
    assert value == "\\xff\\xfe"


@given(st.binary(max_size=200))
def test_random_table_bytes_decode_or_raise_value_error_only(data):
    try:
        decode.field_table(struct.pack(">I", len(data)) + data)
    except ValueError:
        pass
