"""`sms_dlr`: Jasmin delivery receipts onto the CDR (seed 002, "DLR Events Consumer").

The seed's status table maps Jasmin statuses to CDR statuses. DLRs arrive in any order (a late
`ACCEPTD` after `DELIVRD` is common), so the CDR only moves up a fixed precedence
(`billingd.clients.ledger.CDR_RANK`): a final status is never overwritten by a pending or
submitted one, and every ordering of the same receipts ends in the same CDR.

Two formats, chosen by `handler_options.format` (`auto` looks at the headers):

* the seed's JSON `{message_id, status, pdu_type, smpp_msgid, dlr_details}`;
* Jasmin's native receipts (`dlr.submit_sm_resp`, `dlr.deliver_sm`, `dlr_thrower.*`), with
  submit retrials and refunds of failed submissions: see `billingd.handlers.sms.jasmin_receipts`.
"""

from __future__ import annotations

import hashlib
from typing import Literal

import msgspec

from billingd.clients.ledger import SmsLedger
from billingd.config.durations import Duration
from billingd.handlers.kit.base import HandlerContext, HandlerSpec, Id, JsonDecoder, Message, OptionalId
from billingd.handlers.kit.outcome import ACK, InvalidMessage, Outcome
from billingd.handlers.sms import jasmin
from billingd.handlers.sms.jasmin_receipts import NativeReceipts

#: Seed 002 "Status Mapping": Jasmin status → CDR status. Any other `ESME_*` code is `failed`.
#: `ENROUTE` (SMPP 3.4's other intermediate state) reads as `pending`.
STATUS_MAP = {
    "DELIVRD": "delivered",
    "EXPIRED": "expired",
    "DELETED": "failed",
    "UNDELIV": "failed",
    "ACCEPTD": "pending",
    "ENROUTE": "pending",
    "UNKNOWN": "failed",
    "REJECTD": "rejected",
    "ESME_ROK": "submitted",
}

FinalState = Literal["UNDELIV", "REJECTD", "EXPIRED", "DELETED", "UNKNOWN"]


class Dlr(msgspec.Struct, frozen=True):
    """A delivery receipt (seed 002 "DLR Events Consumer" message format). `dlr_details` (the
    operator's receipt: id, sub, dlvrd, submit/done dates, stat, err, text) is kept verbatim."""

    message_id: Id
    status: Id
    pdu_type: OptionalId = ""
    smpp_msgid: OptionalId = ""
    dlr_details: msgspec.Raw = msgspec.Raw(b"{}")


class DlrOptions(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """`handler_options` of `sms_dlr`."""

    format: Literal["auto", "json", "jasmin"] = "auto"
    """Which format to read: by the headers (`auto`), the seed's JSON only, or Jasmin's native only."""
    submit_error_retrial: dict[str, int] = msgspec.field(default_factory=lambda: dict(jasmin.JASMIN_RETRIAL))
    """Jasmin's `[sm-listener] submit_error_retrial` counts (error status → attempts before Jasmin
    gives up); an error not listed is final at once. Must match the Jasmin in front."""
    refund_on_receipt: list[FinalState] = msgspec.field(default_factory=list)
    """Final delivery states that also refund the whole price of the message (off by default)."""
    retention: Duration = Duration(90 * 86400)
    """How long a CDR (and the SMSC id map, and a refund's record) is kept after its last update;
    `0s` keeps them forever."""


def cdr_status(jasmin_status: str) -> str:
    """The CDR status for a Jasmin status (seed 002 table).

    Raises:
        InvalidMessage: the status is neither in the table nor an `ESME_*` code.
    """
    status = STATUS_MAP.get(jasmin_status)
    if status is not None:
        return status
    if jasmin_status.startswith("ESME_"):
        return "failed"
    raise InvalidMessage(f"unknown status {jasmin_status!r}: expected one of {', '.join(STATUS_MAP)} or ESME_*")


class SmsDlrHandler:
    """Records one receipt on its CDR. Downstream: `redis`."""

    downstreams = ("redis",)

    def __init__(
        self, ledger: SmsLedger, native: NativeReceipts | None = None, fmt: str = "auto", retention: int = 0
    ) -> None:
        self._ledger = ledger
        self._native = native
        self._format = fmt
        self._retention = retention
        self._decoder = JsonDecoder(Dlr)

    async def handle(self, message: Message) -> Outcome:
        """Move the CDR of the receipt's message to its mapped status (never backwards).

        Dead-letters: malformed JSON, schema violations, unknown statuses; native receipts as
        `jasmin_receipts` says.
        """
        if self._native is not None and (
            self._format == "jasmin" or (self._format == "auto" and jasmin.is_receipt(message.attributes))
        ):
            receipt = jasmin.receipt(message.message_id, message.body, message.attributes)
            digest = hashlib.sha256(message.body + repr(receipt).encode()).hexdigest()[:16]
            copy = (message.delivery_id, message.redelivered, digest, message.copied)
            return await self._native.apply(receipt, message.attempt, cdr_status, copy)
        dlr = self._decoder.decode(message.body)
        await self._ledger.record_dlr(
            dlr.message_id,
            cdr_status(dlr.status),
            jasmin_status=dlr.status,
            pdu_type=dlr.pdu_type,
            smpp_msgid=dlr.smpp_msgid,
            details=bytes(dlr.dlr_details),
            retention=self._retention,
        )
        return ACK


def _build(ctx: HandlerContext, options: DlrOptions) -> SmsDlrHandler:
    clients, source = ctx.clients, ctx.source
    for status, count in options.submit_error_retrial.items():
        if not status.startswith("ESME_") or count < 1:
            raise ValueError(f"submit_error_retrial: {status} = {count}: expected ESME_* = a count >= 1")
    unmapped = ctx.counter(
        "billingd_sms_receipts_unmapped",
        "Jasmin delivery receipts dead-lettered because no dlr.submit_sm_resp mapped their SMSC id.",
        [],
    ).labels()
    native = NativeReceipts(
        clients.sms_ledger,
        clients.jasmin_ledger,
        dict(options.submit_error_retrial),
        frozenset(options.refund_on_receipt),
        source.max_attempts,
        unmapped,
        int(options.retention),
    )
    native_or_none = None if options.format == "json" else native
    return SmsDlrHandler(clients.sms_ledger, native_or_none, options.format, int(options.retention))


SPEC = HandlerSpec(
    "sms_dlr", DlrOptions, _build, "Jasmin receipts onto the CDR, refunds of failed submissions (seed 002)"
)
