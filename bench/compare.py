"""One comparison bench: billingd against the raw client loops and FastStream, in one run.

    uv run python bench/compare.py amqp  [--messages 20000] [--prefetch 20] [--rounds 3]
    uv run python bench/compare.py sqs   [--messages 10000] [--prefetch 40] [--rounds 3]   # fauxqs on 4566
    uv run python bench/compare.py curves [--messages 10000]
    uv run python bench/compare.py profile [--messages 40000]                             # py-spy

Every contender (see `bench/contenders.py`) runs as its own process on the same number of
pre-queued messages, in interleaved rounds (the order rotates each round), on uvloop unless
`--loop asyncio`. Reported per contender: the median messages/s, the ratio to the raw loop and to
FastStream, CPU time per message (its own process; the brokers' and Redis's CPU is not counted)
and RSS at the end; for SQS also API calls per message.

* `amqp`: the seed-002 DLR workload (`sms_dlr`) and the bill-event workload (`sms_billing`),
  against the raw aio-pika loops — `amqp-raw-callback` (the baseline: `queue.consume` with a
  callback, messages handled concurrently) and `amqp-raw` (the queue iterator, one at a time);
* `sqs`: seed-001 entitlement usage (`usage`, Redis only) against a raw aioboto3 loop, billingd
  on its lean SQS path and on the plain aiobotocore client (`sqs-billingd/botocore`);
* `floor`: billingd as shipped against billingd whose handler acks at once (`sms_dlr` on AMQP,
  `usage` on SQS): what the transport, actor and settler cost without the handler's work;
* `curves`: billingd `sms_dlr` throughput against prefetch (1, 10, 20, 50, 100) and, at
  prefetch 100, against concurrency (1, 5, 10, 20, 50, 100);
* `profile`: billingd `sms_dlr` (or `--target sqs`: `usage`) under py-spy; own time by layer;
* `all`: every one of the above in one run, for the tables in docs/performance.md;
* `footprint`: `billingd run` as a process: seconds from spawn to `/readyz` 200, idle RSS, and
  RSS growth from a warm point (a tenth of the messages) to the end of `--messages` (200,000).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aio_pika
import msgspec
import redis.asyncio as aioredis

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bench.contenders import AMQP_URL, REDIS_URL, SQS_ENDPOINT
from tests.seed002 import bill_event, dlr
from tests.support import amqp_source, sqs_source

ROOT = os.path.join(os.path.dirname(__file__), "..")
WORKLOADS = {
    "dlr": ("sms_dlr", "message_id", lambda i: dlr(f"d-{i}", "DELIVRD")),
    "bill": ("sms_billing", "bid", lambda i: bill_event(f"b-{i}", f"acct-{i % 50}", "ESME_ROK", 0.015)),
}


def contend(name: str, args: dict[str, Any], profile: str | None = None) -> dict[str, Any]:
    """Run contender `name` as its own process; its JSON result."""
    command = [sys.executable, "-m", "bench.contenders", name, json.dumps(args)]
    if profile:
        command = ["py-spy", "record", "--format", "raw", "--rate", "200", "-o", profile, "--", *command]
    out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"{name} failed: {out.stderr[-2000:]}")
    return json.loads(next(line for line in reversed(out.stdout.splitlines()) if line.startswith("{")))


async def amqp_queue(workload: str, n: int, prefetch: int, **overrides: Any) -> dict[str, Any]:
    """A fresh exchange and queue with `n` messages of `workload`; billingd's source table for it."""
    handler, _, make = WORKLOADS[workload]
    source = amqp_source(handler, prefetch=prefetch, queue=f"bench.{uuid.uuid4().hex[:8]}", **overrides)
    connection = await aio_pika.connect(AMQP_URL)
    channel = await connection.channel(publisher_confirms=True)
    exchange = await channel.declare_exchange(source["exchange"], "topic", durable=True)
    queue = await channel.declare_queue(source["queue"], durable=True)
    await queue.bind(exchange, "#")
    offset = uuid.uuid4().int % 10**9  # fresh ids: idempotency records of earlier rounds never match
    bodies = [msgspec.json.encode(make(offset + i)) for i in range(n)]
    for start in range(0, n, 1000):
        await asyncio.gather(
            *(exchange.publish(aio_pika.Message(b, delivery_mode=2), "k") for b in bodies[start : start + 1000])
        )
    await connection.close()
    return source


