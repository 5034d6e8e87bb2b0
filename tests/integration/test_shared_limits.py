"""`SharedLimits` on a live Redis and Redis Cluster: GCRA slots spaced 1/rate apart across
clients, a slot too far away refused without reserving, leases held by one holder at a time."""

from __future__ import annotations

import itertools
import time

import anyio
import pytest

from billingd.clients import Throttled, Unguarded
from billingd.clients.ledger.limits import SharedLimits
from tests.support import unique

pytestmark = [pytest.mark.anyio, pytest.mark.redis_backends, pytest.mark.timeout(30)]


async def test_slots_are_spaced_one_interval_apart_for_every_client(redis):
    replicas = [SharedLimits(redis, Unguarded("redis")) for _ in range(3)]
    account = unique("acct")
    slots = []  # when each request may go, on one clock: the time it asked + the wait it was given
    started = time.monotonic()
    for i in range(30):  # 30 requests at 50/s from three "replicas"
        asked = time.monotonic() - started
        slots.append(asked + await replicas[i % 3].reserve(account, "basic", 50, max_wait=10))
    assert slots[0] < 0.01
    gaps = [b - a for a, b in itertools.pairwise(slots)]
    # 21 ms apart (1/50 s + the 5 % margin), give or take the calls' own time on a busy machine
    assert all(0.021 - 0.006 <= gap <= 0.021 + 0.006 for gap in gaps), gaps
    assert 0.58 <= slots[-1] <= 0.64


async def test_a_slot_past_max_wait_is_refused_and_not_reserved(redis):
    limits = SharedLimits(redis, Unguarded("redis"))
    account = unique("acct")
    for _ in range(10):
        await limits.reserve(account, "basic", 10, max_wait=10)  # the 11th slot is ~1.05 s away
    with pytest.raises(Throttled) as refused:
        await limits.reserve(account, "basic", 10, max_wait=0.5)
    assert 0.95 <= refused.value.retry_after <= 1.06
    nxt = await limits.reserve(account, "basic", 10, max_wait=10)
    assert 0.95 <= nxt <= 1.06  # the refused call took no slot


async def test_a_lease_has_one_holder_and_the_next_waits_for_its_release(redis):
    limits = SharedLimits(redis, Unguarded("redis"))
    scope = unique("cus")
    token = await limits.lease(scope, "meter-call:m", ttl=5, max_wait=1)
    with pytest.raises(Throttled):
        await limits.lease(scope, "meter-call:m", ttl=5, max_wait=0.1)
    got: list[str] = []

    async def second() -> None:
        got.append(await limits.lease(scope, "meter-call:m", ttl=5, max_wait=2))

    async with anyio.create_task_group() as tg:
        tg.start_soon(second)
        await anyio.sleep(0.1)
        assert got == []
        await limits.unlease(scope, "meter-call:m", token)
    assert len(got) == 1
    await limits.unlease(scope, "meter-call:m", "not-the-holder")  # a stranger's release is a no-op
    with pytest.raises(Throttled):
        await limits.lease(scope, "meter-call:m", ttl=5, max_wait=0.05)
