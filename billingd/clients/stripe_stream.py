"""Meter events through Stripe's v2 meter event stream, batched across workers.

Stripe's contract (docs.stripe.com/api/v2/billing-meter-stream; stripe-python ≥ 11): a *meter
event session* (`POST /v2/billing/meter_event_session`, basic API) gives an authentication token
valid for 15 minutes; `POST /v2/billing/meter_event_stream` on its own host
(`meter-events.stripe.com`) takes up to 100 events per request, authenticated with that token,
and answers `{}`: validation happens later, and what Stripe finds invalid is reported as
`v1.billing.meter.error_report_triggered` events (counted by `stripe_events`). An expired token is a
401 `temporary_session_expired` / `billing_meter_event_session_expired`
(`stripe.TemporarySessionExpiredError`).

`MeterStream.send(event)` is awaited by each worker. The first event of a batch makes its caller
the batch's *leader*: it waits until the batch holds `batch_max` events or `linger` has passed,
then sends it as one request; events sent meanwhile gather in the next batch, led by its own
first caller, so several requests are in flight at once and no background task exists. Each
caller returns only when the request holding its event was accepted (so its message is acked
only then), or raises that request's error: a failed request is the outcome of its own events
only. A leader cancelled before or during its request (a drain's abort) fails its followers with
a transient error: their messages are released or retried, never acked unsent; Stripe drops a
repeated `identifier` of an event it already took, so a re-send is harmless.

`MeterSession` creates the token on first use, renews it before `expires_at` (a quarter of its
lifetime early, at most a minute) and again on a 401, shared by every worker.
"""

from __future__ import annotations

import copy
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

import anyio
import stripe

from billingd.clients.errors import DownstreamRejected, DownstreamUnavailable

#: Most events Stripe takes in one stream request.
STREAM_MAX_EVENTS = 100


class StreamRejected(DownstreamRejected):
    """Stripe refused a stream request itself (a 4xx for its events), as opposed to refusing the
    session, or billingd's own budget refusing: only this says something about the events."""


class SessionExpired(Exception):
    """Stripe refused the session token as expired (renew it and send again)."""


class MeterSession:
    """The meter event session token, shared by every worker (see module docstring).

    Args:
        create: makes a session (`await create()` → the session object or a dict with
            `authentication_token` and `expires_at`, RFC 3339); errors as `StripeGateway.call`.
    """

    def __init__(self, create: Callable[[], Awaitable[Any]]) -> None:
        self._create = create
        self._token: str | None = None
        self._renew_at = 0.0
        self._lock = anyio.Lock()
        self.created = 0
        """Sessions created so far (for tests and logs)."""

    async def token(self) -> str:
        """A token valid for a while yet, creating a session when there is none or it is due."""
        if self._token is not None and anyio.current_time() < self._renew_at:
            return self._token
        async with self._lock:
            if self._token is not None and anyio.current_time() < self._renew_at:
                return self._token
            session = await self._create()
            token = str(session["authentication_token"])
            lifetime = _seconds_until(str(session["expires_at"]))
            self._token, self._renew_at = token, anyio.current_time() + lifetime - min(60.0, lifetime / 4)
            self.created += 1
            return token

    def expired(self, token: str) -> None:
        """Forget `token` (Stripe said it expired): the next `token()` makes a new session."""
        if self._token == token:
            self._token = None


class _Batch:
    __slots__ = ("done", "error", "events", "full")

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.full = anyio.Event()
        self.done = anyio.Event()
        self.error: BaseException | None = None


class MeterStream:
    """Batches meter events into stream requests (see module docstring).

    Args:
        post: sends one request: `await post(events, token)`; raises `SessionExpired` for an
            expired token, else as `StripeGateway.call` (classified, through the breaker).
        session: the shared token.
        before_request: awaited before each request (the shared request budget).
        batch_max: most events per request (≤ 100).
        linger: longest a batch waits for more events (seconds).
    """

    def __init__(
        self,
        post: Callable[[list[dict[str, Any]], str], Awaitable[None]],
        session: MeterSession,
        before_request: Callable[[], Awaitable[None]],
        batch_max: int = STREAM_MAX_EVENTS,
        linger: float = 0.02,
    ) -> None:
        self._post = post
        self._session = session
        self._before = before_request
        self._max = min(batch_max, STREAM_MAX_EVENTS)
        self._linger = linger
        self._open: _Batch | None = None
        self.requests = 0
        """Stream requests sent so far."""

    async def send(self, event: dict[str, Any]) -> None:
        """Send one event (`event_name`, `identifier`, `timestamp`, `payload`) in the next batch;
        return once the request holding it was accepted.

        Raises:
            DownstreamUnavailable, DownstreamRejected, Throttled, CircuitOpen: the request's error.
        """
        batch = self._open
        leader = batch is None
        if batch is None:
            batch = self._open = _Batch()
        batch.events.append(event)
        if len(batch.events) >= self._max:
            self._open = None
            batch.full.set()
        if leader:
            await self._lead(batch)
        else:
            await batch.done.wait()
        if batch.error is not None:
            if leader:
                raise batch.error
            raise _own_copy(batch.error)  # one object raised by every follower grows one traceback without end

    async def _lead(self, batch: _Batch) -> None:
        try:
            with anyio.move_on_after(self._linger):
                await batch.full.wait()
            if self._open is batch:
                self._open = None
            await self._request(batch.events)
        except Exception as exc:  # noqa: BLE001 — the request's error, handed to each of its callers
            batch.error = exc
        except BaseException:
            batch.error = DownstreamUnavailable("stripe", "the task sending this meter event batch was cancelled")
            if self._open is batch:
                self._open = None
            raise
        finally:
            batch.done.set()

    async def post(self, events: list[dict[str, Any]]) -> None:
        """Send `events` (at most 100) as one stream request now — the meter outbox's own batches —
        within the budget, with the session token (renewed once when it expired).

        Raises: as `send`."""
        await self._request(events)

    async def _request(self, events: list[dict[str, Any]]) -> None:
        await self._before()
        token = await self._session.token()
        self.requests += 1
        try:
            await self._post(events, token)
        except SessionExpired:
            self._session.expired(token)
            try:
                await self._post(events, await self._session.token())
            except SessionExpired as again:
                raise DownstreamUnavailable(
                    "stripe", f"the meter event session expired again right after it was renewed: {again}"
                ) from None


def _own_copy(error: BaseException) -> BaseException:
    """A copy of a batch's error for one of its followers to raise (see `DownstreamError.__copy__`);
    an error that cannot be copied is reported as a transient failure of the batch."""
    try:
        clone = copy.copy(error)
    except Exception:  # noqa: BLE001 — any error that will not copy becomes the batch's failure
        clone = None
    if clone is None or clone is error:
        return DownstreamUnavailable("stripe", f"meter event batch failed: {type(error).__name__}: {error}"[:500])
    clone.__cause__, clone.__context__, clone.__traceback__ = error.__cause__, None, None
    return clone


def _seconds_until(stamp: str) -> float:
    """Seconds from now until RFC 3339 time `stamp` (at least 1)."""
    when = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    return max(1.0, when.timestamp() - datetime.now(when.tzinfo).timestamp())


def is_session_expired(exc: stripe.StripeError) -> bool:
    """Whether `exc` is Stripe saying the meter event session token expired."""
    return isinstance(exc, stripe.TemporarySessionExpiredError) or exc.code == "billing_meter_event_session_expired"
