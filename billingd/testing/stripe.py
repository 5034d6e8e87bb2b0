"""A Stripe API double: the endpoints billingd calls, form-encoded like Stripe, idempotent like
Stripe, as slow and as limited as Stripe (`StripeContract`).

Behaviour copied from Stripe's documentation (and, where the docs are silent, from what Stripe is
observed to answer):

* requests are `application/x-www-form-urlencoded` with bracketed keys (`payload[value]=25`),
  authenticated with `Authorization: Bearer sk_…` (401 otherwise);
* `Idempotency-Key`: a repeat with the same parameters replays the first answer and changes
  nothing; the same key with other parameters is a 400 `idempotency_error`;
* v1 meter events: `identifier` is unique — a second event with it is a 400
  `invalid_request_error` "An event already exists with identifier <id>." with
  `Stripe-Should-Retry: false` and no `code`; `payload[value]` must be a whole number (400
  otherwise); at most one call in flight per (customer, meter) — a concurrent one is a 429;
* rate limits (docs.stripe.com/rate-limits), token buckets: requests over a limit are
  answered 429 `rate_limit` (`Stripe-Should-Retry: true`) before the idempotency layer; the
  basic API and v1 meter events have separate limits, or one shared (a sandbox);
* the v2 meter event stream: `POST /v2/billing/meter_event_session` gives a token that expires
  after `session_ttl`; `POST /v2/billing/meter_event_stream` (JSON, at most 100 events, the
  token as bearer; an expired one is a 401 `temporary_session_expired` /
  `billing_meter_event_session_expired`) answers `{}` and validates afterwards: invalid events
  (unknown customer, a value that is not whole or has more than 15 significant digits, a
  timestamp outside [now − 35 days, now + 5 min], an unknown meter) are never recorded and are
  reported by `error_report_event()` as a `v1.billing.meter.error_report_triggered` v2 event; a
  repeated identifier is dropped silently;
* every request waits `latency` seconds (Stripe answers in 100–300 ms);
* meter event summaries, cancellations, and the stream's fault modes (refused later with sample
  identifiers, dropped, another producer's events): `billingd.testing.stripe_meters`;
* objects (`products`, `customers`, `invoices`) are retrieved by id (404 `resource_missing`
  otherwise); `POST /v1/invoices/{id}/pay` with `paid_out_of_band=true` pays an open invoice
  (setting `status_transitions.paid_at`) and refuses one already paid (400 "Invoice is already
  paid"); `POST /v1/invoices/{id}` merges `metadata`; `lose_pay_replies` pays and then answers 500;
* an `Idempotency-Key` longer than 255 characters is a 400;
* errors use Stripe's envelope `{"error": {"type": …, "message": …}}`.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import json
import time
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import parse_qsl

from aiohttp import web

from billingd.testing.server import Double, Recorded
from billingd.testing.stripe_meters import MeterBook

#: The meters a new double's account has: those of billingd.toml and the tests.
DEFAULT_METERS = ("ai_credits", "whatsapp_messages", "email_sends", "ai_tutor_uses")


def unflatten(pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """Stripe's form encoding (`a[b][c]=1`, `a[0]=x`) back to nested dicts."""
    result: dict[str, Any] = {}
    for name, value in pairs:
        parts = name.replace("]", "").split("[")
        node = result
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return result


@dataclass
class StripeContract:
    """How slow and how limited the double is. The defaults are an instant, limitless Stripe;
    `StripeContract.live()` is Stripe's documented live-mode contract at 150 ms a request.

    Rates are requests per second (None: no limit); `meter_rate_limit` None with `rate_limit` set
    means v1 meter events count against the basic limit, as in a sandbox."""

    latency: float = 0.0
    rate_limit: float | None = None
    meter_rate_limit: float | None = None
    stream_rate_limit: float | None = None
    per_customer_concurrency: bool = False
    session_ttl: float = 900.0

    @classmethod
    def live(cls, latency: float = 0.15) -> StripeContract:
        """Live mode: 100/s basic, 1,000/s v1 meter events, 10,000/s stream, one v1 call per customer and meter."""
        return cls(latency, 100, 1000, 10000, True)


