"""The consumers `bench/compare.py` races, each run as its own process on pre-queued messages.

    python -m bench.contenders NAME '{"queue": ..., "n": ..., "prefetch": ..., ...}'

prints one JSON line: `rate` (messages/s from the first message to the n-th effect), `cpu_us`
(this process's CPU time per message over the same window, µs), `rss_mb` (at the end), and for
SQS `calls` (API calls per message). Every contender does the same work per message: decode the
JSON body, one Redis write, acknowledge (AMQP ack / SQS delete) after the write.

| name | what |
|---|---|
| `amqp-raw-callback` | aio-pika `queue.consume(callback)` at `prefetch`: the same work, messages handled concurrently |
| `amqp-raw` | aio-pika queue iterator at `prefetch`; `json.loads`, awaited `HSET`, `message.ack()` each (serially) |
| `amqp-faststream` | FastStream `RabbitBroker` subscriber, channel prefetch `prefetch`, the same `HSET` |
| `amqp-billingd` | the billingd daemon with the workload's handler (`sms_dlr`, `sms_billing`: idempotent Lua) |
| `amqp-ceiling` | aio-pika consuming and acking with `multiple=True` every `prefetch/2` messages, no work |
| `sqs-raw` | aioboto3, 4 pollers × receive 10; `json.loads`, awaited `HINCRBY`; `DeleteMessageBatch` |
| `sqs-billingd` | the billingd daemon with the `usage` handler (seed 001 entitlements, Redis only) |
| `*-billingd-floor` | billingd with the handler replaced by an immediate ack: transport, actor, settler, acks only |

`loop` (`uvloop` or `asyncio`) picks the event loop for every contender alike.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bench.common import rss_mb

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
REDIS_URL = "redis://127.0.0.1:6379/14"
SQS_ENDPOINT = "http://127.0.0.1:4566"


class Window:
    """Times the work: from `begin()` (the first message) to `end()` (the n-th effect), wall
    clock and this process's CPU."""

    def __init__(self) -> None:
        self.started = self.cpu = 0.0
        self.seconds = self.cpu_seconds = 0.0
        self.done = asyncio.Event()

    def begin(self) -> None:
        if not self.started:
            self.started, self.cpu = time.perf_counter(), time.process_time()

    def end(self) -> None:
        self.seconds = time.perf_counter() - self.started
        self.cpu_seconds = time.process_time() - self.cpu
        self.done.set()

    def result(self, n: int, **extra: Any) -> dict[str, Any]:
        return {"rate": n / self.seconds, "cpu_us": self.cpu_seconds / n * 1e6, "rss_mb": rss_mb(), **extra}


async def _raw_queue(args: dict[str, Any]) -> tuple[Any, Any]:
    """aio-pika's connection and the benchmark queue, with the channel's prefetch set."""
    import aio_pika

    connection = await aio_pika.connect(AMQP_URL)
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=args["prefetch"])
    return connection, await channel.declare_queue(args["queue"], durable=True, passive=True)


async def amqp_raw(args: dict[str, Any]) -> dict[str, Any]:
    import redis.asyncio as aioredis

    n, window = args["n"], Window()
    redis = aioredis.Redis.from_url(REDIS_URL)
    connection, queue = await _raw_queue(args)
    done = 0
    async with queue.iterator() as messages:
        async for message in messages:
            window.begin()
            body = json.loads(message.body)
            await redis.hset(f"raw:{body[args['key']]}", "status", body["status"])
            await message.ack()
            done += 1
            if done == n:
                window.end()
                break
    await connection.close()
    await redis.aclose()
    return window.result(n)


