"""Hostile input for both transports: what an attacker (or a broken producer) can put on a queue.

Used by the hostile-input tests and by the fault suite (`bench/faults.py`). Everything is seeded:
the same seed gives the same messages.

* AMQP: bodies (random bytes, invalid UTF-8, truncated and deeply nested JSON, NaN, 5,000-digit
  and int64-edge numbers, 256 KB), headers of every field-table type (including the ones pamqp
  cannot read back: keys that are not UTF-8, timestamps past year 9999, long strings that are
  not UTF-8), header tables near `frame_max`, and poison `x-billingd-attempts` values.
  `RawProperties` writes property bytes that no well-behaved client would, the way a foreign
  producer can.
* SQS: the same bodies (as text SQS accepts), attributes of every DataType (`String`, `Number`,
  `Binary` and their custom `.x` forms), a `content_encoding` that is Binary or unknown.
"""

from __future__ import annotations

import datetime
import decimal
import random
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import aiormq
from pamqp.commands import Basic

_STAMP = datetime.datetime(2001, 1, 1, tzinfo=datetime.UTC)
_STAMP_BYTES = struct.pack(">Q", int(_STAMP.timestamp()))
_MAX_STAMP = b"\x7f\xff\xff\xff\xff\xff\xff\xff"


class RawProperties(Basic.Properties):
    """Properties whose marshalled bytes get `replace`d: (placeholder, raw bytes) pairs, each of
    the same length so the frame's length prefixes stay right."""

    def __init__(self, replace: list[tuple[bytes, bytes]] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._replace = replace or []

    def marshal(self) -> bytes:
        data = super().marshal()
        for old, new in self._replace:
            data = data.replace(old, new)
        return data


class WithoutMessageId(Basic.Properties):
    """Properties sent without a `message_id`, as Jasmin (txAMQP) and many producers send them:
    aiormq gives every publish one of its own, so this takes it out of the marshalled frame."""

    def marshal(self) -> bytes:
        kept, self.message_id = self.message_id, None
        try:
            return super().marshal()
        finally:
            self.message_id = kept


def bodies(rng: random.Random) -> list[tuple[str, bytes]]:
    """`(kind, body)`: every hostile body shape once (random parts from `rng`)."""
    deep = b"[" * 100_000 + b"]" * 100_000
    return [
        ("random-bytes", rng.randbytes(rng.randint(0, 2000))),
        ("invalid-utf8", b'{"message_id": "\xff\xfe", "status": "DELIVRD"}'),
        ("truncated-json", b'{"message_id": "m", "status": "DELIV'),
        ("deep-nesting", deep),
        ("deep-object", b'{"a":' * 5000 + b"1" + b"}" * 5000),
        ("nan", b'{"message_id": "m", "status": NaN}'),
        ("infinity", b'{"amount": Infinity}'),
        ("huge-int", b'{"message_id": "m", "status": "DELIVRD", "n": 1' + b"0" * 5000 + b"}"),
        ("huge-amount", b'{"bid": "b", "user": {"uid": "u"}, "amounts": {"submit_sm_resp": 1' + b"0" * 5000 + b"}}"),
        ("int64-edge", b'{"value": 9223372036854775808, "event_type": "x", "workspace_id": "w"}'),
        (
            "exp-amount",
            b'{"bid": "b", "user": {"uid": "u"}, "amounts": {"submit_sm_resp": 1e400}, "status": "ESME_RX"}',
        ),
        ("big-body", b'{"pad": "' + b"x" * (256 * 1024 - 20) + b'"}'),
        ("empty", b""),
        ("null", b"null"),
        ("wrong-types", b'{"message_id": 5, "status": ["DELIVRD"]}'),
        ("surrogate", b'{"message_id": "\\ud800", "status": "DELIVRD"}'),
        ("long-id", b'{"message_id": "' + b"i" * 100_000 + b'", "status": "DELIVRD"}'),
    ]


@dataclass
class AmqpHostile:
    """One hostile AMQP message: its body, properties, and what makes it hostile."""

    kind: str
    body: bytes
    properties: Basic.Properties
    message_id: str = ""
    notes: list[str] = field(default_factory=list)


def _header_values(rng: random.Random) -> dict[str, Any]:
    return {
        "bool": rng.random() < 0.5,
        "i8": rng.randint(-128, 127),
        "i16": rng.randint(-32768, 32767),
        "i32": rng.randint(-(2**31), 2**31 - 1),
        "i64": rng.choice([2**63 - 1, -(2**63), 2**40]),
        "float": rng.choice([-0.0, 3.5, 1e38, -1e-38]),  # RabbitMQ itself refuses NaN and infinities
        "decimal": decimal.Decimal(rng.randint(-(2**31), 2**31 - 1)).scaleb(-rng.randint(0, 20)),
        "text": "".join(chr(rng.randint(32, 0x2FFF)) for _ in range(rng.randint(0, 40))),
        "bytes": bytearray(rng.randbytes(rng.randint(0, 40))),
        "none": None,
        "stamp": _STAMP,
        "array": [1, "a", None, [2, {"k": "v"}]],
        "table": {"nested": {"deeper": {"deepest": rng.random()}}},
    }


def amqp_messages(seed: int, count: int) -> Iterator[AmqpHostile]:
    """`count` hostile AMQP messages, cycling through every kind, seeded."""
    rng = random.Random(seed)
    body_kinds = bodies(rng)
    attempts = ["9" * 40, 3.4e38, -5, 2**63 - 1, "abc", bytearray(b"\xff\xff"), decimal.Decimal("1.5"), [1], {"n": 1}]
    for n in range(count):
        kind_index = n % 8
        kind, body = body_kinds[n % len(body_kinds)]
        message_id = f"hostile-{seed}-{n}"
        if kind_index == 0:  # any body, well-formed headers of every type
            props = Basic.Properties(message_id=message_id, headers=_header_values(rng))
            yield AmqpHostile(f"body:{kind}", body, props, message_id)
        elif kind_index == 1:  # a header key that is not UTF-8 (pamqp cannot read it back)
            props = RawProperties([(b"KEYHOLDER", b"\xffEYHOLDER")], message_id=message_id, headers={"KEYHOLDER": 1})
            yield AmqpHostile("header-key-not-utf8", body, props, message_id)
        elif kind_index == 2:  # timestamps past year 9999, in a header and in the property
            props = RawProperties(
                [(_STAMP_BYTES, _MAX_STAMP)], message_id=message_id, headers={"t": _STAMP}, timestamp=_STAMP
            )
            yield AmqpHostile("timestamp-overflow", body, props, message_id)
        elif kind_index == 3:  # a long string that is not UTF-8 (decoded as bytes, not re-encodable as is)
            props = RawProperties(
                [(b"VALHOLDER", b"\xff\xfeLHOLDER")], message_id=message_id, headers={"v": "VALHOLDER"}
            )
            yield AmqpHostile("header-value-not-utf8", body, props, message_id)
        elif kind_index == 4:  # poison attempt counts
            value = attempts[n // 8 % len(attempts)]
            props = Basic.Properties(message_id=message_id, headers={"x-billingd-attempts": value})
            yield AmqpHostile(f"attempts:{value!r}"[:40], body, props, message_id)
        elif kind_index == 5:  # a header table near frame_max (RabbitMQ: 128 KiB)
            props = Basic.Properties(message_id=message_id, headers={f"h{i}": "x" * 12_000 for i in range(10)})
            yield AmqpHostile("headers-120kb", body, props, message_id)
        elif kind_index == 6:  # no message id at all, an odd content type, a bogus encoding
            props = Basic.Properties(content_type="\x00weird", content_encoding=rng.choice(["zstd", "gzip", "base64"]))
            yield AmqpHostile("no-id-bogus-encoding", body, props, "")
        else:  # random header names and nesting
            headers = {rng.randbytes(8).hex(): _header_values(rng) for _ in range(rng.randint(1, 5))}
            props = Basic.Properties(message_id=message_id, headers=headers)
            yield AmqpHostile("random-headers", body, props, message_id)


async def publish_raw(channel: aiormq.abc.AbstractChannel, exchange: str, routing_key: str, msg: AmqpHostile) -> None:
    """Publish one hostile message with publisher confirms (the channel must have them on)."""
    await channel.basic_publish(msg.body, exchange=exchange, routing_key=routing_key, properties=msg.properties)


#: Characters SQS refuses in a message (it takes #x9, #xA, #xD, #x20–#xD7FF, #xE000–#xFFFD and,
#: on AWS, #x10000–#x10FFFF; fauxqs not the last range).
_SQS_REFUSES = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd]")


@dataclass
class SqsHostile:
    """One hostile SQS message: a body SQS accepts and attributes of any DataType."""

    kind: str
    body: str
    attributes: dict[str, dict[str, Any]]


def sqs_messages(seed: int, count: int, max_body: int = 200_000) -> Iterator[SqsHostile]:
    """`count` hostile SQS messages, seeded. Bodies are text SQS accepts (random bytes go in
    base64 or Latin-1); attributes cover every DataType."""
    rng = random.Random(seed)
    body_kinds = [(k, b) for k, b in bodies(rng) if len(b) <= max_body]
    for n in range(count):
        kind, raw = body_kinds[n % len(body_kinds)]
        body = _SQS_REFUSES.sub("\ufffd", raw.decode("utf-8", "replace")) or " "
        attributes: dict[str, dict[str, Any]] = {}
        choice = n % 6
        if choice == 0:
            attributes["content_encoding"] = {"DataType": "Binary", "BinaryValue": b"gzip"}
        elif choice == 1:
            attributes["content_encoding"] = {
                "DataType": "String",
                "StringValue": rng.choice(["zstd", "gzip", "base64"]),
            }
        elif choice == 2:
            attributes["n"] = {"DataType": "Number", "StringValue": rng.choice(["1e30", "-0", "9" * 38])}
            attributes["c"] = {"DataType": "Number.float", "StringValue": "3.14"}
        elif choice == 3:
            attributes["b"] = {"DataType": "Binary.png", "BinaryValue": rng.randbytes(100)}
            attributes["s"] = {"DataType": "String.custom", "StringValue": "\u2603" * 10}
        elif choice == 4:
            attributes["content_encoding"] = {"DataType": "Number", "StringValue": "1"}
        kind_name = f"{kind}/attr{choice}"
        yield SqsHostile(kind_name, body, attributes)
