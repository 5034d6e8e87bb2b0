"""Body codecs (seed 000: gzip-compressed, base64-encoded)."""

from __future__ import annotations

import base64
import gzip

import pytest
from hypothesis import given
from hypothesis import strategies as st

from billingd.sources.codecs import MAX_BODY, UndecodableBody, decode_body, encode_body

ENCODINGS = [None, "", "identity", "gzip", "base64", "gzip+base64", "gzip,base64", "GZIP"]


@given(st.binary(max_size=2048), st.sampled_from(ENCODINGS), st.booleans())
def test_round_trip(data, encoding, text_transport):
    encoded = encode_body(data, encoding, text_transport=text_transport)
    assert decode_body(encoded, encoding, text_transport=text_transport) == data


@given(st.binary(max_size=512), st.sampled_from(["gzip", "base64", "gzip+base64", "zstd"]), st.booleans())
def test_garbage_is_refused_with_a_reason_never_another_error(data, encoding, text_transport):
    try:
        decode_body(data, encoding, text_transport=text_transport)
    except UndecodableBody as exc:
        assert str(exc)


def test_seed_000_gzip_on_sqs_means_base64_of_gzip():
    body = b'{"type": "invoice_finalized", "organization_id": "org_123"}'
    wire = base64.b64encode(gzip.compress(body))
    assert decode_body(wire, "gzip", text_transport=True) == body
    assert decode_body(gzip.compress(body), "gzip", text_transport=False) == body  # AMQP carries bytes


def test_a_gzip_bomb_is_refused():
    bomb = base64.b64encode(gzip.compress(b"\0" * (MAX_BODY + 10)))
    with pytest.raises(UndecodableBody, match="larger than"):
        decode_body(bomb, "gzip", text_transport=True)


def test_truncated_gzip_is_refused():
    wire = base64.b64encode(gzip.compress(b"x" * 1000)[:-8])
    with pytest.raises(UndecodableBody):
        decode_body(wire, "gzip", text_transport=True)
