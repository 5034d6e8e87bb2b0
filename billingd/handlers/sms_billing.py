"""`sms_billing`: Jasmin `submit_sm_resp` bill events (seed 002, "Billing Events Consumer").

`ESME_ROK` confirms the charge the api-gateway already applied; any other `ESME_*` status means
the SMS was never submitted, so `amounts.submit_sm_resp` is refunded to `user.uid` — exactly once
per bill id `bid`, however often the event is delivered.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated

import msgspec

from billingd.clients import Clients
from billingd.clients.ledger import ChargeResult, SmsLedger
from billingd.config.model import SourceSettings
from billingd.handlers.base import HandlerSpec, JsonDecoder, Message, NoOptions
from billingd.handlers.money import to_micros
from billingd.handlers.outcome import ACK, DeadLetter, InvalidMessage, Outcome

NonEmpty = Annotated[str, msgspec.Meta(min_length=1)]


class Account(msgspec.Struct, frozen=True):
    """`user`: the Jasmin account billed for the SMS."""

    uid: NonEmpty
    username: str = ""


class Amounts(msgspec.Struct, frozen=True):
    """`amounts`: what each PDU cost, in currency units (a JSON number such as 0.01)."""

    submit_sm_resp: Decimal


class BillEvent(msgspec.Struct, frozen=True):
    """A `bill_request.submit_sm_resp.*` event (seed 002 "Message Format")."""

    bid: NonEmpty
    user: Account
    amounts: Amounts
    status: NonEmpty
    message_id: str = ""
    connector_id: str = ""


class SmsBillingHandler:
    """Confirms or refunds one SMS charge. Downstream: `redis`."""

    downstreams = ("redis",)

    def __init__(self, ledger: SmsLedger) -> None:
        self._ledger = ledger
        self._decoder = JsonDecoder(BillEvent)

    async def handle(self, message: Message) -> Outcome:
        """Apply the bill event in `message`.

        Dead-letters: malformed JSON, schema violations, a status that is not `ESME_*`, an
        amount that is negative or finer than a micro-unit, and an event contradicting the
        state already recorded for its bill (e.g. a refund of a confirmed charge).
        """
        event = self._decoder.decode(message.body)
        if not event.status.startswith("ESME_"):
            raise InvalidMessage(f"unknown status {event.status!r}: expected ESME_ROK or another ESME_* code")
        amount = to_micros(event.amounts.submit_sm_resp, "amounts.submit_sm_resp")
        state = "confirmed" if event.status == "ESME_ROK" else "refunded"
        result, current = await self._ledger.settle_charge(
            uid=event.user.uid,
            bid=event.bid,
            state=state,
            amount_micros=amount,
            message_id=event.message_id,
            connector_id=event.connector_id,
            esme_status=event.status,
        )
        if result is ChargeResult.CONFLICT:
            return DeadLetter(f"bill {event.bid} is already {current}; {event.status} would make it {state}")
        return ACK


def _build(clients: Clients, options: NoOptions, source: SourceSettings) -> SmsBillingHandler:
    return SmsBillingHandler(clients.sms_ledger)


SPEC = HandlerSpec("sms_billing", NoOptions, _build, "Jasmin submit_sm_resp: confirm or refund (seed 002)")
