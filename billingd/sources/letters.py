"""The dead-letter format, in one place: what billingd writes on a dead letter, how `billingd dlq`
reads it back, and what a replay strips (DESIGN §2 outcomes table).

| field | AMQP header (`<queue>.dlq`) | SQS attribute (`dead_letter_queue_url`) |
|---|---|---|
| why | `x-billingd-reason` | `reason` |
| handler | `x-billingd-handler` | `handler` |
| attempts | `x-billingd-attempts` | `attempts` (Number) |
| source | `x-billingd-source` | `source` |
| the first message id | `x-billingd-original-message-id` (and the `message_id` property) | `original_message_id` |
| where it came from | `x-billingd-original-exchange`, `x-billingd-original-routing-key` | — |

RabbitMQ's own dead-lettering (a queue's TTL or length limit) writes `x-death` instead; it is read
back as the reason too. A replay removes all of these but the original message id, which stays
so that an idempotency key falling back to the message id stays the same.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

#: The AMQP header counting attempts (also on retry copies). Written for people reading a letter;
#: never believed (any producer can set it): billingd counts attempts in Redis (`AttemptLedger`).
ATTEMPTS_HEADER = "x-billingd-attempts"
#: The AMQP header naming the delivery a retry copy is a copy of (`Delivery.delivery_id`).
DELIVERY_HEADER = "x-billingd-delivery-id"
#: The AMQP header naming a dead letter's first message id (kept by a replay).
ORIGINAL_ID_HEADER = "x-billingd-original-message-id"
#: Longest reason written (AMQP header; SQS attributes are cut at 1,000 characters).
MAX_REASON = 2000

AMQP_ANNOTATIONS = (
    "x-billingd-reason",
    "x-billingd-handler",
    ATTEMPTS_HEADER,
    "x-billingd-source",
    DELIVERY_HEADER,
    ORIGINAL_ID_HEADER,
    "x-billingd-original-exchange",
    "x-billingd-original-routing-key",
    "x-death",
    "x-first-death-exchange",
    "x-first-death-queue",
    "x-first-death-reason",
    "x-last-death-exchange",
    "x-last-death-queue",
    "x-last-death-reason",
)
SQS_ANNOTATIONS = ("reason", "handler", "attempts", "original_message_id", "source")


@dataclass(frozen=True)
class Letter:
    """One dead letter as `dlq list` shows it."""

    message_id: str
    reason: str
    attempts: str
    body: bytes


def amqp_annotations(
    *, reason: str, handler: str, attempts: int, source: str, message_id: str, exchange: str, routing_key: str
) -> dict[str, Any]:
    """The headers billingd adds to an AMQP dead letter."""
    return {
        "x-billingd-reason": reason[:MAX_REASON],
        "x-billingd-handler": handler,
        ATTEMPTS_HEADER: attempts,
        "x-billingd-source": source,
        ORIGINAL_ID_HEADER: message_id,
        "x-billingd-original-exchange": exchange,
        "x-billingd-original-routing-key": routing_key,
    }


def sqs_annotations(*, reason: str, handler: str, attempts: int, source: str, message_id: str) -> dict[str, Any]:
    """The message attributes billingd adds to an SQS dead letter (text SQS accepts)."""
    return {
        "reason": _string(reason[:1000] or "dead-lettered"),
        "handler": _string(handler),
        "attempts": {"DataType": "Number", "StringValue": str(attempts)},
        "original_message_id": _string(message_id),
        "source": _string(source),
    }


def death_reason(headers: Mapping[str, Any]) -> str:
    """Why RabbitMQ itself dead-lettered a message (its `x-death` header); "" when it did not."""
    deaths = headers.get("x-death")
    if not isinstance(deaths, list) or not deaths or not isinstance(deaths[0], dict):
        return ""
    death = deaths[0]
    reason = str(death.get("reason", ""))
    what = {
        "expired": "expired (x-message-ttl)",
        "maxlen": "maxlen (x-max-length overflow)",
        "delivery_limit": "delivery_limit (redelivered more often than the quorum queue's x-delivery-limit)",
    }.get(reason, reason)
    return f"dropped by RabbitMQ from {death.get('queue', '?')}: {what}"


def read_amqp(message_id: str | None, headers: Mapping[str, Any], body: bytes) -> Letter:
    """A letter from an AMQP `.dlq` message."""
    return Letter(
        message_id or "",
        str(headers.get("x-billingd-reason", "")) or death_reason(headers),
        str(headers.get(ATTEMPTS_HEADER, "")),
        body,
    )


def read_sqs(message: Mapping[str, Any]) -> Letter:
    """A letter from an SQS dead-letter queue message."""
    attributes = message.get("MessageAttributes", {})
    return Letter(
        attributes.get("original_message_id", {}).get("StringValue", message["MessageId"]),
        attributes.get("reason", {}).get("StringValue", ""),
        attributes.get("attempts", {}).get("StringValue", ""),
        message["Body"].encode(),
    )


def replay_amqp_headers(headers: Mapping[str, Any]) -> dict[str, Any]:
    """The headers a replayed AMQP letter goes back with (its `message_id` property stays)."""
    return {k: v for k, v in headers.items() if k not in AMQP_ANNOTATIONS}


def replay_sqs_attributes(message: Mapping[str, Any]) -> dict[str, Any]:
    """The attributes a replayed SQS letter goes back with: its own, and `original_message_id`
    (from the letter, or its own id when SQS's redrive policy moved it: SQS gives every copy a
    new id, so handlers whose key falls back to the message id would see a new key)."""
    received = message.get("MessageAttributes", {})
    attributes = {k: v for k, v in received.items() if k not in SQS_ANNOTATIONS}
    original = received.get("original_message_id", {}).get("StringValue") or message["MessageId"]
    attributes["original_message_id"] = _string(original)
    return attributes


_INVALID_XML = re.compile("[^\\t\\n\\r\\x20-\\ud7ff\\ue000-\\ufffd\\U00010000-\\U0010ffff]")


def sqs_text(value: str) -> str:
    """`value` with the characters SQS refuses in messages and attributes replaced (SQS allows
    #x9, #xA, #xD, #x20–#xD7FF, #xE000–#xFFFD, #x10000–#x10FFFF)."""
    return _INVALID_XML.sub("\ufffd", value)


def _string(value: str) -> dict[str, str]:
    return {"DataType": "String", "StringValue": sqs_text(value)}
