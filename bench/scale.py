"""Benchmark: throughput with 1, 2 and 3 billingd replicas, on one Redis and on a Redis Cluster.

    deploy/local/sqs.sh                      # fauxqs on 127.0.0.1:4566 (for the SQS rows)
    uv run python bench/scale.py [--amqp 30000] [--sqs 8000] [--replicas 1,2,3]

Each row preloads the queue, then starts N `billingd run` processes at once on it and measures
from the first ack to the last (an ack follows its durable effect), summing the replicas'
`billingd_messages_processed_total` (messages / second). AMQP: `sms_dlr` (one Lua script
per message); SQS: `usage` without Stripe meters (one Lua script per event). The Redis Cluster
rows use a private 3-master cluster (tests/cluster.py). Every figure comes from the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import aio_pika
import aioboto3
import msgspec

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bench.compare import drop_amqp
from billingd.daemon.logging import configure_logging
from tests.cluster import RedisClusterServer
from tests.seed002 import dlr
from tests.support import AMQP_URL, RedisTarget, amqp_source, free_port, make_settings, scrape, settings_tree, to_toml

SQS_ENDPOINT = "http://127.0.0.1:4566"
SQS_QUEUES = "http://sqs.us-east-1.localhost:4566/000000000000/"


async def preload_amqp(source: dict, n: int) -> None:
    connection = await aio_pika.connect(AMQP_URL)
    channel = await connection.channel(publisher_confirms=True)
    exchange = await channel.declare_exchange(source["exchange"], "topic", durable=True)
    await channel.declare_queue(f"{source['queue']}.dlq", durable=True)
    queue = await channel.declare_queue(source["queue"], durable=True)
    await queue.bind(exchange, "#")
    bodies = [msgspec.json.encode(dlr(f"s-{i}", "DELIVRD")) for i in range(n)]
    for start in range(0, n, 1000):
        await asyncio.gather(
            *(exchange.publish(aio_pika.Message(b, delivery_mode=2), "dlr.x") for b in bodies[start : start + 1000])
        )
    await connection.close()


async def preload_sqs(name: str, n: int) -> tuple[str, str]:
    session = aioboto3.Session(aws_access_key_id="t", aws_secret_access_key="t")
    async with session.client("sqs", region_name="us-east-1", endpoint_url=SQS_ENDPOINT) as client:
        dlq = (await client.create_queue(QueueName=f"{name}-dlq"))["QueueUrl"]
        url = (await client.create_queue(QueueName=name))["QueueUrl"]
        events = [
            msgspec.json.encode(
                {"event_type": "calls", "workspace_id": f"ws-{i % 50}", "value": 1, "idempotency_key": f"k-{i}"}
            ).decode()
            for i in range(n)
        ]
        for start in range(0, n, 10):
            entries = [{"Id": str(j), "MessageBody": b} for j, b in enumerate(events[start : start + 10])]
            await client.send_message_batch(QueueUrl=url, Entries=entries)
    return url, dlq


async def acked(ports: list[int]) -> int:
    """Messages acked so far across the replicas (an ack follows its durable effect)."""
    total = 0.0
    for port in ports:
        try:
            samples = await scrape(port)
        except OSError:
            continue
        total += sum(
            v for (name, labels), v in samples.items()
            if name == "billingd_messages_processed_total" and dict(labels)["outcome"] == "ack"
        )  # fmt: skip
    return int(total)


async def flush() -> None:
    client = RedisTarget.client()
    try:
        if RedisTarget.cluster:
            from redis.asyncio.cluster import RedisCluster

            await client.flushall(target_nodes=RedisCluster.PRIMARIES)
        else:
            await client.flushdb()
    finally:
        await client.aclose()


async def run_row(kind: str, replicas: int, n: int, workdir: Path, min_replicas_acked: int = 0) -> float:
    await flush()
    if kind == "amqp":
        source = amqp_source("sms_dlr", prefetch=50)
        await preload_amqp(source, n)
    else:
        name = f"bench-scale-{uuid.uuid4().hex[:8]}"
        url, dlq = await preload_sqs(name, n)
        source = {
            "name": name, "type": "sqs", "queue_url": url, "dead_letter_queue_url": dlq, "region": "us-east-1",
            "endpoint_url": SQS_ENDPOINT, "handler": "usage", "prefetch": 30, "wait_time": "1s",
            "visibility_timeout": "60s",
        }  # fmt: skip
    processes, ports = [], []
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "t", "AWS_SECRET_ACCESS_KEY": "t", "NO_PROXY": "*"}
    for i in range(replicas):
        settings = make_settings(
            [source],
            http={"listen": f"127.0.0.1:{free_port()}"},
            daemon={"log_level": "error"},
            redis={"min_replicas_acked": min_replicas_acked},
        )
        ports.append(settings.http.port)
        config = workdir / f"{kind}-{replicas}-{i}.toml"
        config.write_text(to_toml(settings_tree(settings)))
        processes.append(
            subprocess.Popen(
                [sys.executable, "-m", "billingd", "run", "--config", str(config)], env=env, stderr=subprocess.DEVNULL
            )
        )
    started = None
    try:
        while True:
            done = await acked(ports)
            now = time.perf_counter()
            if started is None and done > 0:
                started, first = now, done
            if done >= n:
                break
            await asyncio.sleep(0.1)
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            process.wait(30)
        if kind == "amqp":
            await drop_amqp(source)
    return (n - first) / (time.perf_counter() - started)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--amqp", type=int, default=30_000)
    parser.add_argument("--sqs", type=int, default=8_000)
    parser.add_argument("--replicas", default="1,2,3")
    parser.add_argument("--wait-only", action="store_true", help="only the WAIT rows (min_replicas_acked 0 and 1)")
    args = parser.parse_args()
    counts = [int(r) for r in args.replicas.split(",")]
    cluster = RedisClusterServer()
    cluster.start()
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            RedisTarget.use(cluster.url, cluster=True)
            waits = []
            for wait in (0, 1, 0, 1):  # interleaved: the cost of WAIT (a replica per master) on 1 replica
                rate = await run_row("amqp", 1, args.amqp, Path(tmp), min_replicas_acked=wait)
                waits.append((wait, rate))
                print(f"  amqp Redis Cluster min_replicas_acked={wait}: {rate:8,.0f} msg/s", flush=True)
            for wait in (0, 1):
                best = max(rate for w, rate in waits if w == wait)
                print(f"| AMQP `sms_dlr`, 1 replica, Redis Cluster | min_replicas_acked = {wait} | {best:,.0f} msg/s |")
            if args.wait_only:
                return
            for backend in ("one Redis", "Redis Cluster (3 masters)"):
                if backend.startswith("Redis Cluster"):
                    RedisTarget.use(cluster.url, cluster=True)
                else:
                    RedisTarget.use("redis://127.0.0.1:6379/14", cluster=False)
                for kind, n in (("amqp", args.amqp), ("sqs", args.sqs)):
                    for replicas in counts:
                        rate = await run_row(kind, replicas, n, Path(tmp))
                        rows.append((kind, backend, replicas, rate))
                        print(f"  {kind:4} {backend:26} {replicas} replica(s): {rate:8,.0f} msg/s", flush=True)
    finally:
        cluster.stop()
    print(f"\nThroughput by replicas ({os.cpu_count()} cores; every replica, RabbitMQ, Redis and fauxqs share them):")
    print("| source | Redis | " + " | ".join(f"{r} replica{'s' if r > 1 else ''}" for r in counts) + " |")
    print("|---|---|" + "---|" * len(counts))
    for kind, handler in (("amqp", "AMQP `sms_dlr`"), ("sqs", "SQS `usage`")):
        for backend in ("one Redis", "Redis Cluster (3 masters)"):
            rates = [rate for k, b, _, rate in rows if k == kind and b == backend]
            print(f"| {handler} | {backend} | " + " | ".join(f"{r:,.0f} msg/s" for r in rates) + " |")


if __name__ == "__main__":
    configure_logging("error", "console")
    asyncio.run(main())
