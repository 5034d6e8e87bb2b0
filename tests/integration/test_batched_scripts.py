"""Batched effects on real Redis (single and Cluster): concurrent calls of one Lua script go as
one call of its batched form, each caller still getting its own reply or error (issue #12)."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ResponseError

from billingd.clients.errors import DownstreamRejected
from billingd.clients.ledger.base import RedisLedger
from billingd.clients.ledger.batch import CommandBatcher
from billingd.clients.ledger.scripts import Script
from billingd.clients.redis import RedisClient
from billingd.supervisors.breaker import CircuitBreaker

pytestmark = [pytest.mark.anyio, pytest.mark.redis_backends, pytest.mark.usefixtures("redis_backend")]

ADD = Script.of("""
if ARGV[1] == 'boom' then error('boom at ' .. KEYS[1]) end
if ARGV[1] == 'nothing' then return nil end
return redis.call('INCRBY', KEYS[1], ARGV[1])
""")
NAME = Script.of("return {KEYS[1], ARGV[1], #ARGV}")


async def gather(batcher: CommandBatcher, calls: list[tuple[Script, tuple[str, ...], tuple[Any, ...]]]) -> list[Any]:
    """Run `calls` concurrently (they land in one batch); replies or exceptions, in order."""
    results: list[Any] = [None] * len(calls)

    async def one(i: int, script: Script, keys: tuple[str, ...], args: tuple[Any, ...]) -> None:
        try:
            results[i] = await batcher.run_script(script, keys, args)
        except Exception as exc:  # noqa: BLE001 — the test looks at each caller's error
            results[i] = exc

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            for i, (script, keys, args) in enumerate(calls):
                tg.start_soon(one, i, script, keys, args)
    return results


async def load(redis: RedisClient, *scripts: Script) -> None:
    for script in scripts:
        await redis.script_load(script.source)


async def evalsha_calls(redis: RedisClient) -> int:
    if isinstance(redis, RedisCluster):
        infos = (await redis.info("commandstats", target_nodes=RedisCluster.PRIMARIES)).values()
    else:
        infos = [await redis.info("commandstats")]
    return sum(int(info.get("cmdstat_evalsha", {}).get("calls", 0)) for info in infos)


async def test_one_script_call_applies_a_batch_and_each_caller_gets_its_own_reply(redis):
    await load(redis, ADD, NAME)
    batcher = CommandBatcher(redis)
    await gather(batcher, [(ADD, ("b:{t}:warm",), (1,))] * 2)  # loads the batched form (NOSCRIPT once)
    before = await evalsha_calls(redis)
    calls = [(ADD, ("b:{t}:a",), (i,)) for i in range(1, 11)]
    calls += [(ADD, ("b:{t}:b",), ("nothing",)), (ADD, ("b:{t}:c",), ("boom",)), (NAME, ("b:{t}:n",), ("x", "y"))]
    replies = await gather(batcher, calls)
    assert replies[:10] == [sum(range(1, i + 1)) for i in range(1, 11)]  # applied in call order, each its own
    assert replies[10] is None  # a nil reply stays nil
    assert isinstance(replies[11], ResponseError) and "boom at b:{t}:c" in str(replies[11])  # only that caller
    assert replies[12] == [b"b:{t}:n", b"x", 2]  # another script of the same batch, its own keys and args
    assert int(await redis.get("b:{t}:a")) == 55
    # 13 calls of 2 scripts in one slot: 2 script calls on Redis (the second script's one call goes alone)
    assert await evalsha_calls(redis) - before == 2


async def test_a_redis_error_inside_one_call_fails_that_call_alone(redis):
    await load(redis, ADD)
    await redis.set("b:{t}:text", "not a number")
    replies = await gather(CommandBatcher(redis), [(ADD, ("b:{t}:text",), (1,)), (ADD, ("b:{t}:ok",), (5,))])
    assert isinstance(replies[0], ResponseError) and "not an integer" in str(replies[0])
    assert replies[1] == 5
    assert await redis.get("b:{t}:text") == b"not a number"


async def test_a_lost_script_cache_is_reloaded_for_single_and_batched_calls(redis):
    ledger = RedisLedger(redis, CircuitBreaker("redis", failure_threshold=3, reset_timeout=1, reset_timeout_max=1))
    await ledger.run(ADD, ("b:{t}:warm",), (1,))  # the plain script and the batched form get loaded
    await gather(ledger._batcher, [(ADD, ("b:{t}:warm",), (1,))] * 3)
    await redis.script_flush()  # redis-py sends it to every primary of a cluster
    results: list[Any] = []

    async def add(n: int) -> None:
        results.append(await ledger.run(ADD, ("b:{t}:after",), (n,)))

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            for n in range(1, 6):
                tg.start_soon(add, n)
    assert sorted(results)[-1] == 15 and int(await redis.get("b:{t}:after")) == 15


async def test_calls_in_different_cluster_slots_each_reach_their_own_keys(redis):
    await load(redis, ADD)
    tags = [f"slot{i}" for i in range(12)]  # spread over the cluster's masters
    replies = await gather(CommandBatcher(redis), [(ADD, (f"b:{{{tag}}}:x",), (i + 1,)) for i, tag in enumerate(tags)])
    assert replies == list(range(1, 13))
    for i, tag in enumerate(tags):
        assert int(await redis.get(f"b:{{{tag}}}:x")) == i + 1


async def test_a_refused_call_in_a_batch_is_rejected_for_its_message_alone(redis):
    ledger = RedisLedger(redis, CircuitBreaker("redis", failure_threshold=3, reset_timeout=1, reset_timeout_max=1))
    outcomes: dict[int, Any] = {}

    async def add(i: int, value: Any) -> None:
        try:
            outcomes[i] = await ledger.run(ADD, (f"b:{{t}}:{i}",), (value,))
        except DownstreamRejected as exc:
            outcomes[i] = exc

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            for i in range(8):
                tg.start_soon(add, i, "boom" if i == 3 else i)
    assert isinstance(outcomes.pop(3), DownstreamRejected)
    assert outcomes == {i: i for i in range(8) if i != 3}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(-1000, 1000)), min_size=1, max_size=40))
async def test_batched_replies_equal_running_each_call_alone(redis, adds):
    """Whatever the mix, a batch ends with the totals and replies of running the calls one by one."""
    await load(redis, ADD)
    keys = [f"b:{{p}}:{k}" for k in range(4)]
    await redis.delete(*keys) if not isinstance(redis, RedisCluster) else [await redis.delete(k) for k in keys]
    replies = await gather(CommandBatcher(redis), [(ADD, (keys[k],), (v,)) for k, v in adds])
    totals = dict.fromkeys(range(4), 0)
    expected = []
    for k, v in adds:
        totals[k] += v
        expected.append(totals[k])
    assert replies == expected
    for k in range(4):
        assert int(await redis.get(keys[k]) or 0) == totals[k]
