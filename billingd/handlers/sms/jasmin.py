"""Jasmin's native AMQP messages, as a live jasmind 0.11.1 publishes them (DESIGN §8 "real
producers win"; `tests/fixtures/jasmin-0.11.1/README.md`; Jasmin's `jasmin/managers/content.py`
and `listeners.py`). No JSON: the facts are in the AMQP `message_id`, a bare body and headers.

* `bill_request.submit_sm_resp.<uid>` (exchange `billing`): message_id and body = the bill id;
  headers `user-id`, `amount` (`str(float)`);
* `dlr.submit_sm_resp` (`messaging`): message_id = Jasmin's msgid; body = the command status
  (`ESME_ROK`, …); headers `type`, `smpp_msgid` (on `ESME_ROK`);
* `dlr.deliver_sm` (`messaging`): message_id = the SMSC's id; body = the receipt state
  (`DELIVRD`, …); headers `type`, `cid`, `dlr_id`, `dlr_stat`, `dlr_*`;
* `dlr_thrower.http` / `.smpps` (`messaging`): message_id and body = Jasmin's msgid; header
  `message_status` and the receipt's fields;
* `submit.sm.<cid>` (`messaging`): message_id = Jasmin's msgid; body = a pickled `SubmitSM`;
  headers `submit_sm_bill` (pickled), `source_connector`.

Each reader returns a plain record or raises `InvalidMessage` with the reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from billingd.handlers.kit.base import MAX_ID_LENGTH
from billingd.handlers.kit.money import MAX_UNITS, to_micros_rounded
from billingd.handlers.kit.outcome import InvalidMessage
from billingd.handlers.sms.jasmin_pickle import Obj, PickleRefused, read_pickle

#: Jasmin 0.11.1's default `[sm-listener] submit_error_retrial` counts: how many submit attempts
#: end in that error before Jasmin gives up (its counter includes the first attempt).
JASMIN_RETRIAL = {"ESME_RSYSERR": 2, "ESME_RTHROTTLED": 20, "ESME_RMSGQFUL": 2, "ESME_RINVSCHED": 2}
#: Most parts of one long message (SMPP's UDH counts parts in one octet).
MAX_PARTS = 255


def header(headers: Mapping[str, Any], name: str) -> str | None:
    """Header `name` as text: strings as they are, bytes decoded as UTF-8 (errors replaced),
    numbers in decimal; None when absent or of another type."""
    value = headers.get(name)
    if isinstance(value, str):
        return value
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "replace")
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def _identifier(value: str | None, what: str) -> str:
    text = (value or "").strip()
    if not text:
        raise InvalidMessage(f"invalid Jasmin message: no {what}")
    if len(text) > MAX_ID_LENGTH:
        raise InvalidMessage(f"invalid Jasmin message: {what} longer than {MAX_ID_LENGTH} characters")
    return text


def _text_body(body: bytes, what: str) -> str:
    try:
        return body.decode("ascii").strip()
    except UnicodeDecodeError:
        raise InvalidMessage(f"invalid Jasmin message: the {what} body is not ASCII text") from None


@dataclass(frozen=True, slots=True)
class BillRequest:
    """`bill_request.submit_sm_resp.<uid>`: charge `amount_micros` to `uid` once, as bill `bid`."""

    bid: str
    uid: str
    amount_micros: int


def is_bill_request(headers: Mapping[str, Any]) -> bool:
    """Whether the headers are those of a native bill request."""
    return "user-id" in headers and "amount" in headers


def bill_request(message_id: str, body: bytes, headers: Mapping[str, Any]) -> BillRequest:
    """Read a native bill request. The amount is `str(float)`: rounded half-even to micro-units.

    Raises:
        InvalidMessage: no bill id or user id, or an amount that is not a bounded number.
    """
    bid = _identifier(message_id if not message_id.startswith("sha256:") else _text_body(body, "bill"), "bill id")
    uid = _identifier(header(headers, "user-id"), "user-id header")
    text = (header(headers, "amount") or "").strip()
    if len(text) > 64:
        raise InvalidMessage(f"invalid Jasmin bill {bid}: amount header of {len(text)} characters")
    try:
        amount = Decimal(text)
    except InvalidOperation:
        raise InvalidMessage(f"invalid Jasmin bill {bid}: amount header {text!r} is not a number") from None
    return BillRequest(bid, uid, to_micros_rounded(amount, f"bill {bid} amount"))


@dataclass(frozen=True, slots=True)
class SubmitRecord:
    """What a `submit.sm.<cid>` message tells about one submission: who pays, how much Jasmin
    charged early (the `submit_sm` share × parts, micro-units) and the rest per part."""

    msgid: str
    bid: str
    uid: str
    early_micros: int
    resp_micros: int
    parts: int
    connector: str


def is_submit(headers: Mapping[str, Any]) -> bool:
    """Whether the headers are those of a `submit.sm.<cid>` message."""
    return "submit_sm_bill" in headers


def submit_record(message_id: str, body: bytes, headers: Mapping[str, Any]) -> SubmitRecord:
    """Read a `submit.sm.<cid>` message: its pickled `submit_sm_bill` header and the part count of
    its pickled SubmitSM body, through the restricted unpickler.

    Raises:
        InvalidMessage: a pickle naming a global outside the allow-list (the reason names it),
            an unreadable pickle, or a bill without user or amounts.
    """
    msgid = _identifier(message_id, "msgid (message_id)")
    raw = headers.get("submit_sm_bill")
    if isinstance(raw, str):
        data = raw.encode("utf-8", "surrogateescape")
    elif isinstance(raw, bytes | bytearray):
        data = bytes(raw)
    else:  # never bytes(int): bytes(2**31) would allocate 2 GiB
        raise InvalidMessage(f"submit.sm {msgid}: submit_sm_bill header is a {type(raw).__name__}, not a pickle")
    try:
        bill = read_pickle(data)
        pdu = read_pickle(body)
    except PickleRefused as exc:
        raise InvalidMessage(f"refused Jasmin pickle in submit.sm {msgid}: {exc}") from None
    if not isinstance(bill, Obj) or bill.kind != "jasmin.routing.Bills.SubmitSmBill":
        raise InvalidMessage(f"submit.sm {msgid}: submit_sm_bill is not a SubmitSmBill")
    user = bill.get("user")
    amounts = bill.get("amounts")
    if not isinstance(user, Obj) or not isinstance(amounts, dict):
        raise InvalidMessage(f"submit.sm {msgid}: the bill has no user or amounts")
    parts = _parts(pdu)
    early = _share(amounts.get("submit_sm", 0), parts, msgid, "submit_sm")
    rest = _share(amounts.get("submit_sm_resp", 0), 1, msgid, "submit_sm_resp")
    return SubmitRecord(
        msgid=msgid,
        bid=_identifier(str(bill.get("bid") or ""), "bill id"),
        uid=_identifier(str(user.get("uid") or ""), "user uid"),
        early_micros=early,
        resp_micros=rest,
        parts=parts,
        connector=(header(headers, "source_connector") or "")[:MAX_ID_LENGTH],
    )


def _parts(pdu: Any) -> int:
    """Parts in a SubmitSM's `nextPdu` chain (1 for a short message)."""
    parts = 1
    while isinstance(pdu, Obj) and isinstance(pdu.get("nextPdu"), Obj):
        pdu = pdu.get("nextPdu")
        parts += 1
        if parts > MAX_PARTS:
            raise InvalidMessage(f"SubmitSM with more than {MAX_PARTS} parts")
    return parts