async def drop_amqp(source: dict[str, Any]) -> None:
    connection = await aio_pika.connect(AMQP_URL)
    channel = await connection.channel()
    for suffix in ("", ".retry", ".dlq"):
        await channel.queue_delete(source["queue"] + suffix)
    await channel.exchange_delete(source["exchange"])
    await connection.close()


def median_row(results: list[dict[str, Any]]) -> dict[str, float]:
    return {key: statistics.median(r[key] for r in results) for key in results[0]}


def table(title: str, rows: dict[str, list[dict[str, Any]]], baseline: str, peer: str | None) -> None:
    print(f"\n{title}")
    head = "| contender | msg/s (median) | × raw | × FastStream | CPU µs/msg | RSS MiB |"
    extra = any("calls" in result for results in rows.values() for result in results)
    print(head + (" API calls/msg |" if extra else ""))
    print("|---|---|---|---|---|---|" + ("---|" if extra else ""))
    base = median_row(rows[baseline])["rate"]
    other = median_row(rows[peer])["rate"] if peer else None
    for name, results in rows.items():
        m = median_row(results)
        spread = f" ({min(r['rate'] for r in results):,.0f}–{max(r['rate'] for r in results):,.0f})"
        cells = [
            name,
            f"{m['rate']:,.0f}{spread}",
            f"{m['rate'] / base:.2f}×",
            f"{m['rate'] / other:.2f}×" if other else "–",
            f"{m['cpu_us']:.0f}",
            f"{m['rss_mb']:.1f}",
        ]
        if extra:
            cells.append(f"{m['calls']:.3f}" if "calls" in m else "–")
        print("| " + " | ".join(cells) + " |")


async def amqp(args: argparse.Namespace) -> None:
    contenders = [
        "amqp-raw-callback",
        "amqp-raw",
        "amqp-faststream",
        "amqp-billingd",
        "amqp-billingd/asyncio",
        "amqp-ceiling",
    ]
    if args.only:
        contenders = [c for c in contenders if c in args.only.split(",")]
    for workload in args.workloads.split(","):
        rows: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
        for number in range(args.rounds):
            order = contenders[number % len(contenders) :] + contenders[: number % len(contenders)]
            for label in order:
                name, _, loop = label.partition("/")
                source = await amqp_queue(workload, args.messages, args.prefetch)
                key = WORKLOADS[workload][1]
                spec = {"queue": source["queue"], "n": args.messages, "prefetch": args.prefetch, "key": key}
                result = contend(name, {**spec, "source": source, "loop": loop or args.loop})
                rows[label].append(result)
                await drop_amqp(source)
                print(f"  {workload} round {number + 1} {label}: {result['rate']:,.0f} msg/s", file=sys.stderr)
            await aioredis.Redis.from_url(REDIS_URL).flushdb()
        table(
            f"AMQP {workload} ({WORKLOADS[workload][0]}), {args.messages:,} messages, prefetch {args.prefetch}, "
            f"{args.rounds} interleaved rounds, {args.loop}:",
            dict(sorted(rows.items(), key=lambda kv: contenders.index(kv[0]))),
            contenders[0],
            "amqp-faststream" if "amqp-faststream" in contenders else None,
        )


class SqsQueues:
    """Fresh fauxqs queues filled with seed-001 usage messages for users with unlimited
    entitlements (so every message is applied and acked)."""

    USERS = tuple(f"bench-user-{i}" for i in range(20))

    async def __aenter__(self) -> SqsQueues:
        import aioboto3

        from billingd.clients import Unguarded
        from billingd.clients.ledger import UsageLedger

        os.environ.setdefault("AWS_ACCESS_KEY_ID", "test")
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "test")
        self.redis = aioredis.Redis.from_url(REDIS_URL)
        self.ledger = UsageLedger(self.redis, Unguarded("redis"))
        self._session = aioboto3.Session().client("sqs", region_name="us-east-1", endpoint_url=SQS_ENDPOINT)
        self.client = await self._session.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._session.__aexit__(None, None, None)
        await self.redis.flushdb()
        await self.redis.aclose()

    async def filled(self, n: int, prefetch: int) -> tuple[list[str], dict[str, Any]]:
        """`([queue url, dlq url], billingd source table)` with `n` messages queued."""
        for user in self.USERS:
            await self.ledger.put_entitlement(user, "API_CALLS", limit=None, period="month", period_start=0)
        queue = f"bench-{uuid.uuid4().hex[:8]}"
        url = (await self.client.create_queue(QueueName=queue))["QueueUrl"]
        dlq = (await self.client.create_queue(QueueName=queue + "-dlq"))["QueueUrl"]
        await fill(self.client, url, n, self.USERS, uuid.uuid4().hex[:8])
        source = sqs_source(
            "usage", url, dlq, SQS_ENDPOINT, prefetch=prefetch, wait_time="1s", visibility_timeout="60s"
        )
        return [url, dlq], source

    async def drop(self, urls: list[str]) -> None:
        for url in urls:
            await self.client.delete_queue(QueueUrl=url)


