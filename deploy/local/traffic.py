"""Sample traffic for the local stack: the message formats of the seed documents, a few per second.

    uv run python deploy/local/traffic.py [--rate 5] [--count 0]

* seed 002 (RabbitMQ): Jasmin bill events on exchange `billing` (mostly ESME_ROK, some refunds)
  and DLRs on `messaging` (ACCEPTD then a final status, sometimes out of order);
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
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import itertools
import json
import os
import random
import time

import aio_pika
import aioboto3
import aiohttp
import redis.asyncio as aioredis

from billingd.clients import Unguarded
from billingd.clients.ledger import MICROS, UsageLedger
from billingd.sources.codecs import encode_body

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
RUN = f"{int(time.time()):x}"  # idempotency keys are per run: Redis remembers earlier runs' events
SQS = "http://sqs.us-east-1.localhost:4566/000000000000/"
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


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=5.0, help="rounds per second (each makes ~8 messages)")
    parser.add_argument("--count", type=int, default=0, help="stop after this many rounds (0: run until killed)")
    args = parser.parse_args()
    rng = random.Random(7)
    redis = aioredis.Redis.from_url("redis://127.0.0.1:6379/0")
    ledger = UsageLedger(redis, Unguarded("redis"))
    for user in USERS:  # what the Stripe subscription sync would have written
        await ledger.put_entitlement(
            user, "AI_TUTOR_ACCESS", limit=50 * MICROS, period="day", period_start=int(time.time()) // 86400 * 86400
        )
    http = aiohttp.ClientSession()
    await http.post(
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
    connection = await aio_pika.connect_robust(AMQP_URL)
    channel = await connection.channel(publisher_confirms=True)
    billing = await channel.declare_exchange("billing", "topic", durable=True)
    messaging = await channel.declare_exchange("messaging", "topic", durable=True)
    async with aioboto3.Session().client("sqs", region_name="us-east-1", endpoint_url="http://127.0.0.1:4566") as sqs:
        for n in itertools.count(1):
            if args.count and n > args.count:
                break
            amqp = [(billing, "bill_request.submit_sm_resp.smpp-connector-1", bill_event(n, rng))]
            amqp += [(messaging, "dlr.deliver_sm", body) for body in dlrs(n, rng)]
            for exchange, routing_key, body in amqp:
                await exchange.publish(
                    aio_pika.Message(_maybe_broken(json.dumps(body).encode(), rng), delivery_mode=2), routing_key
                )
            for body in usage_events(n, rng):
                await sqs.send_message(
                    QueueUrl=SQS + "billing-usage-events",
                    MessageBody=_maybe_broken(json.dumps(body).encode(), rng).decode(),
                )
            for body in billing_messages(n):
                packed = encode_body(json.dumps(body).encode(), "gzip", text_transport=True).decode()
                await sqs.send_message(
                    QueueUrl=SQS + "billing-to-posthog-us",
                    MessageBody=packed,
                    MessageAttributes={"content_encoding": {"DataType": "String", "StringValue": "gzip"}},
                )
            if n % 5 == 1:  # a slower trickle of Stripe and payment traffic
                for body in stripe_events(n):
                    await sqs.send_message(QueueUrl=SQS + "billing-stripe-events", MessageBody=json.dumps(body))
                    await sqs.send_message(QueueUrl=SQS + "billing-stripe-webhooks", MessageBody=json.dumps(body))
                for body in await payment_events(n, rng, http):
                    await sqs.send_message(QueueUrl=SQS + "billing-payment-events", MessageBody=json.dumps(body))
            await asyncio.sleep(1 / args.rate)
    await http.close()
    await connection.close()
    await redis.aclose()


def _maybe_broken(data: bytes, rng: random.Random) -> bytes:
    return data[: len(data) // 2] if rng.random() < 0.02 else data


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
