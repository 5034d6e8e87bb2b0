"""`sms_dlr`: Jasmin delivery receipts onto the CDR (seed 002, "DLR Events Consumer").

The seed's status table maps Jasmin statuses to CDR statuses. DLRs arrive in any order (a late
`ACCEPTD` after `DELIVRD` is common), so the CDR only moves up a fixed precedence
(`billingd.clients.ledger.CDR_RANK`): a final status is never overwritten by a pending or
submitted one, and every ordering of the same receipts ends in the same CDR.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from billingd.clients import Clients
from billingd.clients.ledger import SmsLedger
from billingd.config.model import SourceSettings
from billingd.handlers.base import HandlerSpec, JsonDecoder, Message, NoOptions
from billingd.handlers.outcome import ACK, InvalidMessage, Outcome

#: Seed 002 "Status Mapping": Jasmin status → CDR status. Any other `ESME_*` code is `failed`.
STATUS_MAP = {
    "DELIVRD": "delivered",
    "EXPIRED": "expired",
    "DELETED": "failed",
    "UNDELIV": "failed",
    "ACCEPTD": "pending",
    "UNKNOWN": "failed",
    "REJECTD": "rejected",
    "ESME_ROK": "submitted",
}


class Dlr(msgspec.Struct, frozen=True):
    """A delivery receipt (seed 002 "DLR Events Consumer" message format). `dlr_details` (the
    operator's receipt: id, sub, dlvrd, submit/done dates, stat, err, text) is kept verbatim."""

    message_id: Annotated[str, msgspec.Meta(min_length=1)]
    status: Annotated[str, msgspec.Meta(min_length=1)]
    pdu_type: str = ""
    smpp_msgid: str = ""
    dlr_details: msgspec.Raw = msgspec.Raw(b"{}")


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
    """Records one DLR on its CDR. Downstream: `redis`."""

    downstreams = ("redis",)

    def __init__(self, ledger: SmsLedger) -> None:
        self._ledger = ledger
        self._decoder = JsonDecoder(Dlr)

    async def handle(self, message: Message) -> Outcome:
        """Move the CDR of the DLR's `message_id` to its mapped status (never backwards).

        Dead-letters: malformed JSON, schema violations, unknown statuses.
        """
        dlr = self._decoder.decode(message.body)
        await self._ledger.record_dlr(
            dlr.message_id,
            cdr_status(dlr.status),
            jasmin_status=dlr.status,
            pdu_type=dlr.pdu_type,
            smpp_msgid=dlr.smpp_msgid,
            details=bytes(dlr.dlr_details),
        )
        return ACK


def _build(clients: Clients, options: NoOptions, source: SourceSettings) -> SmsDlrHandler:
    return SmsDlrHandler(clients.sms_ledger)


SPEC = HandlerSpec("sms_dlr", NoOptions, _build, "Jasmin DLR onto the CDR (seed 002)")
