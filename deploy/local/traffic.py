"""Sample traffic for the local stack: the message formats of the seed documents, a few per second.

    uv run python deploy/local/traffic.py [--rate 5] [--count 0]

* seed 002 (RabbitMQ): Jasmin bill events on exchange `billing` (mostly ESME_ROK, some refunds)
  and DLRs on `messaging` (ACCEPTD then a final status, sometimes out of order), in the seed's
  JSON; and the same traffic as a real Jasmin 0.11.1 publishes it, built from
  `tests/fixtures/jasmin-0.11.1` with fresh ids (`submit.sm.*` with pickled bills,
  `dlr.submit_sm_resp`, `bill_request.submit_sm_resp.<uid>`, `dlr.deliver_sm`; some submissions
  fail and are refunded), on exchanges declared as Jasmin declares them (non-durable);
* seed 001 (SQS `billing-usage-events`): entitlement usage for a few users (the entitlements are
  created first, as the Stripe subscription sync would), some over their limit;
* seed 004 (same queue): metered usage of a workspace (AI credits, WhatsApp messages, emails);
* seed 000 (SQS `billing-to-posthog-us`): gzip+base64 billing-service messages;
* seed 004 (SQS `billing-stripe-events`): Stripe events — the workspace's customer, its
  subscription (products with entitlement metadata, created in the Stripe double first), renewals;
  relayed webhooks are signed with `STRIPE_WEBHOOK_SECRET`;
* seed 004 (SQS `billing-payment-events`): Razorpay captures signed with
  `RAZORPAY_WEBHOOK_SECRET` and manual bank transfers, each paying an invoice of the double;
* seed 003 (SQS `billing-stripe-webhooks`): Stripe webhooks relayed to the sink's
  `/api/v1/Stripe/Webhook`.

About one message in fifty is deliberately broken, so the dead-letter path shows on /metrics too.
Each stream is its own sender: one that fails (a queue missing, RabbitMQ down) says what failed on
stderr and retries every round while the others go on; with `--count`, the exit status is 1 when
a sender was still failing at the end, and a summary line per sender is printed.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import hmac
import itertools
import json
import os
import random
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import aio_pika
import aioboto3
import aiohttp
import redis.asyncio as aioredis

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import aiormq

from billingd.clients import Unguarded
from billingd.clients.ledger import MICROS, UsageLedger
from billingd.handlers.sms.jasmin_pickle import read_pickle
from billingd.sources.codecs import encode_body
from tests.jasmin_capture import Captured, load
from tests.jasmin_capture import properties as jasmin_properties

# where the stack runs (the same variables billingd.toml reads; the defaults are the local stack's)
AMQP_URL = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
SQS_ENDPOINT = os.environ.get("AWS_ENDPOINT_URL", "http://127.0.0.1:4566")
SQS = os.environ.get(
    "SQS_QUEUE_BASE", f"http://sqs.us-east-1.localhost:{SQS_ENDPOINT.rsplit(':', 1)[-1]}/000000000000/"
)
RUN = f"{int(time.time()):x}"  # idempotency keys are per run: Redis remembers earlier runs' events
USERS = ["user-123", "user-456", "user-789"]
WORKSPACE = "ws_abc123"


def bill_event(n: int, rng: random.Random) -> dict:
    status = "ESME_ROK" if rng.random() < 0.9 else rng.choice(["ESME_RTHROTTLED", "ESME_RINVDSTADR"])
    return {
        "bid": f"bill-{RUN}-{n}",
        "user": {"uid": f"acct-{rng.randint(1, 5)}", "username": "demo"},
        "amounts": {"submit_sm_resp": rng.choice([0.01, 0.015, 0.0075])},
        "message_id": f"sms-{RUN}-{n}",
        "connector_id": "smpp-connector-1",
        "status": status,
    }


def dlrs(n: int, rng: random.Random) -> list[dict]:
    final = rng.choice(["DELIVRD"] * 6 + ["UNDELIV", "EXPIRED", "REJECTD"])
    receipts = [_dlr(n, "ACCEPTD"), _dlr(n, final)]
    if rng.random() < 0.2:
        receipts.reverse()  # out of order: the CDR must still end final
    return receipts


def _dlr(n: int, status: str) -> dict:
    return {
        "message_id": f"sms-{RUN}-{n}",
        "status": status,
        "pdu_type": "deliver_sm",
        "smpp_msgid": f"op-{RUN}-{n}",
        "dlr_details": {"id": f"op-{n}", "sub": "1", "dlvrd": "1", "stat": status, "err": "000"},
    }


def usage_events(n: int, rng: random.Random) -> list[dict]:
    return [
        {
            "userId": rng.choice(USERS),
            "entitlementKey": "AI_TUTOR_ACCESS",
            "amount": 1,
            "idempotencyKey": f"tutor-{RUN}-{n}",
            "metadata": {"source": "api"},
        },
        {
            "event_type": "ai_credits",
            "workspace_id": WORKSPACE,
            "value": rng.choice([0.5, 1, 2.5]),
            "idempotency_key": f"msg_{RUN}_{n}",
            "stripe_customer_id": "cus_local_ws",
        },
        {
            "event_type": "whatsapp_message",
            "workspace_id": WORKSPACE,
            "value": 1,
            "idempotency_key": f"wa_{RUN}_{n}",
            "stripe_customer_id": "cus_local_ws",
        },
    ]


class JasminStories:
    """Native Jasmin traffic from the fixture: each `story` is one SMS's messages with fresh ids."""

    def __init__(self, rng: random.Random) -> None:
        captured = load()
        self.rng = rng
        self.submits = [m for m in captured if m.routing_key == "submit.sm.fakesmsc"]
        self.bill = next(m for m in captured if m.routing_key.startswith("bill_request."))
        self.ok = next(m for m in captured if m.routing_key == "dlr.submit_sm_resp" and m.body == b"ESME_ROK")
        self.error = next(m for m in captured if m.routing_key == "dlr.submit_sm_resp" and m.body == b"ESME_RINVDSTADR")
        self.receipt = next(m for m in captured if m.routing_key == "dlr.deliver_sm")

    def story(self) -> list[tuple[str, Captured]]:
        """`(exchange, message)` pairs, in the order Jasmin publishes them."""
        submit = self.rng.choice(self.submits)
        msgid, bid = str(uuid.uuid4()), str(uuid.uuid4())
        old = read_pickle(submit.header("submit_sm_bill")).get("bid").encode()
        bill = submit.headers["submit_sm_bill"][1].replace(old, bid.encode())  # same length: a uuid
        out = [
            (
                "messaging",
                dataclasses.replace(
                    submit, message_id=msgid, headers={**submit.headers, "submit_sm_bill": ("S", bill)}
                ),
            )
        ]
        if self.rng.random() < 0.15:  # the SMSC refuses it: final error, the early share is refunded
            return [*out, ("messaging", dataclasses.replace(self.error, message_id=msgid))]
        smpp = uuid.uuid4().hex[:12].upper()
        state = self.rng.choice(["DELIVRD"] * 6 + ["UNDELIV", "EXPIRED", "REJECTD"])
        headers = {**self.receipt.headers, "dlr_id": ("S", smpp), "dlr_stat": ("S", state)}
        new_bill = str(uuid.uuid4())
        return [
            *out,
            (
                "messaging",
                dataclasses.replace(self.ok, message_id=msgid, headers={**self.ok.headers, "smpp_msgid": ("S", smpp)}),
            ),
            ("billing", dataclasses.replace(self.bill, message_id=new_bill, body=new_bill.encode())),
            ("messaging", dataclasses.replace(self.receipt, message_id=smpp, body=state.encode(), headers=headers)),
        ]