async def sqs(args: argparse.Namespace) -> None:
    contenders = ["sqs-raw", "sqs-billingd", "sqs-billingd/botocore"]  # /botocore: sqs_client = "botocore"
    rows: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    async with SqsQueues() as queues:
        for number in range(args.rounds):
            for label in contenders[number % 3 :] + contenders[: number % 3]:
                name, _, client = label.partition("/")
                urls, source = await queues.filled(args.messages, args.prefetch)
                source["sqs_client"] = client or "lean"
                result = contend(name, {"url": urls[0], "n": args.messages, "source": source, "loop": args.loop})
                rows[label].append(result)
                await queues.drop(urls)
                print(f"  sqs round {number + 1} {label}: {result['rate']:,.0f} msg/s", file=sys.stderr)
        rows = dict(sorted(rows.items(), key=lambda kv: contenders.index(kv[0])))
    table(
        f"SQS usage (seed 001, Redis only) on fauxqs, {args.messages:,} messages, billingd prefetch "
        f"{args.prefetch}, {args.rounds} interleaved rounds, {args.loop}:",
        rows,
        "sqs-raw",
        None,
    )


async def fill(client: Any, url: str, n: int, users: Sequence[str], run: str) -> None:
    async def batch(start: int) -> None:
        entries = [
            {
                "Id": str(i),
                "MessageBody": json.dumps(
                    {
                        "userId": users[(start + i) % len(users)],
                        "entitlementKey": "API_CALLS",
                        "amount": 1,
                        "idempotencyKey": f"{run}-{start + i}",
                    }
                ),
            }
            for i in range(min(10, n - start))
        ]
        await client.send_message_batch(QueueUrl=url, Entries=entries)

    for start in range(0, n, 500):
        await asyncio.gather(*(batch(offset) for offset in range(start, min(n, start + 500), 10)))


async def floor(args: argparse.Namespace) -> None:
    """billingd as shipped against billingd whose handler acks at once, interleaved, per transport."""
    rows: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    async with SqsQueues() as queues:
        for number in range(args.rounds):
            for name in ["amqp-billingd", "amqp-billingd-floor", "sqs-billingd", "sqs-billingd-floor"][
                :: 1 - 2 * (number % 2)
            ]:
                spec: dict[str, Any] = {"n": args.messages, "loop": args.loop}
                if name.startswith("amqp"):
                    source = await amqp_queue("dlr", args.messages, 20)
                    rows[name].append(contend(name, {**spec, "source": source}))
                    await drop_amqp(source)
                else:
                    urls, source = await queues.filled(args.messages, 40)
                    rows[name].append(contend(name, {**spec, "source": source}))
                    await queues.drop(urls)
                print(f"  floor round {number + 1} {name}: {rows[name][-1]['rate']:,.0f} msg/s", file=sys.stderr)
    print(
        f"\nbillingd as shipped and with its handler acking at once, {args.messages:,} messages, {args.rounds} rounds:"
    )
    print("| contender | msg/s (median) | CPU µs/msg |")
    print("|---|---|---|")
    for name, results in rows.items():
        m = median_row(results)
        print(f"| {name} | {m['rate']:,.0f} | {m['cpu_us']:.0f} |")


async def curves(args: argparse.Namespace) -> None:
    print(f"\nbillingd sms_dlr, {args.messages:,} messages, {args.loop}; median of {args.rounds}:")
    print("| prefetch | concurrency | msg/s | CPU µs/msg |")
    print("|---|---|---|---|")
    points = [(p, p) for p in (1, 10, 20, 50, 100)] + [(100, c) for c in (1, 5, 10, 20, 50)]
    for prefetch, concurrency in points:
        results = []
        for _ in range(args.rounds):
            source = await amqp_queue("dlr", args.messages, prefetch, concurrency=concurrency)
            spec = {"n": args.messages, "source": source, "loop": args.loop}
            results.append(contend("amqp-billingd", spec))
            await drop_amqp(source)
        m = median_row(results)
        print(f"| {prefetch} | {concurrency} | {m['rate']:,.0f} | {m['cpu_us']:.0f} |", flush=True)
        await aioredis.Redis.from_url(REDIS_URL).flushdb()


