"""Stripe through stripe-python's async client, every call behind the `stripe` guard.

Failures are classified once, here (DESIGN §2, §9):

* transient (`DownstreamUnavailable`, retried through the breaker): no answer (network,
  timeout), 5xx, 409 (an idempotency key in use by a concurrent request);
* configuration (`DownstreamUnavailable` that is never an attempt, its detail naming the fix): a
  401/403 (a revoked or mistyped key is an outage of our access to Stripe, not a property of the
  message: dead-lettering every message would empty the queue into the DLQ), a 404 that is not
  Stripe's `resource_missing` ("Unrecognized request URL": `api_base` or `meter_events_base`
  points at something that does not serve Stripe's API), and a meter event for a meter that is
  not active (`billingd.clients.stripe_meters`);
* back-pressure (`Throttled`): a 429. Stripe decides it before its idempotency layer
  (docs.stripe.com/error-low-level), so nothing happened; the message is retried after a delay
  (short when `Stripe-Should-Retry` is absent or `true`, longer when `false`), never counted as an
  attempt, never a breaker failure;
* a proven duplicate (`MeterEventExists`): a 400 "An event already exists with identifier X."
  (v1 meter events) says Stripe holds that event: the caller acks;
* permanent (`DownstreamRejected`, dead-lettered with Stripe's message): any other 4xx.

Every write carries an `Idempotency-Key` (Stripe keeps them 24 hours), so a retry after a lost
reply never applies twice. The SDK's own retries are off: the breaker must see failures.

Rate limits (docs.stripe.com/rate-limits) are kept, not discovered: every request first takes a
slot of the account's shared budget (`[stripe] max_requests_per_second`, `SharedLimits.reserve`,
one budget for all replicas), waiting for it up to `max_wait`; the time spent waiting is
`billingd_stripe_throttled_seconds_total{budget}`. Meter events go through the v2 meter event
stream (`billingd.clients.stripe_stream`) or, with `meter_api = "v1"`, one call each, at most one
in flight per (customer, meter) — in this process (`KeyedLocks`) and across replicas (a Redis
lease) — because Stripe allows one concurrent v1 call per customer and meter.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import anyio
import stripe
import structlog

from billingd.clients.errors import CALL_TARGET, DownstreamRejected, DownstreamUnavailable, Guard, Throttled
from billingd.clients.keyed import KeyedLocks
from billingd.clients.stripe_ids import idempotency_key
from billingd.clients.stripe_meters import MeterCatalogue, MeterMissing
from billingd.clients.stripe_stream import (
    MeterSession,
    MeterStream,
    SessionExpired,
    StreamRejected,
    is_session_expired,
)
from billingd.config.model import StripeSettings
from billingd.telemetry.tracing import child_span

if TYPE_CHECKING:
    from billingd.clients.ledger.limits import SharedLimits
    from billingd.telemetry import Metrics

log = structlog.get_logger("billingd.stripe")

#: Delay (seconds) before a message throttled by a 429 is tried again; `Stripe-Should-Retry: false`.
RETRY_429 = 1.0
RETRY_429_REFUSED = 10.0
_EXISTS = re.compile(r"^An event already exists with identifier (.+?)\.?$")


class MeterEventExists(DownstreamRejected):
    """Stripe already holds a meter event with `identifier` (a 400 that proves a duplicate)."""

    def __init__(self, identifier: str, detail: str) -> None:
        super().__init__("stripe", detail)
        self.identifier = identifier


def classify(exc: stripe.StripeError) -> DownstreamUnavailable | DownstreamRejected | Throttled:
    """The billingd error for a stripe-python error (see module docstring)."""
    status = exc.http_status
    message = exc.user_message or str(exc) or type(exc).__name__
    detail = f"{status or 'no answer'}: {message}"[:600]
    if status == 429:
        refused = (_header(exc.headers, "Stripe-Should-Retry") or "").lower() == "false"
        return Throttled("stripe", detail, RETRY_429_REFUSED if refused else RETRY_429)
    if status in (401, 403):
        fix = "[stripe].api_key is refused (revoked, mistyped, or without the permission): fix it and reload"
        return DownstreamUnavailable("stripe", f"{detail} — fix: {fix}", counts=False)
    if status == 404 and exc.code != "resource_missing":
        fix = "[stripe].api_base / meter_events_base do not serve Stripe's API here (a proxy or a mock?)"
        return DownstreamUnavailable("stripe", f"{detail} — fix: {fix}", counts=False)
    if status is None or status >= 500 or status == 409:
        return DownstreamUnavailable("stripe", detail)
    exists = _EXISTS.match(message) if status == 400 else None
    if exists is not None:
        return MeterEventExists(exists.group(1), detail)
    return DownstreamRejected("stripe", detail)


def _header(headers: Mapping[str, str] | None, name: str) -> str | None:
    wanted = name.lower()
    return next((str(v) for k, v in (headers or {}).items() if k.lower() == wanted), None)


class StripeGateway:
    """The Stripe calls billingd makes (meter events; invoices and customers for reconciliation).

    Args:
        settings: `[stripe]`.
        guard: the `stripe` breaker.
        limits: the shared budgets and leases in Redis; None runs without them (CLI tools).
        metrics: where `billingd_stripe_throttled_seconds_total` and
            `billingd_stripe_rate_limited_total` are counted (None: not counted).
    """

    def __init__(
        self,
        settings: StripeSettings,
        guard: Guard,
        limits: SharedLimits | None = None,
        metrics: Metrics | None = None,
        tracer: Any = None,
    ) -> None:
        self._tracer = tracer
        self.timeout = settings.timeout
        self.max_wait = settings.max_wait
        self.meter_api = settings.meter_api
        self._settings = settings
        self._guard = guard
        self._limits = limits
        self._account = hashlib.sha256(settings.api_key.encode()).hexdigest()[:16]  # one budget per key
        self._http = stripe.AIOHTTPClient(timeout=settings.timeout)
        self._client = stripe.StripeClient(
            settings.api_key or "sk_missing",
            base_addresses={"api": settings.api_base, "meter_events": settings.meter_events_url},
            http_client=self._http,
            max_network_retries=0,
        )
        self._throttled = metrics.stripe_throttled if metrics is not None else None
        self._rate_limited = metrics.stripe_rate_limited if metrics is not None else None
        self._in_flight = KeyedLocks("stripe")
        self.catalogue = MeterCatalogue(self._list_meters)
        self._warned: dict[str, float] = {}
        self.session = MeterSession(self._create_session)
        self.stream = MeterStream(
            self._post_stream,
            self.session,
            lambda: self._turn("meter_stream"),
            settings.meter_batch,
            settings.meter_linger,
        )

    # -- the budget --------------------------------------------------------------------------

    async def _turn(self, kind: str) -> None:
        """Wait for this request's slot of the shared budget of `kind` (see module docstring).

        Raises:
            Throttled: the slot is more than `max_wait` away.
            DownstreamUnavailable, CircuitOpen: Redis (which holds the budget) is unavailable.
        """
        if self._limits is None:
            return
        bucket, rate = self._settings.budget(kind)
        if rate <= 0:
            return
        wait = await self._limits.reserve(self._account, bucket, rate, self._settings.max_wait)
        if wait > 0:
            if self._throttled is not None:
                self._throttled.labels(bucket).inc(wait)
            await anyio.sleep(wait)

    def _count_429(self, exc: BaseException, api: str) -> None:
        if isinstance(exc, Throttled) and self._rate_limited is not None:
            self._rate_limited.labels(api).inc()

    # -- calls -------------------------------------------------------------------------------

    async def call(
        self, method: Any, params: dict[str, Any], idempotency_key: str | None = None, *, kind: str = "basic"
    ) -> Any:
        """`await method(params, options)` through the budget of `kind` and the guard, errors
        classified.

        Raises:
            DownstreamUnavailable: transient (see module docstring); CircuitOpen when not admitted.
            Throttled: a 429, or no budget slot within `max_wait`.
            DownstreamRejected: a permanent refusal (`MeterEventExists` for a known identifier).
        """
        options: dict[str, Any] = {"idempotency_key": idempotency_key} if idempotency_key else {}
        with child_span(self._tracer, f"stripe {kind}", {"server.address": "stripe", "billingd.budget": kind}):
            await self._turn(kind)
            try:
                return await self._guard.call(self._request, method, params, options)
            except Throttled as exc:
                self._count_429(exc, kind)
                raise

    @staticmethod
    async def _request(method: Any, params: dict[str, Any], options: dict[str, Any]) -> Any:
        try:
            return await method(params, options)
        except stripe.StripeError as exc:
            raise classify(exc) from exc

    @staticmethod
    async def _request_on(method: Any, target: str, params: dict[str, Any], options: dict[str, Any]) -> Any:
        try:
            return await method(target, params, options)
        except stripe.StripeError as exc:
            raise classify(exc) from exc

    async def _on(
        self, method: Any, target: str, params: dict[str, Any], idempotency_key: str | None
    ) -> dict[str, Any]:
        options: dict[str, Any] = {"idempotency_key": idempotency_key} if idempotency_key else {}
        with child_span(self._tracer, "stripe basic", {"server.address": "stripe", "billingd.budget": "basic"}):
            await self._turn("basic")
            try:
                result = await self._guard.call(self._request_on, method, target, params, options)
            except Throttled as exc:
                self._count_429(exc, "basic")
                raise
        body: dict[str, Any] = result.to_dict()
        return body

    async def retrieve(self, resource: str, object_id: str) -> dict[str, Any]:
        """GET one object: `resource` is `customers`, `products`, `invoices` or `subscriptions`.

        Raises:
            DownstreamUnavailable, DownstreamRejected, Throttled: see `classify` (a missing object
                is a 404: rejected).
        """
        return await self._on(getattr(self._client.v1, resource).retrieve_async, object_id, {}, None)

    async def retrieve_v2_event(self, event_id: str) -> dict[str, Any]:
        """GET a v2 event (`/v2/core/events/{id}`), e.g. the data of a thin event notification."""
        return await self._on(self._client.v2.core.events.retrieve_async, event_id, {}, None)

    async def pay_invoice_out_of_band(self, invoice_id: str, idempotency_key: str) -> dict[str, Any]:
        """Mark an invoice paid outside Stripe (`POST /v1/invoices/{id}/pay`, `paid_out_of_band`)."""
        method = self._client.v1.invoices.pay_async
        return await self._on(method, invoice_id, {"paid_out_of_band": True}, idempotency_key)

    async def update_invoice_metadata(
        self, invoice_id: str, metadata: dict[str, str], idempotency_key: str
    ) -> dict[str, Any]:
        """Merge `metadata` into an invoice's metadata."""
        method = self._client.v1.invoices.update_async
        return await self._on(method, invoice_id, {"metadata": metadata}, idempotency_key)

    # -- reconciliation ----------------------------------------------------------------------

    async def event_summaries(
        self, meter_id: str, customer: str, start: int, end: int
    ) -> tuple[list[dict[str, Any]], int]:
        """Stripe's hourly totals of meter `meter_id` for `customer` over `[start, end)` (Unix
        seconds, whole hours): `GET /v1/billing/meters/{id}/event_summaries` with
        `value_grouping_window = hour`, every page of 100; returns them and the requests made.

        Raises: as `call`."""
        summaries: list[dict[str, Any]] = []
        params: dict[str, Any] = {"customer": customer, "start_time": start, "end_time": end,
                                  "value_grouping_window": "hour", "limit": 100}  # fmt: skip
        method = self._client.v1.billing.meters.event_summaries.list_async
        requests = 0
        while True:
            page = await self._on(method, meter_id, params, None)
            requests += 1
            data = page.get("data") or []
            summaries += data
            if not page.get("has_more") or not data:
                return summaries, requests
            params = {**params, "starting_after": data[-1]["id"]}

    async def correct_meter(self, event_name: str, customer: str, value: int, identifier: str, timestamp: int) -> None:
        """Send one corrective meter event (`value` may be negative) through `POST
        /v1/billing/meter_events`; Stripe already holding `identifier` counts as sent.

        Raises: as `call`."""
        params = {"event_name": event_name, "identifier": identifier, "timestamp": timestamp,
                  "payload": {"stripe_customer_id": customer, "value": str(value)}}  # fmt: skip
        method = self._client.v1.billing.meter_events.create_async
        try:
            await self.call(method, params, idempotency_key("correct", identifier), kind="meter_events")
        except MeterEventExists as exc:
            if exc.identifier != identifier:
                raise

    async def cancel_meter_event(self, event_name: str, identifier: str) -> None:
        """Cancel a meter event Stripe received within the last 24 hours (`POST
        /v1/billing/meter_event_adjustments`, `type = cancel`).

        Raises: as `call`."""
        params = {"event_name": event_name, "type": "cancel", "cancel": {"identifier": identifier}}
        method = self._client.v1.billing.meter_event_adjustments.create_async
        await self.call(method, params, idempotency_key("cancel", identifier))

    # -- meters ------------------------------------------------------------------------------

    async def _list_meters(self) -> list[dict[str, Any]]:
        """Every meter of the account (`GET /v1/billing/meters`, 100 a page)."""
        meters: list[dict[str, Any]] = []
        params: dict[str, Any] = {"limit": 100}
        while True:
            page = await self.call(self._client.v1.billing.meters.list_async, params)
            data = [m.to_dict() for m in page.data]
            meters += data
            if not page.has_more or not data:
                return meters
            params = {"limit": 100, "starting_after": data[-1]["id"]}

    async def require_meter(self, event_name: str) -> None:
        """Return when Stripe has an active meter `event_name`.

        Raises:
            DownstreamUnavailable: it has none, or not active (never an attempt; counted by the
                `stripe` breaker; logged at most once a minute per name) — or the catalogue
                could not be read.
        """
        meter = await self.catalogue.meter(event_name)
        if meter is not None and meter.get("status") == "active":
            return
        await self._guard.call(self._no_meter, event_name, meter)

    async def _no_meter(self, event_name: str, meter: dict[str, Any] | None) -> None:
        state = "no meter" if meter is None else f"meter {meter.get('id')} is {meter.get('status')}"
        detail = (
            f"{state} for event_name {event_name!r} — fix: create or reactivate it in Stripe, or map the event "
            "type to an active meter in [stripe].meters (events wait, uncounted, until then)"
        )
        now = anyio.current_time()
        if now - self._warned.get(event_name, -60.0) >= 60:
            self._warned[event_name] = now
            log.error("Stripe meter missing: meter events held", event_name=event_name, detail=detail)
        raise MeterMissing(event_name, detail)

    # -- meter events ------------------------------------------------------------------------

    async def create_meter_event(
        self, *, event_name: str, customer: str, value: int, identifier: str, timestamp: int
    ) -> None:
        """Report `value` (a whole number, as Stripe requires) of meter `event_name` for `customer`
        at `timestamp` (Unix seconds), through the stream or v1 (`meter_api`). Returns once Stripe
        accepted it.

        `identifier` makes the event unique at Stripe (24 h at least); in v1 the
        `Idempotency-Key` is derived from it.

        Raises:
            MeterEventExists: (v1) Stripe already holds an event with an identifier.
            Throttled, DownstreamUnavailable, DownstreamRejected, CircuitOpen: see `call`.
        """
        await self.require_meter(event_name)
        payload = {"stripe_customer_id": customer, "value": str(value)}
        if self.meter_api == "stream":
            event = {"event_name": event_name, "identifier": identifier, "payload": payload}
            event["timestamp"] = _rfc3339(timestamp)
            with child_span(self._tracer, "stripe meter_event_stream", {"server.address": "stripe"}):
                await self.stream.send(event)  # the wait for the batch holding this event, and its request
            return
        params = {"event_name": event_name, "identifier": identifier, "timestamp": timestamp, "payload": payload}
        max_wait = self._settings.max_wait
        async with self._in_flight.hold((customer, event_name), max_wait):
            lease = f"meter-call:{event_name}"
            token = await self._limits.lease(customer, lease, self.timeout + 1, max_wait) if self._limits else None
            try:
                method = self._client.v1.billing.meter_events.create_async
                await self.call(method, params, f"billingd-meter-{identifier}", kind="meter_events")
            finally:
                if token is not None and self._limits is not None:
                    with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                        await self._limits.unlease(customer, lease, token)

    async def _create_session(self) -> Any:
        return await self.call(self._client.v2.billing.meter_event_session.create_async, {})

    async def _post_stream(self, events: list[dict[str, Any]], token: str) -> None:
        target = CALL_TARGET.set("meter_events")  # its own host: its outage is not the API's
        try:
            await self._guard.call(self._stream_request, events, token)
        except Throttled as exc:
            self._count_429(exc, "meter_stream")
            raise
        finally:
            CALL_TARGET.reset(target)

    async def _stream_request(self, events: list[dict[str, Any]], token: str) -> None:
        try:
            params: Any = {"events": events}  # each event is a MeterEventStreamCreateParamsEvent
            await self._client.v2.billing.meter_event_stream.create_async(params, {"api_key": token})
        except stripe.StripeError as exc:
            if is_session_expired(exc):
                raise SessionExpired(str(exc)) from exc
            error = classify(exc)
            if type(error) is DownstreamRejected:  # about these events (not a duplicate, not our access)
                raise StreamRejected(error.downstream, error.detail) from exc
            raise error from exc

    async def aclose(self) -> None:
        """Close the HTTP session."""
        await self._http.close_async()  # type: ignore[no-untyped-call]  # stripe leaves it unannotated


def _rfc3339(timestamp: int) -> str:
    """Unix seconds as the RFC 3339 UTC time the v2 API takes (`2026-12-01T21:06:05.000Z`)."""
    import datetime as dt

    return dt.datetime.fromtimestamp(timestamp, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")
