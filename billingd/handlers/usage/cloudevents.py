"""CloudEvents 1.0 (CNCF) usage events: structured, batch and binary modes mapped onto a usage event.

The CloudEvents specification (github.com/cloudevents/spec, v1.0.2) and its bindings give three
ways to carry an event; billingd recognises each without configuration:

* **structured** (JSON event format, `application/cloudevents+json`): the body is one JSON object
  with `specversion`, `id`, `source`, `type` and the event's `data`;
* **batch** (`application/cloudevents-batch+json`): the body is a JSON array of such objects;
* **binary**: the attributes travel as message properties and the body is the `data`. The AMQP
  protocol binding names them `cloudEvents:<attribute>` or `cloudEvents_<attribute>` (its
  alternative for names that take no colon — SQS message attribute names allow only letters,
  digits, `_`, `-` and `.`: use `cloudEvents_` there) and may send `time` as an AMQP timestamp;
  the SDK's RabbitMQ (AMQP 0-9-1) binding uses `ce-<attribute>` headers, taken too.

An event maps onto the usage event of seed 004 (`subject` → `workspace_id`, `type` → `event_type`,
`id` → `idempotency_key`, `time` → `timestamp`, `data.<value>` → `value`, `data.<customer>` →
`stripe_customer_id`) or, with `subject = "userId"`, onto seed 001's (`userId`, `entitlementKey`,
`amount`, `idempotencyKey`). From there the usage handler applies it exactly as the native format,
with the same checks and dead-letter reasons; a malformed CloudEvent raises `InvalidMessage` with a
reason that starts `cloudevents:`.
"""

from __future__ import annotations

import datetime
import hashlib
import re
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from typing import Any, Literal

import msgspec

from billingd.handlers.kit.base import MAX_ID_LENGTH
from billingd.handlers.kit.outcome import InvalidMessage

SPEC_VERSION = "1.0"
#: Binary-mode property prefixes: the AMQP binding's `cloudEvents:` and `cloudEvents_`, and the
#: `ce-` headers of the SDK's RabbitMQ binding.
BINARY_PREFIXES = ("cloudEvents:", "cloudEvents_", "ce-")
#: Most events billingd takes in one batch body (an SQS body of 256 KiB holds a few thousand).
MAX_BATCH = 1000
_REQUIRED = ("specversion", "id", "source", "type")
#: RFC 3339 `date-time` (section 5.6): a full date, `T`, a time with optional fraction, an offset.
_RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})$")


