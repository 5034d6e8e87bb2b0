"""Replaying `tests/fixtures/jasmin-0.11.1` onto RabbitMQ exactly as Jasmin published it.

Every captured message goes out with its routing key, its properties and its headers *with the
AMQP types Jasmin used* (`S` long strings — raw bytes for pickles — and `I` ints), which pamqp
cannot produce for a `bytes` value: the header table is written by hand and swapped into the
marshalled properties (`tests.hostile.RawProperties`).
"""

from __future__ import annotations

import base64
import json
import struct
import uuid
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path
from typing import Any

import aiormq
from pamqp import encode

from tests.hostile import RawProperties

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "jasmin-0.11.1"
CAPTURE = FIXTURES / "real-capture.jsonl"
STOCK = FIXTURES / "real-capture.stock.jsonl"


@dataclass(frozen=True)
class Captured:
    """One captured message."""

    seq: int
    exchange: str
    routing_key: str
    message_id: str | None
    headers: dict[str, tuple[str, Any]]  # name → (AMQP type, value: str, bytes or int)
    body: bytes

    def header(self, name: str) -> Any:
        return self.headers[name][1] if name in self.headers else None


def load(path: Path = CAPTURE) -> list[Captured]:
    """The capture's messages in publication order."""
    out = []
    for line in path.read_text().splitlines():
        row = json.loads(line)
        props = row["properties"]
        headers = {}
        for name, field in (props.get("headers") or {}).items():
            value = base64.b64decode(field["value_b64"]) if "value_b64" in field else field["value"]
            headers[name] = (field["amqp_type"], value)
        body = row["body"]
        data = body["text"].encode() if body["encoding"] == "utf-8" else base64.b64decode(body["base64"])
        out.append(Captured(row["seq"], row["exchange"], row["routing_key"], props["message_id"], headers, data))
    return sorted(out, key=lambda c: c.seq)


def _table(headers: dict[str, tuple[str, Any]]) -> bytes:
    body = b""
    for name, (kind, value) in headers.items():
        body += struct.pack(">B", len(name.encode())) + name.encode()
        if kind == "S":
            raw = value if isinstance(value, bytes) else str(value).encode()
            body += b"S" + struct.pack(">I", len(raw)) + raw
        elif kind == "I":
            body += b"I" + struct.pack(">i", value)
        else:
            raise ValueError(f"the capture has no header type {kind!r}")
    return struct.pack(">I", len(body)) + body


def properties(message: Captured) -> RawProperties:
    """The message's properties (transient, like Jasmin's) with the header table written by hand."""
    placeholder = {f"x-placeholder-{uuid.uuid4().hex}": "p"}
    replace = [(encode.field_table(placeholder), _table(message.headers))] if message.headers else []
    return RawProperties(replace, message_id=message.message_id, headers=placeholder if message.headers else None)


async def declare_like_jasmin(channel: aiormq.abc.AbstractChannel, *names: str) -> None:
    """Declare topic exchanges as Jasmin (txamqp) does: durable = false, auto_delete = false."""
    for name in names:
        await channel.exchange_declare(name, exchange_type="topic", durable=False, auto_delete=False)


async def replay(channel: aiormq.abc.AbstractChannel, messages: list[Captured], exchanges: dict[str, str]) -> None:
    """Publish `messages` in order (publisher confirms on `channel`), each to `exchanges[its exchange]`."""
    for message in messages:
        await channel.basic_publish(
            message.body,
            exchange=exchanges[message.exchange],
            routing_key=message.routing_key,
            properties=properties(message),
        )


def micros(amount: Any) -> int:
    """A Jasmin `str(float)` amount in micro-units, half-even (billingd's documented rule)."""
    return int(Decimal(str(amount)).quantize(Decimal("0.000001"), rounding=ROUND_HALF_EVEN).scaleb(6))