class _Window:
    """One rate limit as a token bucket (Stripe's rate limiters are token buckets: "Scaling your
    API with rate limiters", Stripe's engineering blog): `limit` tokens a second, holding at most
    `max(2, limit / 10)` — a tenth of a second of burst, which Stripe does not document; the
    double assumes little."""

    def __init__(self, limit: float) -> None:
        self.limit = limit
        self.capacity = max(2.0, limit / 10)
        self.tokens = self.capacity
        self.at = time.monotonic()

    def admit(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.at) * self.limit)
        self.at = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


class StripeDouble(Double):
    """See module docstring. `meter_events` are the events Stripe would have recorded.

    `contract` sets latency and limits (and may be replaced between tests); `known_customers`,
    when not None, is the set of customer ids the stream's validation accepts; `meter_catalogue`
    holds the account's meters by event name (`add_meter`; by default the active meters of
    `DEFAULT_METERS`), listed by `GET /v1/billing/meters`: an event for an unknown or inactive
    meter is refused later (`no_meter`, `archived_meter`)."""

    def __init__(self, contract: StripeContract | None = None, meters: tuple[str, ...] | None = None) -> None:
        super().__init__()
        self.contract = contract or StripeContract()
        self.meter_catalogue: dict[str, dict[str, Any]] = {}
        for name in DEFAULT_METERS if meters is None else meters:
            self.add_meter(name)
        self.meter_events: list[dict[str, Any]] = []
        self.book = MeterBook(self.meter_events)
        """Summaries, cancellations and the stream's fault modes (`billingd.testing.stripe_meters`)."""
        self.objects: dict[str, dict[str, dict[str, Any]]] = {"products": {}, "customers": {}, "invoices": {}}
        self.payments: list[str] = []
        """Invoice ids paid out of band, one entry per payment Stripe actually made."""
        self.known_customers: set[str] | None = None
        self.rate_limited = 0
        """Requests answered 429."""
        self.stream_requests: list[int] = []
        """The number of events of each accepted stream request."""
        self.sessions = 0
        self._idempotent: dict[str, tuple[dict[str, Any], int, bytes]] = {}
        self._identifiers: set[str] = set()
        self._windows: dict[str, _Window] = {}
        self._in_flight: set[tuple[str, str]] = set()
        self._tokens: dict[str, float] = {}
        self._token_ids = itertools.count(1)
        self._errors: list[tuple[str, str, str]] = []  # (code, message, identifier) not yet reported
        self.events: dict[str, dict[str, Any]] = {}
        """v2 events by id (`GET /v2/core/events/{id}`)."""
        self.unserved: tuple[str, ...] = ()
        """Path prefixes answered 404 "Unrecognized request URL", as Stripe answers a path it does
        not serve (a proxy or a mock without the v2 meter event stream, say)."""
        self.lose_pay_replies = 0
        """The next this many `POST /v1/invoices/{id}/pay` calls pay the invoice and keep their
        answer under the idempotency key, but the reply is lost on its way back (the client sees
        a 500)."""
        self.stream_failures: list[int] = []
        """Statuses the next stream requests are answered with (before anything is recorded)."""
        self.pay_429s = 0
        """The next this many pay calls are answered 429 (before the idempotency layer: nothing happens)."""
        self.saved_500s = 0
        """The next this many pay calls pay the invoice, then answer 500 and save that 500 under
        their idempotency key (Stripe: a call whose endpoint began executing and failed)."""

    def stripe_settings(self, **overrides: Any) -> dict[str, Any]:
        """A `[stripe]` section pointing at this double (a test key, a 2 s timeout), with `overrides`."""
        return {"api_key": "sk_test_billingd", "api_base": self.url, "timeout": "2s", **overrides}

    def add_meter(self, event_name: str, status: str = "active", formula: str = "sum") -> dict[str, Any]:
        """Create (or replace) the meter of `event_name`, as `POST /v1/billing/meters` would."""
        now = int(time.time())
        meter = {
            "id": f"mtr_{len(self.meter_catalogue) + 1:06d}{event_name[:8]}",
            "object": "billing.meter",
            "created": now,
            "updated": now,
            "livemode": False,
            "display_name": event_name,
            "event_name": event_name,
            "event_time_window": None,
            "status": status,
            "status_transitions": {"deactivated_at": None if status == "active" else now},
            "customer_mapping": {"event_payload_key": "stripe_customer_id", "type": "by_id"},
            "default_aggregation": {"formula": formula},
            "value_settings": {"event_payload_key": "value"},
        }
        self.meter_catalogue[event_name] = meter
        return meter

    def expire_tokens(self) -> None:
        """Expire every meter event session token now (as if their 15 minutes had passed)."""
        for token in self._tokens:
            self._tokens[token] = 0.0

    def max_per_second(self, paths: tuple[str, ...] | None = None) -> int:
        """The most requests (to `paths`, else any) that arrived within one second of each other."""
        times = sorted(r.at for r in self.requests if paths is None or r.path in paths)
        most, first = 0, 0
        for last, at in enumerate(times):
            while at - times[first] >= 1.0:
                first += 1
            most = max(most, last - first + 1)
        return most

    def recorded(self) -> dict[str, int]:
        """How many times each identifier was recorded (preloaded ones included)."""
        counts: dict[str, int] = {}
        for event in self.meter_events:
            counts[event["identifier"]] = counts.get(event["identifier"], 0) + 1
        return counts

    def preload(self, events: list[dict[str, Any]]) -> None:
        """Meter events Stripe already holds (recorded by someone else: no idempotency key of ours)."""
        for event in events:
            self._identifiers.add(event["identifier"])
            self.meter_events.append({"object": "billing.meter_event", "preloaded": True, **event})

    def error_response(self, status: int) -> web.Response:
        kind = "rate_limit_error" if status == 429 else "api_error"
        return web.json_response({"error": {"type": kind, "message": f"double failing with {status}"}}, status=status)

    def add(self, resource: str, obj: dict[str, Any]) -> dict[str, Any]:
        """Create an object (`resource` = products, customers or invoices); returns it."""
        kind = {"products": "product", "customers": "customer", "invoices": "invoice"}[resource]
        self.objects[resource][obj["id"]] = {"object": kind, "metadata": {}, **obj}
        return self.objects[resource][obj["id"]]

    def invoice(self, invoice_id: str, amount: int, currency: str = "inr", **fields: Any) -> dict[str, Any]:
        """Create an open invoice of `amount` minor units."""
        return self.add(
            "invoices",
            {
                "id": invoice_id,
                "status": "open",
                "amount_due": amount,
                "amount_paid": 0,
                "amount_remaining": amount,
                "currency": currency,
                **fields,
            },
        )

    @web.middleware
    async def _unserved(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if self.unserved and request.path.startswith(self.unserved):
            self.requests.append(Recorded(request.method, request.path, dict(request.headers), b"", status=404))
            return _error(
                404,
                "invalid_request_error",
                f"Unrecognized request URL ({request.method}: {request.path}). Please see https://stripe.com/docs "
                "or we can help at https://support.stripe.com/.",
            )
        response: web.StreamResponse = await handler(request)
        return response

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._unserved])
        app.router.add_post("/v1/billing/meter_events", self._meter_event)
        app.router.add_post("/v2/billing/meter_event_session", self._session)
        app.router.add_post("/v2/billing/meter_event_stream", self._stream)
        app.router.add_get("/v2/core/events/{id}", self._v2_event)
        app.router.add_get("/v1/billing/meters", self._list_meters)
        app.router.add_get("/v1/billing/meters/{id}/event_summaries", self._summaries)
        app.router.add_post("/v1/billing/meter_event_adjustments", self._adjustment)
        app.router.add_get("/v1/{resource}/{id}", self._retrieve)
        app.router.add_post("/v1/invoices/{id}/pay", self._pay)
        app.router.add_post("/v1/invoices/{id}", self._update_invoice)
        return app

    async def _list_meters(self, request: web.Request) -> web.Response:
        """`GET /v1/billing/meters`: newest first, `limit` 1–100 (default 10), `starting_after`, `status`."""
        _, early = await self._begin(request)
        if early is not None:
            return early
        query = request.query
        try:
            limit = int(query.get("limit", "10"))
        except ValueError:
            limit = 0
        if not 1 <= limit <= 100:
            return _error(
                400, "invalid_request_error", "limit must be between 1 and 100", code="parameter_invalid_integer"
            )
        meters = sorted(self.meter_catalogue.values(), key=lambda m: (m["created"], m["id"]), reverse=True)
        if query.get("status"):
            meters = [m for m in meters if m["status"] == query["status"]]
        after = query.get("starting_after")
        if after:
            ids = [m["id"] for m in meters]
            if after not in ids:
                return _error(
                    404, "invalid_request_error", f"No such billing.meter: '{after}'", code="resource_missing"
                )
            meters = meters[ids.index(after) + 1 :]
        body = {"object": "list", "url": "/v1/billing/meters", "has_more": len(meters) > limit, "data": meters[:limit]}
        return web.json_response(body)

    async def _summaries(self, request: web.Request) -> web.Response:
        _, early = await self._begin(request)
        if early is not None:
            return early
        meter = next((m for m in self.meter_catalogue.values() if m["id"] == request.match_info["id"]), None)
        if meter is None:
            return _error(404, "invalid_request_error", f"No such billing.meter: '{request.match_info['id']}'",
                          code="resource_missing")  # fmt: skip
        status, body = self.book.summaries(meter, dict(request.query))
        return web.json_response(body, status=status)

    async def _adjustment(self, request: web.Request) -> web.Response:
        form, early = await self._begin(request)
        if early is not None:
            return early
        status, body = self.book.cancel(form)
        return self._remember(request, form, web.json_response(body, status=status))

    async def _retrieve(self, request: web.Request) -> web.Response:
        _, early = await self._begin(request)
        if early is not None:
            return early
        obj = self.objects.get(request.match_info["resource"], {}).get(request.match_info["id"])
        if obj is None:
            return _error(
                404, "invalid_request_error", f"No such object: '{request.match_info['id']}'", code="resource_missing"
            )
        return web.json_response(obj)

    async def _pay(self, request: web.Request) -> web.Response:
        if self.pay_429s > 0:  # rate limits come before the idempotency layer: nothing happens
            self.pay_429s -= 1
            self.requests.append(Recorded(request.method, request.path, dict(request.headers), b"", status=429))
            return self._too_many("Request rate limit exceeded.")
        form, early = await self._begin(request)
        if early is not None:
            return early
        invoice = self.objects["invoices"].get(request.match_info["id"])
        if invoice is None:
            response = _error(
                404, "invalid_request_error", f"No such invoice: '{request.match_info['id']}'", code="resource_missing"
            )
        elif invoice["status"] == "paid":
            response = _error(400, "invalid_request_error", "Invoice is already paid")
        elif invoice["status"] != "open":
            response = _error(
                400, "invalid_request_error", f"You can only pay an open invoice, not {invoice['status']}"
            )
        elif form.get("paid_out_of_band") != "true":
            response = _error(400, "invalid_request_error", "the double only supports paid_out_of_band=true")
        else:
            invoice.update(status="paid", paid_out_of_band=True, amount_paid=invoice["amount_due"], amount_remaining=0)
            invoice["status_transitions"] = {**invoice.get("status_transitions", {}), "paid_at": int(time.time())}
            self.payments.append(invoice["id"])
            response = web.json_response(invoice)
        self._remember(request, form, response)
        if self.lose_pay_replies > 0 and response.status == 200:
            self.lose_pay_replies -= 1
            return _error(500, "api_error", "the reply was lost on its way back")  # Stripe kept its answer
        if self.saved_500s > 0 and response.status == 200:
            self.saved_500s -= 1
            return self._remember(request, form, _error(500, "api_error", "An unknown error occurred"))
        return response

    async def _update_invoice(self, request: web.Request) -> web.Response:
        form, early = await self._begin(request)
        if early is not None:
            return early
        invoice = self.objects["invoices"].get(request.match_info["id"])
        if invoice is None:
            return _error(
                404, "invalid_request_error", f"No such invoice: '{request.match_info['id']}'", code="resource_missing"
            )
        invoice["metadata"] = {**invoice.get("metadata", {}), **form.get("metadata", {})}
        return self._remember(request, form, web.json_response(invoice))

    async def _begin(self, request: web.Request, *, wait: bool = True) -> tuple[dict[str, Any], web.Response | None]:
        """Parse, record, authenticate, apply failure modes, rate limits, the latency (unless
        `wait` is false: the caller waits it) and idempotency replays."""
        body = await request.read()
        form = unflatten(parse_qsl(body.decode() or request.query_string, keep_blank_values=True))
        recorded = Recorded(request.method, request.path, dict(request.headers), body, form)
        self.requests.append(recorded)
        if not request.headers.get("Authorization", "").startswith("Bearer sk_"):
            return form, _error(401, "authentication_error", "Invalid API Key provided")
        failure = await self.failure()
        if failure is not None:
            return form, failure
        limited = self._limit("meter_events" if request.path == "/v1/billing/meter_events" else "basic")
        if limited is not None:
            recorded.status = 429
            return form, limited
        if wait:
            await asyncio.sleep(self.contract.latency)
        key = request.headers.get("Idempotency-Key")
        if key is not None and len(key) > 255:
            return form, _error(
                400,
                "invalid_request_error",
                "Idempotency-Key must be at most 255 characters long (docs.stripe.com/idempotency).",
            )
        if key and key in self._idempotent:
            params, status, answer = self._idempotent[key]
            recorded.replayed = True
            if params != form:
                return form, _error(
                    400,
                    "idempotency_error",
                    "Keys for idempotent requests can only be used with the same parameters they were first used with.",
                )
            return form, web.Response(body=answer, status=status, content_type="application/json")
        return form, None

    def _remember(self, request: web.Request, form: dict[str, Any], response: web.Response) -> web.Response:
        key = request.headers.get("Idempotency-Key")
        if key:
            body = response.body
            self._idempotent[key] = (form, response.status, body if isinstance(body, bytes) else b"")
        return response

    def _limit(self, kind: str) -> web.Response | None:
        """A 429 when the request of `kind` is over its rate limit (counted at arrival)."""
        c = self.contract
        rate = {"basic": c.rate_limit, "meter_events": c.meter_rate_limit, "meter_stream": c.stream_rate_limit}[kind]
        if kind == "meter_events" and rate is None:
            kind, rate = "basic", c.rate_limit  # a sandbox: v1 meter events count against the basic limit
        if rate is None:
            return None
        window = self._windows.get(kind)
        if window is None or window.limit != rate:
            window = self._windows[kind] = _Window(rate)
        if window.admit():
            return None
        return self._too_many("Request rate limit exceeded. Learn more about rate limits here "
                              "https://stripe.com/docs/rate-limits.")  # fmt: skip

    def _too_many(self, message: str) -> web.Response:
        self.rate_limited += 1
        body = {"error": {"type": "invalid_request_error", "code": "rate_limit", "message": message}}
        return web.json_response(body, status=429, headers={"Stripe-Should-Retry": "true"})

    async def _meter_event(self, request: web.Request) -> web.Response:
        form, early = await self._begin(request, wait=False)
        if early is not None:
            return early
        payload = form.get("payload", {})
        slot = (str(payload.get("stripe_customer_id")), str(form.get("event_name")))
        if self.contract.per_customer_concurrency:
            if slot in self._in_flight:
                self.requests[-1].status = 429
                return self._too_many(
                    "There is already a meter event request in progress for this customer and meter: "
                    "send one at a time per customer and meter (docs.stripe.com/rate-limits)."
                )
            self._in_flight.add(slot)
            try:
                await asyncio.sleep(self.contract.latency)
                return await self._meter_event_now(request, form, payload)
            finally:
                self._in_flight.discard(slot)
        await asyncio.sleep(self.contract.latency)
        return await self._meter_event_now(request, form, payload)

    async def _meter_event_now(self, request: web.Request, form: dict[str, Any], payload: Any) -> web.Response:
        identifier = form.get("identifier") or f"gen_{len(self.meter_events)}"
        if not form.get("event_name") or "stripe_customer_id" not in payload or "value" not in payload:
            response = _error(400, "invalid_request_error", "Missing required param: event_name, payload")
        elif not payload["value"].lstrip("-").isdigit():
            response = _error(400, "invalid_request_error", "payload[value] must be a whole number")
        elif not -35 * 86400 <= int(form.get("timestamp") or time.time()) - time.time() <= 300:
            response = _error(
                400, "invalid_request_error", "Timestamp must be within the past 35 days and at most 5 minutes ahead."
            )
        elif identifier in self._identifiers:
            response = _error(
                400,
                "invalid_request_error",
                f"An event already exists with identifier {identifier}.",
                headers={"Stripe-Should-Retry": "false"},
            )
        else:
            self._identifiers.add(identifier)
            event = {
                "object": "billing.meter_event",
                "event_name": form["event_name"],
                "identifier": identifier,
                "payload": payload,
                "timestamp": int(form.get("timestamp") or time.time()),
                "created": int(time.time()),
                "livemode": False,
            }
            self.meter_events.append(event)
            response = web.json_response(event)
        return self._remember(request, form, response)

    # -- the v2 meter event stream ---------------------------------------------------------

    async def _session(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.requests.append(Recorded(request.method, request.path, dict(request.headers), body))
        if not request.headers.get("Authorization", "").startswith("Bearer sk_"):
            return _error(401, "authentication_error", "Invalid API Key provided")
        failure = await self.failure()
        if failure is not None:
            return failure
        limited = self._limit("basic")
        if limited is not None:
            return limited
        await asyncio.sleep(self.contract.latency)
        token = f"mes_tok_{next(self._token_ids)}"
        self._tokens[token] = time.monotonic() + self.contract.session_ttl
        self.sessions += 1
        now = dt.datetime.now(dt.UTC)
        expires = now + dt.timedelta(seconds=self.contract.session_ttl)
        return web.json_response(
            {
                "id": f"mes_{token}",
                "object": "v2.billing.meter_event_session",
                "authentication_token": token,
                "created": _rfc3339(now),
                "expires_at": _rfc3339(expires),
                "livemode": False,
            }
        )

    async def _stream(self, request: web.Request) -> web.Response:
        body = await request.read()
        recorded = Recorded(request.method, request.path, dict(request.headers), body)
        self.requests.append(recorded)
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        expiry = self._tokens.get(token)
        if expiry is None:
            recorded.status = 401
            return _error(401, "invalid_request_error", "Invalid meter event session token", code="invalid_token")
        if time.monotonic() >= expiry:
            recorded.status = 401
            return _error(
                401,
                "temporary_session_expired",
                "The meter event session has expired: create a new one.",
                code="billing_meter_event_session_expired",
            )
        failure = await self.failure()
        if failure is None and self.stream_failures:
            failure = self.error_response(self.stream_failures.pop(0))
        if failure is not None:
            recorded.status = failure.status
            return failure
        limited = self._limit("meter_stream")
        if limited is not None:
            recorded.status = 429
            return limited
        events = json.loads(body or b"{}").get("events") or []
        if not 1 <= len(events) <= 100:
            recorded.status = 400
            return _error(400, "invalid_request_error", "events: between 1 and 100 events per request")
        await asyncio.sleep(self.contract.latency)
        self.stream_requests.append(len(events))
        for event in events:
            self._accept(event)
        return web.json_response({})

    def _accept(self, event: dict[str, Any]) -> None:
        """Validate one streamed event (as Stripe does, after answering) and record it."""
        identifier = event.get("identifier") or f"gen_{len(self.meter_events)}"
        if identifier in self._identifiers:
            return
        payload = event.get("payload") or {}
        error = _invalid(event, payload, self.known_customers, self.meter_catalogue)
        fault = self.book.fault() if error is None else None
        if fault == "refuse":
            error = ("meter_event_customer_not_found", f"No customer {payload.get('stripe_customer_id')} (injected)")
            self.book.refused_later.append(event)
        if error is not None:
            self._errors.append((*error, identifier))
            return
        self._identifiers.add(identifier)
        if fault == "drop":
            self.book.dropped.append(event)
            return
        stamp = event.get("timestamp")
        when = int(dt.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()) if stamp else int(time.time())
        self.meter_events.append(
            {
                "object": "billing.meter_event",
                "event_name": event.get("event_name"),
                "identifier": identifier,
                "payload": payload,
                "timestamp": when,
                "created": int(time.time()),
                "livemode": False,
                "streamed": True,
            }
        )

    def error_report_event(self, meter: str = "mtr_double") -> dict[str, Any] | None:
        """The `v1.billing.meter.error_report_triggered` event for the errors not yet reported
        (None when there are none), as Stripe's event destinations deliver it (a v2 event with
        `data`; also served by `GET /v2/core/events/{id}`)."""
        if not self._errors:
            return None
        errors, self._errors = self._errors, []
        by_code: dict[str, list[tuple[str, str]]] = {}
        for code, message, identifier in errors:
            by_code.setdefault(code, []).append((message, identifier))
        event_id = f"evt_test_{len(self.events) + 1:04d}"
        now = _rfc3339(dt.datetime.now(dt.UTC))
        event = {
            "id": event_id,
            "object": "v2.core.event",
            "type": "v1.billing.meter.error_report_triggered",
            "created": now,
            "livemode": False,
            "related_object": {"id": meter, "type": "billing.meter", "url": f"/v1/billing/meters/{meter}"},
            "data": {
                "developer_message_summary": f"{len(errors)} meter events were invalid",
                "validation_start": now,
                "validation_end": now,
                "reason": {
                    "error_count": len(errors),
                    "error_types": [
                        {
                            "code": code,
                            "error_count": len(samples),
                            "sample_errors": [
                                {"error_message": message, "request": {"identifier": identifier}}
                                for message, identifier in samples[:5]
                            ],
                        }
                        for code, samples in sorted(by_code.items())
                    ],
                },
            },
        }
        self.events[event_id] = event
        return event

    async def _v2_event(self, request: web.Request) -> web.Response:
        self.requests.append(Recorded(request.method, request.path, dict(request.headers), b""))
        event = self.events.get(request.match_info["id"])
        if event is None:
            return _error(404, "invalid_request_error", f"No such event: '{request.match_info['id']}'")
        return web.json_response(event)


def _invalid(
    event: dict[str, Any], payload: dict[str, Any], customers: set[str] | None, meters: dict[str, dict[str, Any]]
) -> tuple[str, str] | None:
    """`(code, message)` of the first rule a streamed event breaks, or None."""
    customer = payload.get("stripe_customer_id")
    if not customer:
        return "meter_event_no_customer_defined", "no stripe_customer_id in the payload"
    if customers is not None and customer not in customers:
        return "meter_event_customer_not_found", f"No customer {customer}"
    meter = meters.get(str(event.get("event_name")))
    if meter is None:
        return "no_meter", f"No active meter for event name {event.get('event_name')}"
    if meter["status"] != "active":
        return "archived_meter", f"Meter {meter['id']} is inactive"
    try:
        value = Decimal(str(payload.get("value")))
    except InvalidOperation:
        return "meter_event_invalid_value", "value is not a number"
    if not value.is_finite() or value != value.to_integral_value():
        return "meter_event_invalid_value", "value must be a whole number"
    if len(value.normalize().as_tuple().digits) > 15:
        return "meter_event_value_too_many_digits", "value has more than 15 significant digits"
    stamp = event.get("timestamp")
    if stamp:
        when = dt.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
        if when < time.time() - 35 * 86400:
            return "timestamp_too_far_in_past", "timestamp is more than 35 days in the past"
        if when > time.time() + 300:
            return "timestamp_in_future", "timestamp is more than 5 minutes in the future"
    return None


def _rfc3339(when: dt.datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"


def _error(
    status: int, kind: str, message: str, *, code: str | None = None, headers: dict[str, str] | None = None
) -> web.Response:
    error: dict[str, Any] = {"type": kind, "message": message}
    if code is not None:
        error["code"] = code
    return web.Response(
        body=json.dumps({"error": error}), status=status, content_type="application/json", headers=headers
    )
