"""Benchmark: billingd over TLS against plain text, in the same run, on the same servers.

    uv run python bench/tls.py [--events 5000]

A RabbitMQ node with a plain listener and a TLS listener (a CA and certificates made for the run),
and a `redis-server` with a plain port and a TLS port: only the transport differs between rows.
Rows (messages per second, `--events` pre-published usage events, prefetch 20):

* `aio-pika baseline`: a raw aio-pika consumer acking each message (no Redis), plain and `amqps://`;
* `billingd usage`: billingd consuming the same events and applying them in Redis, for the four
  combinations of AMQP plain / TLS and Redis plain / TLS.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aio_pika
import msgspec

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bench.common import seconds_to_settle
from billingd.config.model import TlsSettings
from billingd.config.tls import client_context
from billingd.daemon.logging import configure_logging
from tests.rabbit_cluster import RabbitCluster
from tests.support import amqp_source, make_settings, running
from tests.tls import TlsFiles, TlsRedis, free_ports

PASSWORD = "bench-tls-password"


async def preload(url: str, source: dict[str, Any], events: int, tls: TlsFiles | None) -> None:
    context = client_context(TlsSettings(ca_file=tls.ca)) if tls else None
    connection = await aio_pika.connect(url, ssl_context=context)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.declare_exchange(source["exchange"], "topic", durable=True)
        queue = await channel.declare_queue(source["queue"], durable=True)
        await queue.bind(exchange, "#")
        bodies = [{"event_type": "api_calls", "workspace_id": f"ws-{i % 50}", "value": 1,
                   "idempotency_key": f"{source['queue']}-{i}"} for i in range(events)]  # fmt: skip
        for start in range(0, events, 500):
            await asyncio.gather(*(exchange.publish(aio_pika.Message(msgspec.json.encode(b), delivery_mode=2), "u")
                                   for b in bodies[start : start + 500]))  # fmt: skip


async def baseline(url: str, events: int, tls: TlsFiles | None) -> float:
    source = amqp_source("usage")
    await preload(url, source, events, tls)
    context = client_context(TlsSettings(ca_file=tls.ca)) if tls else None
    connection = await aio_pika.connect(url, ssl_context=context)
    done = asyncio.Event()
    count = 0
    started = 0.0
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=20)
        queue = await channel.get_queue(source["queue"])

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            nonlocal count, started
            if not count:
                started = time.perf_counter()
            msgspec.json.decode(message.body)
            await message.ack()
            count += 1
            if count == events:
                done.set()

        await queue.consume(on_message)
        await done.wait()
        seconds = time.perf_counter() - started
        await channel.queue_delete(source["queue"])
    return events / seconds


async def billingd_row(amqp_url: str, redis: dict[str, Any], events: int, tls: TlsFiles, amqp_tls: bool) -> float:
    source = {**amqp_source("usage"), "url": amqp_url}
    if amqp_tls:
        source["tls"] = {"ca_file": tls.ca}
    await preload(amqp_url, source, events, tls if amqp_tls else None)
    async with running(make_settings([source], redis=redis)) as daemon:
        acked = daemon.metrics.processed.labels(source["name"], "ack")
        seconds = await seconds_to_settle(acked._value.get, events)
    return events / seconds


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=5000)
    args = parser.parse_args()
    configure_logging("error", "console")
    tls = TlsFiles(Path(tempfile.mkdtemp(prefix="billingd-bench-tls-")))
    [tls_port] = free_ports(1, 25671)
    conf = (f"listeners.ssl.default = {tls_port}\nssl_options.cacertfile = {tls.ca}\n"
            f"ssl_options.certfile = {tls.server_cert}\nssl_options.keyfile = {tls.server_key}\n"
            "ssl_options.verify = verify_none\n")  # fmt: skip
    node = RabbitCluster(("bench",), conf=conf)
    redis = TlsRedis(tls, PASSWORD, plain=True)
    node.start("bench")
    redis.start()
    try:
        plain_amqp, tls_amqp = node.url("bench"), f"amqps://guest:guest@localhost:{tls_port}/"
        base = {"cluster": False, "username": "billingd", "password": PASSWORD}
        plain_redis = {**base, "url": f"redis://127.0.0.1:{redis.plain_port}/0"}
        tls_redis = {**base, "url": f"rediss://localhost:{redis.tls_port}/0", "tls": {"ca_file": tls.ca}}
        print(f"aio-pika baseline   plain {await baseline(plain_amqp, args.events, None):8.0f} msg/s   "
              f"amqps {await baseline(tls_amqp, args.events, tls):8.0f} msg/s")  # fmt: skip
        for amqp_name, amqp_url, amqp_tls in (("plain", plain_amqp, False), ("amqps", tls_amqp, True)):
            for redis_name, settings in (("plain", plain_redis), ("rediss", tls_redis)):
                rate = await billingd_row(amqp_url, settings, args.events, tls, amqp_tls)
                print(f"billingd usage      AMQP {amqp_name:5}  Redis {redis_name:6}  {rate:8.0f} msg/s")
    finally:
        redis.stop()
        node.stop()


if __name__ == "__main__":
    asyncio.run(main())
