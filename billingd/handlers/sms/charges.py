"""Settling one SMS bill on the ledger and turning the ledger's answer into an outcome; shared by
the seed's JSON bills, Jasmin's native bill requests and the refunds of failed submissions."""

from __future__ import annotations

from billingd.clients.ledger import ChargeResult, SmsLedger
from billingd.clients.ledger.base import LEDGER_MAX
from billingd.handlers.kit.outcome import ACK, DeadLetter, Outcome


async def settle_bill(
    ledger: SmsLedger,
    *,
    uid: str,
    bid: str,
    state: str,
    amount: int,
    status: str,
    message_id: str,
    connector: str,
    retention: int,
) -> Outcome:
    """Record bill `bid` of account `uid` as `state` (`confirmed`, `refunded`, `charged`; amount in
    micro-units) once. A duplicate is acked; a bill already recorded in another state, or one that
    would take the account's total past `LEDGER_MAX`, is dead-lettered with a reason for finance."""
    result, current = await ledger.settle_charge(
        uid=uid,
        bid=bid,
        state=state,
        amount_micros=amount,
        message_id=message_id,
        connector_id=connector,
        esme_status=status,
        retention=retention,
    )
    if result is ChargeResult.CONFLICT:
        return DeadLetter(f"bill {bid} of account {uid} is already {current}; {status} would make it {state}")
    if result is ChargeResult.OVERFLOW:
        return DeadLetter(
            f"{state} bill {bid} ({amount} micro-units) would take account {uid}'s total ({current} micro-units) "
            f"past the ledger limit of {LEDGER_MAX}: settle the account first"
        )
    return ACK
