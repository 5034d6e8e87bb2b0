"""Which usage is reported to Stripe: `[stripe].meters` and `value_scale`, matched without case.

The matching rule is **case-insensitive** (Unicode casefold): seed 004 sends `AI_CREDITS` where
the config says `ai_credits`, and a Stripe meter is one product whatever the producer's casing.
Two keys equal but for case are a config error (`billingd check`).

An event type with no meter is *unmetered*: counted in Redis (usage counters) but never billed by
Stripe. That is made visible — `billingd_usage_unmetered_total{source,event_type}` and one warning
per type — and configurable per source: `unmapped = "count"` (default) or `"dead_letter"`.

`value_scale` changes what Stripe bills: `{ ai_credits = 10 }` reports 2.5 credits as 25 units
of the meter, so the meter's price must be per tenth of a credit.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import structlog

log = structlog.get_logger("billingd.usage")

#: Most distinct `event_type` label values per source; more are counted under `other` (a
#: producer inventing types must not explode the metric's cardinality).
MAX_LABELS = 50
#: Longest `event_type` label value.
MAX_LABEL_LENGTH = 64


class MeterMap:
    """Meters and value scales of one `usage` source (see module docstring).

    Args:
        meters: event type → Stripe meter `event_name` (`[stripe].meters`).
        scales: event type → factor (`handler_options.value_scale`).
        unmetered: a counter with its `source` label bound (`SourceCounter`), or None.
    """

    def __init__(self, meters: Mapping[str, str], scales: Mapping[str, int], unmetered: Any = None) -> None:
        self._meters = {name.casefold(): event for name, event in meters.items()}
        self._scales = {name.casefold(): factor for name, factor in scales.items()}
        self._unmetered = unmetered
        self._warned: set[str] = set()

    def __bool__(self) -> bool:
        return bool(self._meters)

    def meter(self, event_type: str) -> str | None:
        """The Stripe meter for `event_type`, or None (unmetered)."""
        return self._meters.get(event_type.casefold())

    def scale(self, event_type: str) -> int:
        """The factor applied before reporting `event_type` (1 when none is set)."""
        return self._scales.get(event_type.casefold(), 1)

    def unmetered(self, event_type: str) -> None:
        """Count (and warn once about) an event of a type without a meter."""
        label = event_type.casefold()[:MAX_LABEL_LENGTH]
        if label not in self._warned:
            if len(self._warned) >= MAX_LABELS:
                label = "other"
            else:
                self._warned.add(label)
                log.warning(
                    "usage of an event type without a Stripe meter: counted in Redis, not billed",
                    event_type=label,
                    meters=sorted(self._meters),
                )
        if self._unmetered is not None:
            self._unmetered.labels(label).inc()

    def describe(self) -> list[str]:
        """Lines for `billingd check`: each meter with its scale."""
        return [
            f"{name} → {event}" + (f" ×{self._scales[name]}" if self._scales.get(name, 1) != 1 else "")
            for name, event in sorted(self._meters.items())
        ]