STRIPE_DOUBLE = os.environ.get("STRIPE_API_BASE", "http://127.0.0.1:12111")
STRIPE_SECRET = os.environ.get("STRIPE_WEBHOOK_SECRET", "whsec_local_stack")
RAZORPAY_SECRET = os.environ.get("RAZORPAY_WEBHOOK_SECRET", "rzp_whsec_local_stack")
CUSTOMER = "cus_local_ws"


def stripe_event(n: int, event_type: str, obj: dict) -> dict:
    return {
        "id": f"evt_{RUN}_{n}_{event_type}",
        "object": "event",
        "type": event_type,
        "created": int(time.time()),
        "data": {"object": obj},
    }


def stripe_relay(event: dict) -> dict:
    payload, ts = json.dumps(event), int(time.time())
    digest = hmac.new(STRIPE_SECRET.encode(), f"{ts}.{payload}".encode(), hashlib.sha256).hexdigest()
    return {"gateway": "stripe", "headers": {"Stripe-Signature": f"t={ts},v1={digest}"}, "body": payload}


def stripe_events(n: int) -> list[dict]:
    now = int(time.time())
    subscription = {
        "id": "sub_local",
        "object": "subscription",
        "customer": CUSTOMER,
        "status": "active",
        "items": {
            "data": [
                {
                    "id": "si_local",
                    "quantity": 1,
                    "current_period_start": now - 86400,
                    "current_period_end": now + 29 * 86400,
                    "price": {"product": "prod_growth", "recurring": {"interval": "month"}},
                }
            ]
        },
    }
    events = [
        stripe_event(n, "customer.subscription.updated", subscription),
        stripe_event(n, "charge.succeeded", {"id": f"ch_{n}", "object": "charge"}),
    ]
    if n == 1:
        customer = {"id": CUSTOMER, "object": "customer", "metadata": {"workspace_id": WORKSPACE}}
        events.insert(0, stripe_relay(stripe_event(n, "customer.created", customer)))
    return events


