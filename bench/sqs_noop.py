"""Benchmark: billingd's SQS source vs a raw aioboto3 loop, against fauxqs (fast SQS emulator).

    deploy/local/sqs.sh                      # fauxqs on 127.0.0.1:4566
    uv run python bench/sqs_noop.py [--messages 20000] [--prefetch 20]

(a) raw loop: one aioboto3 client long-polling 10 at a time (wait 20 s), deleting each batch with
    one DeleteMessageBatch;
(b) billingd: the real daemon (in this process) with a handler that has no effect but acks.

Both consume the same N messages from a fresh queue, in interleaved rounds (raw, billingd, raw,
…). Reported: the median messages per second of each, the median ratio, CPU time per message
(this process), and SQS API calls per message (billingd counts every call it makes in
`billingd_broker_requests_total`; the floor is 0.2: one receive and one delete per 10).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
import uuid
from types import MappingProxyType

import aioboto3
import anyio

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bench.common import Stopwatch, time_daemon
from billingd.daemon.app import Daemon
from billingd.daemon.logging import configure_logging
from billingd.handlers.base import HandlerSpec, NoOptions
from billingd.handlers.outcome import ACK
from billingd.handlers.registry import HANDLERS
from tests.support import make_settings, sqs_source

ENDPOINT = "http://127.0.0.1:4566"


class NoEffect:
    """Acks every message; no effect anywhere."""

    downstreams = ()

    async def handle(self, message: object) -> object:
        return ACK


REGISTRY = MappingProxyType({**HANDLERS, "noop": HandlerSpec("noop", NoOptions, lambda *_: NoEffect())})


async def fill(client, url: str, n: int) -> None:
    async def batch(start: int) -> None:
        entries = [{"Id": str(i), "MessageBody": f'{{"n": {start + i}}}'} for i in range(min(10, n - start))]
        await client.send_message_batch(QueueUrl=url, Entries=entries)

    for start in range(0, n, 500):
        async with anyio.create_task_group() as tg:
            for offset in range(start, min(n, start + 500), 10):
                tg.start_soon(batch, offset)


async def raw_loop(client, url: str, n: int) -> tuple[float, int]:
    done = calls = 0
    with Stopwatch() as t:
        while done < n:
            response = await client.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=20)
            calls += 1
            messages = response.get("Messages", [])
            if messages:
                await client.delete_message_batch(
                    QueueUrl=url,
                    Entries=[{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(messages)],
                )
                calls += 1
                done += len(messages)
    return n / t.seconds, calls


async def billingd_run(url: str, dlq: str, n: int, prefetch: int) -> tuple[float, float]:
    source = sqs_source("noop", url, dlq, ENDPOINT, prefetch=prefetch, wait_time="20s", visibility_timeout="60s")
    daemon = Daemon(make_settings([source]), handlers=REGISTRY, handle_signals=False)
    seconds = await time_daemon(daemon, source["name"], n)
    calls = sum(
        sample.value
        for metric in daemon.metrics.broker_requests.collect()
        for sample in metric.samples
        if sample.name.endswith("_total") and sample.labels["operation"] != "GetQueueAttributes"
    )
    return n / seconds, calls / n


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--prefetch", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "test")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "test")
    configure_logging("error", "console")
    n = args.messages
    rounds = []
    async with aioboto3.Session().client("sqs", region_name="us-east-1", endpoint_url=ENDPOINT) as client:
        for number in range(1, args.rounds + 1):
            name = f"bench-{uuid.uuid4().hex[:8]}"
            url = (await client.create_queue(QueueName=name))["QueueUrl"]
            dlq = (await client.create_queue(QueueName=name + "-dlq"))["QueueUrl"]
            await fill(client, url, n)
            cpu = time.process_time()
            raw, raw_calls = await raw_loop(client, url, n)
            raw_cpu = (time.process_time() - cpu) / n * 1e6
            await fill(client, url, n)
            cpu = time.process_time()
            ours, ours_calls = await billingd_run(url, dlq, n, args.prefetch)
            ours_cpu = (time.process_time() - cpu) / n * 1e6
            for queue in (url, dlq):
                await client.delete_queue(QueueUrl=queue)
            rounds.append((raw, raw_cpu, ours, ours_cpu, ours_calls))
            print(
                f"round {number}: raw {raw:,.0f} msg/s ({raw_calls / n:.3f} calls, {raw_cpu:.0f} us CPU per msg)   "
                f"billingd {ours:,.0f} msg/s ({ours_calls:.3f} calls, {ours_cpu:.0f} us CPU per msg)   "
                f"ratio {ours / raw:.2f}x"
            )
    ratios = [r[2] / r[0] for r in rounds]
    print(
        f"\nSQS consume on fauxqs, {n:,} messages, billingd prefetch {args.prefetch}, "
        f"median of {args.rounds} interleaved rounds:"
    )
    print(
        f"  raw aioboto3 loop (long-poll 10, batch delete): {statistics.median(r[0] for r in rounds):,.0f} msg/s, "
        f"{statistics.median(r[1] for r in rounds):.0f} us CPU per message"
    )
    print(
        f"  billingd, no-effect handler:                   {statistics.median(r[2] for r in rounds):,.0f} msg/s, "
        f"{statistics.median(r[3] for r in rounds):.0f} us CPU per message"
    )
    print(
        f"  ratio billingd / raw:                          {statistics.median(ratios):.2f}x "
        f"(rounds {min(ratios):.2f}-{max(ratios):.2f})"
    )
    print(f"  billingd SQS API calls per message:            {max(r[4] for r in rounds):.3f} (floor 0.200)")


if __name__ == "__main__":
    asyncio.run(main())
