"""Benchmark: billingd's `sms_dlr` source vs a raw aio-pika consumer on the same DLR messages.

    uv run python bench/amqp_dlr.py [--messages 20000] [--prefetch 20] [--rss-messages 200000]

(a) raw loop: aio-pika queue iterator at the same prefetch; per message `json.loads`, one
    awaited Redis `HSET` of the status, `message.ack()`;
(b) billingd: the real daemon (in this process) with the `sms_dlr` handler on the same messages
    (a Lua script per message: idempotent, never regresses a final status).

Both start with N messages already queued and are timed from the start of consumption until
the N-th effect is in Redis. Then, with `--rss-messages`, billingd runs as its own process: idle
RSS after start, and RSS growth from a warm point to the end of that many messages.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import uuid

import aio_pika
import anyio
import msgspec
import redis.asyncio as aioredis

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bench.common import Stopwatch, rss_mb, time_daemon
from billingd.daemon.app import Daemon
from billingd.daemon.logging import configure_logging
from tests.seed002 import dlr
from tests.support import amqp_source, make_settings, settings_tree, to_toml

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
REDIS_URL = "redis://127.0.0.1:6379/14"


async def publish(exchange_name: str, queue: str, n: int, offset: int = 0) -> None:
    """Declare the exchange and queue like billingd does and publish n DLRs (confirmed)."""
    connection = await aio_pika.connect(AMQP_URL)
    channel = await connection.channel(publisher_confirms=True)
    exchange = await channel.declare_exchange(exchange_name, "topic", durable=True)
    q = await channel.declare_queue(queue, durable=True)
    await q.bind(exchange, "#")
    bodies = [msgspec.json.encode(dlr(f"b-{offset + i}", "DELIVRD")) for i in range(n)]
    for start in range(0, n, 1000):
        await asyncio.gather(
            *(exchange.publish(aio_pika.Message(b, delivery_mode=2), "dlr.x") for b in bodies[start : start + 1000])
        )
    await connection.close()


async def cleanup(*queues: str, exchange: str) -> None:
    connection = await aio_pika.connect(AMQP_URL)
    channel = await connection.channel()
    for queue in queues:
        await channel.queue_delete(queue)
    await channel.exchange_delete(exchange)
    await connection.close()


async def raw_loop(queue_name: str, n: int, prefetch: int, redis: aioredis.Redis) -> float:
    connection = await aio_pika.connect(AMQP_URL)
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=prefetch)
    queue = await channel.declare_queue(queue_name, durable=True)
    done = 0
    with Stopwatch() as t:
        async with queue.iterator() as messages:
            async for message in messages:
                body = json.loads(message.body)
                await redis.hset(f"raw:cdr:{body['message_id']}", "status", body["status"])
                await message.ack()
                done += 1
                if done == n:
                    break
    await connection.close()
    return n / t.seconds


async def billingd_run(source: dict, n: int) -> float:
    daemon = Daemon(make_settings([source], redis={"url": REDIS_URL}), handle_signals=False)
    return n / await time_daemon(daemon, source["name"], n)


async def rss_run(source: dict, n: int) -> tuple[float, float, float]:
    """billingd as a process: (idle RSS, RSS after a warm-up of n/10, RSS after n), MiB."""
    settings = make_settings([source], redis={"url": REDIS_URL})
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write(to_toml(settings_tree(settings)))
    process = subprocess.Popen([sys.executable, "-m", "billingd", "run", "--config", f.name], stderr=subprocess.DEVNULL)
    port = settings.http.port
    try:
        await _wait_processed(port, source["name"], 0)
        await anyio.sleep(1)
        idle = rss_mb(process.pid)
        warm = n // 10
        await publish(source["exchange"], source["queue"], warm, offset=10_000_000)
        await _wait_processed(port, source["name"], warm)
        warm_rss = rss_mb(process.pid)
        for chunk in range(warm, n, 20_000):
            await publish(source["exchange"], source["queue"], min(20_000, n - chunk), offset=10_000_000 + chunk)
        await _wait_processed(port, source["name"], n)
        end_rss = rss_mb(process.pid)
    finally:
        process.terminate()
        process.wait(30)
        os.unlink(f.name)
    return idle, warm_rss, end_rss


async def _wait_processed(port: int, source: str, n: int) -> None:
    import aiohttp

    needle = f'billingd_messages_processed_total{{outcome="ack",source="{source}"}} '
    async with aiohttp.ClientSession() as session:
        while True:
            try:
                async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
                    text = await response.text()
                value = next((float(line.split()[-1]) for line in text.splitlines() if line.startswith(needle)), 0.0)
                if value >= n:
                    return
            except OSError:
                pass
            await anyio.sleep(0.2)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--prefetch", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rss-messages", type=int, default=200_000)
    args = parser.parse_args()
    configure_logging("error", "console")
    redis = aioredis.Redis.from_url(REDIS_URL)
    await redis.flushdb()
    n, prefetch = args.messages, args.prefetch
    raw_rates, billingd_rates = [], []
    for round_ in range(args.rounds):
        source = amqp_source("sms_dlr", prefetch=prefetch, queue=f"bench.dlr-{uuid.uuid4().hex[:8]}")
        await publish(source["exchange"], source["queue"], n)
        raw_rates.append(await raw_loop(source["queue"], n, prefetch, redis))
        await publish(source["exchange"], source["queue"], n)
        billingd_rates.append(await billingd_run(source, n))
        await cleanup(
            source["queue"], source["queue"] + ".retry", source["queue"] + ".dlq", exchange=source["exchange"]
        )
        print(f"round {round_ + 1}: raw {raw_rates[-1]:,.0f} msg/s   billingd {billingd_rates[-1]:,.0f} msg/s")
        await redis.flushdb()
    raw, ours = max(raw_rates), max(billingd_rates)
    print(f"\nDLR consume, {n:,} messages, prefetch {prefetch} (best of {args.rounds}):")
    print(f"  raw aio-pika loop (json + awaited HSET + ack each): {raw:,.0f} msg/s")
    print(f"  billingd sms_dlr:                                   {ours:,.0f} msg/s")
    print(f"  ratio billingd / raw:                               {ours / raw:.2f}x")
    if args.rss_messages:
        source = amqp_source("sms_dlr", prefetch=prefetch, queue=f"bench.rss-{uuid.uuid4().hex[:8]}")
        idle, warm, end = await rss_run(source, args.rss_messages)
        await cleanup(
            source["queue"], source["queue"] + ".retry", source["queue"] + ".dlq", exchange=source["exchange"]
        )
        print(
            f"\nbillingd process RSS: idle after start {idle:.1f} MiB; "
            f"after {args.rss_messages // 10:,} messages {warm:.1f} MiB; "
            f"after {args.rss_messages:,} messages {end:.1f} MiB (growth {end - warm:+.1f} MiB)"
        )
    await redis.flushdb()
    await redis.aclose()


if __name__ == "__main__":
    asyncio.run(main())