async def payment_events(n: int, rng: random.Random, http: aiohttp.ClientSession) -> list[dict]:
    invoice, amount = f"in_{RUN}_{n}", rng.choice([150000, 99900, 4900])
    await http.post(
        f"{STRIPE_DOUBLE}/_double/objects/invoices",
        json={
            "id": invoice,
            "status": "open",
            "amount_due": amount,
            "amount_paid": 0,
            "amount_remaining": amount,
            "currency": "inr",
            "customer": CUSTOMER,
        },
    )
    if rng.random() < 0.5:
        body = json.dumps(
            {
                "entity": "event",
                "event": "payment.captured",
                "contains": ["payment"],
                "payload": {
                    "payment": {
                        "entity": {
                            "id": f"pay_{RUN}_{n}",
                            "amount": amount,
                            "currency": "INR",
                            "status": "captured",
                            "notes": {"stripe_invoice_id": invoice},
                        }
                    }
                },
            }
        )
        signature = hmac.new(RAZORPAY_SECRET.encode(), body.encode(), hashlib.sha256).hexdigest()
        return [
            {
                "gateway": "razorpay",
                "body": body,
                "headers": {"X-Razorpay-Signature": signature, "x-razorpay-event-id": f"evt_rzp_{RUN}_{n}"},
            }
        ]
    return [
        {
            "gateway": "manual",
            "stripe_invoice_id": invoice,
            "reference": f"UTR{RUN}{n:06d}",
            "amount": amount,
            "currency": "inr",
        }
    ]


def billing_messages(n: int) -> list[dict]:
    org = f"org_{n % 3}"
    return [
        {
            "type": "billing_customer_update",
            "organization_id": org,
            "customer": {"plan": "scale"},
            "updated_at": int(time.time()),
        },
        {
            "type": "invoice_finalized",
            "organization_id": org,
            "invoice_id": f"inv_{RUN}_{n}",
            "period_start": 1699488000,
            "period_end": 1702080000,
        },
    ]


def say(line: str) -> None:
    """One line on stderr, prefixed like the other local-stack scripts."""
    sys.stderr.write(f"[traffic] {line}\n")


@dataclasses.dataclass
class Sender:
    """One stream of traffic. A failing sender says what failed, keeps trying every round, and
    never stops the others (a missing SQS queue must not stop the AMQP traffic)."""

    name: str
    send: Callable[[int], Awaitable[int]]  # round n -> messages sent
    every: int = 1  # send on rounds 1, 1 + every, 1 + 2 × every, ...
    prepare: Callable[[], Awaitable[None]] | None = None  # run until it succeeds once
    sent: int = 0
    failures: int = 0
    error: str = ""

    async def run(self, rate: float, count: int) -> None:
        for n in itertools.count(1):
            if count and n > count:
                return
            if (n - 1) % self.every == 0:
                try:
                    if self.prepare is not None:
                        await self.prepare()
                        self.prepare = None
                    self.sent += await self.send(n)
                except Exception as exc:  # noqa: BLE001 - reported, retried next round
                    self.failures += 1
                    error = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
                    if error != self.error:
                        say(f"{self.name}: failed: {error} (retrying; other senders go on)")
                    self.error = error
                else:
                    if self.error:
                        say(f"{self.name}: sending again")
                    self.error = ""
            await asyncio.sleep(1 / rate)

    def summary(self) -> str:
        state = f"failing: {self.error}" if self.error else "ok"
        return f"{self.name}: {self.sent} sent, {self.failures} failed rounds, {state}"


