"""Jasmin's native receipts onto CDRs, with refunds of failed submissions (seed 002 "Refund
Logic" and "Pickle Support"; DESIGN §8). Used by `sms_dlr` for messages in Jasmin's own format.

* `dlr.submit_sm_resp` — one per submit *attempt*. `ESME_ROK` makes the CDR `submitted` and maps
  the SMSC's id (`smpp_msgid` header) to Jasmin's msgid. An error Jasmin retries
  (`submit_error_retrial`, the same table in `handler_options`) counts an attempt and leaves the
  CDR `retrying` until the attempts reach the table's count; then — or at once for an error
  Jasmin does not retry — the CDR is `failed` and the **early share** Jasmin charged at submit
  time (from the `submit.sm` record, × parts) is credited to the account, once per submission.
* `dlr.deliver_sm` — names only the SMSC's id: mapped to the msgid through billingd's own map; a
  receipt that arrives before its map entry is retried (counted), then dead-lettered with a
  reason naming the missing map (and counted in `billingd_sms_receipts_unmapped_total`).
* `dlr_thrower.http` / `.smpps` — Jasmin's resolved receipts by msgid: an `ESME_*` status is
  handled like a submit receipt (its own attempt counter), any other like a delivery state.

With `refund_on_receipt` (off by default), a final delivery state in that list also credits the
whole price of the message (early share + the `submit_sm_resp` share of every part), once.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec
import structlog

from billingd.clients.ledger import SmsLedger
from billingd.clients.ledger.jasmin import JasminLedger, SubmitOutcome
from billingd.handlers.kit.outcome import ACK, DeadLetter, Outcome, Retry
from billingd.handlers.sms.charges import settle_bill
from billingd.handlers.sms.jasmin import DeliverReceipt, Receipt, SubmitReceipt

log = structlog.get_logger("billingd.jasmin")

#: Which delivery a receipt came in: `(delivery id, redelivered, content digest, copied)`.
Copy = tuple[str, bool, str, bool]


class NativeReceipts:
    """Applies native receipts (see module docstring).

    Args:
        sms: charges, refunds and CDRs. submits: submit records, the SMSC id map.
        retrial: error status → the attempts after which Jasmin gives up.
        refund_on_receipt: delivery states that refund the whole price.
        max_attempts: the source's; the last attempt of an unmappable receipt dead-letters.
        unmapped: a counter (bound to the source) of receipts that could not be mapped.
        retention: seconds CDRs, the SMSC id map and refund records are kept (0: forever).
    """

    def __init__(
        self,
        sms: SmsLedger,
        submits: JasminLedger,
        retrial: Mapping[str, int],
        refund_on_receipt: frozenset[str],
        max_attempts: int,
        unmapped: Any,
        retention: int = 0,
    ) -> None:
        self._sms = sms
        self._submits = submits
        self._retrial = retrial
        self._refund_on_receipt = refund_on_receipt
        self._max_attempts = max_attempts
        self._unmapped = unmapped
        self._retention = retention
        self._warned = False

    async def apply(
        self,
        receipt: Receipt,
        attempt: int,
        cdr_status: Any,
        copy: tuple[str, bool, str, bool] = ("", False, "", False),
    ) -> Outcome:
        """Apply one receipt; `cdr_status` maps a delivery state onto a CDR status (or raises);
        `copy` says which delivery this is (see `JasminLedger.submit_result`)."""
        if isinstance(receipt, SubmitReceipt):
            return await self._submit_result(
                receipt.msgid, receipt.status, receipt.smpp_msgid, "attempts", attempt, copy
            )
        if isinstance(receipt, DeliverReceipt):
            msgid = await self._submits.msgid_for(receipt.smpp_msgid)
            if msgid is None:
                return self._unmappable(receipt.smpp_msgid, attempt)
            return await self._delivery(msgid, receipt.state, receipt.smpp_msgid, receipt.details, cdr_status, attempt)
        if receipt.status.startswith("ESME_"):
            return await self._submit_result(receipt.msgid, receipt.status, "", "thrower_attempts", attempt, copy)
        return await self._delivery(receipt.msgid, receipt.status, "", receipt.details, cdr_status, attempt)

    async def _submit_result(
        self, msgid: str, status: str, smpp: str, counter: str, attempt: int, copy: Copy
    ) -> Outcome:
        if status == "ESME_ROK" and smpp:
            await self._submits.map_smpp(smpp, msgid, self._retention)
        final_after = self._retrial.get(status, 0)
        outcome, detail = await self._submits.submit_result(
            msgid, status, final_after=final_after, smpp_msgid=smpp, counter=counter, retention=self._retention,
            copy=copy,
        )  # fmt: skip
        if outcome is SubmitOutcome.CONFLICT:
            return DeadLetter(
                f"Jasmin reports submission {msgid} ESME_ROK after billingd counted it as finally failed "
                f"({detail} error attempts) and refunded its early share: check Jasmin's submit_error_retrial "
                "against handler_options.submit_error_retrial, and review the refund"
            )
        if outcome is SubmitOutcome.FINAL:
            return await self._refund(msgid, status, attempt, whole=False)
        return ACK

    async def _delivery(
        self, msgid: str, state: str, smpp: str, details: dict[str, str], cdr_status: Any, attempt: int
    ) -> Outcome:
        await self._sms.record_dlr(
            msgid,
            cdr_status(state),
            jasmin_status=state,
            pdu_type="deliver_sm",
            smpp_msgid=smpp,
            details=msgspec.json.encode(details),
            retention=self._retention,
        )
        if state in self._refund_on_receipt:
            return await self._refund(msgid, state, attempt, whole=True)
        return ACK

    async def _refund(self, msgid: str, status: str, attempt: int, *, whole: bool) -> Outcome:
        """Credit the early share (or, `whole`, the full price) of submission `msgid`, once."""
        record = await self._submits.submit(msgid)
        if not record:
            reason = (
                f"submission {msgid} ended {status} but billingd has no submit.sm record of it, so cannot "
                "refund it: bind submit.sm.# on the messaging exchange to an sms_billing source"
            )
            return DeadLetter(reason) if attempt >= self._max_attempts else Retry(reason)
        amount = int(record["early_micros"])
        bid = record["bid"]
        if whole:
            amount += int(record["resp_micros"]) * int(record["parts"])
            bid = f"receipt:{bid}"
        return await settle_bill(
            self._sms,
            uid=record["uid"],
            bid=bid,
            state="refunded",
            amount=amount,
            status=status,
            message_id=msgid,
            connector=record.get("connector", ""),
            retention=self._retention,
        )

    def _unmappable(self, smpp: str, attempt: int) -> Outcome:
        reason = (
            f"receipt for SMSC id {smpp} cannot be mapped to a Jasmin msgid: billingd has no smpp_msgid map "
            "entry for it (no dlr.submit_sm_resp with this smpp_msgid was seen; a stock Jasmin 0.11.1 publishes "
            "none, see docs/jasmin.md)"
        )
        if attempt < self._max_attempts:
            return Retry(reason)
        self._unmapped.inc()
        if not self._warned:
            self._warned = True
            log.warning("delivery receipts without their dlr.submit_sm_resp: dead-lettered", smpp_msgid=smpp)
        return DeadLetter(reason)
