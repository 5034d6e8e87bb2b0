"""Test handlers with scripted behaviour, registered next to the real ones."""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field

import anyio
import msgspec

from billingd.clients import DownstreamUnavailable
from billingd.handlers.kit.base import Handler, HandlerContext, HandlerSpec, Message
from billingd.handlers.kit.outcome import ACK, Outcome
from billingd.handlers.registry import HandlerRegistry, discover


class FlakyOptions(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """`fail_attempts`: attempts that fail with a transient error before success."""

    fail_attempts: int = 2
    sleep: float = 0.0
    error: str = "transient"  # or "bug": raise a plain RuntimeError, as a handler bug would
    only: str = ""  # when set, only bodies containing this text fail
    bogus: str = ""  # bodies containing this text get an outcome that is none of the three: a bug
    stuck: str = ""  # "shielded": `sleep` ignores cancellation; "blocking": `sleep` blocks the event loop
    shared_calls: int = 0  # the first calls of each message meet an outage others meet too (uncounted)
    own_calls: int = 0  # the calls after those fail on their own (counted), then the message is acked


@dataclass
class Journal:
    """What the test handlers saw: per message id, (attempt, monotonic time) of each call."""

    calls: dict[str, list[tuple[int, float]]] = field(default_factory=lambda: defaultdict(list))
    bodies: list[bytes] = field(default_factory=list)
    ends: dict[str, float] = field(default_factory=dict)
    builds: int = 0


class FlakyHandler:
    """Fails the first `fail_attempts` attempts of each message with `DownstreamUnavailable`."""

    downstreams: tuple[str, ...] = ()

    def __init__(self, options: FlakyOptions, journal: Journal) -> None:
        self.options = options
        self.journal = journal

    async def handle(self, message: Message) -> Outcome:
        self.journal.calls[message.message_id].append((message.attempt, anyio.current_time()))
        self.journal.bodies.append(message.body)
        if self.options.stuck == "shielded":
            with anyio.CancelScope(shield=True):
                await anyio.sleep(self.options.sleep)
        elif self.options.stuck == "blocking":
            time.sleep(self.options.sleep)  # noqa: ASYNC251 — the point: a handler that wedges the loop
        elif self.options.sleep:
            await anyio.sleep(self.options.sleep)
        self.journal.ends[message.message_id] = anyio.current_time()
        if self.options.bogus and self.options.bogus.encode() in message.body:
            return "not an outcome"  # type: ignore[return-value] — a handler bug the actor cannot settle
        calls = len(self.journal.calls[message.message_id])
        if calls <= self.options.shared_calls:
            raise DownstreamUnavailable("test", f"scripted outage on call {calls}")  # no breaker judged it own
        if calls <= self.options.shared_calls + self.options.own_calls:
            failure = DownstreamUnavailable("test", f"scripted own failure on call {calls}")
            failure.own = True
            raise failure
        chosen = not self.options.only or self.options.only.encode() in message.body
        if chosen and message.attempt <= self.options.fail_attempts:
            if self.options.error == "bug":
                raise RuntimeError(f"scripted bug on attempt {message.attempt}")
            failure = DownstreamUnavailable("test", f"scripted failure on attempt {message.attempt}")
            failure.own = True  # as a breaker judges a failure that this message alone meets
            raise failure
        return ACK


def registry(journal: Journal, crash_builds: int = 0) -> HandlerRegistry:
    """The real handlers plus `flaky` and `crashy` (whose build raises the first `crash_builds` times)."""

    def build_flaky(ctx: HandlerContext, options: FlakyOptions) -> Handler:
        return FlakyHandler(options, journal)

    def build_crashy(ctx: HandlerContext, options: FlakyOptions) -> Handler:
        journal.builds += 1
        if journal.builds <= crash_builds:
            raise RuntimeError(f"scripted crash #{journal.builds}")
        return FlakyHandler(options, journal)

    return discover(
        {
            "flaky": HandlerSpec("flaky", FlakyOptions, build_flaky),
            "crashy": HandlerSpec("crashy", FlakyOptions, build_crashy),
        }
    )
