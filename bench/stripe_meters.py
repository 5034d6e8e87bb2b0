"""Benchmark: usage events metered at a Stripe double that keeps Stripe's contract.

    uv run python bench/stripe_meters.py [--events 1200] [--latency 0.15] [--v1-events 300]

The double (billingd/testing/stripe.py) answers every request after `--latency` seconds and keeps
Stripe's live-mode limits: 100 basic requests/s, 1,000 v1 meter events/s with one call in flight
per (customer, meter) — a second is a 429 —, 10,000 stream requests/s; an `identifier` Stripe
already holds is a 400 "An event already exists with identifier …" (v1) or dropped (stream).
The events are seed-004 usage events of two busy customers on one meter, 5 % of which Stripe
already holds (recorded by someone else), preloaded on a RabbitMQ queue and handled by billingd
in this process (`usage`, prefetch 200, `meter_delivery = "inline"`: each message waits for its
own request; `bench/meter_outbox.py` measures the outbox). Rows:

* `stream`: `meter_api = "stream"` (the default);
* `v1`: one call per event, against the ceiling of one call per latency per customer;
* `replicas`: three billingd daemons sharing `max_requests_per_second = 25` against a double
  that allows 25/s (a sandbox: v1 meter events count against the basic limit), 30 customers.

Each row reports events/s (from the first handled message to the last settled one), calls
answered 429, dead letters, whether every identifier is recorded exactly once, the most requests
the double saw in any one-second window and the seconds billingd spent waiting for its budget.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from typing import Any

import aio_pika
import msgspec
import redis.asyncio as aioredis

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bench.common import seconds_to_settle
from bench.compare import drop_amqp
from billingd.clients import Unguarded
from billingd.clients.ledger import UsageLedger
from billingd.daemon.logging import configure_logging
from billingd.testing.stripe import StripeContract, StripeDouble
from tests.support import AMQP_URL, REDIS_URL, amqp_source, make_settings, meter_id, running, unique

METER = "ai_credits"


async def preload(source: dict[str, Any], bodies: list[dict[str, Any]]) -> None:
    connection = await aio_pika.connect(AMQP_URL)
    channel = await connection.channel(publisher_confirms=True)
    exchange = await channel.declare_exchange(source["exchange"], "topic", durable=True)
    queue = await channel.declare_queue(source["queue"], durable=True)
    await queue.bind(exchange, "#")
    await asyncio.gather(
        *(exchange.publish(aio_pika.Message(msgspec.json.encode(b), delivery_mode=2), "usage") for b in bodies)
    )
    await connection.close()


async def row(
    mode: str, events: int, customers: int, contract: StripeContract, replicas: int = 1, budget: float | None = None
) -> dict[str, Any]:
    redis = aioredis.Redis.from_url(REDIS_URL)
    await redis.flushdb()
    ledger = UsageLedger(redis, Unguarded("redis"))
    workspaces = [unique("ws") for _ in range(customers)]
    for i, workspace in enumerate(workspaces):
        await ledger.set_customer(workspace, f"cus_bench{i}")
    bodies = [
        {
            "event_type": METER,
            "workspace_id": workspaces[i % customers],
            "value": 1 + i % 7,
            "idempotency_key": f"{mode}-{i}-{workspaces[0]}",
        }
        for i in range(events)
    ]
    double = StripeDouble(contract)
    known = bodies[:: max(1, events // (events // 20 or 1))][: events // 20]  # 5 % already at Stripe
    double.preload([{"event_name": METER, "identifier": meter_id(b), "payload": {}} for b in known])
    source = amqp_source("usage", prefetch=200 if replicas == 1 else 20, max_attempts=5)
    await preload(source, bodies)
    stripe: dict[str, Any] = {"api_key": "sk_test_bench", "meters": {METER: METER}, "meter_api": mode, "timeout": "5s",
                              "meter_delivery": "inline"}  # fmt: skip
    if budget is not None:
        stripe["max_requests_per_second"] = budget
    async with double.running():
        stripe["api_base"] = double.url
        settings = [make_settings([source], stripe=stripe) for _ in range(replicas)]
        daemons: list[Any] = []
        async with _all(settings, daemons):
            name = source["name"]

            def settled() -> float:
                return sum(
                    d.metrics.processed.labels(name, o)._value.get() for d in daemons for o in ("ack", "dead_letter")
                )

            elapsed = await seconds_to_settle(settled, events, started=lambda: bool(double.requests))
            dead = sum(d.metrics.processed.labels(name, "dead_letter")._value.get() for d in daemons)
            retries = sum(d.metrics.processed.labels(name, "retry")._value.get() for d in daemons)
            waited = sum(
                child.get()
                for d in daemons
                for child in [d.metrics.stripe_throttled.labels(b)._value for b in ("all", "basic", "meter_stream")]
            )
            duplicates = sum(d.metrics.stripe_duplicates.labels(name)._value.get() for d in daemons)
        recorded = double.recorded()
        calls = [r for r in double.requests if "meter_event" in r.path]
    await drop_amqp(source)
    await redis.aclose()
    once = sorted(recorded) == sorted(meter_id(b) for b in bodies) and set(recorded.values()) == {1}
    return {
        "mode": mode,
        "replicas": replicas,
        "events": events,
        "events_per_s": events / elapsed if elapsed else float("inf"),
        "calls": len(calls),
        "answered_429": double.rate_limited,
        "dead_lettered": int(dead),
        "retries": int(retries),
        "duplicates_acked": int(duplicates),
        "recorded_once": once,
        "max_requests_in_1s": double.max_per_second(),
        "waited_s": round(waited, 2),
        "stream_requests": len(double.stream_requests),
        "sessions": double.sessions,
    }


class _all:
    """Run several in-process daemons at once (replicas sharing one Redis and one queue)."""

    def __init__(self, settings: list[Any], into: list[Any]) -> None:
        self._settings, self._into = settings, into
        self._stack: Any = None

    async def __aenter__(self) -> None:
        import contextlib

        self._stack = contextlib.AsyncExitStack()
        for s in self._settings:
            self._into.append(await self._stack.enter_async_context(running(s)))

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()


def show(result: dict[str, Any], ceiling: float | None = None) -> None:
    extra = f"  ({result['events_per_s'] / ceiling:.0%} of the per-customer ceiling {ceiling:.1f}/s)" if ceiling else ""
    print(
        f"{result['mode']:>6} ×{result['replicas']}: {result['events']:>5} events  "
        f"{result['events_per_s']:8.1f} events/s  calls {result['calls']:>5}  429s {result['answered_429']:>4}  "
        f"dead-lettered {result['dead_lettered']}  retries {result['retries']}  duplicates acked "
        f"{result['duplicates_acked']}  recorded once: {result['recorded_once']}  "
        f"max requests in 1 s {result['max_requests_in_1s']}  waited {result['waited_s']} s  "
        f"sessions {result['sessions']}  stream requests {result['stream_requests']}" + extra,
        flush=True,
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=1200)
    parser.add_argument("--v1-events", type=int, default=300)
    parser.add_argument("--replica-events", type=int, default=300)
    parser.add_argument("--latency", type=float, default=0.15)
    parser.add_argument("--rows", default="stream,v1,replicas")
    args = parser.parse_args()
    configure_logging(os.environ.get("BENCH_LOG", "error"), "console")
    rows = args.rows.split(",")
    if "stream" in rows:
        show(await row("stream", args.events, 2, StripeContract.live(args.latency)))
    if "v1" in rows:
        show(await row("v1", args.v1_events, 2, StripeContract.live(args.latency)), ceiling=2 / args.latency)
    if "replicas" in rows:
        sandbox = StripeContract(latency=args.latency, rate_limit=25, per_customer_concurrency=True)
        show(await row("v1", args.replica_events, 30, sandbox, replicas=3, budget=25))


if __name__ == "__main__":
    asyncio.run(main())
