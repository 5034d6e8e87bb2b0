"""The settler of a source actor (Broadway's acknowledger): settlements in batches, then the
window given back.

A batch is up to the transport's `settle_batch` settlements, waiting at most `linger` seconds
(≤ `ack_flush`) for it to fill. If the transport raises while settling (a bug: it reports broker
errors itself), the batch is settled one by one so the others are not held hostage; the ones that
still fail are named as suspects (for poison detection) and the settler crashes.
"""

from __future__ import annotations

from collections.abc import Callable

import anyio
import structlog
from anyio.streams.memory import MemoryObjectReceiveStream

from billingd.sources.base import Settlement, Source
from billingd.supervisors import streams


async def run_settler(
    settlements: MemoryObjectReceiveStream[Settlement],
    source: Source,
    linger: float,
    settled: Callable[[list[Settlement]], None],
    suspects: set[str],
    log: structlog.typing.FilteringBoundLogger,
) -> None:
    """Settle until every sender of `settlements` is closed; `settled(batch)` after each batch."""
    async with settlements:
        while True:
            try:
                batch = [await settlements.receive()]
            except anyio.EndOfStream:
                return
            await _fill(batch, settlements, source.settle_batch, linger)
            await _settle(batch, source, suspects, log)
            settled(batch)


async def _fill(
    batch: list[Settlement], settlements: MemoryObjectReceiveStream[Settlement], most: int, linger: float
) -> None:
    """Add to `batch` until it holds `most` or `linger` seconds have passed: what is already
    queued at once, then whatever arrives, under one cancel scope for the whole wait."""
    while len(batch) < most:
        try:
            batch.append(settlements.receive_nowait())
        except anyio.WouldBlock:
            break
        except anyio.EndOfStream:
            return
    if len(batch) >= most or linger <= 0:
        return
    with anyio.move_on_after(linger):
        while len(batch) < most:
            try:
                batch.append(await streams.receive(settlements))
            except anyio.EndOfStream:
                return


async def _settle(
    batch: list[Settlement], source: Source, suspects: set[str], log: structlog.typing.FilteringBoundLogger
) -> None:
    try:
        await source.settle(batch)
        return
    except Exception as exc:  # noqa: BLE001 — isolated below, then re-raised if it persists
        first: Exception = exc
    failed = []
    for settlement in batch:
        try:
            await source.settle([settlement])
        except Exception:  # noqa: BLE001 — collected, then raised below
            failed.append(settlement.delivery.message_id)
    if failed:
        suspects.update(failed)
        raise RuntimeError(f"settling {len(failed)} message(s) failed: {first!r}") from first
    log.error("settling a batch failed; settled one by one", error=repr(first))
