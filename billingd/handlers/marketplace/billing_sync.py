"""`billing_sync`: the billing service's messages to the product (seed 000, `BillingConsumer`).

| `type` | effect |
|---|---|
| `billing_customer_update` | store the organization's billing status in Redis (a newer `updated_at` wins) |
| `invoice_finalized` | submit the invoice to the marketplace (the Vercel integration) |
| `marketplace.invoice.submit` | submit an invoice to the marketplace |
| `marketplace.usage.submit` | submit usage data to the marketplace |

Submissions are POSTed (JSON, the decoded body) to `handler_options.marketplace_url` through the
`forward:marketplace` breaker, once per message: the idempotency key is the message's
`idempotency_key`, else `<type>:<invoice_id>`, else the SQS message id; it is sent as the
`Idempotency-Key` header, and the POST runs once across workers and replicas (`OnceLedger`), so
a redelivery — even one handled at the same moment — is acked without a second POST. 2xx ack;
429, 5xx and timeouts retry; other 4xx dead-letter with the status and a snippet.
An unknown `type` is dead-lettered with the reason. Bodies arrive gzip-compressed and
base64-encoded when the `content_encoding` attribute says so; the transport decodes them.
"""

from __future__ import annotations

from functools import partial

import msgspec

from billingd.clients.http import HttpForwarder
from billingd.clients.ledger import OnceLedger
from billingd.clients.ledger.sync import SyncLedger
from billingd.config.durations import Duration
from billingd.handlers.kit.base import HandlerContext, HandlerSpec, JsonDecoder, Message
from billingd.handlers.kit.outcome import ACK, DeadLetter, InvalidMessage, Outcome

CUSTOMER_UPDATE = "billing_customer_update"
SUBMISSIONS = ("invoice_finalized", "marketplace.invoice.submit", "marketplace.usage.submit")
TYPES = (CUSTOMER_UPDATE, *SUBMISSIONS)


class SyncOptions(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """`handler_options` of `billing_sync`."""

    marketplace_url: str = ""
    """Where submissions are POSTed; required for the three submission types."""
    timeout: Duration = Duration(10)
    dedup_ttl: Duration = Duration(15 * 86400)


class SyncMessage(msgspec.Struct, frozen=True):
    """The fields billingd reads; the rest of the message is stored or forwarded as it came."""

    type: str
    organization_id: str | None = None
    invoice_id: str | None = None
    idempotency_key: str | None = None
    updated_at: int | None = None


class BillingSyncHandler:
    """Applies seed-000 messages. Downstreams: `redis`, `forward:marketplace`."""

    downstreams = ("redis", "forward:marketplace")

    def __init__(self, ledger: SyncLedger, once: OnceLedger, forwarder: HttpForwarder, options: SyncOptions) -> None:
        self._ledger = ledger
        self._once = once
        self._forwarder = forwarder
        self._options = options
        self._decoder = JsonDecoder(SyncMessage)

    async def handle(self, message: Message) -> Outcome:
        """Apply one message (see module docstring)."""
        sync = self._decoder.decode(message.body)
        if sync.type == CUSTOMER_UPDATE:
            if not sync.organization_id:
                raise InvalidMessage("invalid message: Object missing required field `organization_id`")
            await self._ledger.store_billing(sync.organization_id, message.body, sync.updated_at or 0)
            return ACK
        if sync.type not in SUBMISSIONS:
            raise InvalidMessage(f"unknown message type {sync.type!r}: expected one of {', '.join(TYPES)}")
        if sync.type != "marketplace.usage.submit" and not sync.invoice_id:
            raise InvalidMessage("invalid message: Object missing required field `invoice_id`")
        if not self._options.marketplace_url:
            return DeadLetter(f"handler_options.marketplace_url is not set: cannot submit {sync.type}")
        key = sync.idempotency_key or (f"{sync.type}:{sync.invoice_id}" if sync.invoice_id else message.message_id)
        headers = {"Content-Type": "application/json", "Idempotency-Key": key, "X-Billingd-Type": sync.type}
        post = partial(self._forwarder.post, self._options.marketplace_url, message.body, headers)
        lease = 2 * self._options.timeout + 5
        await self._once.run_once(
            sync.organization_id or "-", f"submit:{key}", post, lease=lease, ttl=int(self._options.dedup_ttl)
        )
        return ACK


def _build(ctx: HandlerContext, options: SyncOptions) -> BillingSyncHandler:
    clients = ctx.clients
    ledger = SyncLedger(clients.redis, clients.guard("redis"), clients.batcher)
    return BillingSyncHandler(ledger, clients.once, clients.forwarder("marketplace", options.timeout), options)


SPEC = HandlerSpec("billing_sync", SyncOptions, _build, "billing service → product sync (seed 000)")
