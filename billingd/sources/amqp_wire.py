"""What crosses the AMQP wire, read and written defensively (DESIGN §8 "a message is the unit of failure").

RabbitMQ relays header tables that its clients cannot always read back: a field-table key that is
not UTF-8, a timestamp beyond year 9999, a long string that is not UTF-8. pamqp 4 (under aiormq
and aio-pika) raises on the first two *while parsing the frame*, so aiormq closes the whole
connection; the broker requeues the message at the head of the queue and every reconnect dies
on it again — one published message stops the source for good (pika traps the same errors since
pika#890). `install_lenient_decoders()` replaces those three pamqp decoders, once per process,
with versions that never raise on content: text that is not UTF-8 is decoded with
`backslashreplace`, an out-of-range timestamp stays an int of seconds. Frame-structure errors
(lengths, truncation) still raise, as they must.

Writing the other way, pamqp refuses values it decoded itself (a long string that was not UTF-8
comes back as `bytes`, which it cannot encode; decimals outside its range; ints beyond int64), and a
header table larger than the broker's `frame_max` closes the connection. `encodable_headers()`
makes any decoded table publishable within a byte budget, so a retry copy or a dead letter of a
hostile message can always be published.
"""

from __future__ import annotations

import asyncio
import datetime
import struct
from collections.abc import Callable, Mapping
from typing import Any

import aio_pika
import aiormq
from pamqp import common, decode, encode
from pamqp.commands import Basic

#: What a broker that is gone or refuses looks like to aio-pika/aiormq (transient: never a crash).
CONNECT_ERRORS = (
    OSError,
    asyncio.TimeoutError,
    aiormq.exceptions.AMQPError,
    aiormq.exceptions.ChannelInvalidStateError,  # a channel closed under us (a RuntimeError, not an AMQPError)
    ConnectionError,
)
#: Largest number our own headers may take once encoded (RabbitMQ's default frame_max is 128 KiB;
#: the whole content header, properties included, must fit in one frame).
HEADER_BUDGET = 64 * 1024
#: A single header value longer than this (encoded) is replaced by a note of its size.
VALUE_BUDGET = 16 * 1024
#: Largest attempt count read from `x-billingd-attempts`; anything above is clamped to it.
MAX_ATTEMPTS_HEADER = 1_000_000
#: Header that lists the headers dropped to fit `HEADER_BUDGET`.
DROPPED_HEADER = "x-billingd-dropped-headers"

_installed = False


def _text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("utf-8", "backslashreplace")


def _short_str(value: bytes) -> tuple[int, str]:
    if not value:  # every property of every delivery is read here: the plain path is kept short
        raise ValueError("Could not unpack short string value")
    length = value[0]
    raw = value[1 : length + 1]
    try:
        return length + 1, raw.decode("utf-8")
    except UnicodeDecodeError:
        return length + 1, raw.decode("utf-8", "backslashreplace")


def _timestamp(value: bytes) -> tuple[int, datetime.datetime | int]:
    try:
        seconds = common.Struct.timestamp.unpack(value[0:8])[0]
    except (struct.error, TypeError) as err:
        raise ValueError("Could not unpack timestamp value") from err
    scaled = seconds / 1000.0 if seconds > 0xFFFFFFFF else seconds  # pamqp's own milliseconds rule
    try:
        return 8, datetime.datetime.fromtimestamp(scaled, tz=datetime.UTC)
    except (OverflowError, OSError, ValueError):
        return 8, seconds


def _field_table(value: bytes) -> tuple[int, dict[str, Any]]:
    try:
        length = common.Struct.integer.unpack(value[0:4])[0]
        offset = 4
        data: dict[str, Any] = {}
        end = offset + length
        if end > len(value):
            raise ValueError("Field table length exceeds available data")
        while offset < end:
            key_length = common.Struct.byte.unpack_from(value, offset)[0]
            offset += 1
            if offset + key_length > end:
                raise ValueError("Field table key length exceeds data")
            key = _text(value[offset : offset + key_length])
            offset += key_length
            consumed, result = decode.embedded_value(value[offset:])
            offset += consumed
            data[key] = result
        return end, data
    except (struct.error, TypeError) as err:
        raise ValueError("Could not unpack data") from err


def install_lenient_decoders() -> None:
    """Make pamqp's decoders of short strings, field tables and timestamps total (see the module
    docstring). Idempotent; called when the AMQP transport is imported."""
    global _installed
    if _installed:
        return
    replacements: dict[str, Callable[[bytes], tuple[int, Any]]] = {
        "shortstr": _short_str,
        "table": _field_table,
        "timestamp": _timestamp,
    }
    decode.METHODS.update(replacements)
    decode.TABLE_MAPPING.update({b"F": _field_table, b"T": _timestamp})
    decode.short_str = _short_str
    decode.field_table = _field_table
    decode.timestamp = _timestamp  # type: ignore[assignment]
    _installed = True


