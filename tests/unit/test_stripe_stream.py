"""The meter event stream's batcher and session, the Stripe error classification, keyed locks."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any

import anyio
import pytest
import stripe
from hypothesis import given, settings
from hypothesis import strategies as st

from billingd.clients.errors import DownstreamRejected, DownstreamUnavailable, Throttled
from billingd.clients.keyed import KeyedLocks
from billingd.clients.stripe import MeterEventExists, classify
from billingd.clients.stripe_stream import MeterSession, MeterStream, SessionExpired
from billingd.handlers.kit.outcome import InvalidMessage
from billingd.handlers.usage.usage import _check_timestamp
from billingd.testing.stripe import _invalid

pytestmark = pytest.mark.timeout(30)


def in_seconds(seconds: float) -> str:
    when = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=seconds)
    return when.strftime("%Y-%m-%dT%H:%M:%S.000Z")


class FakeStripe:
    """Records stream requests; fails the ones whose first event's identifier is in `fail`."""

    def __init__(self, latency: float = 0.01) -> None:
        self.latency = latency
        self.requests: list[tuple[list[str], str]] = []
        self.fail: dict[str, BaseException] = {}
        self.expired: set[str] = set()
        self.sessions = 0

    async def create(self) -> dict[str, Any]:
        self.sessions += 1
        return {"authentication_token": f"tok{self.sessions}", "expires_at": in_seconds(900)}

    async def post(self, events: list[dict[str, Any]], token: str) -> None:
        if token in self.expired:
            raise SessionExpired("expired")
        await anyio.sleep(self.latency)
        ids = [e["identifier"] for e in events]
        self.requests.append((ids, token))
        for identifier in ids:
            if identifier in self.fail:
                raise self.fail[identifier]


async def nothing() -> None:
    return None


def stream_of(fake: FakeStripe, batch_max: int = 100, linger: float = 0.02) -> MeterStream:
    return MeterStream(fake.post, MeterSession(fake.create), nothing, batch_max, linger)


@pytest.mark.anyio
async def test_concurrent_senders_share_requests_of_at_most_batch_max_and_several_fly_at_once():
    fake = FakeStripe(latency=0.05)
    stream = stream_of(fake, batch_max=10)
    done: list[str] = []

    async def send(i: int) -> None:
        await stream.send({"identifier": f"e{i}"})
        done.append(f"e{i}")

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            for i in range(95):
                tg.start_soon(send, i)
    assert sorted(done) == sorted(f"e{i}" for i in range(95))
    sizes = [len(ids) for ids, _ in fake.requests]
    assert sum(sizes) == 95
    assert max(sizes) == 10
    assert len(sizes) == 10
    assert fake.sessions == 1


@pytest.mark.anyio
async def test_a_failed_request_fails_its_own_callers_only():
    fake = FakeStripe(latency=0.02)
    fake.fail["bad-0"] = DownstreamUnavailable("stripe", "500: boom")
    stream = stream_of(fake, batch_max=5, linger=0.01)
    results: dict[str, str] = {}

    async def send(name: str) -> None:
        try:
            await stream.send({"identifier": name})
            results[name] = "ok"
        except DownstreamUnavailable:
            results[name] = "failed"

    async with anyio.create_task_group() as tg:
        for i in range(5):
            tg.start_soon(send, f"bad-{i}")  # one batch of 5, holding the failing event
        await anyio.sleep(0.005)
        for i in range(5):
            tg.start_soon(send, f"good-{i}")
    failed = {n for n, r in results.items() if r == "failed"}
    assert failed == {f"bad-{i}" for i in range(5)}
    assert {n for n, r in results.items() if r == "ok"} == {f"good-{i}" for i in range(5)}


@pytest.mark.anyio
async def test_an_expired_token_is_renewed_once_and_the_request_sent_again():
    fake = FakeStripe()
    stream = stream_of(fake)
    await stream.send({"identifier": "a"})
    fake.expired.add("tok1")
    await stream.send({"identifier": "b"})
    assert fake.requests == [(["a"], "tok1"), (["b"], "tok2")]
    assert fake.sessions == 2


@pytest.mark.anyio
async def test_a_session_is_renewed_before_it_expires():
    fake = FakeStripe()
    lifetimes = iter([4.0, 900.0])

    async def create() -> dict[str, Any]:
        fake.sessions += 1
        return {"authentication_token": f"tok{fake.sessions}", "expires_at": in_seconds(next(lifetimes))}

    session = MeterSession(create)
    assert await session.token() == "tok1"
    assert await session.token() == "tok1"
    await anyio.sleep(3.1)  # past 3/4 of its 4 s: renewed early, never used expired
    assert await session.token() == "tok2"


@pytest.mark.anyio
async def test_a_cancelled_leader_fails_its_followers_transiently_and_the_next_batch_works():
    fake = FakeStripe(latency=10)
    stream = stream_of(fake, linger=0.01)
    outcome: list[str] = []

    async def follower() -> None:
        try:
            await stream.send({"identifier": "f"})
        except DownstreamUnavailable as exc:
            outcome.append(str(exc))

    async def leader() -> None:
        with anyio.move_on_after(0.1):  # the leader is cancelled mid-request (a drain's abort)
            await stream.send({"identifier": "leader"})

    async with anyio.create_task_group() as tg:
        tg.start_soon(leader)
        await anyio.sleep(0.001)
        tg.start_soon(follower)
    assert outcome == ["stripe: the task sending this meter event batch was cancelled"]
    fake.latency = 0.0
    await stream.send({"identifier": "next"})
    assert fake.requests[-1][0] == ["next"]


