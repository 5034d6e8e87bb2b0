"""The circuit breaker's state machine (DESIGN §3)."""

from __future__ import annotations

import anyio
import pytest

from billingd.clients.errors import CircuitOpen, DownstreamRejected, DownstreamUnavailable
from billingd.supervisors.breaker import BreakerState, CircuitBreaker

pytestmark = pytest.mark.anyio


async def ok() -> str:
    return "ok"


async def down() -> None:
    raise DownstreamUnavailable("redis", "connection refused")


async def rejected() -> None:
    raise DownstreamRejected("stripe", "400 bad request")


async def fail(breaker: CircuitBreaker, times: int) -> None:
    for _ in range(times):
        with pytest.raises(DownstreamUnavailable):
            await breaker.call(down)


async def test_consecutive_failures_open_it_and_an_answer_resets_the_count():
    breaker = CircuitBreaker("redis", failure_threshold=3, reset_timeout=0.2, reset_timeout_max=1)
    await fail(breaker, 2)
    with pytest.raises(DownstreamRejected):
        await breaker.call(rejected)  # the downstream answered: not a failure
    await fail(breaker, 2)
    assert breaker.state is BreakerState.CLOSED
    await fail(breaker, 1)
    assert breaker.state is BreakerState.OPEN
    with pytest.raises(CircuitOpen) as caught:
        await breaker.call(ok)
    assert 0 < caught.value.retry_after <= 0.2
    assert breaker.blocking


async def test_half_open_admits_one_probe_and_doubles_the_timeout_while_probes_fail():
    breaker = CircuitBreaker("stripe", failure_threshold=1, reset_timeout=0.05, reset_timeout_max=0.15)
    await fail(breaker, 1)
    timeouts = []
    for _ in range(3):
        await anyio.sleep(breaker.open_until - anyio.current_time() + 0.01)
        assert not breaker.blocking
        await fail(breaker, 1)  # the probe fails
        timeouts.append(breaker.timeout)
    assert timeouts == [0.1, 0.15, 0.15]
    await anyio.sleep(breaker.open_until - anyio.current_time() + 0.01)
    assert await breaker.call(ok) == "ok"
    assert breaker.state is BreakerState.CLOSED
    assert breaker.timeout == 0.05


async def test_callers_wait_for_the_probe_instead_of_failing():
    breaker = CircuitBreaker("redis", failure_threshold=1, reset_timeout=0.05, reset_timeout_max=1)
    await fail(breaker, 1)
    await anyio.sleep(0.06)
    release = anyio.Event()
    results = []

    async def slow_probe() -> str:
        await release.wait()
        return "probe"

    async def call(fn) -> None:
        results.append(await breaker.call(fn))

    async with anyio.create_task_group() as tg:
        tg.start_soon(call, slow_probe)
        await anyio.sleep(0.01)
        assert breaker.state is BreakerState.HALF_OPEN
        for _ in range(3):
            tg.start_soon(call, ok)
        await anyio.sleep(0.01)
        assert results == []  # waiting on the probe, not failing
        release.set()
    assert results == ["probe", "ok", "ok", "ok"]


async def test_a_cancelled_probe_lets_the_next_call_probe():
    breaker = CircuitBreaker("redis", failure_threshold=1, reset_timeout=0.01, reset_timeout_max=1)
    await fail(breaker, 1)
    await anyio.sleep(0.02)
    with anyio.move_on_after(0.01):
        await breaker.call(anyio.sleep, 1)
    assert await breaker.call(ok) == "ok"
    assert breaker.state is BreakerState.CLOSED


# -- whose failure is it (issue 24, items 16 and 17) ------------------------------------------


async def judged(breaker: CircuitBreaker, message: str, fn=down) -> DownstreamUnavailable | CircuitOpen:
    """The failure of one call made while handling `message`, as the breaker judged it."""
    from billingd.clients.errors import CURRENT_MESSAGE

    token = CURRENT_MESSAGE.set(message)
    try:
        with pytest.raises(DownstreamUnavailable) as caught:
            await breaker.call(fn)
        return caught.value
    finally:
        CURRENT_MESSAGE.reset(token)


