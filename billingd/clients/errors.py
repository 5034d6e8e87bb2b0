"""How a downstream call failed, and the admission `Guard` (a circuit breaker) around it.

Clients translate their library's exceptions into these so that handlers and the source actor
classify failures the same way for every downstream (DESIGN §2, §3):

* `DownstreamUnavailable` — transient (network, timeout, 5xx, 429, lock busy): retry later;
* `CircuitOpen` — the breaker refused the call without trying: retry, not counted as an attempt;
* `DownstreamRejected` — permanent (a 4xx other than 429): dead-letter with the downstream's words;
* `Busy` — another worker holds the lease on this step (a duplicate delivery in progress);
* `Throttled` — the downstream asked us to slow down (a 429, or our own shared request budget has
  no slot soon enough): back-pressure, retried later, never counted as an attempt and never a
  breaker failure (an answer proves the downstream is up).

The breaker itself lives in `billingd.supervisors.breaker`; clients only see the `Guard` protocol,
so the dependency arrow keeps pointing down (daemon → supervisors → handlers → clients).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import Protocol, TypeVar

T = TypeVar("T")


class DownstreamError(Exception):
    """A call to downstream `downstream` (`redis`, `stripe`, `forward:<name>`, …) failed."""

    def __init__(self, downstream: str, detail: str) -> None:
        super().__init__(f"{downstream}: {detail}")
        self.downstream = downstream
        self.detail = detail

    def __copy__(self) -> DownstreamError:
        """A copy with the same class and fields and no traceback of its own yet: one failure
        handed to several callers is raised as a copy by each (a shared exception object would
        grow its traceback with every raise)."""
        clone = type(self).__new__(type(self))
        clone.args = self.args
        clone.__dict__.update(self.__dict__)
        return clone


#: The id of the message the current task is handling (set by the source actor around each
#: handler call; None elsewhere). A breaker reads it to tell one message's own failures from an
#: outage that every message meets (`billingd.supervisors.breaker`).
CURRENT_MESSAGE: ContextVar[str | None] = ContextVar("billingd_current_message", default=None)
#: What part of a downstream the current call goes to (a Redis Cluster node, Stripe's API or its
#: meter event host; "" for the whole), set by the clients around a guarded call: a failure is a
#: message's own only when a later call *to the same part* succeeded — a partial outage (one
#: cluster node failing over, one Stripe host down) is not the message's fault.
CALL_TARGET: ContextVar[str] = ContextVar("billingd_call_target", default="")


class DownstreamUnavailable(DownstreamError):
    """A transient failure: the same call may succeed later.

    `counts` False: its retry is never an attempt (the effect happened but is not yet durable
    enough to ack, e.g. Redis replicas behind). `own`: set by the breaker the call went through —
    True when the failure is this message's own (the downstream served calls made after it, or
    the message failed a half-open probe that no other message was waiting on), False when it is
    an outage other messages meet too, None when no breaker judged it. Only an own failure is an
    attempt (DESIGN §10: unavailability never brings a valid message nearer its dead letter).
    """

    def __init__(self, downstream: str, detail: str, *, counts: bool = True) -> None:
        super().__init__(downstream, detail)
        self.counts = counts
        self.own: bool | None = None

    @property
    def attempt(self) -> bool:
        """Whether the retry this failure causes is a counted attempt."""
        return self.counts and self.own is True


class CallAborted(DownstreamUnavailable):
    """The call never got an answer because another task gave up on it (the task leading a Redis
    pipeline was cancelled): retried, never an attempt, never a breaker failure."""

    def __init__(self, downstream: str, detail: str) -> None:
        super().__init__(downstream, detail, counts=False)


class CircuitOpen(DownstreamUnavailable):
    """The breaker of `downstream` is open; `retry_after` is the time (seconds) until it half-opens."""

    def __init__(self, downstream: str, retry_after: float) -> None:
        super().__init__(downstream, f"circuit breaker open, retry in {retry_after:.1f}s")
        self.retry_after = retry_after


class DownstreamRejected(DownstreamError):
    """A permanent refusal: the same call will fail the same way (e.g. an HTTP 400 from Stripe)."""


class Throttled(DownstreamError):
    """Back-pressure from `downstream`: try again in about `retry_after` seconds (see module docstring)."""

    def __init__(self, downstream: str, detail: str, retry_after: float) -> None:
        super().__init__(downstream, detail)
        self.retry_after = retry_after


class Busy(Exception):
    """Another worker (or replica) is doing this step right now: retry later, uncounted."""


class Guard(Protocol):
    """Admission control around one downstream; `billingd.supervisors.breaker.CircuitBreaker` is one."""

    name: str

    async def call(self, fn: Callable[..., Awaitable[T]], *args: object) -> T:
        """Run `await fn(*args)` if admitted.

        Raises:
            CircuitOpen: not admitted.
            DownstreamUnavailable: from `fn`, after recording the failure.
        """
        ...


class Unguarded:
    """A `Guard` that admits every call and records nothing (CLI tools and tests)."""

    def __init__(self, name: str) -> None:
        self.name = name

    async def call(self, fn: Callable[..., Awaitable[T]], *args: object) -> T:
        """Run `fn(*args)` directly."""
        return await fn(*args)
