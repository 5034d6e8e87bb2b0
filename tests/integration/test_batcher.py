"""`CommandBatcher` on real Redis: coalescing, per-command errors, cancellation, hand-off."""

from __future__ import annotations

import anyio
import pytest
from redis.exceptions import ResponseError

from billingd.clients.ledger.batch import BatchAborted, CommandBatcher

pytestmark = pytest.mark.anyio


class CountingRedis:
    """Wraps a client to count pipelines sent."""

    def __init__(self, redis) -> None:
        self.redis = redis
        self.pipelines: list[int] = []

    def pipeline(self, transaction: bool = False):
        pipe = self.redis.pipeline(transaction=transaction)
        execute = pipe.execute

        async def counted(raise_on_error: bool = True):
            self.pipelines.append(len(pipe.command_stack))
            return await execute(raise_on_error=raise_on_error)

        pipe.execute = counted
        return pipe


async def test_concurrent_commands_share_one_pipeline_and_get_their_own_replies(redis):
    counting = CountingRedis(redis)
    batcher = CommandBatcher(counting)
    replies: dict[int, object] = {}

    async def incr(i: int) -> None:
        replies[i] = await batcher.execute("INCRBY", f"batch:{i}", i)

    async with anyio.create_task_group() as tg:
        for i in range(50):
            tg.start_soon(incr, i)
    assert replies == {i: i for i in range(50)}
    assert counting.pipelines == [50]


async def test_one_failing_command_does_not_fail_the_others(redis):
    batcher = CommandBatcher(redis)
    results: list[object] = []

    async def run(*command) -> None:
        try:
            results.append(await batcher.execute(*command))
        except ResponseError as exc:
            results.append(exc)

    await redis.set("batch:str", "x")
    async with anyio.create_task_group() as tg:
        tg.start_soon(run, "INCR", "batch:str")
        tg.start_soon(run, "INCR", "batch:n")
    assert isinstance(results[0], ResponseError)
    assert results[1] == 1


async def test_a_cancelled_leader_fails_its_followers_instead_of_stranding_them(redis):
    batcher = CommandBatcher(redis)
    outcomes: list[object] = []

    async def follower() -> None:
        try:
            outcomes.append(await batcher.execute("PING"))
        except BatchAborted as exc:
            outcomes.append(exc)

    leader_scope = anyio.CancelScope()

    async def leader() -> None:
        with leader_scope:
            await batcher.execute("BLPOP", "batch:never", 2)  # holds its pipeline open

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(leader)
            await anyio.sleep(0.01)
            for _ in range(3):
                tg.start_soon(follower)
            await anyio.sleep(0.01)
            leader_scope.cancel()
    # followers queued behind the leader's flush were either in its pipeline (aborted) or led
    # themselves after the hand-off (answered); none waits forever
    assert len(outcomes) == 3
    assert all(o is True or isinstance(o, BatchAborted) for o in outcomes)
    assert await batcher.execute("PING") is True  # the batcher is usable afterwards


async def test_calls_queued_during_a_flush_are_led_by_the_oldest(redis):
    counting = CountingRedis(redis)
    batcher = CommandBatcher(counting)
    order: list[int] = []

    async def call(i: int) -> None:
        await batcher.execute("INCR", "batch:order")
        order.append(i)

    async with anyio.create_task_group() as tg:
        tg.start_soon(call, 0)
        await anyio.lowlevel.checkpoint()
        await anyio.lowlevel.checkpoint()  # the first flush is now in flight
        for i in range(1, 6):
            tg.start_soon(call, i)
    assert sorted(order) == list(range(6))
    assert sum(counting.pipelines) == 6
    assert len(counting.pipelines) >= 2
    assert int(await redis.get("batch:order")) == 6