class CloudEventsOptions(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """`handler_options.cloudevents` of `usage`: how a CloudEvent maps onto a usage event."""

    enabled: bool = True
    """Recognise CloudEvents (structured, batch, binary); false: every body is the native format."""
    subject: Literal["workspace_id", "userId"] = "workspace_id"
    """What the event's `subject` names: a seed-004 workspace (metered usage) or a seed-001 user
    (entitlement usage: `type` is then the entitlement key)."""
    type_prefix: str = ""
    """Stripped from `type` to give the event type (`com.acme.usage.ai_credits` → `ai_credits`);
    an event whose type lacks it is dead-lettered."""
    value: str = "value"
    """The `data` field holding the quantity (a dotted path for a nested one: `usage.tokens`)."""
    customer: str = "stripe_customer_id"
    """The `data` field holding the Stripe customer id, when the producer knows it (optional)."""
    key: Literal["source+id", "id"] = "source+id"
    """The idempotency key: `source` and `id` together (CloudEvents makes only the pair unique:
    two producers may both send id "42" for one subject), or the `id` alone (when every producer
    is known to make ids unique per subject). Changing it on a live system changes the key of
    every event not yet applied: a replay of one applied before the change counts again."""


_DECODER = msgspec.json.Decoder(float_hook=Decimal)  # values keep their decimal digits


def cloud_events(
    body: bytes, attributes: Mapping[str, Any], options: CloudEventsOptions
) -> list[dict[str, Any]] | None:
    """The usage events a CloudEvents message carries, in the native format's field names, or None
    when the message is not a CloudEvent (the native format then applies).

    Raises:
        InvalidMessage: `cloudevents: …` — a missing or empty required attribute, a `specversion`
            other than 1.0, a `time` that is not RFC 3339, `data` that is not a JSON object with a
            number at `options.value`, a `type` without `options.type_prefix`, an empty or oversized
            batch; for a batch the reason names the event's index.
    """
    if not options.enabled:
        return None
    binary = _binary_attributes(attributes)
    if binary is not None:
        data = _decode(body, "the body (binary mode: the body is the event's data)")
        return [_usage(binary, data, options, "", binary=True)]
    if b'"specversion"' not in body:
        return None
    document = _decode(body, "the body")
    if isinstance(document, dict) and "specversion" in document:
        return [_structured(document, options, "")]
    if isinstance(document, list) and document and isinstance(document[0], dict) and "specversion" in document[0]:
        if len(document) > MAX_BATCH:
            raise InvalidMessage(f"cloudevents: a batch of {len(document)} events; billingd takes at most {MAX_BATCH}")
        try:
            return [_structured(event, options, f"event [{i}]: ") for i, event in enumerate(document)]
        except InvalidMessage as exc:
            raise InvalidMessage(f"{exc.reason} (no event of the batch was applied)") from None
    return None  # "specversion" somewhere inside a native event


def _binary_attributes(attributes: Mapping[str, Any]) -> dict[str, Any] | None:
    """The binary-mode attributes by name, or None without a `specversion` among them.

    Raises:
        InvalidMessage: one attribute under two prefixes with different values (which one a
            broker delivers first is not defined: the key could change between deliveries), or a
            bytes value that is not UTF-8.
    """
    found: dict[str, Any] = {}
    for name, value in attributes.items():
        for prefix in BINARY_PREFIXES:
            if not (isinstance(name, str) and name.startswith(prefix)):
                continue
            attribute = name[len(prefix) :]
            if isinstance(value, bytes):
                try:
                    value = value.decode("utf-8")
                except UnicodeDecodeError:
                    raise InvalidMessage(f"cloudevents: attribute {name[:80]!r} is not UTF-8 text") from None
            if attribute in found and found[attribute] != value:
                raise InvalidMessage(
                    f"cloudevents: attribute `{attribute[:40]}` is given twice with different values "
                    f"({', '.join(BINARY_PREFIXES)} prefixes): not applied"
                )
            found[attribute] = value
    return found if "specversion" in found else None


def _decode(body: bytes, what: str) -> Any:
    try:
        return _DECODER.decode(body)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise InvalidMessage(f"cloudevents: {what} is not JSON: {str(exc)[:200]}") from None


def _structured(event: Any, options: CloudEventsOptions, where: str) -> dict[str, Any]:
    if not isinstance(event, dict):
        raise InvalidMessage(f"cloudevents: {where}an event must be a JSON object, not {_kind(event)}")
    if "data_base64" in event:
        raise InvalidMessage(f"cloudevents: {where}data_base64 (binary data) is not a usage event; send JSON data")
    return _usage(event, event.get("data"), options, where)


def _usage(
    event: Mapping[str, Any], data: Any, options: CloudEventsOptions, where: str, *, binary: bool = False
) -> dict[str, Any]:
    """The native usage event (a dict for `msgspec.convert`) of one CloudEvent."""
    for name in _REQUIRED:
        value = event.get(name)
        if not isinstance(value, str) or not value:
            state = "missing" if value is None else f"not a non-empty string ({_kind(value)})"
            raise InvalidMessage(f"cloudevents: {where}required attribute `{name}` is {state}")
    if event["specversion"] != SPEC_VERSION:
        raise InvalidMessage(
            f"cloudevents: {where}specversion {str(event['specversion'])[:20]!r} is not supported (only {SPEC_VERSION})"
        )
    content = event.get("datacontenttype")
    if content is not None and not _is_json(content):
        raise InvalidMessage(f"cloudevents: {where}datacontenttype {str(content)[:80]!r} is not JSON")
    subject = event.get("subject")
    if not isinstance(subject, str) or not subject:
        raise InvalidMessage(f"cloudevents: {where}`subject` (the {options.subject}) is missing or empty")
    kind: str = event["type"]
    if not kind.startswith(options.type_prefix):
        raise InvalidMessage(f"cloudevents: {where}type {kind[:120]!r} does not start with {options.type_prefix!r}")
    kind = kind[len(options.type_prefix) :]
    if not isinstance(data, dict):
        raise InvalidMessage(f"cloudevents: {where}`data` must be a JSON object, not {_kind(data)}")
    value = _number(_field(data, options.value), options.value, where)
    key = _key(event["source"], event["id"], options.key)
    if len(key) > MAX_ID_LENGTH or "{" in key or "}" in key:
        raise InvalidMessage(
            f"cloudevents: {where}the idempotency key (`id`) must be at most {MAX_ID_LENGTH} characters, without braces"
        )
    timestamp = _timestamp(event.get("time"), where, binary)
    customer = _field(data, options.customer)
    if customer is not None and not isinstance(customer, str):
        raise InvalidMessage(f"cloudevents: {where}data.{options.customer} must be a string, not {_kind(customer)}")
    if value is None:  # never a default quantity: a CloudEvent without one is not understood
        raise InvalidMessage(f"cloudevents: {where}data.{options.value} is missing (the usage value)")
    usage: dict[str, Any]
    if options.subject == "userId":
        usage = {"userId": subject, "entitlementKey": kind, "amount": value, "idempotencyKey": key}
    else:
        usage = {"event_type": kind, "workspace_id": subject, "value": value, "idempotency_key": key}
    if customer is not None and options.subject == "workspace_id":
        usage["stripe_customer_id"] = customer
    if timestamp is not None:
        usage["timestamp"] = timestamp
    return usage


def _key(source: str, event_id: str, kind: str) -> str:
    """The idempotency key of an event: its `id`, or (`source+id`) its `source` and `id`
    length-prefixed — `"a b" + "c"` and `"a" + "b c"` differ — and digested past
    `MAX_ID_LENGTH` or when the source holds a brace (a Redis Cluster hash tag's delimiter)."""
    if kind == "id":
        return event_id
    key = f"{len(source)}:{source}:{event_id}"
    if len(key) <= MAX_ID_LENGTH and "{" not in source and "}" not in source:
        return key
    return "ce-sha256:" + hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest() + ":" + event_id[:300]


def _field(data: Mapping[str, Any], path: str) -> Any:
    node: Any = data
    for part in path.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


def _number(value: Any, name: str, where: str) -> Decimal | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | Decimal | str):
        raise InvalidMessage(f"cloudevents: {where}data.{name} must be a number, not {_kind(value)}")
    try:
        number = Decimal(value) if not isinstance(value, Decimal) else value
    except InvalidOperation:
        raise InvalidMessage(f"cloudevents: {where}data.{name} {str(value)[:40]!r} is not a number") from None
    if not number.is_finite():
        raise InvalidMessage(f"cloudevents: {where}data.{name} must be a finite number")
    return number