def senders(rng: random.Random, sqs: Any, http: aiohttp.ClientSession) -> tuple[list[Sender], dict[str, Any]]:
    """The senders of every seed's traffic (see the module docstring) and their AMQP connections."""
    amqp: dict[str, Any] = {}

    async def connect_amqp() -> None:
        if "connection" not in amqp:
            amqp["connection"] = await aio_pika.connect_robust(AMQP_URL)
        channel = await amqp["connection"].channel(publisher_confirms=True)
        # declared as Jasmin declares them (non-durable), like billingd.toml's exchange_declare = "transient"
        amqp["billing"] = await channel.declare_exchange("billing", "topic", durable=False)
        amqp["messaging"] = await channel.declare_exchange("messaging", "topic", durable=False)

    async def connect_raw() -> None:
        """A channel for the Jasmin stream, reopened (with a new connection if need be) after the
        broker closed it; the exchanges declared as Jasmin declares them at its start."""
        if "raw" not in amqp or amqp["raw"].is_closed:
            amqp["raw"] = await aiormq.connect(AMQP_URL)
        channel = await amqp["raw"].channel(publisher_confirms=True)
        for exchange in ("billing", "messaging"):
            await channel.exchange_declare(exchange, exchange_type="topic", durable=False)
        amqp["raw_channel"] = channel

    async def seed_json(n: int) -> int:
        messages = [(amqp["billing"], "bill_request.submit_sm_resp.smpp-connector-1", bill_event(n, rng))]
        messages += [(amqp["messaging"], "dlr.deliver_sm", body) for body in dlrs(n, rng)]
        for exchange, routing_key, body in messages:
            await exchange.publish(
                aio_pika.Message(_maybe_broken(json.dumps(body).encode(), rng), delivery_mode=2), routing_key
            )
        return len(messages)

    stories = JasminStories(rng)

    async def jasmin(n: int) -> int:
        if amqp["raw_channel"].is_closed:  # e.g. a publish the broker refused closed it
            await connect_raw()
        story = stories.story()
        for exchange_name, message in story:  # headers typed as Jasmin types them
            await amqp["raw_channel"].basic_publish(
                message.body,
                exchange=exchange_name,
                routing_key=message.routing_key,
                properties=jasmin_properties(message),
            )
        return len(story)

    async def entitlements() -> None:  # what the Stripe subscription sync would have written
        redis = aioredis.Redis.from_url(REDIS_URL)
        try:
            ledger = UsageLedger(redis, Unguarded("redis"))
            for user in USERS:
                today = int(time.time()) // 86400 * 86400
                await ledger.put_entitlement(
                    user, "AI_TUTOR_ACCESS", limit=50 * MICROS, period="day", period_start=today
                )
        finally:
            await redis.aclose()

    async def product() -> None:
        response = await http.post(
            f"{STRIPE_DOUBLE}/_double/objects/products",
            json={
                "id": "prod_growth",
                "name": "Growth",
                "metadata": {
                    "billingd.entitlement.AI_CREDITS": "1000/month",
                    "billingd.entitlement.WHATSAPP": "unlimited",
                    "billingd.entitlement.DASHBOARD": "access",
                },
            },
        )
        response.raise_for_status()

    async def send_all(queue: str, bodies: list[str], **extra: Any) -> int:
        for body in bodies:
            await sqs.send_message(QueueUrl=SQS + queue, MessageBody=body, **extra)
        return len(bodies)

    async def usage(n: int) -> int:
        bodies = [_maybe_broken(json.dumps(b).encode(), rng).decode() for b in usage_events(n, rng)]
        return await send_all("billing-usage-events", bodies)

    async def billing(n: int) -> int:
        bodies = [
            encode_body(json.dumps(b).encode(), "gzip", text_transport=True).decode() for b in billing_messages(n)
        ]
        gzip = {"content_encoding": {"DataType": "String", "StringValue": "gzip"}}
        return await send_all("billing-to-posthog-us", bodies, MessageAttributes=gzip)

    async def stripe(n: int) -> int:
        bodies = [json.dumps(b) for b in stripe_events(n)]
        return await send_all("billing-stripe-events", bodies) + await send_all("billing-stripe-webhooks", bodies)

    async def payments(n: int) -> int:
        bodies = [json.dumps(b) for b in await payment_events(n, rng, http)]
        return await send_all("billing-payment-events", bodies)

    return [
        Sender("amqp seed-002 JSON (billing, messaging)", seed_json, prepare=connect_amqp),
        Sender("amqp Jasmin 0.11.1 native (billing, messaging)", jasmin, prepare=connect_raw),
        Sender("sqs billing-usage-events", usage, prepare=entitlements),
        Sender("sqs billing-to-posthog-us", billing),
        Sender("sqs billing-stripe-events + billing-stripe-webhooks", stripe, every=5, prepare=product),
        Sender("sqs billing-payment-events", payments, every=5),
    ], amqp


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=5.0, help="rounds per second (each makes ~8 messages)")
    parser.add_argument("--count", type=int, default=0, help="stop after this many rounds (0: run until killed)")
    args = parser.parse_args()
    rng = random.Random(7)
    async with (
        aiohttp.ClientSession() as http,
        aioboto3.Session().client("sqs", region_name="us-east-1", endpoint_url=SQS_ENDPOINT) as sqs,
    ):
        streams, amqp = senders(rng, sqs, http)
        try:
            async with asyncio.TaskGroup() as group:
                for sender in streams:
                    group.create_task(sender.run(args.rate, args.count))
        finally:
            for sender in streams:
                say(sender.summary())
            for name in ("connection", "raw"):
                if name in amqp:
                    await amqp[name].close()
    if any(sender.error for sender in streams):
        raise SystemExit(1)


def _maybe_broken(data: bytes, rng: random.Random) -> bytes:
    return data[: len(data) // 2] if rng.random() < 0.02 else data


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
