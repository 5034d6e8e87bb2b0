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

Every correction is recorded per bucket (`billingd:corrections:{<customer>}`), numbered: its
identifier is derived from the bucket, its number and the two values it corrects, so a fix
interrupted after sending repeats the same identifier (Stripe keeps the first). A bucket with a
correction sent within `settle` + 1 hour is left alone ("sent before": Stripe's summaries have not
caught up); a correction Stripe never counted is followed, later, by the next number. A bucket in
a closed period (before the start of the subject's current billing period, rolled forward by its
interval, or — when billingd knows none — older than `correct_within`) is reported as needing a
credit note, never sent: a finalized invoice is not changed by later usage; one in an open period
but older than Stripe's 35 days for meter events (a yearly plan) as needing an invoice item.

Only what is settled is compared: a bucket whose journal grew within `settle`, or with events
still in the outbox (waiting, or sent and not yet journaled), is counted as `unsettled` and left
to a later run; so is nothing of a meter whose formula is not `sum` (Stripe's `count` and `last`
do not add values up as the journal does: those meters are listed in `skipped`). One
difference's failed fix is that difference's (`action = "failed: …"`); the others go on.
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

from billingd.clients.errors import DownstreamError, Throttled
from billingd.clients.ledger.base import key
from billingd.clients.ledger.outbox import OutboxLedger, day_of, decode
from billingd.clients.ledger.scripts import Script

if TYPE_CHECKING:
    from billingd.clients.ledger import UsageLedger
    from billingd.clients.stripe import StripeGateway
    from billingd.telemetry import Metrics

log = structlog.get_logger("billingd.reconcile")

#: How long Stripe accepts the cancellation of an event after receiving it (seconds).
CANCEL_WINDOW = 24 * 3600
#: How old a meter event's timestamp may be (seconds; Stripe API reference, meter events: "within
#: the past 35 calendar days").
STRIPE_MAX_AGE = 35 * 86400
#: How often one customer-meter read is tried again after a 429 (or an exhausted shared budget).
THROTTLED_RETRIES = 5
#: Stripe summary requests in flight at once (each still takes its slot of the shared budget).
READS_IN_FLIGHT = 16


@dataclass
class Difference:
    """One hour of one customer's meter whose values differ (`billingd` − `stripe` = `diff`).

    `action`: what a fix did or would do — `corrected`, `cancelled`, `sent before` (a correction
    of this bucket was sent within `settle` + 1 hour; Stripe's summaries have not caught up),
    `needs a credit note` (a closed period), `needs an invoice item` (an open period's hour older
    than Stripe's 35 days for meter events), `failed: <error>`, or empty (not fixed)."""

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
    unsettled: int = 0
    skipped: dict[str, str] = field(default_factory=dict)

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
            "unsettled": self.unsettled,
            "skipped_meters": self.skipped,
        }


_CORRECTIONS = Script.of("return redis.call('HGETALL', KEYS[1])")
_RECORD = Script.of("""
redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 1
""")
_REFUSED = Script.of("return redis.call('SMEMBERS', KEYS[1])")


