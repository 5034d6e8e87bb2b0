"""The outcome policy, as pure functions (DESIGN §2 "Outcomes"):

* `outcome_of` — what an exception out of a handler stands for: invalid input and permanent
  refusals are dead letters; unavailability is a retry, counted only when its breaker judged the
  failure the message's own (`DownstreamUnavailable.attempt`: an outage that other messages meet
  too must never bring a valid message nearer its dead letter), and never when a breaker is
  open, a duplicate is busy or the downstream throttles; None for anything else (a bug: the
  actor logs it with its stack trace and retries, counted);
* `settlement_of` — how an outcome settles a delivery: ack; retry after the outcome's delay or
  the source's exponential backoff with full jitter, until `max_attempts` counted attempts, then
  a dead letter; dead letter with the reason.
"""

from __future__ import annotations

import random

from billingd.clients.errors import Busy, CircuitOpen, DownstreamRejected, DownstreamUnavailable, Throttled
from billingd.config.model import SourceSettings
from billingd.handlers.kit.outcome import ACK, DeadLetter, InvalidMessage, Outcome, Retry
from billingd.sources.base import Delivery, Disposition, Settlement
from billingd.supervisors.backoff import full_jitter
from billingd.telemetry.redact import scrub


def outcome_of(exc: Exception, *, retry_initial: float, rng: random.Random) -> Outcome | None:
    """The outcome `exc` (raised by a handler) stands for, or None for an unexpected exception."""
    if isinstance(exc, InvalidMessage):
        return DeadLetter(exc.reason)
    if isinstance(exc, CircuitOpen):
        return Retry(str(exc), delay=exc.retry_after + rng.uniform(0, retry_initial), counted=False)
    if isinstance(exc, Throttled):  # back-pressure (a 429, the shared budget): never an attempt
        return Retry(str(exc), delay=exc.retry_after + rng.uniform(0, retry_initial), counted=False)
    if isinstance(exc, DownstreamUnavailable):
        return Retry(str(exc), counted=exc.attempt)
    if isinstance(exc, DownstreamRejected):
        return DeadLetter(str(exc))
    if isinstance(exc, Busy):  # a duplicate of work in progress: come back later, uncounted
        return Retry(f"busy: {exc}", delay=retry_initial, counted=False)
    if isinstance(exc, UnicodeError | RecursionError | ArithmeticError):  # the input's shape, never transient
        return DeadLetter(f"unreadable input: {type(exc).__name__}: {exc}"[:500])
    return None


def settlement_of(delivery: Delivery, outcome: Outcome, settings: SourceSettings, rng: random.Random) -> Settlement:
    """How `outcome` settles `delivery` under the source's retry settings (see module docstring).
    The reason — an exception's text, kept with a dead letter until it is replayed — has URL
    passwords and other credentials masked (`billingd.telemetry.redact.scrub`)."""
    if isinstance(outcome, Retry | DeadLetter):
        outcome = _scrubbed(outcome)
    if outcome is ACK:
        return Settlement(delivery, Disposition.ACK)
    if isinstance(outcome, Retry):
        if not outcome.counted or delivery.attempt < settings.max_attempts:
            delay = outcome.delay
            if delay is None:
                delay = full_jitter(delivery.attempt - 1, settings.retry_initial, settings.retry_max, rng)
            return Settlement(delivery, Disposition.RETRY, outcome.reason, delay, outcome.counted)
        return Settlement(
            delivery, Disposition.DEAD_LETTER, f"gave up after {delivery.attempt} attempts: {outcome.reason}"
        )
    if isinstance(outcome, DeadLetter):
        return Settlement(delivery, Disposition.DEAD_LETTER, outcome.reason)
    raise TypeError(f"a handler returned {outcome!r}, which is not an Outcome")


def _scrubbed(outcome: Retry | DeadLetter) -> Retry | DeadLetter:
    reason = scrub(outcome.reason)
    if reason == outcome.reason:
        return outcome
    if isinstance(outcome, DeadLetter):
        return DeadLetter(reason)
    return Retry(reason, delay=outcome.delay, counted=outcome.counted)
