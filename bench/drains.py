"""Benchmark (soak): drains of real `billingd run` processes behind an SQS proxy that delays or
holds its answers, some while a CPU burner runs. Every drain must exit 0 within 2 s.

    uv run python bench/drains.py [--runs 50]

Each run: a fresh queue on a moto SQS server, 10 seed-004 usage events sent, `billingd run`
(two SQS sources, `usage` and `billing_sync`, `wait_time = "2s"`, `drain_timeout = "10s"`)
against an HTTP proxy in front of moto, in one of three modes taken in turn:

* `idle, then held`: once all 10 are handled and settled, the proxy holds every answer;
* `settlement held`: from the start the proxy holds the answers of `DeleteMessageBatch` and
  `ChangeMessageVisibilityBatch` (the settlement of what billingd handles hangs);
* `delayed 3 s`: from the start every answer takes 3 s more.

Every fourth run a busy loop pins one of the two cores. Once the 10 are handled: SIGTERM, and
the time to exit is measured.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aioboto3
import msgspec

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from tests.proxies import HoldingProxy
from tests.support import make_settings, scrape, settings_tree, sqs_source, start_moto, to_toml, unique

os.environ.setdefault("AWS_ACCESS_KEY_ID", "test")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "test")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")


async def handled(port: int) -> float:
    try:
        samples = await scrape(port)
    except OSError:
        return 0.0
    return sum(v for (name, labels), v in samples.items() if name == "billingd_messages_processed_total")


async def one_run(i: int, moto: str, proxy: HoldingProxy, workdir: Path) -> tuple[float, int]:
    session = aioboto3.Session()
    async with session.client("sqs", endpoint_url=moto) as client:
        queues = []
        for kind in ("usage", "sync"):
            name = unique(f"drain-{kind}")
            dlq = (await client.create_queue(QueueName=f"{name}-dlq"))["QueueUrl"]
            queues.append(((await client.create_queue(QueueName=name))["QueueUrl"], dlq))
        for j in range(10):
            body = {"event_type": "calls", "workspace_id": f"ws-{i}", "value": 1, "idempotency_key": f"{i}-{j}"}
            await client.send_message(QueueUrl=queues[0][0], MessageBody=msgspec.json.encode(body).decode())
    sources = [
        sqs_source("usage", queues[0][0], queues[0][1], proxy.url, wait_time="2s"),
        sqs_source("billing_sync", queues[1][0], queues[1][1], proxy.url, wait_time="2s"),
    ]
    settings = make_settings(sources, daemon={"drain_timeout": "10s", "log_level": "warning"})
    mode = MODES[i % len(MODES)]
    if mode == "settlement held":
        proxy.hold("DeleteMessageBatch", "ChangeMessageVisibilityBatch")
    elif mode == "delayed 3 s":
        proxy.delay = 3.0
    config = workdir / f"billingd-{i}.toml"
    config.write_text(to_toml(settings_tree(settings)))
    process = subprocess.Popen([sys.executable, "-m", "billingd", "run", "--config", str(config)])
    burner = None
    try:
        deadline = time.monotonic() + 60
        while await handled(settings.http.port) < 10:
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError(f"run {i}: billingd did not handle the 10 messages")
            await asyncio.sleep(0.1)
        if mode == "idle, then held":
            await asyncio.sleep(0.5)  # settled; long polls in progress, nothing in flight
            proxy.hold("*")
        if i % 4 == 3:
            burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        while process.poll() is None:
            await asyncio.sleep(0.01)
        return time.monotonic() - started, process.returncode
    finally:
        if burner is not None:
            burner.kill()
        if process.poll() is None:
            process.kill()
        proxy.release()
        proxy.delay = 0.0


MODES = ("idle, then held", "settlement held", "delayed 3 s")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=50)
    args = parser.parse_args()
    moto_process, moto = start_moto()
    times: list[float] = []
    codes: list[int] = []
    try:
        async with HoldingProxy(moto).running() as proxy:
            with tempfile.TemporaryDirectory() as workdir:
                for i in range(args.runs):
                    took, code = await one_run(i, moto, proxy, Path(workdir))
                    times.append(took)
                    codes.append(code)
                    mode = MODES[i % len(MODES)]
                    burn = ", CPU burner" if i % 4 == 3 else ""
                    print(f"run {i:2d} ({mode}{burn}): exit {code} after {took:.2f}s", flush=True)
    finally:
        moto_process.terminate()
    over = [t for t in times if t > 2.0]
    print(
        f"{len(times)} drains: exit codes {sorted(set(codes))}, median {statistics.median(times):.2f}s, "
        f"max {max(times):.2f}s, over 2 s: {len(over)}",
        flush=True,
    )


if __name__ == "__main__":
    asyncio.run(main())
