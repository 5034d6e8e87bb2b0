"""Helpers shared by the benchmarks (not part of the test run)."""

from __future__ import annotations

import os
import time
from pathlib import Path


def rss_mb(pid: int | None = None) -> float:
    """Resident set size of `pid` (default: this process) in MiB, from /proc."""
    status = Path(f"/proc/{pid or os.getpid()}/status").read_text()
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


class Stopwatch:
    """`with Stopwatch() as t: ...; t.seconds`."""

    def __enter__(self) -> Stopwatch:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start


async def time_daemon(daemon: object, source: str, n: int) -> float:
    """Run `daemon` (a billingd `Daemon`) until `n` messages of `source` are acked; return the
    seconds from its first received message to the n-th ack. The daemon is drained afterwards."""
    import anyio

    acked = daemon.metrics.processed.labels(source, "ack")  # type: ignore[attr-defined]
    received = daemon.metrics.received.labels(source)  # type: ignore[attr-defined]
    async with anyio.create_task_group() as tg:
        tg.start_soon(daemon.run)  # type: ignore[attr-defined]
        while received._value.get() == 0:
            await anyio.sleep(0.001)
        with Stopwatch() as t:
            while acked._value.get() < n:
                await anyio.sleep(0.002)
        await anyio.sleep(0.3)  # let the last settlements flush before the caller reads counters
        tg.start_soon(_drain, daemon)
    return t.seconds


async def _drain(daemon: object) -> None:
    daemon.request_drain("benchmark done")  # type: ignore[attr-defined]
