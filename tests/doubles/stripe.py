"""A Stripe API double: the endpoints billingd calls, form-encoded like Stripe, idempotent like Stripe.

Behaviour copied from Stripe's documentation:

* requests are `application/x-www-form-urlencoded` with bracketed keys (`payload[value]=25`),
  authenticated with `Authorization: Bearer sk_…` (401 otherwise);
* `Idempotency-Key`: a repeat with the same parameters replays the first answer and changes
  nothing; the same key with other parameters is a 400 `idempotency_error`;
* meter events: `identifier` is unique (a second event with it is a 400), `payload[value]` must
  be a whole number (400 otherwise);
* objects (`products`, `customers`, `invoices`) are retrieved by id (404 `resource_missing`
  otherwise); `POST /v1/invoices/{id}/pay` with `paid_out_of_band=true` pays an open invoice and
  refuses one already paid (400); `POST /v1/invoices/{id}` merges `metadata`;
* errors use Stripe's envelope `{"error": {"type": …, "message": …}}`.
"""

from __future__ import annotations

import json
import time
from typing import Any
from urllib.parse import parse_qsl

from aiohttp import web

from tests.doubles.server import Double, Recorded


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


class StripeDouble(Double):
    """See module docstring. `meter_events` are the events Stripe would have recorded."""

    def __init__(self) -> None:
        super().__init__()
        self.meter_events: list[dict[str, Any]] = []
        self.objects: dict[str, dict[str, dict[str, Any]]] = {"products": {}, "customers": {}, "invoices": {}}
        self.payments: list[str] = []
        """Invoice ids paid out of band, one entry per payment Stripe actually made."""
        self._idempotent: dict[str, tuple[dict[str, Any], int, bytes]] = {}
        self._identifiers: set[str] = set()

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

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/billing/meter_events", self._meter_event)
        app.router.add_get("/v1/{resource}/{id}", self._retrieve)
        app.router.add_post("/v1/invoices/{id}/pay", self._pay)
        app.router.add_post("/v1/invoices/{id}", self._update_invoice)
        return app

    async def _retrieve(self, request: web.Request) -> web.Response:
        _, early = await self._begin(request)
        if early is not None:
            return early
        obj = self.objects.get(request.match_info["resource"], {}).get(request.match_info["id"])
        if obj is None:
            return _error(404, "invalid_request_error", f"No such object: '{request.match_info['id']}'")
        return web.json_response(obj)

    async def _pay(self, request: web.Request) -> web.Response:
        form, early = await self._begin(request)
        if early is not None:
            return early
        invoice = self.objects["invoices"].get(request.match_info["id"])
        if invoice is None:
            response = _error(404, "invalid_request_error", f"No such invoice: '{request.match_info['id']}'")
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
            self.payments.append(invoice["id"])
            response = web.json_response(invoice)
        return self._remember(request, form, response)

    async def _update_invoice(self, request: web.Request) -> web.Response:
        form, early = await self._begin(request)
        if early is not None:
            return early
        invoice = self.objects["invoices"].get(request.match_info["id"])
        if invoice is None:
            return _error(404, "invalid_request_error", f"No such invoice: '{request.match_info['id']}'")
        invoice["metadata"] = {**invoice.get("metadata", {}), **form.get("metadata", {})}
        return self._remember(request, form, web.json_response(invoice))

    async def _begin(self, request: web.Request) -> tuple[dict[str, Any], web.Response | None]:
        """Parse, record, authenticate, apply failure modes and idempotency replays."""
        body = await request.read()
        form = unflatten(parse_qsl(body.decode() or request.query_string, keep_blank_values=True))
        recorded = Recorded(request.method, request.path, dict(request.headers), body, form)
        self.requests.append(recorded)
        if not request.headers.get("Authorization", "").startswith("Bearer sk_"):
            return form, _error(401, "authentication_error", "Invalid API Key provided")
        failure = await self.failure()
        if failure is not None:
            return form, failure
        key = request.headers.get("Idempotency-Key")
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
            self._idempotent[key] = (form, response.status, response.body)  # type: ignore[arg-type]
        return response

    async def _meter_event(self, request: web.Request) -> web.Response:
        form, early = await self._begin(request)
        if early is not None:
            return early
        payload = form.get("payload", {})
        identifier = form.get("identifier") or f"gen_{len(self.meter_events)}"
        if not form.get("event_name") or "stripe_customer_id" not in payload or "value" not in payload:
            response = _error(400, "invalid_request_error", "Missing required param: event_name, payload")
        elif not payload["value"].lstrip("-").isdigit():
            response = _error(400, "invalid_request_error", "payload[value] must be a whole number")
        elif identifier in self._identifiers:
            response = _error(400, "invalid_request_error", f"An event with identifier {identifier} already exists")
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


def _error(status: int, kind: str, message: str) -> web.Response:
    return web.Response(
        body=json.dumps({"error": {"type": kind, "message": message}}), status=status, content_type="application/json"
    )