async def test_an_outage_every_message_meets_is_never_a_messages_own_failure():
    breaker = CircuitBreaker("redis", failure_threshold=3, reset_timeout=0.05, reset_timeout_max=0.1)
    failures = [await judged(breaker, f"m{i}") for i in range(3)]  # a short outage: three messages fail
    assert [f.own for f in failures] == [False, False, False]
    refused = await judged(breaker, "m3")
    assert isinstance(refused, CircuitOpen) and not refused.attempt
    await anyio.sleep(0.06)
    probe = await judged(breaker, "m0")  # the probe fails, but other messages met the outage too
    assert probe.own is False


async def test_a_message_failing_while_later_calls_succeed_fails_on_its_own():
    breaker = CircuitBreaker("stripe", failure_threshold=5, reset_timeout=0.05, reset_timeout_max=0.1)
    from billingd.clients.errors import CURRENT_MESSAGE

    gate, started = anyio.Event(), anyio.Event()

    async def slow_failure() -> None:
        started.set()
        await gate.wait()
        raise DownstreamUnavailable("stripe", "500 for this payload")

    result: list[DownstreamUnavailable] = []

    async def poison() -> None:
        result.append(await judged(breaker, "poison", slow_failure))

    async with anyio.create_task_group() as tg:
        tg.start_soon(poison)
        await started.wait()
        token = CURRENT_MESSAGE.set("valid")
        assert await breaker.call(ok) == "ok"  # a call made after the poison's succeeds
        CURRENT_MESSAGE.reset(token)
        gate.set()
    assert result[0].own is True and result[0].attempt


async def test_a_message_alone_on_its_downstream_counts_its_failed_probes():
    breaker = CircuitBreaker("stripe", failure_threshold=2, reset_timeout=0.02, reset_timeout_max=0.04)
    opening = [await judged(breaker, "poison") for _ in range(2)]
    assert [f.own for f in opening] == [False, False]  # not yet known to be its own: the breaker opens
    assert breaker.state is BreakerState.OPEN
    for _ in range(3):
        await anyio.sleep(breaker.open_until - anyio.current_time() + 0.005)
        probe = await judged(breaker, "poison")
        assert probe.own is True and probe.attempt  # the probe's own failure counts: it reaches its DLQ


async def test_a_partial_outage_is_not_a_messages_own_failure():
    """The review of issue 24: one Redis Cluster node failing over (or Stripe's meter event host
    down) while calls to the other parts succeed must not count against the messages it fails."""
    from billingd.clients.errors import CALL_TARGET

    breaker = CircuitBreaker("redis", failure_threshold=99, reset_timeout=0.05, reset_timeout_max=0.1)
    gate, started = anyio.Event(), anyio.Event()

    async def slow_failure() -> None:
        started.set()
        await gate.wait()
        raise DownstreamUnavailable("redis", "node 7001 failing over")

    result: list[DownstreamUnavailable] = []

    async def on_node(name: str) -> None:
        token = CALL_TARGET.set(name)
        try:
            result.append(await judged(breaker, "m1", slow_failure))
        finally:
            CALL_TARGET.reset(token)

    async with anyio.create_task_group() as tg:
        tg.start_soon(on_node, "127.0.0.1:7001")
        await started.wait()
        token = CALL_TARGET.set("127.0.0.1:7002")
        assert await breaker.call(ok) == "ok"  # another node answers
        CALL_TARGET.reset(token)
        gate.set()
    assert result[0].own is False


async def test_an_aborted_call_is_neither_a_failure_nor_an_attempt():
    from billingd.clients.errors import CallAborted

    breaker = CircuitBreaker("redis", failure_threshold=1, reset_timeout=1, reset_timeout_max=1)

    async def aborted() -> None:
        raise CallAborted("redis", "the pipeline's leader was cancelled")

    for _ in range(3):
        with pytest.raises(CallAborted) as caught:
            await breaker.call(aborted)
        assert not caught.value.attempt
    assert breaker.state is BreakerState.CLOSED