def _timestamp(value: Any, where: str, binary: bool = False) -> int | None:
    """CloudEvents `time` → Unix seconds: an RFC 3339 string, or (binary mode over AMQP only) an
    AMQP timestamp — milliseconds since the epoch (AMQP 1.0) or a header timestamp (AMQP 0-9-1)."""
    if value is None:
        return None
    if not binary and not isinstance(value, str):
        raise InvalidMessage(f"cloudevents: {where}`time` must be an RFC 3339 timestamp string")
    if isinstance(value, datetime.datetime):
        return (
            int(value.timestamp()) if value.tzinfo is not None else int(value.replace(tzinfo=datetime.UTC).timestamp())
        )
    if isinstance(value, int) and not isinstance(value, bool):
        return value // 1000
    if not isinstance(value, str) or len(value) > 64:
        raise InvalidMessage(f"cloudevents: {where}`time` must be an RFC 3339 timestamp string")
    if not _RFC3339.match(value):
        raise InvalidMessage(f"cloudevents: {where}`time` {value!r} is not an RFC 3339 timestamp")
    try:
        moment = datetime.datetime.fromisoformat(value.upper())  # RFC 3339 allows `t` and `z`
    except ValueError:
        raise InvalidMessage(f"cloudevents: {where}`time` {value!r} is not an RFC 3339 timestamp") from None
    return int(moment.timestamp())


def _is_json(content: Any) -> bool:
    if not isinstance(content, str):
        return False
    media = content.split(";", 1)[0].strip().lower()
    return media == "application/json" or media.endswith("+json") or media == "text/json"


def _kind(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )
