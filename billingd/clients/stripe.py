"""Stripe through stripe-python's async client, every call behind the `stripe` guard.

Failures are classified once, here (DESIGN §2):

* transient (`DownstreamUnavailable`, retried through the breaker): no answer (network,
  timeout), 429, 5xx, 409 (an idempotency key in use by a concurrent request) — and 401/403,
  because a revoked or mistyped API key is an outage of our access to Stripe, not a property of
  the message: dead-lettering every message would empty the queue into the DLQ;
* permanent (`DownstreamRejected`, dead-lettered with Stripe's message): any other 4xx.

Every write carries an `Idempotency-Key` (Stripe keeps them 24 hours), so a retry after a lost
reply never applies twice. The SDK's own retries are off: the breaker must see failures.
"""

from __future__ import annotations

from typing import Any

import stripe

from billingd.clients.errors import DownstreamRejected, DownstreamUnavailable, Guard
from billingd.config.model import StripeSettings


def classify(exc: stripe.StripeError) -> DownstreamUnavailable | DownstreamRejected:
    """The billingd error for a stripe-python error (see module docstring)."""
    status = exc.http_status
    message = exc.user_message or str(exc) or type(exc).__name__
    detail = f"{status or 'no answer'}: {message}"
    if status is None or status >= 500 or status in (401, 403, 409, 429):
        return DownstreamUnavailable("stripe", detail)
    return DownstreamRejected("stripe", detail)


class StripeGateway:
    """The Stripe calls billingd makes (meter events; invoices and customers for reconciliation)."""

    def __init__(self, settings: StripeSettings, guard: Guard) -> None:
        self.timeout = settings.timeout
        self._guard = guard
        self._http = stripe.AIOHTTPClient(timeout=settings.timeout)
        self._client = stripe.StripeClient(
            settings.api_key or "sk_missing",
            base_addresses={"api": settings.api_base},
            http_client=self._http,
            max_network_retries=0,
        )

    async def call(self, method: Any, params: dict[str, Any], idempotency_key: str | None = None) -> Any:
        """`await method(params, options)` through the guard, errors classified.

        Raises:
            DownstreamUnavailable: transient (see module docstring); CircuitOpen when not admitted.
            DownstreamRejected: a permanent refusal.
        """
        options: dict[str, Any] = {"idempotency_key": idempotency_key} if idempotency_key else {}
        return await self._guard.call(self._request, method, params, options)

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
        result = await self._guard.call(self._request_on, method, target, params, options)
        body: dict[str, Any] = result.to_dict()
        return body

    async def retrieve(self, resource: str, object_id: str) -> dict[str, Any]:
        """GET one object: `resource` is `customers`, `products`, `invoices` or `subscriptions`.

        Raises:
            DownstreamUnavailable, DownstreamRejected: see `classify` (a missing object is a 404:
                rejected).
        """
        return await self._on(getattr(self._client.v1, resource).retrieve_async, object_id, {}, None)

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

    async def create_meter_event(
        self, *, event_name: str, customer: str, value: int, identifier: str, timestamp: int
    ) -> None:
        """Report `value` (a whole number, as Stripe requires) of meter `event_name` for `customer`.

        `identifier` makes the event unique at Stripe (24 h); the `Idempotency-Key` is derived from it.
        """
        params = {
            "event_name": event_name,
            "identifier": identifier,
            "timestamp": timestamp,
            "payload": {"stripe_customer_id": customer, "value": str(value)},
        }
        await self.call(self._client.v1.billing.meter_events.create_async, params, f"billingd-meter-{identifier}")

    async def aclose(self) -> None:
        """Close the HTTP session."""
        await self._http.close_async()  # type: ignore[no-untyped-call]  # stripe leaves it unannotated
