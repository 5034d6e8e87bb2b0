"""`CommandBatcher` on real Redis: coalescing, per-command errors, cancellation, hand-off."""

from __future__ import annotations

import anyio
import pytest
from redis.exceptions import DataError, ResponseError

from billingd.clients.ledger.batch import BatchAborted, CommandBatcher

pytestmark = pytest.mark.anyio


class CountingRedis:
    """Wraps a client to count pipelines sent."""

    def __init__(self, redis) -> None:
        self.redis = redis
        self.pipelines: list[int] = []
        self.get_encoder = redis.get_encoder

    def pipeline(self, transaction: bool = False):
        pipe = self.redis.pipeline(transaction=transaction)
        execute = pipe.execute

        async def counted(raise_on_error: bool = True):
            self.pipelines.append(len(pipe.command_stack))
            return await execute(raise_on_error=raise_on_error)

        pipe.execute = counted
        return pipe

    def __getattr__(self, name: str):
        return getattr(self.redis, name)


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


async def test_a_next_batch_leader_cancelled_while_waiting_fails_its_batch_not_strands_it(redis):
    batcher = CommandBatcher(redis)
    outcomes: list[object] = []

    async def call(*command: object) -> None:
        try:
            outcomes.append(await batcher.execute(*command))
        except BatchAborted as exc:
            outcomes.append(exc)

    waiting_leader = anyio.CancelScope()

    async def next_leader() -> None:
        with waiting_leader:
            await batcher.execute("PING")

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(call, "BLPOP", "batch:never", 1)  # the flush in flight for a second
            await anyio.sleep(0.01)
            tg.start_soon(next_leader)  # first of the next batch: waits for the flush to end
            await anyio.sleep(0.01)
            for _ in range(3):
                tg.start_soon(call, "PING")  # its followers
            await anyio.sleep(0.01)
            waiting_leader.cancel()
    # the blocking call answered None; the three followers were aborted (transient: they retry)
    assert outcomes.count(None) == 1
    assert sum(isinstance(o, BatchAborted) for o in outcomes) == 3
    assert await batcher.execute("PING") is True


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


async def test_an_argument_that_cannot_be_encoded_fails_its_caller_alone(redis):
    """DESIGN §8: a 5,000-digit number used to fail the whole pipeline it rode in."""
    counting = CountingRedis(redis)
    batcher = CommandBatcher(counting)
    results: dict[int, object] = {}

    async def incr(i: int, amount: object) -> None:
        try:
            results[i] = await batcher.execute("INCRBY", f"batch:enc:{i}", amount)
        except DataError as exc:
            results[i] = exc

    async with anyio.create_task_group() as tg:
        for i in range(20):
            tg.start_soon(incr, i, 10**5000 if i == 7 else i)
    assert isinstance(results.pop(7), DataError)
    assert results == {i: i for i in range(20) if i != 7}
    assert counting.pipelines == [19]  # the bad command never joined the pipeline


async def test_a_data_error_is_rejected_for_that_message_and_never_opens_the_breaker(redis):
    from billingd.clients.errors import DownstreamRejected
    from billingd.clients.ledger.base import RedisLedger
    from billingd.clients.ledger.scripts import Script
    from billingd.supervisors.breaker import BreakerState, CircuitBreaker

    breaker = CircuitBreaker("redis", failure_threshold=2, reset_timeout=5, reset_timeout_max=5)
    ledger = RedisLedger(redis, breaker)
    incr = Script.of("return redis.call('INCRBY', KEYS[1], ARGV[1])")
    await redis.set("batch:not-a-number", "x")
    for _ in range(5):
        with pytest.raises(DownstreamRejected, match="redis"):
            await ledger.run(incr, ("batch:not-a-number",), (1,))
        with pytest.raises(DownstreamRejected, match="cannot encode"):
            await ledger.run(incr, ("batch:n",), (10**5000,))
    assert breaker.state is BreakerState.CLOSED
    assert await ledger.run(incr, ("batch:n",), (2,)) == 2
