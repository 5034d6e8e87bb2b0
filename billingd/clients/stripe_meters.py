"""Which Stripe meters exist and are active, known before a meter event is sent (DESIGN §10).

The v2 meter event stream accepts anything and validates later: an event for a meter that does
not exist (`no_meter`) or was deactivated (`archived_meter`) is refused after billingd acked its
message — counted, never billed. That is a configuration fault, not the message's: so the
gateway asks `GET /v1/billing/meters` (every page) before sending, keeps the answer for
`REFRESH` seconds, asks again for a name it does not know (at most every `RECHECK` seconds), and
asks again likewise for a meter it knows as inactive, and refuses to send for a name that is not an
active meter (`DownstreamUnavailable`, never an
attempt: the message waits, uncounted, until the meter exists or the config is fixed).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import anyio

from billingd.clients.errors import DownstreamUnavailable

#: Stripe's meter event rules ("Record usage with the API"): timestamps within the past 35 days
#: and at most 5 minutes ahead (seconds).
STRIPE_MAX_AGE = 35 * 86400
STRIPE_MAX_AHEAD = 300

#: Seconds a catalogue is used before it is read again; and the least time between two reads
#: caused by a name the catalogue does not know.
REFRESH = 300.0
RECHECK = 10.0


class MeterMissing(DownstreamUnavailable):
    """Stripe has no active meter of this `event_name`: its events wait (never an attempt)."""

    def __init__(self, event_name: str, detail: str) -> None:
        super().__init__("stripe", detail, counts=False)
        self.event_name = event_name


class MeterCatalogue:
    """`event_name → status` of the account's meters (see module docstring).

    Args:
        fetch: returns every meter object (`{"event_name", "status", "id", …}`); raises as
            `StripeGateway.call`.
    """

    def __init__(self, fetch: Callable[[], Awaitable[list[dict[str, Any]]]]) -> None:
        self._fetch = fetch
        self._meters: dict[str, dict[str, Any]] = {}
        self._read_at: float | None = None
        self._lock = anyio.Lock()

    async def meter(self, event_name: str) -> dict[str, Any] | None:
        """The meter with `event_name` (None when Stripe has none), from a catalogue fresh enough.

        Raises: as `fetch` (the catalogue could not be read)."""
        now = anyio.current_time()
        stale = self._read_at is None or now - self._read_at >= REFRESH
        known = self._meters.get(event_name)
        inactive = known is None or known.get("status") != "active"
        unknown = inactive and (self._read_at is None or now - self._read_at >= RECHECK)
        if stale or unknown:
            async with self._lock:
                if self._read_at is None or anyio.current_time() - self._read_at >= RECHECK:
                    meters = await self._fetch()
                    self._meters = {str(m.get("event_name")): m for m in meters}
                    self._read_at = anyio.current_time()
        return self._meters.get(event_name)

    def forget(self) -> None:
        """Read the catalogue again before the next event (Stripe reported a missing or archived meter)."""
        self._read_at = None

    async def all(self) -> list[dict[str, Any]]:
        """Every meter, read now."""
        meters = await self._fetch()
        self._meters, self._read_at = {str(m.get("event_name")): m for m in meters}, anyio.current_time()
        return meters
