"""What SQS messages and batch entries look like to billingd: message attributes of any DataType
read defensively, the receive count, dead-letter entries, and batches within SQS's limits."""

from __future__ import annotations

import hashlib
from typing import Any

import aiohttp
from botocore.exceptions import BotoCoreError

from billingd.config.model import SQS_MAX_BATCH, SqsSourceSettings
from billingd.sources.base import Settlement
from billingd.sources.letters import sqs_annotations, sqs_text

MAX_ATTRIBUTES = 10  # SQS limit per message
MAX_BATCH_BYTES = 256 * 1024  # SQS limit per batch call (the sum of its entries)
MAX_BATCH = SQS_MAX_BATCH
#: What an SQS endpoint that is gone or slow looks like through aiobotocore (transient).
TRANSIENT = (BotoCoreError, aiohttp.ClientError, OSError, TimeoutError)


def dead_letter_entry(
    entry_id: str, settlement: Settlement, settings: SqsSourceSettings, *, keep_theirs: bool
) -> dict[str, Any]:
    """A `SendMessageBatch` entry for `settlement`'s dead letter: the original body, billingd's
    annotations (`letters`) and — with `keep_theirs` — the message's own attributes that fit
    (`content_encoding` first; SQS takes 10 per message)."""
    s = settings
    message = settlement.delivery.handle
    ours = sqs_annotations(
        reason=settlement.reason,
        handler=s.handler,
        attempts=settlement.delivery.attempt,
        source=settings.name,
        message_id=settlement.delivery.message_id,
    )
    received = message.get("MessageAttributes") or {}
    theirs = {k: v for k, v in received.items() if k not in ours and (keep_theirs or k == "content_encoding")}
    keep = dict(sorted(theirs.items(), key=lambda kv: kv[0] != "content_encoding")[: MAX_ATTRIBUTES - len(ours)])
    entry: dict[str, Any] = {"Id": entry_id, "MessageBody": message["Body"], "MessageAttributes": {**keep, **ours}}
    if s.dead_letter_fifo:
        entry["MessageGroupId"] = sqs_text(settlement.delivery.partition_key or settings.name)[:128]
        # an id of this receive, not of the message: SQS drops a FIFO send whose id it saw in the
        # last 5 minutes, and a replayed letter that fails again within them must reach the DLQ
        # again (its receipt handle is new); sends of one receive still deduplicate
        receipt = f"{settlement.delivery.message_id}\n{message.get('ReceiptHandle', '')}"
        entry["MessageDeduplicationId"] = hashlib.sha256(receipt.encode("utf-8", "surrogatepass")).hexdigest()
    return entry


def chunks(entries: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """`entries` in calls of at most `MAX_BATCH` entries and `MAX_BATCH_BYTES` (an entry larger
    than that goes alone)."""
    out: list[list[dict[str, Any]]] = []
    size = 0
    for entry in entries:
        this = entry_size(entry)
        if not out or len(out[-1]) == MAX_BATCH or size + this > MAX_BATCH_BYTES:
            out.append([])
            size = 0
        out[-1].append(entry)
        size += this
    return out


def entry_size(entry: dict[str, Any]) -> int:
    """The bytes SQS counts for an entry: body plus each attribute's name, type and value."""
    total = len(entry["MessageBody"].encode("utf-8", "surrogatepass"))
    for name, value in entry.get("MessageAttributes", {}).items():
        data = value.get("StringValue") or value.get("BinaryValue") or b""
        total += len(name) + len(value.get("DataType", "")) + len(data if isinstance(data, bytes) else data.encode())
    return total


def read_attributes(raw: object) -> dict[str, str | bytes]:
    """SQS message attributes as `name → value`: `StringValue` for the String and Number data
    types (and their custom `String.x` / `Number.x` forms), `BinaryValue` bytes for Binary ones.
    Anything malformed is skipped, never raised."""
    if not isinstance(raw, dict):
        return {}
    attributes: dict[str, str | bytes] = {}
    for name, value in raw.items():
        if not isinstance(value, dict):
            continue
        if str(value.get("DataType", "")).startswith("Binary"):
            binary = value.get("BinaryValue")
            if isinstance(binary, bytes | bytearray):
                attributes[str(name)] = bytes(binary)
        elif isinstance(value.get("StringValue"), str):
            attributes[str(name)] = value["StringValue"]
    return attributes


def receive_count(value: object) -> int:
    """`ApproximateReceiveCount` as an int ≥ 1, whatever the emulator or SQS sent."""
    try:
        return max(1, min(int(str(value)), 1_000_000))
    except ValueError:
        return 1


def settleable(messages: object) -> tuple[list[dict[str, Any]], int]:
    """`(kept, dropped)`: the entries of a `ReceiveMessage` answer's `Messages` that can be
    settled — objects with a text `ReceiptHandle` — and how many others there were (an
    emulator's or a proxy's garbage: without a receipt handle nothing can delete or dead-letter
    them; the rest of the batch goes on)."""
    if not isinstance(messages, list):
        return [], 0 if messages is None else 1
    kept = [m for m in messages if isinstance(m, dict) and isinstance(m.get("ReceiptHandle"), str)]
    return kept, len(messages) - len(kept)
