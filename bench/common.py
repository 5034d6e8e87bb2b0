"""Helpers shared by the benchmarks (not part of the test run)."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from pathlib import Path


def rss_mb(pid: int | None = None) -> float:
    """Resident set size of `pid` (default: this process) in MiB, from /proc."""
    status = Path(f"/proc/{pid or os.getpid()}/status").read_text()
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


async def seconds_to_settle(
    done: Callable[[], float], count: int, *, started: Callable[[], bool] | None = None
) -> float:
    """Seconds from the first settled message (or `started()` turning true) until `done()` reaches
    `count`, polled every 5 ms: a rate without the start-up before the first message."""
    first: float | None = None
    while done() < count:
        if first is None and (done() or (started is not None and started())):
            first = time.perf_counter()
        await asyncio.sleep(0.005)
    return time.perf_counter() - (first or time.perf_counter())