#: Where a sampled frame's own time goes, by the file it is in (first match wins).
LAYERS = [
    ("billingd", "billingd (actor, handler, ledger, source)"),
    ("aiormq", "aiormq + pamqp (AMQP framing)"),
    ("pamqp", "aiormq + pamqp (AMQP framing)"),
    ("aio_pika", "aio-pika"),
    ("redis", "redis-py (commands, parsing)"),
    ("botocore", "botocore + aiobotocore (SQS requests, parsing)"),
    ("aiobotocore", "botocore + aiobotocore (SQS requests, parsing)"),
    ("aiohttp", "aiohttp (HTTP)"),
    ("anyio", "anyio (streams, cancel scopes)"),
    ("msgspec", "msgspec"),
    ("prometheus_client", "prometheus-client"),
    ("structlog", "structlog"),
    ("uvloop", "event loop"),
    ("asyncio", "event loop"),
]


#: Whole paths whose share of the samples (inclusive: everything they call) the profile reports.
PATHS = [
    ("sqs_lean.py", "the lean SQS path (billingd.sources.sqs_lean: signing, aiohttp, decoding)"),
    ("aiobotocore/client.py", "aiobotocore client calls (GetQueueAttributes, DLQ sends)"),
    ("ledger/batch.py", "the Redis command batcher and redis-py under it"),
]


def summarize(path: str) -> tuple[collections.Counter[str], collections.Counter[str], int]:
    """py-spy's raw (collapsed) samples → own samples by layer (and inclusive samples of `PATHS`),
    by function, and the total."""
    own: collections.Counter[str] = collections.Counter()
    functions: collections.Counter[str] = collections.Counter()
    total = 0
    for line in Path(path).read_text().splitlines():
        if line:
            stack, _, count = line.rpartition(" ")
            if "importlib" in stack:  # start-up: importing modules is not the steady state
                continue
            leaf = stack.split(";")[-1]
            total += int(count)
            own[next((label for key, label in LAYERS if key in leaf), "other (interpreter, stdlib)")] += int(count)
            for key, label in PATHS:
                if key in stack:
                    own["inclusive: " + label] += int(count)
            functions[leaf.split(" (")[0] + " (" + leaf.split("/")[-1]] += int(count)
    return own, functions, total


async def profile(args: argparse.Namespace) -> None:
    with tempfile.NamedTemporaryFile(suffix=".txt", delete=False) as f:
        path = f.name
    spec: dict[str, Any] = {"n": args.messages, "loop": args.loop}
    if args.target == "sqs":
        async with SqsQueues() as queues:
            urls, source = await queues.filled(args.messages, args.prefetch)
            result = contend("sqs-billingd", {**spec, "source": source}, profile=path)
            await queues.drop(urls)
    else:
        source = await amqp_queue("dlr", args.messages, args.prefetch)
        result = contend("amqp-billingd", {**spec, "source": source}, profile=path)
        await drop_amqp(source)
    own, functions, total = summarize(path)
    if args.keep:
        print(f"raw samples kept in {path}", file=sys.stderr)
    else:
        os.unlink(path)
    what = "usage on SQS" if args.target == "sqs" else "sms_dlr on AMQP"
    print(f"\npy-spy, billingd {what}, {args.messages:,} messages at {result['rate']:,.0f} msg/s; own time by layer:")
    print("| layer | share of samples |")
    print("|---|---|")
    for label, count in own.most_common():
        if not label.startswith("inclusive: "):
            print(f"| {label} | {count / total:.0%} |")
    for label, count in own.most_common():
        if label.startswith("inclusive: "):
            print(f"| {label} | {count / total:.0%} |")
    print("\ntop functions (own time):")
    for name, count in functions.most_common(15):
        print(f"  {count / total:5.1%}  {name}")


