"""The source actor and its pure parts, on an in-memory source: the outcome policy, partition lanes
and FIFO holds, drain, and poison detection — no broker, no Redis."""

from __future__ import annotations

import random

import anyio
import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from billingd.clients.errors import Busy, CircuitOpen, DownstreamRejected, DownstreamUnavailable
from billingd.config import convert
from billingd.config.model import Settings
from billingd.handlers.kit.outcome import ACK, DeadLetter, InvalidMessage, Retry
from billingd.sources.base import Delivery, Disposition
from billingd.sources.memory import MemorySource
from billingd.supervisors.actor import SourceActor
from billingd.supervisors.breaker import BreakerBoard
from billingd.supervisors.lanes import Lanes, partition_key
from billingd.supervisors.poison import PoisonLog
from billingd.supervisors.policy import outcome_of, settlement_of
from billingd.telemetry import Metrics, SourceStatus
from tests.support import wait_for

pytestmark = pytest.mark.anyio

RNG = random.Random(1)


def settings(**source: object) -> Settings:
    entry = {"name": "mem", "type": "amqp", "exchange": "", "queue": "q", "handler": "test", "prefetch": 10,
             "retry_initial": "10ms", "retry_max": "40ms", **source}  # fmt: skip
    return convert({"sources": [entry]}, Settings)


def delivery(body: bytes = b"{}", attempt: int = 1, group: str | None = None) -> Delivery:
    return Delivery(body, "m", attempt, {}, None, group)


# -- policy ------------------------------------------------------------------------------------


def test_each_exception_stands_for_its_outcome():
    assert outcome_of(InvalidMessage("bad"), retry_initial=1, rng=RNG) == DeadLetter("bad")
    assert outcome_of(DownstreamRejected("stripe", "400"), retry_initial=1, rng=RNG) == DeadLetter("stripe: 400")
    open_retry = outcome_of(CircuitOpen("redis", 2.0), retry_initial=1, rng=RNG)
    assert isinstance(open_retry, Retry) and not open_retry.counted and 2.0 <= (open_retry.delay or 0) <= 3.0
    shared = DownstreamUnavailable("stripe", "503")
    shared.own = False  # the breaker judged it an outage others meet too
    assert outcome_of(shared, retry_initial=1, rng=RNG) == Retry("stripe: 503", counted=False)
    assert outcome_of(DownstreamUnavailable("redis", "t/o"), retry_initial=1, rng=RNG) == Retry(
        "redis: t/o", counted=False
    )  # no breaker judged it: never an attempt
    own = DownstreamUnavailable("redis", "t/o")
    own.own = True
    assert outcome_of(own, retry_initial=1, rng=RNG) == Retry("redis: t/o", counted=True)
    replicas = DownstreamUnavailable("redis", "NOREPLICAS", counts=False)
    replicas.own = True
    assert outcome_of(replicas, retry_initial=1, rng=RNG) == Retry("redis: NOREPLICAS", counted=False)
    assert outcome_of(Busy("x"), retry_initial=1, rng=RNG) == Retry("busy: x", 1, counted=False)
    for shape in (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "bad"), RecursionError("deep"), OverflowError("big")):
        outcome = outcome_of(shape, retry_initial=1, rng=RNG)
        assert isinstance(outcome, DeadLetter) and outcome.reason.startswith("unreadable input")
    assert outcome_of(KeyError("a bug"), retry_initial=1, rng=RNG) is None


@given(st.integers(1, 12), st.booleans(), st.floats(0, 5) | st.none())
def test_a_retry_settles_as_retry_until_max_attempts_unless_uncounted(attempt, counted, delay):
    source = settings(max_attempts=5).sources[0]
    settlement = settlement_of(delivery(attempt=attempt), Retry("why", delay, counted), source, RNG)
    if counted and attempt >= 5:
        assert settlement.disposition is Disposition.DEAD_LETTER
        assert settlement.reason == f"gave up after {attempt} attempts: why"
    else:
        assert settlement.disposition is Disposition.RETRY
        assert settlement.counted is counted
        if delay is None:  # full jitter between retry_initial and the capped exponential
            assert 0.01 <= settlement.delay <= 0.04
        else:
            assert settlement.delay == delay


def test_ack_and_dead_letter_settle_as_themselves_and_anything_else_is_a_bug():
    source = settings().sources[0]
    assert settlement_of(delivery(), ACK, source, RNG).disposition is Disposition.ACK
    assert settlement_of(delivery(), DeadLetter("no"), source, RNG).reason == "no"
    with pytest.raises(TypeError):
        settlement_of(delivery(), "not an outcome", source, RNG)  # type: ignore[arg-type]


# -- lanes ---------------------------------------------------------------------------------------


def test_partition_keys_from_a_body_field_the_group_or_the_message_id():
    body = msgspec.json.encode({"data": {"object": {"customer": "cus_1"}}})
    assert partition_key("data.object.customer", delivery(body)) == "cus_1"
    assert partition_key("data.object.customer", delivery(b"not json")) == ""
    assert partition_key("data.object.missing", delivery(body)) == ""
    assert partition_key("data", delivery(b"[" * 100_000)) == ""  # nesting past msgspec's limit: lane 0
    assert partition_key("MessageGroupId", delivery(group="g-1")) == "g-1"
    assert partition_key("message_id", delivery()) == "m"


