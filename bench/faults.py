"""The fault suite (DESIGN §8): billingd as real processes under every fault at once, measured
from outside by the effects it leaves.

    uv run python bench/faults.py            # full: 3 replicas, 30,000 valid + 20,000 fuzzed, ~5 min
    uv run python bench/faults.py --quick    # what CI runs: 2 replicas, ~1 minute

Services: RabbitMQ (the machine's), a private `redis-server` (so it can be stopped), a private
fauxqs (SQS emulator, installed from npm on first use) and the Stripe double. billingd runs as
replicas on five sources: `sms_billing` and `sms_dlr` on AMQP; `usage` (with a Stripe meter),
`payment_events` and `stripe_events` on SQS. While valid events (with duplicates) and fuzzed
messages from `tests.hostile` flow on both transports, the chaos task kills billingd's broker
connections, SIGTERMs and SIGKILLs replicas (restarting them), stops Redis for a while, makes
Redis refuse writes with `MISCONF` (a snapshot that cannot be written), makes Stripe answer
500/429 and stop serving the meter event stream (404). The money edges ride along: tenants share
idempotency keys (every workspace sends `u-0`, `u-1`, …), payments are sent twice (during the
storms too), and the relayed Stripe webhooks were signed 10 minutes before they are sent. At the
end the queues must drain; then the suite compares Redis and the Stripe double with what was
sent: every invoice paid once, no "needs a refund", every webhook applied.

Prints one line of figures and exits 1 if any of lost, doubled, wrongly dead-lettered, crashes,
escalations, slow drains or unclean exit codes is non-zero, or the sentinel sent after the fuzz
was not applied.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import aioboto3
import aiormq
import anyio
import msgspec
import redis.asyncio as aioredis

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bench.fault_stack import Fauxqs, Replica, kill_billingd_connections, queue_messages
from billingd.clients.ledger.base import key
from billingd.clients.stripe_ids import meter_identifier
from billingd.daemon.app import STOP_GRACE
from billingd.testing.stripe import StripeDouble
from tests.hostile import amqp_messages, publish_raw, sqs_messages
from tests.seed002 import bill_event, dlr
from tests.signing import razorpay_relay, stripe_event, stripe_relay
from tests.support import AMQP_URL, RedisServer, free_port, to_toml, unique

#: The meter identifier of the sentinel usage event (the last one sent).
SENTINEL = meter_identifier("ws-sentinel", "ai_credits", "usage-sentinel")

DRAIN_TIMEOUT = 5.0
CDR_RANK = {"pending": 2, "failed": 3, "expired": 4, "rejected": 5, "delivered": 6}
FINAL = {"DELIVRD": "delivered", "UNDELIV": "failed", "EXPIRED": "expired", "REJECTD": "rejected"}


@dataclass(frozen=True)
class Plan:
    """How much of everything one run does."""

    replicas: int
    valid: int  # per source family: bills, DLRs, usage events
    fuzz_amqp: int
    fuzz_sqs: int
    broker_kills: int
    sigterms: int
    sigkills: int
    redis_outage: float
    stripe_storms: int
    duration: float  # seconds over which load and faults are spread
    payments: int = 0  # invoices paid by payment_events (a fifth of them sent twice)
    webhooks: int = 0  # relayed Stripe webhooks, signed 10 minutes before they are sent
    stream_404s: int = 0  # episodes of a Stripe that does not serve the meter event stream
    misconf: float = 0.0  # seconds Redis refuses writes with MISCONF


FULL = Plan(3, 10_000, 14_000, 6_000, 10, 10, 3, 30.0, 2, 150.0, 300, 300, 2, 10.0)
QUICK = Plan(2, 300, 700, 300, 1, 2, 1, 5.0, 1, 25.0, 20, 20, 1, 3.0)
#: The secrets the replicas get from the environment (the Stripe double and the relays use them).
WEBHOOK_SECRET, RAZORPAY_SECRET = "whsec_faults", "rzp_faults"


@dataclass
class Expected:
    """What the valid load must leave behind."""

    refunds: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    charges: dict[tuple[str, str], str] = field(default_factory=dict)
    cdrs: dict[str, str] = field(default_factory=dict)
    usage: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    meters: dict[str, int] = field(default_factory=dict)
    valid_amqp_ids: set[str] = field(default_factory=set)
    valid_sqs_ids: set[str] = field(default_factory=set)
    fuzz_amqp_ids: set[str] = field(default_factory=set)
    fuzz_sqs_ids: set[str] = field(default_factory=set)
    invoices: set[str] = field(default_factory=set)
    customers: dict[str, str] = field(default_factory=dict)  # customer → workspace (relayed webhooks)


@dataclass
class Figures:
    """What the chaos did and saw."""

    broker_kills: int = 0
    sigterms: list[tuple[int, float]] = field(default_factory=list)
    sigkills: int = 0
    redis_down: float = 0.0
    storms: int = 0
    stream_404s: int = 0
    misconf: float = 0.0


class Suite:
    """One run (see module docstring)."""

    def __init__(self, plan: Plan, workdir: Path) -> None:
        self.plan = plan
        self.workdir = workdir
        self.rng = random.Random(8)
        self.redis_server = RedisServer(str(workdir), "--enable-protected-configs", "yes")
        self.sqs = Fauxqs()
        self.stripe = StripeDouble()
        self.expected = Expected()
        self.figures = Figures()
        self.bills_exchange, self.bills_queue = unique("faults-billing"), unique("faults.bills")
        self.dlr_exchange, self.dlr_queue = unique("faults-messaging"), unique("faults.dlr")
        self.usage_queue = unique("faults-usage")
        self.payments_queue, self.webhooks_queue = unique("faults-payments"), unique("faults-webhooks")
        self.replicas: list[Replica] = []

    # -- set-up --------------------------------------------------------------------------

    def config(self, port: int) -> str:
        amqp = {"type": "amqp", "url": AMQP_URL, "prefetch": 20, "retry_initial": "200ms", "retry_max": "2s"}
        tree: dict[str, Any] = {
            "daemon": {"drain_timeout": f"{DRAIN_TIMEOUT:g}s", "log_level": "info", "log_format": "json"},
            "http": {"listen": f"127.0.0.1:{port}"},
            "supervisor": {"backoff_initial": "100ms", "backoff_max": "2s"},
            "redis": {"url": self.redis_server.url, "timeout": "1s"},
            "stripe": {
                "api_key": "${STRIPE_SECRET_KEY}",
                "webhook_secret": "${STRIPE_WEBHOOK_SECRET}",
                "api_base": self.stripe.url,
                "timeout": "2s",
                "meters": {"ai_credits": "ai_credits"},
            },
            "razorpay": {
                "key_id": "rzp_faults",
                "key_secret": "${RAZORPAY_KEY_SECRET}",
                "webhook_secret": "${RAZORPAY_WEBHOOK_SECRET}",
            },
            "breakers": {"default": {"failure_threshold": 3, "reset_timeout": "500ms", "reset_timeout_max": "2s"}},
            "sources": [
                {
                    **amqp,
                    "name": "bills",
                    "handler": "sms_billing",
                    "exchange": self.bills_exchange,
                    "queue": self.bills_queue,
                    "routing_keys": ["bill_request.#"],
                },
                {
                    **amqp,
                    "name": "dlrs",
                    "handler": "sms_dlr",
                    "exchange": self.dlr_exchange,
                    "queue": self.dlr_queue,
                    "routing_keys": ["dlr.#"],
                },
                {
                    "type": "sqs",
                    "name": "usage",
                    "handler": "usage",
                    "prefetch": 20,
                    "queue_url": self.sqs.queue_url(self.usage_queue),
                    "dead_letter_queue_url": self.sqs.queue_url(self.usage_queue + "-dlq"),
                    "endpoint_url": self.sqs.endpoint,
                    "wait_time": "1s",
                    "visibility_timeout": "30s",
                    "retry_initial": "1s",
                    "retry_max": "2s",
                },
                self._sqs_source("payments", "payment_events"),
                self._sqs_source("webhooks", "stripe_events"),
            ],
        }
        return to_toml(tree)

    def _sqs_source(self, name: str, handler: str) -> dict[str, Any]:
        queue = self.payments_queue if name == "payments" else self.webhooks_queue
        return {
            "type": "sqs",
            "name": name,
            "handler": handler,
            "prefetch": 10,
            "max_attempts": 3,
            "queue_url": self.sqs.queue_url(queue),
            "dead_letter_queue_url": self.sqs.queue_url(queue + "-dlq"),
            "endpoint_url": self.sqs.endpoint,
            "wait_time": "1s",
            "visibility_timeout": "30s",
            "retry_initial": "1s",
            "retry_max": "2s",
        }

    async def set_up(self, stack: Any) -> None:
        await self.redis_server.start()
        await self.sqs.start()
        await stack.enter_async_context(self.stripe.running())
        async with self._sqs_client() as client:
            for queue in (self.usage_queue, self.payments_queue, self.webhooks_queue):
                for name in (queue + "-dlq", queue):
                    await client.create_queue(QueueName=name, Attributes={"VisibilityTimeout": "30"})
        env = {
            "STRIPE_SECRET_KEY": "sk_test_faults",
            "STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET,
            "RAZORPAY_KEY_SECRET": "s",
            "RAZORPAY_WEBHOOK_SECRET": RAZORPAY_SECRET,
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_DEFAULT_REGION": "us-east-1",
            "NO_PROXY": "*",
        }
        for i in range(self.plan.replicas):
            port = free_port()
            config = self.workdir / f"replica-{i}.toml"
            config.write_text(self.config(port))
            self.replicas.append(Replica(i, config, port, self.workdir / f"replica-{i}.log", env))
        async with anyio.create_task_group() as tg:
            for replica in self.replicas:
                tg.start_soon(replica.start)

    def _sqs_client(self) -> Any:
        return aioboto3.Session(aws_access_key_id="test", aws_secret_access_key="test").client(
            "sqs", region_name="us-east-1", endpoint_url=self.sqs.endpoint
        )

    # -- load ----------------------------------------------------------------------------

    def _valid_amqp(self, n: int) -> list[tuple[str, str, str, bytes]]:
        """(exchange, routing key, message id, body) of one bill and one DLR, some duplicated."""
        out = []
        uid = f"acct-{n % 50}"
        bid = f"bid-{n}"
        status = "ESME_ROK" if n % 3 == 0 else self.rng.choice(["ESME_RTHROTTLED", "ESME_RINVDSTADR"])
        amount = self.rng.randint(1, 200) / 100
        state = "confirmed" if status == "ESME_ROK" else "refunded"
        self.expected.charges[(uid, bid)] = state
        if state == "refunded":
            self.expected.refunds[uid] += round(amount * 1_000_000)
        body = msgspec.json.encode(bill_event(bid, uid, status, amount=amount))
        copies = 2 if n % 10 == 0 else 1  # a producer's duplicate
        for c in range(copies):
            out.append((self.bills_exchange, f"bill_request.submit_sm_resp.{uid}", f"v-bill-{n}-{c}", body))
        message_id = f"sms-{n}"
        final = self.rng.choice(list(FINAL))
        self.expected.cdrs[message_id] = FINAL[final]
        for c, jasmin in enumerate(["ACCEPTD", final] if n % 4 == 0 else [final]):
            out.append(
                (self.dlr_exchange, "dlr.deliver_sm", f"v-dlr-{n}-{c}", msgspec.json.encode(dlr(message_id, jasmin)))
            )
        return out

    def _valid_usage(self, n: int) -> list[str]:
        workspace = f"ws-{n % 40}"
        value = self.rng.randint(1, 5)
        idempotency = f"u-{n // 40}"  # unique within the workspace; every workspace uses the same keys
        self.expected.usage[workspace] += value * 1_000_000
        self.expected.meters[meter_identifier(workspace, "ai_credits", idempotency)] = value
        body = msgspec.json.encode(
            {
                "event_type": "ai_credits",
                "workspace_id": workspace,
                "value": value,
                "idempotency_key": idempotency,
                "stripe_customer_id": f"cus_{workspace}",
            }
        ).decode()
        return [body] * (2 if n % 10 == 0 else 1)

    async def load(self) -> None:
        rounds = 50
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._amqp_load, rounds)
            tg.start_soon(self._sqs_load, rounds)
            tg.start_soon(self._money_load)

    async def _money_load(self) -> None:
        """Payments (a fifth sent twice, spread over the run: some meet the storms) and relayed
        webhooks signed 10 minutes ago."""
        payments: list[str] = []
        for n in range(self.plan.payments):
            invoice = f"in_faults_{n}"
            self.stripe.invoice(invoice, 1000 + n, "inr")
            self.expected.invoices.add(invoice)
            if n % 2:
                capture = {"event": "payment.captured", "payload": {"payment": {"entity": {
                    "id": f"pay_f{n}", "amount": 1000 + n, "currency": "INR",
                    "notes": {"stripe_invoice_id": invoice}}}}}  # fmt: skip
                body = msgspec.json.encode(razorpay_relay(capture, RAZORPAY_SECRET, f"evt_rzp_f{n}")).decode()
            else:
                body = msgspec.json.encode({"gateway": "manual", "stripe_invoice_id": invoice, "reference": f"UTR{n}",
                                            "amount": 1000 + n, "currency": "inr"}).decode()  # fmt: skip
            payments += [body] * (2 if n % 5 == 0 else 1)
        signed = int(time.time()) - 600
        webhooks = []
        for n in range(self.plan.webhooks):
            customer, workspace = f"cus_faults_{n}", f"ws-hook-{n}"
            self.expected.customers[customer] = workspace
            obj = {"id": customer, "object": "customer", "metadata": {"workspace_id": workspace}}
            relay = stripe_relay(stripe_event("customer.updated", obj, signed, f"evt_f{n}"), WEBHOOK_SECRET, signed)
            webhooks.append(msgspec.json.encode(relay).decode())
        pause = self.plan.duration * 0.8 / 10
        async with self._sqs_client() as client:
            for r in range(10):
                for queue, bodies in ((self.payments_queue, payments), (self.webhooks_queue, webhooks)):
                    share = bodies[r * len(bodies) // 10 : (r + 1) * len(bodies) // 10]
                    for start in range(0, len(share), 10):
                        entries = [{"Id": str(i), "MessageBody": b} for i, b in enumerate(share[start : start + 10])]
                        response = await client.send_message_batch(QueueUrl=self.sqs.queue_url(queue), Entries=entries)
                        self.expected.valid_sqs_ids.update(x["MessageId"] for x in response.get("Successful", []))
                await anyio.sleep(pause)

    async def _amqp_load(self, rounds: int) -> None:
        plan = self.plan
        fuzz = list(amqp_messages(seed=8, count=plan.fuzz_amqp))
        valid = [m for n in range(plan.valid) for m in self._valid_amqp(n)]
        per_round_valid, per_round_fuzz = -(-len(valid) // rounds), -(-len(fuzz) // rounds)
        pause = plan.duration * 0.8 / rounds
        connection = await aio_pika.connect_robust(AMQP_URL)
        channel = await connection.channel(publisher_confirms=True)
        exchanges = {
            name: await channel.declare_exchange(name, "topic", durable=True)
            for name in (self.bills_exchange, self.dlr_exchange)
        }
        raw = await aiormq.connect(AMQP_URL)
        raw_channel = await raw.channel(publisher_confirms=True)
        for r in range(rounds):
            for exchange, routing_key, message_id, body in valid[r * per_round_valid : (r + 1) * per_round_valid]:
                self.expected.valid_amqp_ids.add(message_id)
                message = aio_pika.Message(body, message_id=message_id, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
                await _retry(exchanges[exchange].publish, message, routing_key)
            for i, msg in enumerate(fuzz[r * per_round_fuzz : (r + 1) * per_round_fuzz]):
                exchange = self.bills_exchange if i % 2 else self.dlr_exchange
                key_ = "bill_request.fuzz" if i % 2 else "dlr.fuzz"
                if msg.message_id:
                    self.expected.fuzz_amqp_ids.add(msg.message_id)
                while True:
                    try:
                        await publish_raw(raw_channel, exchange, key_, msg)
                        break
                    except (aiormq.exceptions.AMQPError, ConnectionError, OSError):
                        raw = await aiormq.connect(AMQP_URL)
                        raw_channel = await raw.channel(publisher_confirms=True)
            await anyio.sleep(pause)
        # the sentinel: a valid message after all the fuzz
        sentinel = msgspec.json.encode(dlr("sentinel", "DELIVRD"))
        self.expected.cdrs["sentinel"] = "delivered"
        self.expected.valid_amqp_ids.add("v-sentinel")
        message = aio_pika.Message(sentinel, message_id="v-sentinel", delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
        await _retry(exchanges[self.dlr_exchange].publish, message, "dlr.deliver_sm")
        await raw.close()
        await connection.close()

    async def _sqs_load(self, rounds: int) -> None:
        plan = self.plan
        url = self.sqs.queue_url(self.usage_queue)
        valid = [b for n in range(plan.valid) for b in self._valid_usage(n)]
        fuzz = list(sqs_messages(seed=8, count=plan.fuzz_sqs))
        per_round_valid, per_round_fuzz = -(-len(valid) // rounds), -(-len(fuzz) // rounds)
        pause = plan.duration * 0.8 / rounds
        async with self._sqs_client() as client:
            for r in range(rounds):
                for start in range(r * per_round_valid, min((r + 1) * per_round_valid, len(valid)), 10):
                    entries = [{"Id": str(i), "MessageBody": b} for i, b in enumerate(valid[start : start + 10])]
                    response = await client.send_message_batch(QueueUrl=url, Entries=entries)
                    self.expected.valid_sqs_ids.update(x["MessageId"] for x in response.get("Successful", []))
                    if response.get("Failed"):
                        raise RuntimeError(f"fauxqs refused valid messages: {response['Failed']}")
                for msg in fuzz[r * per_round_fuzz : (r + 1) * per_round_fuzz]:  # one by one: up to 200 KB each
                    kwargs: dict[str, Any] = {"QueueUrl": url, "MessageBody": msg.body}
                    if msg.attributes:
                        kwargs["MessageAttributes"] = msg.attributes
                    self.expected.fuzz_sqs_ids.add((await client.send_message(**kwargs))["MessageId"])
                await anyio.sleep(pause)
            sentinel = {
                "event_type": "ai_credits",
                "workspace_id": "ws-sentinel",
                "value": 1,
                "idempotency_key": "usage-sentinel",
                "stripe_customer_id": "cus_sentinel",
            }
            self.expected.usage["ws-sentinel"] += 1_000_000
            self.expected.meters[SENTINEL] = 1
            response = await client.send_message(QueueUrl=url, MessageBody=msgspec.json.encode(sentinel).decode())
            self.expected.valid_sqs_ids.add(response["MessageId"])

    # -- chaos ---------------------------------------------------------------------------

    async def chaos(self) -> None:
        plan = self.plan
        events: list[tuple[float, str]] = []
        span = plan.duration * 0.75
        for kind, count in (
            ("kill", plan.broker_kills),
            ("sigterm", plan.sigterms),
            ("sigkill", plan.sigkills),
            ("storm", plan.stripe_storms),
            ("stream_404", plan.stream_404s),
        ):
            events += [(self.rng.uniform(0.05, 1) * span, kind) for _ in range(count)]
        if plan.redis_outage:
            events.append((span * 0.4, "redis"))
        if plan.misconf:
            events.append((span * 0.7, "misconf"))
        events.sort()
        started = anyio.current_time()
        async with anyio.create_task_group() as tg:
            for at, kind in events:
                await anyio.sleep_until(started + at)
                if kind == "kill":
                    self.figures.broker_kills += await kill_billingd_connections() > 0
                elif kind in ("sigterm", "sigkill"):
                    replica = self.rng.choice([r for r in self.replicas if r.running] or self.replicas)
                    await self._restart(replica, kind)
                elif kind == "storm":
                    tg.start_soon(self._storm)
                elif kind == "stream_404":
                    tg.start_soon(self._stream_404)
                elif kind == "misconf":
                    tg.start_soon(self._misconf)
                else:
                    tg.start_soon(self._redis_outage)

    async def _restart(self, replica: Replica, kind: str) -> None:
        if not replica.running:
            return
        if kind == "sigterm":
            self.figures.sigterms.append(await replica.terminate())
        else:
            await replica.kill()
            self.figures.sigkills += 1
        await replica.start()

    async def _storm(self) -> None:
        self.stripe.set_mode("error", self.rng.choice([500, 429]))
        await anyio.sleep(min(10.0, self.plan.duration / 10))
        self.stripe.set_mode("ok")
        self.figures.storms += 1

    async def _stream_404(self) -> None:
        """Stripe (a proxy, a mock) stops serving the v2 meter event stream for a while."""
        self.stripe.unserved = ("/v2/billing/meter_event",)
        await anyio.sleep(min(10.0, self.plan.duration / 10))
        self.stripe.unserved = ()
        self.figures.stream_404s += 1

    async def _misconf(self) -> None:
        """Redis cannot write its snapshot (its file name is a directory) and refuses every write
        with MISCONF; then the snapshot is written again."""
        redis = aioredis.Redis.from_url(self.redis_server.url)
        try:
            (self.workdir / "blocked.rdb").mkdir(exist_ok=True)
            await redis.config_set("save", "3600 1")
            await redis.config_set("dbfilename", "blocked.rdb")
            await redis.bgsave()
            started = time.monotonic()
            await anyio.sleep(self.plan.misconf)
            await redis.config_set("dbfilename", "dump.rdb")
            await redis.bgsave()
            self.figures.misconf = time.monotonic() - started
            await anyio.sleep(1)
            await redis.config_set("save", "")
        except (OSError, aioredis.RedisError) as exc:  # Redis stopped by the outage meanwhile: try once more
            print(f"[faults] MISCONF episode cut short: {exc}", file=sys.stderr)
        finally:
            await redis.aclose()

    async def _redis_outage(self) -> None:
        await self.redis_server.stop()
        started = time.monotonic()
        await anyio.sleep(self.plan.redis_outage)
        await self.redis_server.start()
        self.figures.redis_down = time.monotonic() - started

    # -- the end -------------------------------------------------------------------------

    async def settle(self, within: float) -> bool:
        """Wait until every source queue is empty (nothing ready, unacked or in flight) and the
        meter outboxes have delivered what they hold (the Stripe double recorded every expected
        meter event): an acked usage event's meter event is sent after its ack, so a stop right
        after the queues empty would leave it waiting in Redis — durable, but not yet at Stripe."""
        amqp = [self.bills_queue, f"{self.bills_queue}.retry", self.dlr_queue, f"{self.dlr_queue}.retry"]
        deadline = anyio.current_time() + within
        async with self._sqs_client() as client:
            while anyio.current_time() < deadline:
                sqs = 0
                for queue in (self.usage_queue, self.payments_queue, self.webhooks_queue):
                    attributes = (
                        await client.get_queue_attributes(
                            QueueUrl=self.sqs.queue_url(queue),
                            AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
                        )
                    )["Attributes"]
                    sqs += sum(int(v) for v in attributes.values())
                recorded = {event["identifier"] for event in self.stripe.meter_events}
                delivered = all(identifier in recorded for identifier in self.expected.meters)
                if sqs == 0 and delivered and await queue_messages(amqp) == 0:
                    return True
                await anyio.sleep(1)
        return False

    async def stop_all(self) -> None:
        async with anyio.create_task_group() as tg:
            for replica in self.replicas:
                if replica.running:
                    tg.start_soon(self._final_stop, replica)

    async def _final_stop(self, replica: Replica) -> None:
        self.figures.sigterms.append(await replica.terminate())

    async def check(self) -> dict[str, Any]:
        e = self.expected
        redis = aioredis.Redis.from_url(self.redis_server.url)
        lost = doubled = 0
        for (uid, bid), state in e.charges.items():
            charge = await redis.hgetall(key("sms", "charge", bid, tag=uid))
            lost += charge.get(b"state", b"").decode() != state
        for uid, micros in e.refunds.items():
            got = int(await redis.get(key("sms", "refunds", tag=uid)) or 0)
            lost += got < micros
            doubled += got > micros
        for message_id, status in e.cdrs.items():
            got = (await redis.hget(key("cdr", tag=message_id), "status") or b"").decode()
            lost += got != status
        for workspace, micros in e.usage.items():
            got = int(await redis.hget(key("usage", tag=workspace), "ai_credits") or 0)
            lost += got < micros
            doubled += got > micros
        for customer, workspace in e.customers.items():
            lost += (await redis.get(key("subject", tag=customer)) or b"").decode() != workspace
        await redis.aclose()
        paid = Counter(self.stripe.payments)
        lost += sum(1 for invoice in e.invoices if paid[invoice] == 0)
        doubled += sum(1 for n in paid.values() if n > 1)
        meters = Counter(event["identifier"] for event in self.stripe.meter_events)
        values = {event["identifier"]: int(event["payload"]["value"]) for event in self.stripe.meter_events}
        lost += sum(1 for identifier, value in e.meters.items() if values.get(identifier) != value)
        doubled += sum(1 for n in meters.values() if n > 1)  # the double refuses these; a refusal dead-letters
        letters = await self._dead_letters()
        wrong = sum(1 for message_id in letters if message_id in e.valid_amqp_ids | e.valid_sqs_ids)
        fuzz_ids = e.fuzz_amqp_ids | e.fuzz_sqs_ids
        fuzz_dead = sum(1 for message_id, reason in letters.items() if message_id in fuzz_ids and reason)
        logs = "".join(r.log.read_text(errors="replace") for r in self.replicas)
        bound = DRAIN_TIMEOUT + STOP_GRACE
        wrong += logs.count("needs a refund")  # a payment billingd made, reported as a double collection
        return {
            "lost": lost,
            "doubled": doubled,
            "wrong_dlq": wrong,
            "no_reason": sum(1 for reason in letters.values() if not reason),
            "fuzz": len(fuzz_ids),
            "fuzz_dlq": fuzz_dead,
            "crashes": logs.count('"actor crashed"'),
            "escalations": logs.count('"supervisor escalation'),
            "slow_drains": sum(1 for _, seconds in self.figures.sigterms if seconds > bound),
            "bad_exits": sum(1 for code, _ in self.figures.sigterms if code != 0),
            "max_drain": max((s for _, s in self.figures.sigterms), default=0.0),
            "sentinel": e.cdrs["sentinel"] == "delivered" and meters[SENTINEL] == 1,
        }

    async def _dead_letters(self) -> dict[str, str]:
        """Original message id → reason of every dead letter on both transports."""
        letters: dict[str, str] = {}
        connection = await aio_pika.connect(AMQP_URL)
        channel = await connection.channel()
        for queue in (f"{self.bills_queue}.dlq", f"{self.dlr_queue}.dlq"):
            declared = await channel.declare_queue(queue, passive=True)
            while (message := await declared.get(no_ack=True, fail=False)) is not None:
                headers = message.headers or {}
                original = str(headers.get("x-billingd-original-message-id", message.message_id or ""))
                letters[original] = str(headers.get("x-billingd-reason", ""))
        await connection.close()
        async with self._sqs_client() as client:
            for queue in (self.usage_queue, self.payments_queue, self.webhooks_queue):
                url = self.sqs.queue_url(queue + "-dlq")
                while messages := (
                    await client.receive_message(
                        QueueUrl=url, MaxNumberOfMessages=10, MessageAttributeNames=["All"], VisibilityTimeout=300
                    )
                ).get("Messages", []):
                    for m in messages:
                        attributes = m.get("MessageAttributes", {})
                        original = attributes.get("original_message_id", {}).get("StringValue", m["MessageId"])
                        letters[original] = attributes.get("reason", {}).get("StringValue", "")
        return letters

    async def tear_down(self) -> None:
        for replica in self.replicas:
            if replica.running:
                await replica.kill()
        self.sqs.stop()
        await self.redis_server.stop()
        connection = await aio_pika.connect(AMQP_URL)
        channel = await connection.channel()
        for queue in (self.bills_queue, self.dlr_queue):
            for suffix in ("", ".retry", ".dlq"):
                await channel.queue_delete(queue + suffix)
        for exchange in (self.bills_exchange, self.dlr_exchange):
            await channel.exchange_delete(exchange)
        await connection.close()


async def _retry(publish: Any, *args: Any) -> None:
    """Publish until confirmed (the broker connection may be killed under us): at least once."""
    for attempt in range(100):
        try:
            await publish(*args)
            return
        except (aio_pika.exceptions.AMQPError, ConnectionError, OSError, RuntimeError):
            await anyio.sleep(min(1.0, 0.05 * (attempt + 1)))
    raise RuntimeError("could not publish for 100 attempts")


async def run(plan: Plan) -> int:
    import contextlib

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="billingd-faults-") as tmp:
        suite = Suite(plan, Path(tmp))
        async with contextlib.AsyncExitStack() as stack:
            try:
                await suite.set_up(stack)
                async with anyio.create_task_group() as tg:
                    tg.start_soon(suite.load)
                    tg.start_soon(suite.chaos)
                settled = await suite.settle(within=120)
                await suite.stop_all()
                figures = await suite.check()
            finally:
                await suite.tear_down()
    f, fig = figures, suite.figures
    failed = (
        any(
            f[k]
            for k in ("lost", "doubled", "wrong_dlq", "no_reason", "crashes", "escalations", "slow_drains", "bad_exits")
        )
        or not f["sentinel"]
        or not settled
    )
    print(
        f"faults: replicas={plan.replicas} valid={3 * plan.valid} fuzz={plan.fuzz_amqp + plan.fuzz_sqs} "
        f"fuzz_tracked={f['fuzz']} lost={f['lost']} "
        f"doubled={f['doubled']} wrongly_dead_lettered={f['wrong_dlq']} fuzz_dead_lettered={f['fuzz_dlq']} "
        f"fuzz_acked_as_valid={f['fuzz'] - f['fuzz_dlq']} "
        f"letters_without_reason={f['no_reason']} crashes={f['crashes']} escalations={f['escalations']} "
        f"broker_kills={fig.broker_kills} sigterms={len(fig.sigterms)} sigkills={fig.sigkills} "
        f"redis_down={fig.redis_down:.0f}s redis_misconf={fig.misconf:.0f}s stripe_storms={fig.storms} "
        f"stream_404s={fig.stream_404s} payments={plan.payments} webhooks={plan.webhooks} "
        f"drains_over_bound={f['slow_drains']} "
        f"max_drain={f['max_drain']:.2f}s/{DRAIN_TIMEOUT + STOP_GRACE:.0f}s unclean_exits={f['bad_exits']} "
        f"settled={settled} sentinel={'ok' if f['sentinel'] else 'MISSING'} took={time.monotonic() - started:.0f}s "
        f"result={'FAIL' if failed else 'ok'}"
    )
    return 1 if failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the short version CI runs")
    args = parser.parse_args()
    from billingd.daemon.logging import configure_logging

    configure_logging("error", "console")
    return anyio.run(run, QUICK if args.quick else FULL, backend="asyncio")


if __name__ == "__main__":
    sys.exit(main())
