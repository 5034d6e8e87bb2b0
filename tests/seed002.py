"""Seed 002 message examples (the SMS billing system billingd replaces; formats in
docs/architecture.md §5 and docs/handlers.md), as test data."""

from __future__ import annotations

from typing import Any


def bill_event(bid: str, uid: str, status: str, amount: Any = 0.01) -> dict[str, Any]:
    """A Jasmin `submit_sm_resp` bill event as in the seed's "Message Format"."""
    return {
        "bid": bid,
        "user": {"uid": uid, "username": "account-name"},
        "amounts": {"submit_sm_resp": amount},
        "message_id": f"msg-{bid}",
        "connector_id": "smpp-connector-1",
        "status": status,
    }


def dlr(message_id: str, status: str, pdu_type: str = "deliver_sm") -> dict[str, Any]:
    """A Jasmin DLR as in the seed's DLR "Message Format"."""
    return {
        "message_id": message_id,
        "status": status,
        "pdu_type": pdu_type,
        "smpp_msgid": f"op-{message_id}",
        "dlr_details": {
            "id": f"op-dlr-{message_id}",
            "sub": "1",
            "dlvrd": "1",
            "submit_date": "2024-01-01 12:00:00",
            "done_date": "2024-01-01 12:00:05",
            "stat": status,
            "err": "000",
            "text": "Message delivered",
        },
    }


#: The seed's status table: Jasmin status → CDR status.
STATUS_TABLE = {
    "DELIVRD": "delivered",
    "EXPIRED": "expired",
    "DELETED": "failed",
    "UNDELIV": "failed",
    "ACCEPTD": "pending",
    "UNKNOWN": "failed",
    "REJECTD": "rejected",
    "ESME_ROK": "submitted",
    "ESME_RINVDSTADR": "failed",
    "ESME_RTHROTTLED": "failed",
}
