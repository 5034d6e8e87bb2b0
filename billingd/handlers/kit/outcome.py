"""The `Outcome` a handler returns: the one contract between handlers and transports (DESIGN §2).

| outcome              | when                                              |
|----------------------|---------------------------------------------------|
| `ACK`                | done, or a duplicate already done                 |
| `Retry(reason, ...)` | transient failure: try again after a delay        |
| `DeadLetter(reason)` | permanent: undecodable, invalid, refused by a rule |

Handlers may also raise `InvalidMessage` (→ dead-letter) or let a client's
`DownstreamUnavailable` propagate (→ retry through the breaker); any other exception is a retry
logged with its traceback.
"""

from __future__ import annotations

from dataclasses import dataclass


class Ack:
    """Done (or already done): delete / `basic.ack`. Use the `ACK` singleton."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "ACK"


ACK = Ack()


@dataclass(frozen=True, slots=True)
class Retry:
    """Try again later.

    `delay` (seconds) overrides the source's exponential backoff; `counted=False` keeps the
    attempt count unchanged (used for retries caused by an open circuit breaker, which must never
    dead-letter good messages).
    """

    reason: str
    delay: float | None = None
    counted: bool = True


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """Never retry: move to the source's dead-letter queue with `reason`."""

    reason: str


Outcome = Ack | Retry | DeadLetter


class InvalidMessage(Exception):
    """The message can never be handled (malformed, fails its schema, unknown status): dead-letter."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