async def amqp_raw_callback(args: dict[str, Any]) -> dict[str, Any]:
    """aio-pika `queue.consume(callback)`: aiormq runs each delivery's callback as its own task,
    so up to `prefetch` messages are handled concurrently (the serial iterator loop handles one
    at a time)."""
    import aio_pika
    import redis.asyncio as aioredis

    n, window = args["n"], Window()
    redis = aioredis.Redis.from_url(REDIS_URL)
    connection, queue = await _raw_queue(args)
    done = 0

    async def handle(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        nonlocal done
        window.begin()
        body = json.loads(message.body)
        await redis.hset(f"raw:{body[args['key']]}", "status", body["status"])
        await message.ack()
        done += 1
        if done == n:
            window.end()

    tag = await queue.consume(handle)
    await window.done.wait()
    await queue.cancel(tag)
    await connection.close()
    await redis.aclose()
    return window.result(n)


async def amqp_faststream(args: dict[str, Any]) -> dict[str, Any]:
    import redis.asyncio as aioredis
    from faststream.rabbit import Channel, RabbitBroker, RabbitQueue

    n, window, key = args["n"], Window(), args["key"]
    redis = aioredis.Redis.from_url(REDIS_URL)
    broker = RabbitBroker(AMQP_URL, logger=None)
    done = 0

    @broker.subscriber(
        RabbitQueue(args["queue"], durable=True, declare=False), channel=Channel(prefetch_count=args["prefetch"])
    )
    async def handle(body: dict[str, Any]) -> None:
        nonlocal done
        window.begin()
        await redis.hset(f"fs:{body[key]}", "status", body["status"])
        done += 1  # FastStream acks after the handler returns (AckPolicy default)
        if done == n:
            window.end()

    async with broker:
        await broker.start()
        await window.done.wait()
        await anyio.sleep(0.2)  # the n-th ack leaves after the handler returns
    await redis.aclose()
    return window.result(n)


async def amqp_ceiling(args: dict[str, Any]) -> dict[str, Any]:
    import aio_pika

    n, window = args["n"], Window()
    connection = await aio_pika.connect(AMQP_URL)
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=args["prefetch"])
    queue = await channel.declare_queue(args["queue"], durable=True, passive=True)
    every, done = max(1, args["prefetch"] // 2), 0
    async with queue.iterator() as messages:
        async for message in messages:
            window.begin()
            done += 1
            if done % every == 0 or done == n:
                await message.ack(multiple=True)
            if done == n:
                window.end()
                break
    await connection.close()
    return window.result(n)


async def _daemon(source: dict[str, Any], n: int, **sections: Any) -> tuple[Window, Any]:
    """Run billingd (in this process) on `source` until `n` messages are acked."""
    from billingd.daemon.app import Daemon
    from billingd.daemon.logging import configure_logging
    from tests.support import make_settings

    configure_logging("error", "console")
    daemon = Daemon(make_settings([source], redis={"url": REDIS_URL}, **sections), handle_signals=False)
    acked = daemon.metrics.processed.labels(source["name"], "ack")
    received = daemon.metrics.received.labels(source["name"])
    window = Window()
    async with anyio.create_task_group() as tg:
        tg.start_soon(daemon.run)
        while received._value.get() == 0:
            await anyio.sleep(0.002)
        window.begin()
        while acked._value.get() < n:
            await anyio.sleep(0.005)
        window.end()
        daemon.request_drain("benchmark done")
    return window, daemon


async def amqp_billingd(args: dict[str, Any]) -> dict[str, Any]:
    source = {**args["source"]}
    window, _ = await _daemon(source, args["n"])
    return window.result(args["n"])


async def sqs_raw(args: dict[str, Any]) -> dict[str, Any]:
    import aioboto3
    import redis.asyncio as aioredis

    n, window, url = args["n"], Window(), args["url"]
    redis = aioredis.Redis.from_url(REDIS_URL)
    done = calls = 0
    async with aioboto3.Session().client("sqs", region_name="us-east-1", endpoint_url=SQS_ENDPOINT) as sqs:

        async def poller() -> None:
            nonlocal done, calls
            while done < n:
                response = await sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=1)
                calls += 1
                messages = response.get("Messages", [])
                if not messages:
                    continue
                window.begin()
                for message in messages:
                    body = json.loads(message["Body"])
                    await redis.hincrby(f"raw:{body['userId']}", body["entitlementKey"], body["amount"])
                entries = [{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(messages)]
                await sqs.delete_message_batch(QueueUrl=url, Entries=entries)
                calls += 1
                done += len(messages)
            if not window.done.is_set():
                window.end()

        async with anyio.create_task_group() as tg:
            for _ in range(4):
                tg.start_soon(poller)
    await redis.aclose()
    return window.result(n, calls=calls / n)


async def sqs_billingd(args: dict[str, Any]) -> dict[str, Any]:
    window, daemon = await _daemon(args["source"], args["n"])
    calls = sum(
        sample.value
        for metric in daemon.metrics.broker_requests.collect()
        for sample in metric.samples
        if sample.name.endswith("_total") and sample.labels["operation"] != "GetQueueAttributes"
    )
    return window.result(args["n"], calls=calls / args["n"])


def _ack_at_once() -> None:
    """Replace the benchmarked handlers' work by an immediate ack (this process only): what is
    left is the transport, the actor, the settler and the acks — billingd's floor."""
    from billingd.handlers.kit.outcome import ACK
    from billingd.handlers.sms.sms_dlr import SmsDlrHandler
    from billingd.handlers.usage.usage import UsageHandler

    async def handle(self: object, message: object) -> Any:
        return ACK

    SmsDlrHandler.handle = handle  # type: ignore[method-assign]
    UsageHandler.handle = handle  # type: ignore[method-assign]


async def amqp_billingd_floor(args: dict[str, Any]) -> dict[str, Any]:
    _ack_at_once()
    return await amqp_billingd(args)


async def sqs_billingd_floor(args: dict[str, Any]) -> dict[str, Any]:
    _ack_at_once()
    return await sqs_billingd(args)


CONTENDERS: dict[str, Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]] = {
    "amqp-raw": amqp_raw,
    "amqp-raw-callback": amqp_raw_callback,
    "amqp-faststream": amqp_faststream,
    "amqp-billingd": amqp_billingd,
    "amqp-ceiling": amqp_ceiling,
    "sqs-raw": sqs_raw,
    "sqs-billingd": sqs_billingd,
    "amqp-billingd-floor": amqp_billingd_floor,
    "sqs-billingd-floor": sqs_billingd_floor,
}


def main() -> None:
    name, args = sys.argv[1], json.loads(sys.argv[2])
    options = {"use_uvloop": True} if args.get("loop", "uvloop") == "uvloop" else {}
    result = anyio.run(CONTENDERS[name], args, backend="asyncio", backend_options=options)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