class Correction(msgspec.Struct, array_like=True, frozen=True):
    """A correction billingd sent: its bucket, the values it corrected, what it sent (`kind`:
    `event`, `negative`, or `cancel` of the event `identifier`), when (Unix s), and whether a
    later run cancelled it."""

    meter: str
    hour: int
    billingd: int
    stripe: int
    value: int
    kind: str
    sent_at: int
    identifier: str
    cancelled: bool = False


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
        journal, subjects, unsettled = await self._journal(first, last, customer, meter, now)
        refused = await self._refused(first, last)
        customers = sorted({c for c, _ in journal})
        names = [meter] if meter is not None else sorted({n for _, n in journal} | set(self._meters))
        meters = await self._comparable(names, report) if customers else {}
        report.customers = len(customers)
        pairs = {(who, name): journal.get((who, name), {}) for who in customers for name in meters}
        stripe: dict[tuple[str, str], dict[int, int]] = {}
        limiter = anyio.CapacityLimiter(READS_IN_FLIGHT)

        async def read(who: str, name: str) -> None:
            for attempt in range(THROTTLED_RETRIES + 1):
                try:
                    async with limiter:
                        stripe[who, name], requests = await self._stripe_hours(meters[name], who, first, last)
                        report.requests += requests
                    return
                except Throttled as exc:  # Stripe's 429 or the shared budget: wait as told, then again
                    if attempt == THROTTLED_RETRIES:
                        raise
                    await anyio.sleep(exc.retry_after)

        async with anyio.create_task_group() as tg:
            for who, name in pairs:
                tg.start_soon(read, who, name)
        for (who, name), hours in sorted(pairs.items()):
            report.meters.add(name)
            stripe_hours = stripe[who, name]
            for hour in sorted(set(hours) | set(stripe_hours)):
                if (who, name, hour) in unsettled:
                    report.unsettled += 1
                    continue
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

    async def _comparable(self, names: Iterable[str], report: Report) -> dict[str, str]:
        """`event_name → meter id` of the meters whose totals the journal can prove; the others
        are named in `report.skipped` with the reason."""
        out: dict[str, str] = {}
        for name in names:
            found = await self._stripe.catalogue.meter(name)
            formula = ((found or {}).get("default_aggregation") or {}).get("formula", "sum")
            if found is None:
                report.skipped[name] = "Stripe has no meter with this event_name"
            elif formula != "sum":
                report.skipped[name] = f"formula {formula}: Stripe does not add values up as the journal does"
            else:
                out[name] = str(found["id"])
        return out

    # -- reading ---------------------------------------------------------------------------

    async def _journal(
        self, first: int, last: int, customer: str | None, meter: str | None, now: float
    ) -> tuple[dict[tuple[str, str], dict[int, int]], dict[str, set[str]], set[tuple[str, str, int]]]:
        """`{(customer, meter): {hour: value}}` in `[first, last)`, each customer's subjects, and
        the buckets not yet settled (grown within `settle`, or with events still in an outbox)."""
        journal: dict[tuple[str, str], dict[int, int]] = defaultdict(lambda: defaultdict(int))
        subjects: dict[str, set[str]] = defaultdict(set)
        unsettled: set[tuple[str, str, int]] = set()
        for day in range(day_of(first * 3600), day_of(max(first, last - 1) * 3600) + 1):
            for subject in await self._outbox.journal_subjects(day):
                for bucket, (value, touched) in (await self._outbox.journal(subject, day)).items():
                    who, name, hour = _split(bucket)
                    if not first <= hour < last or (customer and who != customer) or (meter and name != meter):
                        continue
                    journal[who, name][hour] += value
                    subjects[who].add(subject)
                    if touched > now - self._settle:
                        unsettled.add((who, name, hour))
        for subject in {s for found in subjects.values() for s in found}:
            if await self._outbox.count(subject):
                for raw in (await self._outbox.events(subject)).values():
                    event = decode(raw)
                    unsettled.add((event.customer, event.event_name, event.hour))
        return journal, subjects, unsettled

    async def _refused(self, first: int, last: int) -> dict[tuple[str, str, int], list[tuple[str, str]]]:
        """Stripe's sample identifiers of refused events, by the bucket they were sent in."""
        out: dict[tuple[str, str, int], list[tuple[str, str]]] = defaultdict(list)
        for day in range(day_of(first * 3600), day_of(max(first, last - 1) * 3600) + 2):
            for raw in await self._outbox.run(_REFUSED, (key("refused", tag=str(day)),), ()):
                who, name, hour, identifier, code = raw.decode().split("\x1f")
                out[who, name, int(hour)].append((identifier, code))
        return out

    async def _stripe_hours(self, meter_id: str, customer: str, first: int, last: int) -> tuple[dict[int, int], int]:
        """Stripe's hourly totals of `customer` on meter `meter_id` in `[first, last)`; requests made."""
        if last <= first:
            return {}, 0
        summaries, requests = await self._stripe.event_summaries(meter_id, customer, first * 3600, last * 3600)
        hours: dict[int, int] = defaultdict(int)
        for summary in summaries:
            value = summary.get("aggregated_value") or 0
            hours[int(summary["start_time"]) // 3600] += round(float(value))
        return {h: v for h, v in hours.items() if v}, requests

    # -- fixing ----------------------------------------------------------------------------

    async def _fix(self, report: Report, subjects: dict[str, set[str]], now: float) -> None:
        for d in report.differences:
            try:
                await self._fix_one(d, subjects.get(d.customer, set()), now)
            except DownstreamError as exc:  # one bucket's failure is that bucket's
                d.action = f"failed: {type(exc).__name__}: {str(exc)[:200]}"
                log.warning("meter drift not corrected; the next run tries again", error=d.action, **_evidence(d))

    async def _fix_one(self, d: Difference, subjects: set[str], now: float) -> None:
        period_start = await self._period_start(subjects, int(now))
        open_period = (
            d.hour * 3600 >= period_start if period_start is not None else now - d.hour * 3600 < self._correct_within
        )
        if not open_period:
            d.action = "needs a credit note"
            log.warning("meter drift in a closed period: needs a credit note", **_evidence(d))
            self._corrected(d.meter, "credit_note")
            return
        if now - d.hour * 3600 > STRIPE_MAX_AGE - 3600:  # Stripe refuses a meter event this old
            d.action = "needs an invoice item"
            log.warning("meter drift older than Stripe's 35 days: needs an invoice item", **_evidence(d))
            self._corrected(d.meter, "invoice_item")
            return
        records = [c for c in (await self._corrections(d.customer)).values() if (c.meter, c.hour) == (d.meter, d.hour)]
        recent = [c for c in records if now - c.sent_at < self._settle + 3600]
        if recent:
            d.action, d.correction = "sent before", max(recent, key=lambda c: c.sent_at).identifier
            return
        identifier = _correction_id(d, len(records))
        wrong = _cancellable(records, d, now) if d.diff < 0 else None
        if wrong is not None:
            await self._stripe.cancel_meter_event(d.meter, wrong.identifier)
            await self._record(d.customer, wrong.identifier, msgspec.structs.replace(wrong, cancelled=True))
            await self._record(d.customer, identifier, Correction(d.meter, d.hour, d.billingd, d.stripe, -wrong.value,
                                                                  "cancel", int(now), wrong.identifier))  # fmt: skip
            d.action, d.correction = "cancelled", wrong.identifier
            self._corrected(d.meter, "cancel")
            log.warning("meter drift corrected: our correction cancelled", cancelled=wrong.identifier, **_evidence(d))
            return
        timestamp = d.hour * 3600 + 1800
        await self._stripe.correct_meter(d.meter, d.customer, d.diff, identifier, timestamp)
        kind = "event" if d.diff > 0 else "negative"
        await self._record(d.customer, identifier, Correction(d.meter, d.hour, d.billingd, d.stripe, d.diff, kind,
                                                              int(now), identifier))  # fmt: skip
        d.action, d.correction = "corrected", identifier
        self._corrected(d.meter, kind)
        log.warning("meter drift corrected", correction=identifier, value=d.diff, **_evidence(d))

    async def _period_start(self, subjects: Iterable[str], now: int) -> int | None:
        """The latest start of the subjects' current billing periods (None: billingd knows none)."""
        starts = []
        for subject in subjects:
            period = await self._periods.period(subject, now)
            if period is not None:
                starts.append(period[0])
        return max(starts) if starts else None

    async def _corrections(self, customer: str) -> dict[str, Correction]:
        reply = await self._outbox.run(_CORRECTIONS, (key("corrections", tag=customer),), ())
        return {reply[i].decode(): msgspec.json.decode(reply[i + 1], type=Correction) for i in range(0, len(reply), 2)}

    async def _record(self, customer: str, identifier: str, correction: Correction) -> None:
        args = (self._keep, identifier, msgspec.json.encode(correction))
        await self._outbox.run(_RECORD, (key("corrections", tag=customer),), args)

    def _count(self, report: Report) -> None:
        if self._metrics is None:
            return
        for name, drift in report.drift().items():
            self._metrics.meter_drift.labels(name).set(drift)

    def _corrected(self, meter: str, kind: str) -> None:
        if self._metrics is not None:
            self._metrics.meter_corrections.labels(meter, kind).inc()


def _correction_id(d: Difference, number: int) -> str:
    """The identifier of the `number`-th correction of `d`'s bucket (0 first): the same for the
    same bucket, number and values, so a fix repeated after a crash sends the same identifier."""
    text = f"{len(d.customer)}:{d.customer}|{len(d.meter)}:{d.meter}|{d.hour}|{number}|{d.billingd}|{d.stripe}"
    return "bdc-" + hashlib.sha256(text.encode()).hexdigest()[:60]


def _cancellable(records: Iterable[Correction], d: Difference, now: float) -> Correction | None:
    """billingd's own positive correction of this bucket, not cancelled yet, that alone makes
    Stripe hold too much, still within Stripe's 24 hours to cancel it."""
    for c in records:
        mine = c.kind == "event" and not c.cancelled and c.value == -d.diff
        if mine and now - c.sent_at < CANCEL_WINDOW - 600:
            return c
    return None


def _split(bucket: str) -> tuple[str, str, int]:
    """`(customer, meter, hour)` of a journal field `<customer>|<meter>|<hour>` (customer ids
    hold no `|`: Stripe's `cus_…`; meter names may)."""
    who, rest = bucket.split("|", 1)
    name, hour = rest.rsplit("|", 1)
    return who, name, int(hour)


def _evidence(d: Difference) -> dict[str, Any]:
    return {"customer": d.customer, "meter": d.meter, "hour": _iso(d.hour * 3600), "billingd": d.billingd,
            "stripe": d.stripe, "diff": d.diff, "refused": [i for i, _ in d.refused][:5]}  # fmt: skip


def _iso(seconds: int) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%Y-%m-%dT%H:%MZ")
