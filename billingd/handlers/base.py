"""What a handler sees (`Message`), what it is (`Handler`), and how it is built (`HandlerSpec`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import msgspec

from billingd.clients import Clients
from billingd.config.model import SourceSettings
from billingd.handlers.outcome import InvalidMessage, Outcome

T = TypeVar("T")


class Message(Protocol):
    """One message as a transport delivered it, body already decoded (gzip/base64 removed).

    `message_id` is the broker's id (SQS `MessageId`, AMQP `message_id` or a digest of the
    body); `attempt` counts deliveries that ended in a counted retry, starting at 1;
    `attributes` are SQS message attributes or AMQP headers.
    """

    @property
    def body(self) -> bytes: ...

    @property
    def message_id(self) -> str: ...

    @property
    def attempt(self) -> int: ...

    @property
    def attributes(self) -> Mapping[str, Any]: ...


class Handler(Protocol):
    """Applies one event family's billing effects. `downstreams` names the breakers it uses
    (`redis`, `stripe`, …): while one is open, its sources pause intake."""

    downstreams: tuple[str, ...]

    async def handle(self, message: Message) -> Outcome:
        """Apply `message`'s effects exactly once and say how to settle it."""
        ...


class NoOptions(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """`handler_options` of a handler that takes none: the table must be empty."""


@dataclass(frozen=True)
class HandlerSpec:
    """A handler by name: the schema of its `handler_options` and how to build it."""

    name: str
    options: type[msgspec.Struct]
    build: Callable[[Clients, Any, SourceSettings], Handler]
    description: str = ""


class JsonDecoder(Generic[T]):
    """A msgspec JSON decoder for `schema` whose errors become `InvalidMessage` (→ dead-letter)."""

    __slots__ = ("_decoder",)

    def __init__(self, schema: type[T]) -> None:
        self._decoder = msgspec.json.Decoder(schema)

    def decode(self, body: bytes) -> T:
        """Decode `body`.

        Raises:
            InvalidMessage: `malformed JSON: …`, or `invalid message: …` naming the schema
                violation and where it is (`$.user.uid`).
        """
        try:
            return self._decoder.decode(body)
        except msgspec.ValidationError as exc:
            raise InvalidMessage(f"invalid message: {exc}") from None
        except msgspec.DecodeError as exc:
            raise InvalidMessage(f"malformed JSON: {exc}") from None
