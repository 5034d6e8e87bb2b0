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