def test_an_ordered_group_is_held_back_after_a_retry_until_nothing_of_it_is_in_hand():
    lanes = Lanes("MessageGroupId", 4, ordered=True)
    first, second, other = delivery(group="a"), delivery(group="a"), delivery(group="b")
    lanes.hold([first, second, other])
    from billingd.sources.base import Settlement

    retried = Settlement(first, Disposition.RETRY, "later", 1.0)
    lanes.handled(retried)
    assert not lanes.may_start(second)  # must not overtake the retried one
    assert lanes.may_start(other)
    lanes.settled([retried])
    assert not lanes.may_start(second)  # `second` is still in hand
    lanes.settled([Settlement(second, Disposition.RELEASE)])
    assert lanes.may_start(delivery(group="a"))  # nothing of the group left: the broker orders the rest


# -- the actor on an in-memory source ------------------------------------------------------------


class Scripted:
    """A handler that answers by body: `{"do": "ack" | "dead" | "retry" | "bug" | "bogus", "sleep": s}`."""

    downstreams: tuple[str, ...] = ()

    def __init__(self) -> None:
        self.seen: list[tuple[str, int]] = []

    async def handle(self, message):
        script = msgspec.json.decode(message.body)
        self.seen.append((message.message_id, message.attempt))
        await anyio.sleep(script.get("sleep", 0))
        return (
            {
                "ack": ACK,
                "dead": DeadLetter("scripted"),
                "retry": Retry("again") if message.attempt < 3 else ACK,
                "bogus": "not an outcome",
            }.get(script.get("do", "ack"), ACK)
            if script.get("do") != "bug"
            else {}["bug"]
        )


def actor_for(source: MemorySource, handler, **overrides: object) -> SourceActor:
    cfg = settings(**overrides)
    metrics = Metrics("test")
    return SourceActor(
        cfg.sources[0],
        source.bind,
        handler,
        BreakerBoard(cfg, metrics),
        metrics.for_source("mem"),
        SourceStatus("mem"),
        (0.01, 0.05),
        random.Random(2),
        PoisonLog(),
    )


async def _until(predicate, timeout: float = 5) -> None:
    await wait_for(predicate, timeout=timeout, interval=0.005)


async def test_messages_are_acked_dead_lettered_and_retried_to_success():
    handler = Scripted()
    async with MemorySource() as source, anyio.create_task_group() as tg:
        actor = actor_for(source, handler)
        source.put(b'{"do": "ack"}', "a")
        source.put(b'{"do": "dead"}', "d")
        source.put(b'{"do": "retry"}', "r")
        tg.start_soon(actor.run)
        await _until(lambda: len(source.outcomes(Disposition.ACK)) == 2)
        actor.drain()
    assert source.outcomes(Disposition.DEAD_LETTER) == ["d"]
    assert [attempt for message_id, attempt in handler.seen if message_id == "r"] == [1, 2, 3]
    processed = actor.metrics.processed
    assert (processed["ack"]._value.get(), processed["retry"]._value.get(), processed["dead_letter"]._value.get()) == (
        2, 2, 1,
    )  # fmt: skip


async def test_a_body_field_partition_keeps_each_key_in_order_across_concurrent_workers():
    handler = Scripted()
    rng = random.Random(5)
    async with MemorySource(receive_max=20) as source, anyio.create_task_group() as tg:
        actor = actor_for(source, handler, prefetch=20, concurrency=8, partition_by="account.id")
        for i in range(60):
            body = {"account": {"id": f"acc-{i % 4}"}, "sleep": rng.uniform(0, 0.01)}
            source.put(msgspec.json.encode(body), f"{i % 4}:{i:02d}")
        tg.start_soon(actor.run)
        await _until(lambda: len(source.outcomes(Disposition.ACK)) == 60)
        actor.drain()
    for key in range(4):
        seen = [message_id for message_id, _ in handler.seen if message_id.startswith(f"{key}:")]
        assert seen == sorted(seen)  # one lane per key: handled in arrival order


async def test_drain_lets_in_flight_handlers_finish_and_releases_the_rest():
    handler = Scripted()
    async with MemorySource() as source, anyio.create_task_group() as tg:
        actor = actor_for(source, handler, prefetch=4, concurrency=2)
        for i in range(8):
            source.put(b'{"sleep": 0.2}', f"s{i}")
        tg.start_soon(actor.run)
        await _until(lambda: len(handler.seen) == 2)
        actor.drain()
    assert sorted(source.outcomes(Disposition.ACK)) == ["s0", "s1"]  # in flight: finished and acked
    assert len(source.outcomes(Disposition.RELEASE)) == 2  # received, not started: back to the broker
    assert source.waiting == 6  # the released ones and those never received


async def test_a_message_that_crashes_the_actor_is_named_and_poisoned_after_two_crashes():
    handler, poison = Scripted(), PoisonLog()
    async with MemorySource() as source:
        for crash in range(2):
            source.put(b'{"do": "bogus"}', "bad")
            actor = actor_for(source, handler)
            actor._poison = poison
            with pytest.raises(Exception) as crashed:  # noqa: PT011 — the crash is an exception group
                await actor.run()
            assert "not an Outcome" in "".join(_leaves(crashed.value))
            assert source.closed == crash + 1
        verdict = poison.verdict("bad")
    assert verdict is not None and "crashed 2 times" in verdict
    assert poison.verdict("innocent") is None


async def test_a_handler_bug_is_a_retry_with_its_stack_trace_never_a_crash():
    handler = Scripted()
    async with MemorySource() as source, anyio.create_task_group() as tg:
        actor = actor_for(source, handler, max_attempts=2)
        source.put(b'{"do": "bug"}', "b")
        tg.start_soon(actor.run)
        await _until(lambda: source.outcomes(Disposition.DEAD_LETTER) == ["b"])
        actor.drain()
    [dead] = [s for s in source.settled if s.disposition is Disposition.DEAD_LETTER]
    assert dead.reason == "gave up after 2 attempts: unexpected KeyError: 'bug'"


def _leaves(exc: BaseException) -> list[str]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [str(exc)]
