"""Benchmark: usage events per second with the meter outbox against inline delivery, and the cost
of a reconciliation run.

    uv run python bench/meter_outbox.py [--events 3000] [--customers 50] [--latency 0.15] [--days 1000]

Rows (same run, the Stripe double answering every request after `--latency` seconds and keeping
Stripe's live limits; billingd in this process on a RabbitMQ `usage` source at the default
prefetch, 20):

* `inline`: each message waits for its own stream request before its ack (`meter_delivery =
  "inline"`): Little's law caps it near prefetch / latency;
* `outbox`: the message is acked once its Redis step (which enqueues the meter event) ran; the
  sender streams the outbox. Reported: acks per second (intake), and the seconds until the last
  event reached Stripe.

Then `reconcile`: a journal of `--days` customer-meter-days (24 hourly buckets each, the same at
the double) reconciled once within the default basic budget (80 requests/s): Stripe requests,
seconds, and the journal's bytes per customer-meter-day (`MEMORY USAGE`).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from typing import Any

import redis.asyncio as aioredis

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bench.common import seconds_to_settle
from bench.compare import drop_amqp
from bench.stripe_meters import preload
from billingd.clients import Clients, Unguarded
from billingd.clients.ledger import UsageLedger
from billingd.clients.ledger.base import key
from billingd.daemon.logging import configure_logging
from billingd.metering.reconcile import Reconciler
from billingd.testing.stripe import StripeContract, StripeDouble
from tests.support import REDIS_URL, amqp_source, make_settings, running, unique

METER = "ai_credits"


async def delivery_row(mode: str, events: int, customers: int, latency: float) -> dict[str, Any]:
    redis = aioredis.Redis.from_url(REDIS_URL)
    await redis.flushdb()
    ledger = UsageLedger(redis, Unguarded("redis"))
    workspaces = [unique("ws") for _ in range(customers)]
    for i, workspace in enumerate(workspaces):
        await ledger.set_customer(workspace, f"cus_bench{i}")
    bodies = [{"event_type": METER, "workspace_id": workspaces[i % customers], "value": 1 + i % 7,
               "idempotency_key": f"{mode}-{i}"} for i in range(events)]  # fmt: skip
    double = StripeDouble(StripeContract.live(latency))
    source = amqp_source("usage", max_attempts=5)  # prefetch: the default 20
    source.pop("prefetch", None)
    await preload(source, bodies)
    stripe = {"api_key": "sk_test_bench", "meters": {METER: METER}, "timeout": "5s", "meter_delivery": mode}
    async with double.running():
        stripe["api_base"] = double.url
        async with running(make_settings([source], stripe=stripe)) as daemon:
            acked = daemon.metrics.processed.labels(source["name"], "ack")
            intake = await seconds_to_settle(acked._value.get, events)  # from the first ack
            acks_done = time.perf_counter()
            while len(double.meter_events) < events:
                await asyncio.sleep(0.01)
            billed = intake + time.perf_counter() - acks_done
        requests = len([r for r in double.requests if "meter_event" in r.path])
    await drop_amqp(source)
    await redis.aclose()
    return {"mode": mode, "events": events, "acks_per_s": events / intake if intake else float("inf"),
            "billed_after_s": billed, "stripe_requests": requests}  # fmt: skip


async def reconcile_row(days: int, latency: float) -> dict[str, Any]:
    """`days` customer-meter-days (one meter, `days` customers, one day each) reconciled once."""
    redis = aioredis.Redis.from_url(REDIS_URL)
    await redis.flushdb()
    double = StripeDouble(StripeContract.live(latency))
    now = int(time.time())
    first_hour = now // 3600 - 25
    day = first_hour * 3600 // 86400
    for c in range(days):
        subject, customer = f"ws-rec-{c}", f"cus_rec{c}"
        for h in range(first_hour, first_hour + 24):
            double.book.foreign(METER, customer, 3, h * 3600 + 60)
            await redis.hset(key("journal", str(h * 3600 // 86400), tag=subject), mapping={
                f"{customer}|{METER}|{h}": 3, f"{customer}|{METER}|{h}@": now - 7200})  # fmt: skip
        await redis.sadd(key("journal-index", tag=str(day)), subject)
        await redis.sadd(key("journal-index", tag=str(day + 1)), subject)
    sizes = []
    for c in range(min(days, 200)):
        for d in (day, day + 1):
            size = await redis.memory_usage(key("journal", str(d), tag=f"ws-rec-{c}"))
            sizes.append(size or 0)
    per_day = sum(sizes) / max(1, min(days, 200))
    async with double.running():
        settings = make_settings([], stripe={"api_key": "sk_live_bench", "api_base": double.url,
                                             "meters": {METER: METER}})  # fmt: skip
        clients = Clients(settings.redis, settings.stripe, Unguarded)
        reconciler = Reconciler(clients.outbox, clients.stripe, clients.usage_ledger, settle=0,
                                correct_within=72 * 3600, keep=86400, meters=(METER,))  # fmt: skip
        started = time.perf_counter()
        report = await reconciler.run(since=first_hour * 3600, until=(first_hour + 24) * 3600)
        seconds = time.perf_counter() - started
        await clients.aclose()
    await redis.aclose()
    return {"customer_meter_days": days, "buckets": report.compared, "differences": len(report.differences),
            "stripe_requests": report.requests, "seconds": seconds, "bytes": per_day}  # fmt: skip


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=3000)
    parser.add_argument("--customers", type=int, default=50)
    parser.add_argument("--latency", type=float, default=0.15)
    parser.add_argument("--days", type=int, default=1000)
    parser.add_argument("--rows", default="inline,outbox,reconcile")
    args = parser.parse_args()
    configure_logging(os.environ.get("BENCH_LOG", "error"), "console")
    rows = args.rows.split(",")
    for mode in ("inline", "outbox"):
        if mode in rows:
            r = await delivery_row(mode, args.events, args.customers, args.latency)
            print(f"{r['mode']:>7}: {r['events']} events  {r['acks_per_s']:8.1f} acks/s  every event at Stripe after "
                  f"{r['billed_after_s']:6.1f} s  stream requests {r['stripe_requests']}", flush=True)  # fmt: skip
    if "reconcile" in rows:
        r = await reconcile_row(args.days, args.latency)
        print(f"reconcile: {r['customer_meter_days']} customer-meter-days ({r['buckets']} hourly buckets): "
              f"{r['stripe_requests']} Stripe requests in {r['seconds']:.1f} s, {r['differences']} differences; "
              f"journal {r['bytes']:.0f} bytes per customer-meter-day", flush=True)  # fmt: skip


if __name__ == "__main__":
    asyncio.run(main())