def _share(value: Any, parts: int, msgid: str, name: str) -> int:
    """A float amount from a pickle × parts, in micro-units (half-even at the ledger's precision)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidMessage(f"submit.sm {msgid}: amounts.{name} is not a number")
    amount = Decimal(repr(value)) if isinstance(value, float) else Decimal(value)
    if not amount.is_finite() or amount > MAX_UNITS:
        raise InvalidMessage(f"submit.sm {msgid}: amounts.{name} {value!r} is out of range")
    return to_micros_rounded(amount * parts, f"submit.sm {msgid} amounts.{name}")


@dataclass(frozen=True, slots=True)
class SubmitReceipt:
    """`dlr.submit_sm_resp`: the result of one submit attempt of `msgid`."""

    msgid: str
    status: str
    smpp_msgid: str


@dataclass(frozen=True, slots=True)
class DeliverReceipt:
    """`dlr.deliver_sm`: the SMSC's receipt for its id `smpp_msgid` (not Jasmin's msgid)."""

    smpp_msgid: str
    state: str
    details: dict[str, str]


@dataclass(frozen=True, slots=True)
class ThrowerReceipt:
    """`dlr_thrower.http` / `.smpps`: Jasmin's own resolved receipt for `msgid`."""

    msgid: str
    status: str
    details: dict[str, str]


Receipt = SubmitReceipt | DeliverReceipt | ThrowerReceipt


def is_receipt(headers: Mapping[str, Any]) -> bool:
    """Whether the headers are those of a native receipt (any of the three kinds)."""
    return header(headers, "type") in ("submit_sm_resp", "deliver_sm") or "message_status" in headers


def receipt(message_id: str, body: bytes, headers: Mapping[str, Any]) -> Receipt:
    """Read a native receipt.

    Raises:
        InvalidMessage: no id or status, or a body that is not ASCII text.
    """
    kind = header(headers, "type")
    if kind == "submit_sm_resp":
        status = _identifier(_text_body(body, "dlr.submit_sm_resp"), "command status")
        smpp = (header(headers, "smpp_msgid") or "").strip()[:MAX_ID_LENGTH]
        return SubmitReceipt(_identifier(message_id, "msgid (message_id)"), status, smpp)
    if kind == "deliver_sm":
        state = _text_body(body, "dlr.deliver_sm") or (header(headers, "dlr_stat") or "")
        details = {k[4:]: v for k in headers if k.startswith("dlr_") and (v := header(headers, k)) is not None}
        details["cid"] = header(headers, "cid") or ""
        return DeliverReceipt(_identifier(message_id, "SMSC id (message_id)"), _identifier(state, "state"), details)
    status = _identifier(header(headers, "message_status"), "message_status header")
    msgid = message_id if not message_id.startswith("sha256:") else _text_body(body, "dlr_thrower")
    keep = ("id_smsc", "sub", "dlvrd", "subdate", "donedate", "err", "text", "connector", "level")
    details = {k: v for k in keep if (v := header(headers, k)) is not None}
    return ThrowerReceipt(_identifier(msgid, "msgid (message_id)"), status, details)
