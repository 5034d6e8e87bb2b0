"""What a handler sees (`Message`), what it is (`Handler`), and how it is built (`HandlerSpec`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Generic, Protocol, TypeVar

import msgspec

from billingd.clients import Clients
from billingd.config.model import RazorpaySettings, SourceSettings, StripeSettings
from billingd.handlers.kit.outcome import InvalidMessage, Outcome
from billingd.telemetry import Metrics, SourceCounter

T = TypeVar("T")

#: Most characters of an identifier that becomes part of a Redis key (an account, bill, message,
#: subject or idempotency key): real ones are under 100; a longer one is refused, not stored.
MAX_ID_LENGTH = 512
#: An identifier from a message: non-empty, at most `MAX_ID_LENGTH` characters, without `{` or
#: `}` (it becomes a Redis Cluster hash tag: a brace would split it, and two ids could share a key).
Id = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ID_LENGTH, pattern=r"^[^{}]*$")]
#: An optional identifier (may be empty; absent is None).
OptionalId = Annotated[str, msgspec.Meta(max_length=MAX_ID_LENGTH, pattern=r"^[^{}]*$")]


class Message(Protocol):
    """One message as a transport delivered it, body already decoded (gzip/base64 removed).

    `message_id` is the broker's id (SQS `MessageId`, AMQP `message_id` or, when the producer
    set none, a digest of the body: `derived_id` is then True — two identical bodies share it, so
    it identifies a content, not a delivery); `attempt` counts deliveries that ended in a counted
    retry, starting at 1; `redelivered` says the broker delivered this message before (or it is
    billingd's copy of an earlier delivery); `delivery_id` names the delivery, the same on
    billingd's own retry copies of it (`copied`); `attributes` are SQS message attributes or AMQP
    headers.
    """

    @property
    def body(self) -> bytes: ...

    @property
    def message_id(self) -> str: ...

    @property
    def attempt(self) -> int: ...

    @property
    def attributes(self) -> Mapping[str, Any]: ...

    @property
    def redelivered(self) -> bool: ...

    @property
    def derived_id(self) -> bool: ...

    @property
    def delivery_id(self) -> str: ...

    @property
    def copied(self) -> bool: ...


class Handler(Protocol):
    """Applies one event family's billing effects. `downstreams` names the breakers it uses
    (`redis`, `stripe`, …): while one is open, its sources pause intake."""

    @property
    def downstreams(self) -> tuple[str, ...]:
        """Breaker names this handler's effects go through."""
        ...

    async def handle(self, message: Message) -> Outcome:
        """Apply `message`'s effects exactly once and say how to settle it."""
        ...


class NoOptions(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """`handler_options` of a handler that takes none: the table must be empty."""


@dataclass(frozen=True)
class HandlerContext:
    """What a handler is built with, and all it may use: its source's settings, the downstream
    clients (made on first use), the `[stripe]` and `[razorpay]` sections, counters with its
    `source` label bound (`counter`), and how long (seconds) the meter journal is kept
    (`[reconcile] keep`)."""

    source: SourceSettings
    clients: Clients
    stripe: StripeSettings
    razorpay: RazorpaySettings
    metrics: Metrics
    journal_keep: float = 45 * 86400.0

    def counter(self, name: str, documentation: str, labels: Sequence[str]) -> SourceCounter:
        """Counter `name` with labels `source` + `labels` (values from a bounded set), the source bound."""
        return SourceCounter(self.metrics.counter(name, documentation, ["source", *labels]), self.source.name)


OptionsT = TypeVar("OptionsT", bound=msgspec.Struct)


@dataclass(frozen=True)
class HandlerSpec(Generic[OptionsT]):
    """A handler by name: the schema of its `handler_options` (`OptionsT`) and how to build it."""

    name: str
    options: type[OptionsT]
    build: Callable[[HandlerContext, OptionsT], Handler]
    description: str = ""


class JsonDecoder(Generic[T]):
    """A msgspec JSON decoder for `schema` whose errors become `InvalidMessage` (→ dead-letter)."""

    __slots__ = ("_decoder",)

    def __init__(self, schema: type[T]) -> None:
        self._decoder = msgspec.json.Decoder(schema)

    def decode(self, body: bytes) -> T:
        """Decode `body`.

        Raises:
            InvalidMessage: `malformed JSON: …` (also text that is not UTF-8, or nesting deeper than
                msgspec's recursion limit), or `invalid message: …` naming the schema violation
                and where it is (`$.user.uid`).
        """
        try:
            return self._decoder.decode(body)
        except msgspec.ValidationError as exc:
            raise InvalidMessage(f"invalid message: {exc}") from None
        except msgspec.DecodeError as exc:
            raise InvalidMessage(f"malformed JSON: {exc}") from None
        except UnicodeDecodeError as exc:
            raise InvalidMessage(f"malformed JSON: not UTF-8 ({exc.reason} at byte {exc.start})") from None
        except RecursionError:
            raise InvalidMessage("malformed JSON: nested too deeply") from None