def parse_attempts(value: object) -> int:
    """The previous attempt count from an `x-billingd-attempts` header of any type.

    Accepts an int, an integral float or a string of digits, clamped to
    `0..MAX_ATTEMPTS_HEADER`; anything else (absent, negative, text, NaN) reads as 0, so a forged
    or corrupted header can neither crash the consumer nor make a message immortal.
    """
    if isinstance(value, bool):
        return 0
    if isinstance(value, bytes | bytearray):
        value = bytes(value[:20]).decode("ascii", "replace")
    if isinstance(value, str):
        text = value.strip()
        if not text.isdigit() or not text.isascii():
            return 0
        return MAX_ATTEMPTS_HEADER if len(text) > 7 else min(int(text), MAX_ATTEMPTS_HEADER)
    if isinstance(value, float):
        if value != value or value < 0:  # NaN or negative
            return 0
        return MAX_ATTEMPTS_HEADER if value >= MAX_ATTEMPTS_HEADER else int(value)
    if isinstance(value, int):
        return max(0, min(value, MAX_ATTEMPTS_HEADER))
    return 0


def _encoded_size(value: Any) -> int | None:
    try:
        return len(encode.encode_table_value(value))
    except (TypeError, ValueError, OverflowError, struct.error):
        return None


def _repair(value: Any) -> Any:
    """An encodable stand-in for a value pamqp cannot encode (or one too large)."""
    if isinstance(value, bytes):
        return bytearray(value)
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        return {_repair(str(k)): _repair(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_repair(v) for v in value]
    return str(value)[:200]


def encodable_headers(headers: Mapping[str, Any], ours: Mapping[str, Any]) -> dict[str, Any]:
    """`headers` (as received) plus `ours` (billingd's annotations, which win), made publishable.

    Values pamqp cannot encode are repaired (`bytes` → byte array, non-UTF-8 text escaped,
    out-of-range numbers → text); a value over `VALUE_BUDGET` is replaced by a note of its size;
    received headers that do not fit `HEADER_BUDGET` are dropped, largest first, and named in
    `x-billingd-dropped-headers`. `ours` is always kept.
    """
    kept: dict[str, Any] = {}
    sizes: dict[str, int] = {}
    for key, value in headers.items():
        name = _repair(str(key))[:128]
        if name in ours:
            continue
        size = _encoded_size(value)
        if size is None:
            value = _repair(value)
            size = _encoded_size(value)
            if size is None:
                value = str(value)[:200]
                size = len(value) + 5
        if size > VALUE_BUDGET:
            value = f"<header of {size} bytes dropped by billingd>"
            size = len(value) + 5
        kept[name] = value
        sizes[name] = size + len(name) + 1
    result = {k: (_repair(v) if _encoded_size(v) is None else v) for k, v in ours.items()}
    budget = HEADER_BUDGET - sum(_encoded_size(v) or 0 for v in result.values())
    dropped: list[str] = []
    for name in sorted(sizes, key=sizes.__getitem__):
        if sizes[name] <= budget:
            budget -= sizes[name]
            result[name] = kept[name]
        else:
            dropped.append(name)
    if dropped:
        result[DROPPED_HEADER] = ",".join(dropped)[:1000]
    return result


def persistent_copy(
    body: bytes, properties: Basic.Properties, headers: dict[str, Any], expiration: float | None = None
) -> aio_pika.Message:
    """A persistent copy of a message with new `headers` (and a per-message TTL in seconds), its
    other properties kept: what retries, dead letters and DLQ replays publish. Short-string
    properties are cut to the 255 bytes AMQP allows; a timestamp that is not a date is dropped."""
    timestamp = properties.timestamp if isinstance(properties.timestamp, datetime.datetime) else None
    return aio_pika.Message(
        body,
        headers=headers,
        content_type=_short(properties.content_type),
        content_encoding=_short(properties.content_encoding),
        message_id=_short(properties.message_id),
        correlation_id=_short(properties.correlation_id),
        timestamp=timestamp,
        type=_short(properties.message_type),
        app_id=_short(properties.app_id),
        priority=properties.priority,
        reply_to=_short(properties.reply_to),
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        expiration=expiration,
    )


def _short(value: str | None) -> str | None:
    if not value:
        return None
    return value.encode("utf-8", "backslashreplace")[:255].decode("utf-8", "ignore")
