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
replica; past `max_outbox_age`, while Stripe is what keeps the outbox back (its stream requests fail), it
holds the `stripe-outbox` breaker open, which pauses the intake of every `usage` source in outbox
mode until the outbox gets through again. Events of a meter Stripe does not have wait without
taking the place of others (they are left out of the passes for `MISSING_RECHECK` seconds at a
time) and do not pause intake: `BillingdMeterOutboxBehind` alerts on them.
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

from billingd.clients.errors import DownstreamError, Throttled
from billingd.clients.ledger.outbox import OutboxEvent, OutboxLedger, decode, shard_of
from billingd.clients.stripe_meters import STRIPE_MAX_AGE, MeterMissing
from billingd.clients.stripe_stream import STREAM_MAX_EVENTS, StreamRejected

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
#: Seconds a pass that sent nothing waits before the next (doubling up to `IDLE_MAX` while the
#: outbox stays empty).
IDLE = 0.2
IDLE_MAX = 2.0
#: The most subjects whose events are counted per measurement (the gauge is a floor past it).
COUNT_MAX_SUBJECTS = 10_000
#: Seconds a meter found missing is left out of the passes before it is asked about again.
MISSING_RECHECK = 10.0
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
        self._stripe_trouble = False
        """The latest stream request failed (Stripe down, throttling, its session or budget)."""
        self._missing: dict[str, float] = {}
        """Meters Stripe does not have (or not active), and since when: their events wait."""
        self._limiter = anyio.CapacityLimiter(IN_FLIGHT)
        self.sent = 0
        """Events Stripe accepted from this sender."""

    async def run(self) -> None:
        """Send until cancelled; shards are given back on the way out. The outbox is measured by
        a task of its own (its reads never delay a send)."""
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._measuring)
                await self._sending()
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                for shard in list(self._held):
                    try:
                        await self._outbox.unlease(shard, self._token)
                    except DownstreamError:
                        pass  # it expires

    async def _sending(self) -> None:
        failures, idle = 0, IDLE
        while True:
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
            idle = IDLE if sent else min(IDLE_MAX, idle * 2)  # an empty outbox is polled less and less
            if not sent:
                await anyio.sleep(idle)

    async def send_pass(self) -> int:
        """One pass over every shard this process can lease; returns the events Stripe accepted.

        Raises:
            DownstreamError: Redis or Stripe unavailable (the events wait for the next pass), after
                every leased shard had its turn.
        """
        sent, trouble = 0, None
        for shard in range(await self._shard_count()):
            if not await self._outbox.lease(shard, self._token, LEASE):
                self._held.discard(shard)
                continue
            self._held.add(shard)
            try:
                sent += await self._drain(shard)
            except DownstreamError as exc:  # this shard waits; the others still go
                trouble = trouble or exc
        self.sent += sent
        if trouble is not None and not sent:
            raise trouble
        return sent

    async def _shard_count(self) -> int:
        """The shards to read: the configured count, or more while a larger count used before
        still has subjects indexed (they move to their new shard as they are sent)."""
        return max(self._shards, await self._outbox.shards_used(self._shards))

    async def _drain(self, shard: int) -> int:
        work = _Pass()
        now = int(time.time())
        start = 0
        while len(work.pending) < STREAM_MAX_EVENTS * IN_FLIGHT:
            page = await self._outbox.waiting(shard, SUBJECTS_PER_PASS, start)
            if not page:
                break
            start += len(page)
            for waiting in page:
                work.touched.add(waiting.subject)
                await self._collect(waiting.subject, work, now)
                if len(work.pending) >= STREAM_MAX_EVENTS * IN_FLIGHT:
                    break
        await self._send_all(work)
        for subject in work.touched:
            await self._reindex(subject, shard)
        if work.trouble is not None and not work.sent:
            raise work.trouble
        return work.sent

    async def _collect(self, subject: str, work: _Pass, now: int) -> None:
        """Read `subject`'s waiting events into `work` (those of a meter Stripe does not have
        stay, and do not take the place of others); hold what can never be sent."""
        events = await self._outbox.events(subject)
        unreadable, expired = [], []
        for identifier, raw in events.items():
            try:
                event = decode(raw)
            except (msgspec.DecodeError, msgspec.ValidationError):
                unreadable.append(identifier)
                continue
            if event.timestamp < now - STRIPE_MAX_AGE + AGE_MARGIN:
                expired.append(identifier)
            elif event.event_name not in self._missing:
                work.pending.append((subject, identifier, event))
        if unreadable:
            await self._hold(subject, unreadable, "unreadable outbox entry")
        if expired:
            await self._hold(subject, expired, "older than Stripe's 35-day window: bill it by hand")

    async def _send_all(self, work: _Pass) -> None:
        ready: list[tuple[str, str, OutboxEvent]] = []
        for name in {event.event_name for _, _, event in work.pending}:
            try:
                await self._stripe.require_meter(name)
            except MeterMissing as exc:  # the meter's events wait, out of the way; the others go
                work.trouble = work.trouble or exc
                self._missing[name] = anyio.current_time()
                continue
            except DownstreamError as exc:  # Stripe cannot tell now (its catalogue did not answer)
                work.trouble = work.trouble or exc
                self._stripe_trouble = True
                continue
            ready += [item for item in work.pending if item[2].event_name == name]
        self._missing = {n: t for n, t in self._missing.items() if anyio.current_time() - t < MISSING_RECHECK}
        batches = [ready[i : i + STREAM_MAX_EVENTS] for i in range(0, len(ready), STREAM_MAX_EVENTS)]
        async with anyio.create_task_group() as tg:
            for batch in batches:
                tg.start_soon(self._send, batch, work)

    async def _send(self, batch: list[tuple[str, str, OutboxEvent]], work: _Pass) -> None:
        try:
            async with self._limiter:
                await self._stripe.stream.post([_stream_event(identifier, event) for _, identifier, event in batch])
        except StreamRejected as exc:  # Stripe refused this request's events themselves
            if len(batch) > 1:  # which event? each goes alone (outside the limiter: each takes it again)
                for one in batch:
                    await self._send([one], work)
                return
            subject, identifier, event = batch[0]
            log.error("Stripe refused a meter event: held for finance", identifier=identifier,
                      idempotency_key=event.key[:200], error=str(exc)[:300])  # fmt: skip
            await self._hold(subject, [identifier], f"refused by Stripe: {exc}"[:500])
            return
        except DownstreamError as exc:  # unavailable, throttled, or a refusal of the session or budget
            work.trouble = work.trouble or exc
            self._stripe_trouble = True
            return
        self._stripe_trouble = False
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

    async def _reindex(self, subject: str, shard: int) -> None:
        """Put `subject` in its shard's index at its oldest waiting event, or take it out of the
        shard it was read from when nothing waits — and read once more after taking it out, so an
        event enqueued meanwhile (whose handler may have indexed it just before) is never left in
        an outbox that no index names."""
        home = shard_of(subject, self._shards)
        oldest = _oldest(await self._outbox.events(subject))
        if oldest is not None:
            await self._outbox.index_at(subject, home, oldest)
            if shard != home:
                await self._outbox.unindex(subject, shard)
            return
        await self._outbox.unindex(subject, shard)
        oldest = _oldest(await self._outbox.events(subject))  # the read that comes last
        if oldest is not None:
            await self._outbox.index_at(subject, home, oldest)

    async def _measuring(self) -> None:
        counted = -COUNT_EVERY
        while True:
            count = anyio.current_time() - counted >= COUNT_EVERY
            if count:
                counted = anyio.current_time()
            await self._measure(count)
            await anyio.sleep(SAMPLE)

    async def _measure(self, count: bool) -> None:
        """Set the outbox gauges from every shard (the events waiting when `count`) and hold
        intake while the outbox is too old — and Stripe is what keeps it so (a meter Stripe does
        not have is a configuration fault that alerts, not a reason to stop counting usage)."""
        try:
            oldest, events, subjects = None, 0, 0
            for shard in range(await self._shard_count()):
                since, _ = await self._outbox.oldest(shard)
                if since is not None:
                    oldest = since if oldest is None else min(oldest, since)
                if count and subjects < COUNT_MAX_SUBJECTS:
                    for waiting in await self._outbox.waiting(shard, COUNT_MAX_SUBJECTS - subjects):
                        events += await self._outbox.count(waiting.subject)
                        subjects += 1
        except DownstreamError as exc:
            log.info("meter outbox: could not measure", error=str(exc)[:200])
            return
        age = max(0.0, time.time() - oldest) if oldest is not None else 0.0
        if self._metrics is not None:
            if count:
                self._metrics.outbox_events.set(events)
            self._metrics.outbox_oldest.set(age)
        if self._max_age and age > self._max_age and self._stripe_trouble:
            if not self._pausing:
                log.error("meter outbox older than max_outbox_age: usage intake paused", age=round(age),
                          max_outbox_age=self._max_age)  # fmt: skip
            self._pausing = True
            self._hold_open(3 * SAMPLE)
        elif self._pausing:
            log.warning("meter outbox getting through again: usage intake resumes", age=round(age))
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
