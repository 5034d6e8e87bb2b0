"""`OnceLedger`: a step runs once across concurrent workers; a failed step can be retried."""

from __future__ import annotations

import anyio
import pytest

from billingd.clients import Busy, Unguarded
from billingd.clients.ledger import OnceLedger

pytestmark = [pytest.mark.anyio, pytest.mark.redis_backends, pytest.mark.usefixtures("redis_backend")]


async def test_concurrent_claims_run_the_step_once_and_the_others_are_busy(redis):
    once = OnceLedger(redis, Unguarded("redis"))
    runs, busy = [], []

    async def step() -> None:
        runs.append(1)
        await anyio.sleep(0.05)

    async def worker() -> None:
        try:
            await once.run_once("org-1", "submit:inv-1", step, lease=5, ttl=60)
        except Busy:
            busy.append(1)

    async with anyio.create_task_group() as tg:
        for _ in range(5):
            tg.start_soon(worker)
    assert (len(runs), len(busy)) == (1, 4)
    assert await once.done("org-1", "submit:inv-1")
    assert await once.run_once("org-1", "submit:inv-1", step, lease=5, ttl=60) is False  # already done
    assert len(runs) == 1


async def test_a_failed_step_releases_its_lease_for_the_retry(redis):
    once = OnceLedger(redis, Unguarded("redis"))

    async def failing() -> None:
        raise RuntimeError("downstream said no")

    with pytest.raises(RuntimeError):
        await once.run_once("org-2", "submit:inv-2", failing, lease=5, ttl=60)
    assert not await once.done("org-2", "submit:inv-2")
    ran = []

    async def ok() -> None:
        ran.append(1)

    assert await once.run_once("org-2", "submit:inv-2", ok, lease=5, ttl=60) is True
    assert ran == [1]


async def test_an_expired_lease_lets_another_worker_take_over(redis):
    once = OnceLedger(redis, Unguarded("redis"))
    crashed = anyio.Event()

    async def hangs() -> None:
        crashed.set()
        await anyio.sleep(10)

    with anyio.move_on_after(0.05):  # the worker "dies" holding a 100 ms lease (cancelled, no release)
        await once.run_once("org-3", "submit:inv-3", hangs, lease=0.1, ttl=60)
    await redis.set("billingd:once:{org-3}:submit:inv-3", "pending:someone-else", px=100)  # as if never released
    await anyio.sleep(0.15)
    ran = []

    async def ok() -> None:
        ran.append(1)

    assert await once.run_once("org-3", "submit:inv-3", ok, lease=5, ttl=60) is True
    assert ran == [1]
