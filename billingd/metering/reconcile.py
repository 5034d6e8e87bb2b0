"""Reconciliation: what Stripe bills against what billingd acked, per customer, meter and hour.

Stripe is the authoritative record for invoicing (seed 004); billingd's journal
(`OutboxLedger.journal`) holds what Stripe accepted from billingd, per (customer, meter, hour of
the events' timestamps). A run compares, for every customer and meter the journal names in the
window, the journal's hours with Stripe's `GET /v1/billing/meters/{id}/event_summaries`
(`value_grouping_window = hour`, 100 a page, within the shared request budget), over *closed*
hours only — those that ended at least `settle` ago, since Stripe's summaries are "an eventually
consistent view". Each hour whose values differ is a `Difference`, with the sample identifiers
Stripe's error reports named for it.

With `fix`, a difference in the customer's **open** billing period is corrected:

* Stripe holds less (events refused later, dropped): one corrective meter event carrying the
  difference, timestamped inside that hour;
* Stripe holds more (another producer, a mistake): a cancellation (`meter_event_adjustments`,
  `type = cancel`) of billingd's own correction when that correction is what made it more and was
  sent within Stripe's 24 hours; else one corrective event carrying the (negative) difference
  ("fix incorrectly recorded usage data by recording negative quantities").

A correction's identifier is derived from the bucket and the two values it corrects, and every
correction is recorded (`billingd:corrections:{<customer>}`): running the fix again before
Stripe's summaries caught up sends nothing new. A bucket in a closed period (before the start of
the subject's current billing period, or — when billingd knows none — older than
`correct_within`) is reported as needing a credit note, never sent: a finalized invoice is not
changed by later usage.
"""

from __future__ import annotations

import hashlib
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio
import msgspec
import structlog

from billingd.clients.ledger.base import key
from billingd.clients.ledger.outbox import OutboxLedger, day_of
from billingd.clients.ledger.scripts import Script

if TYPE_CHECKING:
    from billingd.clients.ledger import UsageLedger
    from billingd.clients.stripe import StripeGateway
    from billingd.telemetry import Metrics

log = structlog.get_logger("billingd.reconcile")

#: How long Stripe accepts the cancellation of an event after receiving it (seconds).
CANCEL_WINDOW = 24 * 3600
#: Stripe summary requests in flight at once (each still takes its slot of the shared budget).
READS_IN_FLIGHT = 16


@dataclass
class Difference:
    """One hour of one customer's meter whose values differ (`billingd` − `stripe` = `diff`).

    `action`: what a fix did or would do — `corrected`, `cancelled`, `sent before` (a correction
    for these very values was sent; Stripe's summaries have not caught up), `needs a credit note`,
    or empty (not fixed)."""

    customer: str
    meter: str
    hour: int
    billingd: int
    stripe: int
    refused: list[tuple[str, str]] = field(default_factory=list)
    action: str = ""
    correction: str = ""

    @property
    def diff(self) -> int:
        """billingd's value minus Stripe's (positive: Stripe bills less than billingd acked)."""
        return self.billingd - self.stripe

    def as_dict(self) -> dict[str, Any]:
        """The JSON form (`billingd reconcile --json`)."""
        return {
            "customer": self.customer,
            "meter": self.meter,
            "hour": _iso(self.hour * 3600),
            "billingd": self.billingd,
            "stripe": self.stripe,
            "diff": self.diff,
            "refused": [{"identifier": i, "code": c} for i, c in self.refused],
            "action": self.action,
            "correction": self.correction,
        }


@dataclass
class Report:
    """The outcome of one run over `[since, until)` (Unix seconds, whole hours)."""

    since: int
    until: int
    customers: int = 0
    meters: set[str] = field(default_factory=set)
    compared: int = 0
    differences: list[Difference] = field(default_factory=list)
    requests: int = 0
    seconds: float = 0.0

    def drift(self) -> dict[str, int]:
        """Per meter, the absolute differences summed (before any fix)."""
        out: dict[str, int] = dict.fromkeys(sorted(self.meters), 0)
        for d in self.differences:
            out[d.meter] = out.get(d.meter, 0) + abs(d.diff)
        return out

    def as_dict(self) -> dict[str, Any]:
        """The JSON form (`billingd reconcile --json`)."""
        return {
            "since": _iso(self.since),
            "until": _iso(self.until),
            "customers": self.customers,
            "meters": sorted(self.meters),
            "buckets_compared": self.compared,
            "drift": self.drift(),
            "differences": [d.as_dict() for d in self.differences],
            "stripe_requests": self.requests,
            "seconds": round(self.seconds, 3),
        }


_CORRECTIONS = Script.of("return redis.call('HGETALL', KEYS[1])")
_RECORD = Script.of("""
redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 1
""")
_REFUSED = Script.of("return redis.call('SMEMBERS', KEYS[1])")


