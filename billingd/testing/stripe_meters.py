"""What the Stripe double does with the meter events it accepted: summaries, cancellations, faults.

Kept to Stripe's contract (API reference "Billing meter event summaries", "Meter event
adjustments", "Record usage with the API"):

* `GET /v1/billing/meters/{id}/event_summaries` — `customer`, `start_time` and `end_time` are
  required and minute-aligned (hour-aligned with `value_grouping_window = hour`, day-aligned with
  `day`); one summary per window with events (`aggregated_value` the sum of their values, negative
  corrections included), 100 a page (`limit`, `starting_after`); an event counts once it is
  `visibility_lag` seconds old ("an eventually consistent view");
* `POST /v1/billing/meter_event_adjustments` — `type = cancel` with `cancel[identifier]`: the
  event stops counting; only within 24 hours of Stripe receiving it (400 otherwise), and only an
  event of that `event_name`;
* fault modes for the meter event stream: `refuse_rate` of accepted events are refused later (an
  error report with a few sample identifiers, as Stripe sends), `drop_rate` silently dropped;
  `foreign(...)` records an event of "another producer" on the same account.
"""

from __future__ import annotations

import random
import time
from typing import Any

#: How long after receiving an event Stripe accepts its cancellation (seconds).
CANCEL_WINDOW = 24 * 3600


class MeterBook:
    """The double's meter events and what it does with them (see module docstring). `events` is
    the double's own list (`StripeDouble.meter_events`)."""

    def __init__(self, events: list[dict[str, Any]], seed: int = 0) -> None:
        self.events = events
        self.rng = random.Random(seed)
        self.refuse_rate = 0.0
        self.drop_rate = 0.0
        self.visibility_lag = 0.0
        self.refused_later: list[dict[str, Any]] = []
        """Events accepted by a stream request and refused afterwards (reported with samples only)."""
        self.dropped: list[dict[str, Any]] = []
        """Events accepted and silently never recorded."""
        self.foreign_events: list[dict[str, Any]] = []
        """Events of another producer on the same meters."""
        self.cancelled: dict[str, float] = {}
        """identifier → when its cancellation was accepted."""

    def fault(self) -> str | None:
        """What becomes of the next streamed event: `refuse`, `drop` or None (recorded)."""
        draw = self.rng.random()
        if draw < self.refuse_rate:
            return "refuse"
        if draw < self.refuse_rate + self.drop_rate:
            return "drop"
        return None

    def foreign(self, event_name: str, customer: str, value: int, timestamp: int) -> dict[str, Any]:
        """Record an event of another producer (not billingd) on `event_name`."""
        event = {
            "object": "billing.meter_event",
            "event_name": event_name,
            "identifier": f"other-{len(self.foreign_events)}-{self.rng.randrange(10**9)}",
            "payload": {"stripe_customer_id": customer, "value": str(value)},
            "timestamp": timestamp,
            "created": time.time(),
            "livemode": False,
        }
        self.foreign_events.append(event)
        self.events.append(event)
        return event

    def summaries(self, meter: dict[str, Any], query: dict[str, str]) -> tuple[int, dict[str, Any]]:
        """`(status, body)` of `GET /v1/billing/meters/{id}/event_summaries`."""
        try:
            customer = query["customer"]
            start, end = int(query["start_time"]), int(query["end_time"])
            limit = int(query.get("limit", "10"))
        except (KeyError, ValueError):
            return 400, _error("Missing or invalid required param: customer, start_time, end_time")
        window = query.get("value_grouping_window", "")
        size = {"hour": 3600, "day": 86400, "": 60}.get(window)
        if size is None:
            return 400, _error(f"Invalid value_grouping_window: {window}")
        if start % size or end % size or end <= start:
            return 400, _error(f"start_time and end_time must be aligned to the {window or 'minute'} and ordered")
        if not 1 <= limit <= 100:
            return 400, _error("limit must be between 1 and 100")
        size = size if window else end - start
        visible_before = time.time() - self.visibility_lag
        sums: dict[int, float] = {}
        for event in self.events:
            if event.get("event_name") != meter["event_name"] or event["identifier"] in self.cancelled:
                continue
            if (event.get("payload") or {}).get("stripe_customer_id") != customer:
                continue
            if event.get("created", 0) > visible_before or not start <= event["timestamp"] < end:
                continue
            bucket = start + (event["timestamp"] - start) // size * size
            sums[bucket] = sums.get(bucket, 0.0) + float(event["payload"]["value"])
        data = [
            {
                "id": f"mtrusum_{meter['id']}_{customer}_{bucket}",
                "object": "billing.meter_event_summary",
                "aggregated_value": value,
                "start_time": bucket,
                "end_time": bucket + size,
                "livemode": False,
                "meter": meter["id"],
            }
            for bucket, value in sorted(sums.items())
        ]
        after = query.get("starting_after")
        if after:
            ids = [d["id"] for d in data]
            data = data[ids.index(after) + 1 :] if after in ids else []
        url = f"/v1/billing/meters/{meter['id']}/event_summaries"
        return 200, {"object": "list", "url": url, "has_more": len(data) > limit, "data": data[:limit]}

    def cancel(self, form: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """`(status, body)` of `POST /v1/billing/meter_event_adjustments`."""
        identifier = (form.get("cancel") or {}).get("identifier")
        if form.get("type") != "cancel" or not identifier or not form.get("event_name"):
            return 400, _error("type must be cancel, with cancel[identifier] and event_name")
        event = next(
            (e for e in self.events if e["identifier"] == identifier and e["event_name"] == form["event_name"]), None
        )
        if event is None:
            return 400, _error(f"No meter event with identifier {identifier} for {form['event_name']}")
        if time.time() - event.get("created", 0) > CANCEL_WINDOW:
            return 400, _error("Meter events can only be cancelled within 24 hours of Stripe receiving them")
        self.cancelled[identifier] = time.time()
        body = {
            "object": "billing.meter_event_adjustment",
            "event_name": form["event_name"],
            "livemode": False,
            "status": "pending",
            "type": "cancel",
            "cancel": {"identifier": identifier},
        }
        return 200, body


def _error(message: str) -> dict[str, Any]:
    return {"error": {"type": "invalid_request_error", "message": message}}