async def footprint(args: argparse.Namespace) -> None:
    from bench.common import rss_mb
    from tests.support import make_settings, settings_tree, to_toml

    source = await amqp_queue("dlr", 0, args.prefetch)
    settings = make_settings([source], redis={"url": REDIS_URL})
    port = settings.http.port
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write(to_toml(settings_tree(settings)))
    spawned = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "billingd", "run", "--config", f.name], stderr=subprocess.DEVNULL)
    try:
        while not await ready(port):
            await asyncio.sleep(0.01)
        ready_after = time.perf_counter() - spawned
        await asyncio.sleep(2)
        idle = rss_mb(process.pid)
        warm, n = args.messages // 10, args.messages
        await publish_more(source, warm)
        await processed(port, source["name"], warm)
        warm_rss = rss_mb(process.pid)
        for done in range(warm, n, 20_000):
            await publish_more(source, min(20_000, n - done))
            await processed(port, source["name"], done + min(20_000, n - done))
        end_rss = rss_mb(process.pid)
    finally:
        process.terminate()
        process.wait(30)
        os.unlink(f.name)
        await drop_amqp(source)
    print(f"\nbillingd run (sms_dlr source, uvloop): /readyz 200 after {ready_after:.2f} s; idle RSS {idle:.1f} MiB;")
    growth = end_rss - warm_rss
    print(f"RSS {warm_rss:.1f} MiB after {warm:,} messages, {end_rss:.1f} MiB after {n:,} (growth {growth:+.1f} MiB)")


async def ready(port: int) -> bool:
    import aiohttp

    try:
        async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/readyz") as response:
            return response.status == 200
    except aiohttp.ClientError:
        return False


async def publish_more(source: dict[str, Any], n: int) -> None:
    connection = await aio_pika.connect(AMQP_URL)
    channel = await connection.channel(publisher_confirms=True)
    exchange = await channel.get_exchange(source["exchange"])
    offset = uuid.uuid4().int % 10**9
    bodies = [msgspec.json.encode(dlr(f"f-{offset + i}", "DELIVRD")) for i in range(n)]
    for start in range(0, n, 1000):
        await asyncio.gather(
            *(exchange.publish(aio_pika.Message(b, delivery_mode=2), "k") for b in bodies[start : start + 1000])
        )
    await connection.close()


async def processed(port: int, source: str, n: int) -> None:
    """Wait until `billingd_messages_processed_total{outcome="ack"}` of `source` reaches `n`."""
    import aiohttp

    needle = f'billingd_messages_processed_total{{outcome="ack",source="{source}"}} '
    async with aiohttp.ClientSession() as session:
        while True:
            async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
                text = await response.text()
            if next((float(x.split()[-1]) for x in text.splitlines() if x.startswith(needle)), 0.0) >= n:
                return
            await asyncio.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["amqp", "sqs", "floor", "curves", "profile", "footprint", "all"])
    parser.add_argument("--messages", type=int, default=None)
    parser.add_argument("--prefetch", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    parser.add_argument("--keep", action="store_true", help="profile: keep py-spy's raw samples file")
    parser.add_argument("--only", default="", help="amqp: only these contenders (comma-separated)")
    parser.add_argument("--workloads", default="dlr,bill", help="amqp: dlr, bill or both")
    parser.add_argument("--target", choices=["amqp", "sqs"], default="amqp", help="profile: which transport")
    args = parser.parse_args()
    defaults = {
        "amqp": (20_000, 20),
        "sqs": (10_000, 40),
        "curves": (10_000, 20),
        "floor": (10_000, 20),
        "profile": (40_000, 20),
        "footprint": (200_000, 20),
    }
    if args.what != "all":
        messages, prefetch = defaults["sqs" if args.what == "profile" and args.target == "sqs" else args.what]
        args.messages = args.messages or messages
        args.prefetch = args.prefetch or prefetch
    commands = {"amqp": amqp, "sqs": sqs, "floor": floor, "curves": curves, "profile": profile, "footprint": footprint}
    if args.what != "all":
        asyncio.run(commands[args.what](args))
        return
    for what, target in [("amqp", "amqp"), ("sqs", "amqp"), ("floor", "amqp"), ("curves", "amqp"), ("profile", "amqp"),
                         ("profile", "sqs"), ("footprint", "amqp")]:  # fmt: skip
        step = argparse.Namespace(**{**vars(args), "what": what, "target": target})
        key = "sqs" if what == "profile" and target == "sqs" else what
        step.messages, step.prefetch = args.messages or defaults[key][0], args.prefetch or defaults[key][1]
        asyncio.run(commands[what](step))


if __name__ == "__main__":
    main()
