"""The meter outbox sender: one per process, it drains the outboxes into Stripe (DESIGN §10).

Each pass it takes (or renews) the lease of every outbox shard no other live process holds, so
the shards of a dead replica are taken over within `LEASE` seconds; for each leased shard it
reads the longest-waiting subjects' events, sends them to the v2 meter event stream in requests
of up to 100 events (`IN_FLIGHT` requests at once, each within the shared Stripe budget) and, only
once Stripe accepted a request, removes its events from their outboxes and journals them
(`OutboxLedger.acknowledge`: once per event, however often it was sent). A request that fails
leaves its events waiting: the next pass sends them again with the same identifiers, which Stripe
keeps once.

What can never be sent is held, never dropped (`billingd meters` lists it for finance): an event
older than Stripe's 35-day window, one Stripe refuses on its own (a 4xx for a request of one), one
that cannot be read. An event for a meter Stripe does not have (or not active) waits.

Every `SAMPLE` seconds it measures every shard's oldest event (`billingd_meter_outbox_oldest_seconds`),
every `COUNT_EVERY` seconds the events waiting (`billingd_meter_outbox_events`) — the same on every
replica; past `max_outbox_age` it holds the `stripe-outbox` breaker open, which pauses the intake of
every `usage` source in outbox mode until the outbox is younger again.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio
import msgspec
import structlog

from billingd.clients.errors import DownstreamError, DownstreamRejected, Throttled
from billingd.clients.ledger.outbox import OutboxEvent, OutboxLedger, decode
from billingd.clients.stripe_meters import STRIPE_MAX_AGE
from billingd.clients.stripe_stream import STREAM_MAX_EVENTS

if TYPE_CHECKING:
    from billingd.clients.stripe import StripeGateway
    from billingd.telemetry import Metrics

log = structlog.get_logger("billingd.outbox")

#: Seconds a shard's lease lasts without renewal (a dead replica's shards wait this long).
LEASE = 15.0
#: Stream requests in flight at once, per process.
IN_FLIGHT = 8
#: Subjects read from a shard per pass.
SUBJECTS_PER_PASS = 200
#: Seconds between two measurements of the outbox's age (one read per shard), and of its size
#: (one read per waiting subject).
SAMPLE = 1.0
COUNT_EVERY = 15.0
#: Seconds a pass that sent nothing waits before the next.
IDLE = 0.2
#: The longest wait between two passes while Stripe or Redis is unavailable (seconds).
BACKOFF_MAX = 10.0
#: How long before Stripe's 35 days an event is held instead of sent (seconds): it must still
#: reach Stripe, and the answer is asynchronous.
AGE_MARGIN = 600


@dataclass
class _Pass:
    """What one pass found: events to send by subject, and the first unavailability met."""

    pending: list[tuple[str, str, OutboxEvent]] = field(default_factory=list)
    touched: set[str] = field(default_factory=set)
    trouble: DownstreamError | None = None
    sent: int = 0


class OutboxSender:
    """Drains the meter outboxes (see module docstring).

    Args:
        outbox: the outboxes and the journal.
        stripe: the Stripe gateway (stream session, budget, breaker).
        shards: outbox shards (`[stripe] outbox_shards`).
        keep: seconds the journal is kept (`[reconcile] keep`).
        max_age: seconds past which intake pauses (`[stripe] max_outbox_age`).
        hold_open: `hold_open(seconds)` keeps the `stripe-outbox` breaker open that long;
            `hold_open(0)` closes it.
        metrics: where the outbox gauges are set (None: not measured).
    """

    def __init__(
        self,
        outbox: OutboxLedger,
        stripe: StripeGateway,
        *,
        shards: int,
        keep: int,
        max_age: float,
        hold_open: Callable[[float], None],
        metrics: Metrics | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._outbox = outbox
        self._stripe = stripe
        self._shards = shards
        self._keep = keep
        self._max_age = max_age
        self._hold_open = hold_open
        self._metrics = metrics
        self._rng = rng or random.Random()
        self._token = uuid.uuid4().hex
        self._held: set[int] = set()
        self._pausing = False
        self._limiter = anyio.CapacityLimiter(IN_FLIGHT)
        self.sent = 0
        """Events Stripe accepted from this sender."""

    async def run(self) -> None:
        """Send until cancelled; shards are given back on the way out."""
        failures, sampled, counted = 0, -SAMPLE, -COUNT_EVERY
        try:
            while True:
                if anyio.current_time() - sampled >= SAMPLE:
                    sampled = anyio.current_time()
                    count = anyio.current_time() - counted >= COUNT_EVERY
                    if count:
                        counted = sampled
                    await self._measure(count)
                try:
                    sent = await self.send_pass()
                    failures = 0
                except Throttled as exc:
                    await anyio.sleep(exc.retry_after)
                    continue
                except DownstreamError as exc:
                    delay = min(BACKOFF_MAX, 0.5 * 2**failures) * self._rng.uniform(0.5, 1.0)
                    failures += 1
                    log.info("meter outbox: Stripe or Redis unavailable, trying again", error=str(exc)[:300],
                             retry_in=round(delay, 2))  # fmt: skip
                    await anyio.sleep(delay)
                    continue
                except Exception:  # a bug must not stop the daemon: the outbox waits, loudly
                    failures += 1
                    log.exception("meter outbox sender failed unexpectedly; trying again")
                    await anyio.sleep(min(BACKOFF_MAX, 0.5 * 2**failures))
                    continue
                if not sent:
                    await anyio.sleep(IDLE)
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                for shard in list(self._held):
                    try:
                        await self._outbox.unlease(shard, self._token)
                    except DownstreamError:
                        pass  # it expires

    async def send_pass(self) -> int:
        """One pass over the shards this process holds; returns the events Stripe accepted.

        Raises:
            DownstreamError: Redis or Stripe unavailable (the events wait for the next pass).
        """
        sent = 0
        for shard in range(self._shards):
            if not await self._outbox.lease(shard, self._token, LEASE):
                self._held.discard(shard)
                continue
            self._held.add(shard)
            sent += await self._drain(shard)
        self.sent += sent
        return sent

    async def _drain(self, shard: int) -> int:
        work = _Pass()
        now = int(time.time())
        for waiting in await self._outbox.waiting(shard, SUBJECTS_PER_PASS):
            work.touched.add(waiting.subject)
            events = await self._outbox.events(waiting.subject)
            unreadable, expired = [], []
            for identifier, raw in events.items():
                try:
                    event = decode(raw)
                except (msgspec.DecodeError, msgspec.ValidationError):
                    unreadable.append(identifier)
                    continue
                if event.timestamp < now - STRIPE_MAX_AGE + AGE_MARGIN:
                    expired.append(identifier)
                else:
                    work.pending.append((waiting.subject, identifier, event))
            if unreadable:
                await self._hold(waiting.subject, unreadable, "unreadable outbox entry")
            if expired:
                await self._hold(waiting.subject, expired, "older than Stripe's 35-day window: bill it by hand")
            if len(work.pending) >= STREAM_MAX_EVENTS * IN_FLIGHT:
                break
        await self._send_all(work)
        for subject in work.touched:
            await self._reindex(subject)
        if work.trouble is not None:
            raise work.trouble
        return work.sent

    async def _send_all(self, work: _Pass) -> None:
        ready: list[tuple[str, str, OutboxEvent]] = []
        for name in {event.event_name for _, _, event in work.pending}:
            try:
                await self._stripe.require_meter(name)
            except DownstreamError as exc:  # the meter's events wait; the others go
                work.trouble = work.trouble or exc
                continue
            ready += [item for item in work.pending if item[2].event_name == name]
        batches = [ready[i : i + STREAM_MAX_EVENTS] for i in range(0, len(ready), STREAM_MAX_EVENTS)]
        async with anyio.create_task_group() as tg:
            for batch in batches:
                tg.start_soon(self._send, batch, work)

    async def _send(self, batch: list[tuple[str, str, OutboxEvent]], work: _Pass) -> None:
        async with self._limiter:
            try:
                await self._stripe.stream.post([_stream_event(identifier, event) for _, identifier, event in batch])
            except DownstreamRejected as exc:
                if len(batch) > 1:  # which event? each goes alone
                    for one in batch:
                        await self._send([one], work)
                    return
                subject, identifier, event = batch[0]
                log.error("Stripe refused a meter event: held for finance", identifier=identifier,
                          idempotency_key=event.key[:200], error=str(exc)[:300])  # fmt: skip
                await self._hold(subject, [identifier], f"refused by Stripe: {exc}"[:500])
                return
            except DownstreamError as exc:
                work.trouble = work.trouble or exc
                return
        by_subject: dict[str, list[tuple[str, OutboxEvent]]] = {}
        for subject, identifier, event in batch:
            by_subject.setdefault(subject, []).append((identifier, event))
        for subject, events in by_subject.items():
            done = await self._outbox.acknowledge(subject, events, self._keep)
            work.sent += done
            if self._metrics is not None:
                self._metrics.outbox_sent.inc(done)

    async def _hold(self, subject: str, identifiers: list[str], reason: str) -> None:
        held = await self._outbox.hold(subject, identifiers, reason)
        if held and self._metrics is not None:
            self._metrics.outbox_held_total.inc(held)
        if held:
            log.warning("meter events held out of the stream", subject=subject, events=held, reason=reason)

    async def _reindex(self, subject: str) -> None:
        """Put `subject` back in its shard's index at its oldest waiting event, or take it out
        when nothing waits — checking again afterwards, so an event enqueued meanwhile (whose
        handler's index write may have come first) is never stranded."""
        for _ in range(2):
            oldest = _oldest(await self._outbox.events(subject))
            await self._outbox.reindex(subject, self._shards, oldest)
            if oldest is not None:
                return

    async def _measure(self, count: bool) -> None:
        """Set the outbox gauges from every shard (the events waiting when `count`) and hold
        intake while the outbox is too old."""
        try:
            oldest, events = None, 0
            for shard in range(self._shards):
                since, _ = await self._outbox.oldest(shard)
                if since is not None:
                    oldest = since if oldest is None else min(oldest, since)
                if count:
                    for waiting in await self._outbox.waiting(shard, 10_000):
                        events += await self._outbox.count(waiting.subject)
        except DownstreamError as exc:
            log.info("meter outbox: could not measure", error=str(exc)[:200])
            return
        age = max(0.0, time.time() - oldest) if oldest is not None else 0.0
        if self._metrics is not None:
            if count:
                self._metrics.outbox_events.set(events)
            self._metrics.outbox_oldest.set(age)
        if self._max_age and age > self._max_age:
            if not self._pausing:
                log.error("meter outbox older than max_outbox_age: usage intake paused", age=round(age),
                          max_outbox_age=self._max_age)  # fmt: skip
            self._pausing = True
            self._hold_open(3 * SAMPLE)
        elif self._pausing:
            log.warning("meter outbox younger than max_outbox_age again: usage intake resumes", age=round(age))
            self._pausing = False
            self._hold_open(0)


def _oldest(events: dict[str, bytes]) -> int | None:
    oldest: int | None = None
    for raw in events.values():
        try:
            enqueued = decode(raw).enqueued
        except (msgspec.DecodeError, msgspec.ValidationError):
            enqueued = 0
        oldest = enqueued if oldest is None else min(oldest, enqueued)
    return oldest


def _stream_event(identifier: str, event: OutboxEvent) -> dict[str, Any]:
    """The v2 meter event stream's form of `event`."""
    import datetime as dt

    stamp = dt.datetime.fromtimestamp(event.timestamp, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    payload = {"stripe_customer_id": event.customer, "value": str(event.value)}
    return {"event_name": event.event_name, "identifier": identifier, "timestamp": stamp, "payload": payload}
