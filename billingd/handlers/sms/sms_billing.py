"""`sms_billing`: Jasmin's bills (seed 002, "Billing Events Consumer"), in both of its formats.

* **Seed JSON** `{bid, user{uid}, amounts{submit_sm_resp}, status, …}`: `ESME_ROK` confirms the
  charge the api-gateway already applied; any other `ESME_*` status means the SMS was never
  submitted, so `amounts.submit_sm_resp` is refunded to `user.uid` — once per bill id `bid`.
* **Native bill request** (`bill_request.submit_sm_resp.<uid>` from a real Jasmin, published on
  `ESME_ROK` only): the `submit_sm_resp` share to charge to header `user-id`, amount from header
  `amount` (`str(float)`, rounded half-even to micro-units) — charged once per bill id.
* **Native `submit.sm.<cid>`** (bound from the `messaging` exchange): the pickled
  `submit_sm_bill` header (read through the allow-list of `jasmin_pickle`) is kept per Jasmin
  msgid, so that `sms_dlr` can refund the early share of a submission that finally fails.

`handler_options.format` is `auto` (by the message's headers: `submit_sm_bill` → submit,
`user-id` + `amount` → bill request, otherwise JSON), `json` or `jasmin`.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Literal

import msgspec

from billingd.clients.ledger import SmsLedger
from billingd.clients.ledger.jasmin import JasminLedger
from billingd.config.durations import Duration
from billingd.handlers.kit.base import HandlerContext, HandlerSpec, Id, JsonDecoder, Message, OptionalId
from billingd.handlers.kit.money import to_micros
from billingd.handlers.kit.outcome import ACK, InvalidMessage, Outcome
from billingd.handlers.sms import jasmin
from billingd.handlers.sms.charges import settle_bill


class Account(msgspec.Struct, frozen=True):
    """`user`: the Jasmin account billed for the SMS."""

    uid: Id
    username: str = ""


class Amounts(msgspec.Struct, frozen=True):
    """`amounts`: what each PDU cost, in currency units (a JSON number such as 0.01)."""

    submit_sm_resp: Decimal


class BillEvent(msgspec.Struct, frozen=True):
    """A `bill_request.submit_sm_resp.*` event (seed 002 "Message Format")."""

    bid: Id
    user: Account
    amounts: Amounts
    status: Id
    message_id: OptionalId = ""
    connector_id: OptionalId = ""


class BillingOptions(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """`handler_options` of `sms_billing`."""

    format: Literal["auto", "json", "jasmin"] = "auto"
    """Which format to read: by the headers (`auto`), the seed's JSON only, or Jasmin's native only."""
    retention: Duration = Duration(90 * 86400)
    """How long a bill's charge record (its idempotency record too) and a submission's record are
    kept after they are written; `0s` keeps them forever."""


class SmsBillingHandler:
    """Confirms, refunds or charges SMS bills; keeps Jasmin submit records. Downstream: `redis`."""

    downstreams = ("redis",)

    def __init__(self, ledger: SmsLedger, submits: JasminLedger, options: BillingOptions | None = None) -> None:
        self._ledger = ledger
        self._submits = submits
        options = options or BillingOptions()
        self._format = options.format
        self._retention = int(options.retention)
        self._decoder = JsonDecoder(BillEvent)

    async def handle(self, message: Message) -> Outcome:
        """Apply the bill or submit record in `message` (see module docstring).

        Dead-letters: malformed JSON, schema violations, a status that is not `ESME_*`, amounts out
        of bounds, a Jasmin pickle naming a global outside the allow-list, and a bill contradicting
        the state already recorded for it (e.g. a refund of a confirmed charge).
        """
        headers = message.attributes
        native = self._format == "jasmin" or (
            self._format == "auto" and (jasmin.is_submit(headers) or jasmin.is_bill_request(headers))
        )
        if not native:
            return await self._json(message.body)
        if jasmin.is_submit(headers):
            record = jasmin.submit_record(message.message_id, message.body, headers)
            await self._submits.record_submit(
                record.msgid,
                uid=record.uid,
                bid=record.bid,
                early_micros=record.early_micros,
                resp_micros=record.resp_micros,
                parts=record.parts,
                connector=record.connector,
                retention=self._retention,
            )
            return ACK
        if not jasmin.is_bill_request(headers):
            raise InvalidMessage("not a Jasmin bill: expected headers user-id and amount, or submit_sm_bill")
        bill = jasmin.bill_request(message.message_id, message.body, headers)
        return await self._settle(bill.uid, bill.bid, "charged", bill.amount_micros, "ESME_ROK", bill.bid, "")

    async def _json(self, body: bytes) -> Outcome:
        event = self._decoder.decode(body)
        if not event.status.startswith("ESME_"):
            raise InvalidMessage(f"unknown status {event.status!r}: expected ESME_ROK or another ESME_* code")
        amount = to_micros(event.amounts.submit_sm_resp, "amounts.submit_sm_resp")
        state = "confirmed" if event.status == "ESME_ROK" else "refunded"
        uid, bid = event.user.uid, event.bid
        return await self._settle(uid, bid, state, amount, event.status, event.message_id, event.connector_id)

    async def _settle(
        self, uid: str, bid: str, state: str, amount: int, status: str, message_id: str, connector: str
    ) -> Outcome:
        return await settle_bill(
            self._ledger,
            uid=uid,
            bid=bid,
            state=state,
            amount=amount,
            status=status,
            message_id=message_id,
            connector=connector,
            retention=self._retention,
        )


def _build(ctx: HandlerContext, options: BillingOptions) -> SmsBillingHandler:
    return SmsBillingHandler(ctx.clients.sms_ledger, ctx.clients.jasmin_ledger, options)


SPEC = HandlerSpec(
    "sms_billing", BillingOptions, _build, "Jasmin bills: confirm, refund or charge; submit records (seed 002)"
)
