"""`webhook_forward`: relay Stripe events to a webhook endpoint, as `batman-ms-sqs` did (seed 003).

Each message is POSTed to `handler_options.url` (e.g. `…/api/v1/Stripe/Webhook`) once per event
id, with a timeout, through the `forward:<source>` breaker. A relayed webhook
(`{"headers": {...}, "body": "<raw>"}`) is forwarded with its original body and headers (so the
receiver can verify `Stripe-Signature` itself); an EventBridge envelope forwards its `detail`;
any other body is forwarded as it came. A redelivered event already forwarded is acked without a
second POST. 2xx ack; 429, 5xx, timeouts and refused connections retry (the breaker pauses the
source while the endpoint is down); other 4xx are dead-lettered with the status and a snippet.

Seed 003's validation and filtering, both off by default:

* `verify_signature = true` — only relayed webhooks whose `Stripe-Signature` verifies against
  `[stripe].webhook_secret` are forwarded; a forged, stale or unsigned message is dead-lettered
  and never forwarded;
* `event_types = ["invoice.paid", …]` — an allow-list: other events are acked without a POST and
  counted in `billingd_webhook_events_skipped_total{source,type}`.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import msgspec

from billingd.clients.http import HttpForwarder
from billingd.clients.ledger import OnceLedger
from billingd.config.durations import Duration
from billingd.handlers.kit.base import HandlerContext, HandlerSpec, Message
from billingd.handlers.kit.outcome import ACK, InvalidMessage, Outcome
from billingd.handlers.stripe.webhooks import Envelope, WebhookAge, verify_relayed

#: Headers that describe the original hop, not the event: never forwarded.
HOP_HEADERS = frozenset({"host", "content-length", "connection", "transfer-encoding", "keep-alive", "accept-encoding"})


class ForwardOptions(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """`handler_options` of `webhook_forward`."""

    url: str
    timeout: Duration = Duration(10)
    dedup_ttl: Duration = Duration(15 * 86400)
    verify_signature: bool = False
    """Forward only relayed webhooks whose Stripe-Signature verifies (`[stripe].webhook_secret`)."""
    event_types: list[str] = msgspec.field(default_factory=list)
    """Forward only these event types (empty: all); others are acked and counted."""


#: What decoding an arbitrary body can raise: not JSON, not UTF-8, nested too deeply.
_UNREADABLE = (msgspec.DecodeError, UnicodeDecodeError, RecursionError)


class _Id(msgspec.Struct):
    id: str | None = None
    type: str | None = None


class WebhookForwardHandler:
    """Forwards one event per message. Downstreams: `redis`, `forward:<source>`."""

    def __init__(
        self,
        once: OnceLedger,
        forwarder: HttpForwarder,
        options: ForwardOptions,
        secret: str = "",
        age: WebhookAge | None = None,
        skipped: Any = None,
    ) -> None:
        self._once = once
        self._forwarder = forwarder
        self._options = options
        self._secret, self._age = secret, age or WebhookAge()
        self._allowed = frozenset(options.event_types)
        self._skipped = skipped
        self._skipped_types: set[str] = set()
        self.downstreams = ("redis", forwarder.name)

    async def handle(self, message: Message) -> Outcome:
        """POST the event once (see module docstring).

        Dead-letters: with `verify_signature`, anything that is not a relayed webhook with a valid
        signature."""
        if self._options.verify_signature:
            try:
                envelope = msgspec.json.decode(message.body, type=Envelope)
            except (*_UNREADABLE, msgspec.ValidationError):
                raise InvalidMessage("not a relayed Stripe webhook: the body is not a JSON envelope") from None
            verify_relayed(envelope, self._secret, self._age)
        body, headers = self.request(message.body)
        event = _event(body)
        if self._allowed and event.type not in self._allowed:
            self._skip(event.type or "")
            return ACK
        event_id = event.id or message.message_id
        headers = {**headers, "X-Billingd-Event-Id": event_id, "Idempotency-Key": event_id}
        post = partial(self._forwarder.post, self._options.url, body, headers)
        lease = 2 * self._options.timeout + 5
        await self._once.run_once(event_id, self._forwarder.name, post, lease=lease, ttl=int(self._options.dedup_ttl))
        return ACK

    @staticmethod
    def request(raw: bytes) -> tuple[bytes, dict[str, str]]:
        """The body and headers to forward for a message body."""
        try:
            envelope = msgspec.json.decode(raw, type=Envelope)
        except _UNREADABLE:
            return raw, {"Content-Type": "application/json"}
        if envelope.headers is not None and envelope.body is not None:
            headers = {k: v for k, v in envelope.headers.items() if k.lower() not in HOP_HEADERS}
            if not any(k.lower() == "content-type" for k in headers):
                headers["Content-Type"] = "application/json"
            return envelope.body.encode(), headers
        if envelope.detail:
            return bytes(envelope.detail), {"Content-Type": "application/json"}
        return raw, {"Content-Type": "application/json"}

    def _skip(self, event_type: str) -> None:
        if self._skipped is None:
            return
        label = event_type[:64] if event_type in self._skipped_types or len(self._skipped_types) < 50 else "other"
        self._skipped_types.add(label)
        self._skipped.labels(label).inc()


def _event(body: bytes) -> _Id:
    try:
        return msgspec.json.decode(body, type=_Id)
    except (*_UNREADABLE, msgspec.ValidationError):
        return _Id()


def _build(ctx: HandlerContext, options: ForwardOptions) -> WebhookForwardHandler:
    stripe = ctx.stripe
    if options.verify_signature and not stripe.webhook_secret:
        raise ValueError("handler_options.verify_signature needs [stripe].webhook_secret (STRIPE_WEBHOOK_SECRET)")
    skipped = ctx.counter(
        "billingd_webhook_events_skipped",
        "Webhook events acked without forwarding: their type is not in handler_options.event_types.",
        ["type"],
    )
    return WebhookForwardHandler(
        ctx.clients.once,
        ctx.clients.forwarder(ctx.source.name, options.timeout),
        options,
        stripe.webhook_secret,
        WebhookAge(float(stripe.webhook_tolerance), float(stripe.webhook_max_age)),
        skipped,
    )


SPEC = HandlerSpec("webhook_forward", ForwardOptions, _build, "relay Stripe events to a webhook endpoint (seed 003)")