class Correction(msgspec.Struct, array_like=True, frozen=True):
    """A correction billingd sent: its bucket, the values it corrected, what it sent."""

    meter: str
    hour: int
    billingd: int
    stripe: int
    value: int
    kind: str  # event | negative | cancel
    sent_at: int
    identifier: str


class Reconciler:
    """Compares and corrects (see module docstring).

    Args:
        outbox: the journal (and the records of corrections and refusals, beside it).
        stripe: the gateway (summaries, corrective events, cancellations; the shared budget).
        periods: the subjects' billing periods.
        settle: seconds an hour must be over before it is compared.
        correct_within: seconds a bucket of a customer whose period billingd does not know
            counts as open.
        keep: seconds corrections are remembered (`[reconcile] keep`).
        metrics: drift, runs and corrections are counted here (None: not counted).
        meters: the meters billingd reports to (`[stripe].meters` values): each is compared for
            every customer the journal names, so usage another producer put on a meter billingd
            never used for that customer is found too.
    """

    def __init__(
        self,
        outbox: OutboxLedger,
        stripe: StripeGateway,
        periods: UsageLedger,
        *,
        settle: float,
        correct_within: float,
        keep: int,
        metrics: Metrics | None = None,
        meters: tuple[str, ...] = (),
    ) -> None:
        self._meters = meters
        self._outbox = outbox
        self._stripe = stripe
        self._periods = periods
        self._settle = settle
        self._correct_within = correct_within
        self._keep = keep
        self._metrics = metrics
        self.metrics = metrics

    async def run(
        self,
        *,
        since: int,
        until: int,
        customer: str | None = None,
        meter: str | None = None,
        fix: bool = False,
        now: float | None = None,
    ) -> Report:
        """Compare `[since, until)` (cut at `now − settle`) and, with `fix`, correct.

        Raises:
            DownstreamError: Redis or Stripe unavailable (nothing half-done is recorded).
        """
        started = time.monotonic()
        now = time.time() if now is None else now
        first, last = since // 3600, min(until, int(now - self._settle)) // 3600  # hours [first, last)
        report = Report(first * 3600, max(first, last) * 3600)
        journal, subjects = await self._journal(first, last, customer, meter)
        refused = await self._refused(first, last)
        customers = sorted({c for c, _ in journal})
        meters = sorted(({n for _, n in journal} | set(self._meters)) - ({""} if meter is None else set()))
        if meter is not None:
            meters = [meter]
        report.customers = len(customers)
        pairs = {(who, name): journal.get((who, name), {}) for who in customers for name in meters}
        stripe: dict[tuple[str, str], dict[int, int]] = {}
        limiter = anyio.CapacityLimiter(READS_IN_FLIGHT)

        async def read(who: str, name: str) -> None:
            async with limiter:
                stripe[who, name], requests = await self._stripe_hours(who, name, first, last)
                report.requests += requests

        async with anyio.create_task_group() as tg:
            for who, name in pairs:
                tg.start_soon(read, who, name)
        for (who, name), hours in sorted(pairs.items()):
            report.meters.add(name)
            stripe_hours = stripe[who, name]
            for hour in sorted(set(hours) | set(stripe_hours)):
                report.compared += 1
                ours, theirs = hours.get(hour, 0), stripe_hours.get(hour, 0)
                if ours != theirs:
                    report.differences.append(
                        Difference(who, name, hour, ours, theirs, refused.get((who, name, hour), []))
                    )
        if fix and report.differences:
            await self._fix(report, subjects, now)
        report.seconds = time.monotonic() - started
        self._count(report)
        return report

    # -- reading ---------------------------------------------------------------------------

    async def _journal(
        self, first: int, last: int, customer: str | None, meter: str | None
    ) -> tuple[dict[tuple[str, str], dict[int, int]], dict[str, set[str]]]:
        """`{(customer, meter): {hour: value}}` in `[first, last)`, and each customer's subjects."""
        journal: dict[tuple[str, str], dict[int, int]] = defaultdict(lambda: defaultdict(int))
        subjects: dict[str, set[str]] = defaultdict(set)
        for day in range(day_of(first * 3600), day_of(max(first, last - 1) * 3600) + 1):
            for subject in await self._outbox.journal_subjects(day):
                for bucket, value in (await self._outbox.journal(subject, day)).items():
                    who, rest = bucket.split("|", 1)
                    name, hour_text = rest.rsplit("|", 1)
                    hour = int(hour_text)
                    if not first <= hour < last or (customer and who != customer) or (meter and name != meter):
                        continue
                    journal[who, name][hour] += value
                    subjects[who].add(subject)
        return journal, subjects

    async def _refused(self, first: int, last: int) -> dict[tuple[str, str, int], list[tuple[str, str]]]:
        """Stripe's sample identifiers of refused events, by the bucket they were sent in."""
        out: dict[tuple[str, str, int], list[tuple[str, str]]] = defaultdict(list)
        for day in range(day_of(first * 3600), day_of(max(first, last - 1) * 3600) + 2):
            for raw in await self._outbox.run(_REFUSED, (key("refused", tag=str(day)),), ()):
                who, name, hour, identifier, code = raw.decode().split("\x1f")
                out[who, name, int(hour)].append((identifier, code))
        return out

    async def _stripe_hours(self, customer: str, name: str, first: int, last: int) -> tuple[dict[int, int], int]:
        """Stripe's hourly totals of `customer` on meter `name` in `[first, last)`; requests made."""
        found = await self._stripe.catalogue.meter(name)
        if found is None or last <= first:
            return {}, 0
        summaries, requests = await self._stripe.event_summaries(str(found["id"]), customer, first * 3600, last * 3600)
        hours: dict[int, int] = defaultdict(int)
        for summary in summaries:
            value = summary.get("aggregated_value") or 0
            hours[int(summary["start_time"]) // 3600] += round(float(value))
        return {h: v for h, v in hours.items() if v}, requests

    # -- fixing ----------------------------------------------------------------------------

    async def _fix(self, report: Report, subjects: dict[str, set[str]], now: float) -> None:
        for d in report.differences:
            period_start = await self._period_start(subjects.get(d.customer, set()))
            open_period = (
                d.hour * 3600 >= period_start
                if period_start is not None
                else now - d.hour * 3600 < self._correct_within
            )
            if not open_period:
                d.action = "needs a credit note"
                log.warning("meter drift in a closed period: needs a credit note", **_evidence(d))
                self._corrected(d.meter, "credit_note")
                continue
            records = await self._corrections(d.customer)
            identifier = _correction_id(d)
            if identifier in records:
                d.action, d.correction = "sent before", identifier
                continue
            wrong = _cancellable(records.values(), d, now) if d.diff < 0 else None
            if wrong is not None:
                await self._stripe.cancel_meter_event(d.meter, wrong.identifier)
                await self._record(d, identifier, Correction(d.meter, d.hour, d.billingd, d.stripe, -wrong.value,
                                                             "cancel", int(now), wrong.identifier))  # fmt: skip
                d.action, d.correction = "cancelled", wrong.identifier
                self._corrected(d.meter, "cancel")
                log.warning(
                    "meter drift corrected: our correction cancelled", cancelled=wrong.identifier, **_evidence(d)
                )
                continue
            timestamp = d.hour * 3600 + 1800
            await self._stripe.correct_meter(d.meter, d.customer, d.diff, identifier, timestamp)
            kind = "event" if d.diff > 0 else "negative"
            await self._record(d, identifier, Correction(d.meter, d.hour, d.billingd, d.stripe, d.diff, kind,
                                                         int(now), identifier))  # fmt: skip
            d.action, d.correction = "corrected", identifier
            self._corrected(d.meter, kind)
            log.warning("meter drift corrected", correction=identifier, value=d.diff, **_evidence(d))

    async def _period_start(self, subjects: Iterable[str]) -> int | None:
        starts = []
        for subject in subjects:
            period = await self._periods.period(subject)
            if period is not None:
                starts.append(period[0])
        return max(starts) if starts else None

    async def _corrections(self, customer: str) -> dict[str, Correction]:
        reply = await self._outbox.run(_CORRECTIONS, (key("corrections", tag=customer),), ())
        return {reply[i].decode(): msgspec.json.decode(reply[i + 1], type=Correction) for i in range(0, len(reply), 2)}

    async def _record(self, d: Difference, identifier: str, correction: Correction) -> None:
        args = (self._keep, identifier, msgspec.json.encode(correction))
        await self._outbox.run(_RECORD, (key("corrections", tag=d.customer),), args)

    def _count(self, report: Report) -> None:
        if self._metrics is None:
            return
        for name, drift in report.drift().items():
            self._metrics.meter_drift.labels(name).set(drift)

    def _corrected(self, meter: str, kind: str) -> None:
        if self._metrics is not None:
            self._metrics.meter_corrections.labels(meter, kind).inc()


def _correction_id(d: Difference) -> str:
    """The identifier of the correction of `d`: the same for the same bucket and values."""
    digest = hashlib.sha256(f"{d.customer}|{d.meter}|{d.hour}|{d.billingd}|{d.stripe}".encode()).hexdigest()
    return "bdc-" + digest[:60]


def _cancellable(records: Iterable[Correction], d: Difference, now: float) -> Correction | None:
    """billingd's own positive correction of this bucket that alone makes Stripe hold too much,
    still within Stripe's 24 hours to cancel it."""
    for c in records:
        mine = (c.meter, c.hour) == (d.meter, d.hour) and c.kind == "event" and c.value == -d.diff
        if mine and now - c.sent_at < CANCEL_WINDOW - 600:
            return c
    return None


def _evidence(d: Difference) -> dict[str, Any]:
    return {"customer": d.customer, "meter": d.meter, "hour": _iso(d.hour * 3600), "billingd": d.billingd,
            "stripe": d.stripe, "diff": d.diff, "refused": [i for i, _ in d.refused][:5]}  # fmt: skip


def _iso(seconds: int) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%Y-%m-%dT%H:%MZ")
