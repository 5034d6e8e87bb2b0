"""Jasmin's native formats (tests/fixtures/jasmin-0.11.1) and the restricted unpickler."""

from __future__ import annotations

import builtins
import os
import pickle
import subprocess

import pytest
from hypothesis import given
from hypothesis import strategies as st

from billingd.handlers.kit.outcome import InvalidMessage
from billingd.handlers.sms import jasmin
from billingd.handlers.sms.jasmin_pickle import PickleRefused, read_pickle
from tests.jasmin_capture import STOCK, load

CAPTURE = load()


def _headers(message) -> dict:
    return {name: value for name, (_, value) in message.headers.items()}


def test_every_captured_submit_reads_its_bill_and_its_parts():
    submits = [m for m in CAPTURE + load(STOCK) if m.routing_key == "submit.sm.fakesmsc"]
    records = [jasmin.submit_record(m.message_id, m.body, _headers(m)) for m in submits]
    assert len(records) == 90
    assert {r.uid for r in records} == {"billuser01"}
    assert {r.parts for r in records} == {1, 2, 3}
    for r in records:
        assert r.early_micros == 1_500 * r.parts  # 0.0015 per part, charged by Jasmin at submit time
        assert r.resp_micros == 13_500
        assert r.connector == "httpapi" or r.connector


def test_every_captured_receipt_and_bill_is_understood():
    for m in CAPTURE:
        headers = _headers(m)
        if m.routing_key.startswith("bill_request."):
            bill = jasmin.bill_request(m.message_id, m.body, headers)
            assert bill.uid == "billuser01"
            assert bill.amount_micros in (13_500, 27_000, 40_500)
        elif m.routing_key.startswith(("dlr.", "dlr_thrower.")):
            assert jasmin.is_receipt(headers)
            receipt = jasmin.receipt(m.message_id, m.body, headers)
            if m.routing_key == "dlr.deliver_sm":
                assert receipt.smpp_msgid == m.message_id
                assert receipt.details["stat"] == m.body.decode()


@pytest.mark.parametrize(
    ("amount", "micros"),
    [("0.0135", 13_500), ("0.09000000000000001", 90_000), ("0.0000005", 0), ("0.0000015", 2), ("0.027", 27_000)],
)
def test_bill_amounts_are_rounded_half_even_at_the_ledger_precision(amount, micros):
    bill = jasmin.bill_request("bid-1", b"bid-1", {"user-id": "u", "amount": amount})
    assert bill.amount_micros == micros


@pytest.mark.parametrize("amount", ["", "abc", "NaN", "-0.5", "1e400", "9" * 300, "Infinity"])
def test_bills_with_unusable_amounts_are_refused_with_a_reason(amount):
    with pytest.raises(InvalidMessage, match="amount"):
        jasmin.bill_request("bid-1", b"bid-1", {"user-id": "u", "amount": amount})


class _Call:
    def __init__(self, target, *args) -> None:
        self.target, self.args = target, args

    def __reduce__(self):
        return (self.target, self.args)


@pytest.mark.parametrize(
    "target",
    [os.system, subprocess.Popen, builtins.eval, builtins.getattr, builtins.__import__, pickle.loads],
)
def test_a_pickle_naming_anything_off_the_allow_list_is_refused_by_name(target):
    with pytest.raises(PickleRefused, match="allow-list"):
        read_pickle(pickle.dumps(_Call(target, "echo pwned"), protocol=2))


def test_allowed_callables_cannot_be_abused():
    with pytest.raises(PickleRefused):  # bytes(n) would allocate n bytes
        read_pickle(pickle.dumps(_Call(bytes, 2**40), protocol=2).replace(b"builtins", b"__builtin__"))
    with pytest.raises(PickleRefused):  # _codecs.encode with another codec
        read_pickle(pickle.dumps(_Call(__import__("_codecs").encode, "x", "rot13"), protocol=2))
    assert read_pickle(pickle.dumps(_Call(__import__("re")._compile, "(a+)+$", 0), protocol=2)) == "(a+)+$"


@given(st.binary(max_size=300))
def test_random_bytes_are_a_refused_pickle_never_another_error(data):
    try:
        read_pickle(b"\x80\x02" + data)
    except PickleRefused:
        pass


def test_a_submit_whose_bill_header_is_not_a_pickle_is_refused_not_allocated():
    genuine = next(m for m in CAPTURE if m.routing_key == "submit.sm.fakesmsc")
    for value in (2**31, -1, None, 1.5):
        with pytest.raises(InvalidMessage, match="submit_sm_bill"):
            jasmin.submit_record("m", genuine.body, {**_headers(genuine), "submit_sm_bill": value})


def test_a_tiny_pickle_cannot_make_the_unpickler_allocate_gigabytes():
    """`LONG_BINPUT 0x7fffffff` grows the C unpickler's memo to billions of slots: refused unread."""
    for data in (b"\x80\x02Nr\xff\xff\xff\x7f.", b"\x80\x02Nr\x00\x00\x00\x02.", b"\x80\x02Nj\xff\xff\xff\x7f."):
        with pytest.raises(PickleRefused, match="memo slot"):
            read_pickle(data)