def stripe_error(
    status: int, message: str, headers: dict[str, str] | None = None, code: str | None = None
) -> stripe.StripeError:
    return stripe.InvalidRequestError(message, None, http_status=status, headers=headers, code=code)


def test_classify_follows_stripes_contract():
    assert isinstance(classify(stripe_error(429, "Request rate limit exceeded.")), Throttled)
    assert classify(stripe_error(429, "x", {"Stripe-Should-Retry": "false"})).retry_after == 10.0  # type: ignore[union-attr]
    exists = classify(stripe_error(400, "An event already exists with identifier evt-1."))
    assert isinstance(exists, MeterEventExists)
    assert exists.identifier == "evt-1"
    assert type(classify(stripe_error(400, "Missing required param: event_name"))) is DownstreamRejected
    assert type(classify(stripe_error(503, "down"))) is DownstreamUnavailable
    assert type(classify(stripe_error(409, "idempotency key in use"))) is DownstreamUnavailable


def test_a_configuration_answer_is_unavailability_that_is_never_an_attempt():
    """Issue 24, item 5: a 404 for a URL Stripe (or a proxy) does not serve dead-lettered every
    usage event; a missing object's 404 (`resource_missing`) is still the message's own."""
    unserved = classify(stripe_error(404, "Unrecognized request URL (POST: /v2/billing/meter_event_session)."))
    assert isinstance(unserved, DownstreamUnavailable) and not unserved.counts
    assert "fix: [stripe].api_base / meter_events_base" in unserved.detail
    missing = classify(stripe_error(404, "No such invoice: 'in_1'", code="resource_missing"))
    assert type(missing) is DownstreamRejected
    for status in (401, 403):
        refused = classify(stripe_error(status, "Invalid API Key provided"))
        assert isinstance(refused, DownstreamUnavailable) and not refused.counts and "api_key" in refused.detail


@pytest.mark.anyio
async def test_keyed_locks_admit_one_holder_per_key_and_forget_idle_keys():
    locks = KeyedLocks("stripe")
    inside: dict[str, int] = {"a": 0, "b": 0}
    most: dict[str, int] = {"a": 0, "b": 0}

    async def hold(key: str) -> None:
        async with locks.hold(key, 5):
            inside[key] += 1
            most[key] = max(most[key], inside[key])
            await anyio.sleep(0.01)
            inside[key] -= 1

    async with anyio.create_task_group() as tg:
        for i in range(10):
            tg.start_soon(hold, "ab"[i % 2])
    assert most == {"a": 1, "b": 1}
    assert len(locks) == 0
    refused: list[Throttled] = []

    async def wait_briefly() -> None:
        try:
            async with locks.hold("a", 0.05):
                pass
        except Throttled as exc:
            refused.append(exc)

    async with locks.hold("a", 5), anyio.create_task_group() as tg:
        tg.start_soon(wait_briefly)
    assert len(refused) == 1
    assert len(locks) == 0


NOW = 1_800_000_000


@settings(max_examples=300, deadline=None)
@given(
    value=st.decimals(allow_nan=False, allow_infinity=False, min_value=0, max_value=10**20, places=0),
    age=st.integers(min_value=-3600, max_value=40 * 86400),
)
def test_what_billingd_lets_through_the_stream_would_accept(value: Decimal, age: int) -> None:
    """billingd's checks before sending are at least as strict as Stripe's later validation."""
    from billingd.handlers.usage.meters import MeterMap
    from billingd.handlers.usage.usage import UsageHandler, UsageOptions

    handler = UsageHandler(None, None, None, MeterMap({"m": "m"}, {}), UsageOptions())  # type: ignore[arg-type]
    timestamp = NOW - age
    try:
        metered = handler._meter_value("m", value)
        _check_timestamp(timestamp, NOW)
    except InvalidMessage:
        return
    stamp = dt.datetime.fromtimestamp(timestamp, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    event = {"event_name": "m", "timestamp": stamp, "payload": {"stripe_customer_id": "cus_1", "value": str(metered)}}
    import time as clock

    real = clock.time
    clock.time = lambda: float(NOW)  # type: ignore[assignment]
    try:
        assert _invalid(event, event["payload"], None, {"m": {"id": "mtr_m", "status": "active"}}) is None
    finally:
        clock.time = real  # type: ignore[assignment]


@pytest.mark.anyio
async def test_each_caller_of_a_failed_batch_raises_its_own_copy_with_a_short_traceback():
    """Issue 24, item 6: one exception object re-raised by every follower grew one traceback
    with every raise (lines of 18 KB, 9.6 MB of log in 8 s)."""
    import traceback

    fake = FakeStripe()
    fake.fail["e0"] = DownstreamUnavailable("stripe", "500: boom")
    stream = stream_of(fake, linger=0.05)
    caught: list[BaseException] = []

    async def send(i: int) -> None:
        try:
            await stream.send({"identifier": f"e{i}"})
        except DownstreamUnavailable as exc:
            caught.append(exc)

    async with anyio.create_task_group() as tg:
        for i in range(50):
            tg.start_soon(send, i)
    assert len(caught) == 50 and len({id(exc) for exc in caught}) == 50
    assert all(isinstance(exc, DownstreamUnavailable) and exc.detail == "500: boom" for exc in caught)
    longest = max(len("".join(traceback.format_exception(exc))) for exc in caught)
    assert longest < 5000


@pytest.mark.anyio
async def test_a_session_that_expires_again_right_after_renewal_is_a_transient_failure():
    fake = FakeStripe()
    fake.expired = {"tok1", "tok2"}  # the renewed token is refused too
    stream = stream_of(fake)
    with pytest.raises(DownstreamUnavailable, match="expired again right after it was renewed"):
        await stream.send({"identifier": "x"})
