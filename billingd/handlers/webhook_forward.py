"""`webhook_forward`: relay Stripe events to a webhook endpoint, as `batman-ms-sqs` did (seed 003).

Each message is POSTed to `handler_options.url` (e.g. `…/api/v1/Stripe/Webhook`) once per event
id, with a timeout, through the `forward:<source>` breaker. A relayed webhook
(`{"headers": {...}, "body": "<raw>"}`) is forwarded with its original body and headers (so the
receiver can verify `Stripe-Signature` itself); an EventBridge envelope forwards its `detail`;
any other body is forwarded as it came. A redelivered event already forwarded is acked without a
second POST. 2xx ack; 429, 5xx, timeouts and refused connections retry (the breaker pauses the
source while the endpoint is down); other 4xx are dead-lettered with the status and a snippet.
"""

from __future__ import annotations

from functools import partial

import msgspec

from billingd.clients import Clients
from billingd.clients.http import HttpForwarder
from billingd.clients.ledger import OnceLedger
from billingd.config.durations import Duration
from billingd.config.model import SourceSettings
from billingd.handlers.base import HandlerSpec, Message
from billingd.handlers.outcome import ACK, Outcome
from billingd.handlers.stripe_objects import Envelope

#: Headers that describe the original hop, not the event: never forwarded.
HOP_HEADERS = frozenset({"host", "content-length", "connection", "transfer-encoding", "keep-alive", "accept-encoding"})


class ForwardOptions(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """`handler_options` of `webhook_forward`."""

    url: str
    timeout: Duration = Duration(10)
    dedup_ttl: Duration = Duration(15 * 86400)


class _Id(msgspec.Struct):
    id: str | None = None


class WebhookForwardHandler:
    """Forwards one event per message. Downstreams: `redis`, `forward:<source>`."""

    def __init__(self, once: OnceLedger, forwarder: HttpForwarder, options: ForwardOptions) -> None:
        self._once = once
        self._forwarder = forwarder
        self._options = options
        self.downstreams = ("redis", forwarder.name)

    async def handle(self, message: Message) -> Outcome:
        """POST the event once (see module docstring)."""
        body, headers = self.request(message.body)
        event_id = _event_id(body) or message.message_id
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
        except msgspec.DecodeError:
            return raw, {"Content-Type": "application/json"}
        if envelope.headers is not None and envelope.body is not None:
            headers = {k: v for k, v in envelope.headers.items() if k.lower() not in HOP_HEADERS}
            if not any(k.lower() == "content-type" for k in headers):
                headers["Content-Type"] = "application/json"
            return envelope.body.encode(), headers
        if envelope.detail:
            return bytes(envelope.detail), {"Content-Type": "application/json"}
        return raw, {"Content-Type": "application/json"}


def _event_id(body: bytes) -> str | None:
    try:
        return msgspec.json.decode(body, type=_Id).id
    except msgspec.DecodeError:
        return None


def _build(clients: Clients, options: ForwardOptions, source: SourceSettings) -> WebhookForwardHandler:
    return WebhookForwardHandler(clients.once, clients.forwarder(source.name, options.timeout), options)


SPEC = HandlerSpec("webhook_forward", ForwardOptions, _build, "relay Stripe events to a webhook endpoint (seed 003)")
