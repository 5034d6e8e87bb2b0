"""CPU per SQS API call: botocore as it comes, with its documented knobs, and billingd's lean path.

    uv run python bench/sqs_calls.py [--calls 1000] [--rounds 3]      # fauxqs on 127.0.0.1:4566

Each client makes the calls that carry billingd's traffic against fauxqs, on one queue holding
10 messages: `ReceiveMessage` of 10 (visibility 0, so the messages stay) and
`DeleteMessageBatch` of 10 entries (stale receipt handles: the answer is a full `Failed` list,
the same bytes every time). Reported: this process's CPU time per call (µs, median of the
rounds, rounds interleaved). The clients:

* `botocore` — `AioConfig()` as it comes (the full User-Agent rebuilt per call, parameters validated);
* `+ user_agent` — `AioConfig(user_agent=...)`: botocore's short User-Agent path;
* `+ parameter_validation=False` — both documented knobs (what billingd's source client uses);
* `lean` — `billingd.sources.sqs_lean` (botocore-signed JSON 1.0 over aiohttp).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session

from bench.contenders import SQS_ENDPOINT
from billingd.sources.sqs_client import USER_AGENT
from billingd.sources.sqs_lean import LeanSqs

CONFIGS = {
    "botocore": {},
    "+ user_agent": {"user_agent": USER_AGENT},
    "+ parameter_validation=False": {"user_agent": USER_AGENT, "parameter_validation": False},
}


async def cpu_per_call(call: Callable[[], Awaitable[Any]], calls: int) -> float:
    await call()  # warm: connection open, caches filled
    started = time.process_time()
    for _ in range(calls):
        await call()
    return (time.process_time() - started) / calls * 1e6


async def main(args: argparse.Namespace) -> None:
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "test")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "test")
    results: dict[tuple[str, str], list[float]] = {}
    session = get_session()
    async with contextlib.AsyncExitStack() as stack:
        clients: dict[str, Callable[..., Awaitable[Any]]] = {}
        admin = None
        for name, options in CONFIGS.items():
            client = await stack.enter_async_context(
                session.create_client(
                    "sqs", region_name="us-east-1", endpoint_url=SQS_ENDPOINT, config=AioConfig(**options)
                )
            )
            admin = admin or client
            clients[name] = lambda operation, _c=client, **p: getattr(_c, _snake(operation))(**p)
        assert admin is not None
        lean = LeanSqs(admin, await session.get_credentials(), read_timeout=30, connections=4)
        clients["lean"] = (await stack.enter_async_context(lean)).call
        url = (await admin.create_queue(QueueName=f"calls-{uuid.uuid4().hex[:8]}"))["QueueUrl"]
        for i in range(10):
            await admin.send_message(QueueUrl=url, MessageBody=f'{{"userId": "u-{i}", "entitlementKey": "API_CALLS"}}')
        handles = [
            m["ReceiptHandle"] for m in (await admin.receive_message(QueueUrl=url, MaxNumberOfMessages=10))["Messages"]
        ]
        entries = [{"Id": str(i), "ReceiptHandle": h + "-stale"} for i, h in enumerate(handles)]
        receive = {
            "QueueUrl": url,
            "MaxNumberOfMessages": 10,
            "VisibilityTimeout": 0,
            "MessageAttributeNames": ["All"],
            "MessageSystemAttributeNames": ["ApproximateReceiveCount"],
        }
        operations = {
            "ReceiveMessage (10)": ("ReceiveMessage", receive),
            "DeleteMessageBatch (10)": ("DeleteMessageBatch", {"QueueUrl": url, "Entries": entries}),
        }
        for _ in range(args.rounds):
            for op_label, (operation, params) in operations.items():
                for name, send in clients.items():
                    cpu = await cpu_per_call(lambda s=send, o=operation, p=params: s(o, **p), args.calls)
                    results.setdefault((op_label, name), []).append(cpu)
        await admin.delete_queue(QueueUrl=url)
    print(f"\nCPU per SQS call on fauxqs, {args.calls:,} calls × {args.rounds} interleaved rounds (median µs):")
    print("| call | " + " | ".join(clients) + " |")
    print("|---|" + "---|" * len(clients))
    for op_label in operations:
        base = statistics.median(results[op_label, "botocore"])
        cells = []
        for name in clients:
            cpu = statistics.median(results[op_label, name])
            cells.append(f"{cpu:,.0f}" + ("" if name == "botocore" else f" ({cpu / base - 1:+.0%})"))
        print(f"| {op_label} | " + " | ".join(cells) + " |")


def _snake(operation: str) -> str:
    return "".join("_" + c.lower() if c.isupper() else c for c in operation).lstrip("_")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    import uvloop

    uvloop.run(main(parser.parse_args()))
