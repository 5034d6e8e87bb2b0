"""`usage` against a Stripe double that keeps Stripe's contract (DESIGN §9): latency, rate limits,
one v1 call per customer and meter, duplicate answers, the v2 stream's session tokens and its
asynchronous error reports. Messages come through RabbitMQ (fast); effects are asserted at the
double, in Redis and in the metrics."""

from __future__ import annotations

import json
import time
from typing import Any

import anyio
import pytest

from billingd.clients import Unguarded
from billingd.clients.ledger import UsageLedger
from billingd.supervisors.breaker import BreakerState
from billingd.testing.stripe import StripeContract
from tests.support import amqp_source, make_settings, meter_id, running, unique, wait_for

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(90)]

METERS = {"ai_credits": "ai_credits"}


def stripe_settings(double: Any, **overrides: Any) -> dict[str, Any]:
    """`[stripe]` reporting inline: these tests hold the contract of each call a message makes."""
    return {"api_key": "sk_test_contract", "api_base": double.url, "meters": METERS, "timeout": "2s",
            "meter_delivery": "inline", **overrides}  # fmt: skip


def usage(workspace: str, key: str, value: int = 1, **fields: Any) -> dict[str, Any]:
    return {"event_type": "ai_credits", "workspace_id": workspace, "value": value, "idempotency_key": key, **fields}


async def customers(redis: Any, count: int) -> list[tuple[str, str]]:
    """`count` workspaces, each mapped to its own Stripe customer."""
    ledger = UsageLedger(redis, Unguarded("redis"))
    pairs = [(unique("ws"), f"cus_{unique('c').replace('-', '')}") for _ in range(count)]
    for workspace, customer in pairs:
        await ledger.set_customer(workspace, customer)
    return pairs


def value(daemon: Any, source: str, outcome: str) -> float:
    return daemon.metrics.processed.labels(source, outcome)._value.get()


async def publish(amqp: Any, source: dict[str, Any], bodies: list[dict[str, Any]]) -> None:
    await amqp.publish_many(source["exchange"], "usage", [(b["idempotency_key"], b) for b in bodies])


async def test_stream_batches_events_of_many_workers_and_renews_an_expired_token(amqp, redis, stripe_double):
    stripe_double.contract = StripeContract(latency=0.05)
    source = amqp.track(amqp_source("usage", prefetch=50))
    [(workspace, customer)] = await customers(redis, 1)
    first = [usage(workspace, f"a-{i}-{workspace}") for i in range(60)]
    second = [usage(workspace, f"b-{i}-{workspace}") for i in range(60)]
    async with running(make_settings([source], stripe=stripe_settings(stripe_double))) as daemon:
        await publish(amqp, source, first)
        await wait_for(lambda: value(daemon, source["name"], "ack") == 60, timeout=20, what="first 60 acked")
        stripe_double.expire_tokens()  # mid-stream: the next request is a 401 session expired
        await publish(amqp, source, second)
        await wait_for(lambda: value(daemon, source["name"], "ack") == 120, timeout=20, what="all acked")
        assert value(daemon, source["name"], "retry") == 0  # a renewed token is not a failure
    recorded = stripe_double.recorded()
    assert sorted(recorded) == sorted(meter_id(e) for e in first + second)
    assert set(recorded.values()) == {1}
    assert stripe_double.sessions == 2
    assert max(stripe_double.stream_requests) > 1  # events of several workers shared requests
    assert len(stripe_double.stream_requests) < 120
    assert {e["payload"]["stripe_customer_id"] for e in stripe_double.meter_events} == {customer}


def events_in(requests: list[Any]) -> int:
    return sum(len(json.loads(r.body)["events"]) for r in requests if r.path == "/v2/billing/meter_event_stream")


@pytest.mark.parametrize("failure", ["500", "timeout"])
async def test_a_failed_stream_request_retries_only_its_own_events(amqp, redis, stripe_double, failure):
    source = amqp.track(amqp_source("usage", prefetch=20))
    [(workspace, _)] = await customers(redis, 1)
    bodies = [usage(workspace, f"f-{i}-{workspace}") for i in range(41)]
    settings = make_settings([source], stripe=stripe_settings(stripe_double, timeout="500ms"))
    async with running(settings) as daemon:
        name = source["name"]
        await publish(amqp, source, bodies[:1])  # the session exists before the failure
        await wait_for(lambda: value(daemon, name, "ack") == 1, what="first acked")
        start = len(stripe_double.requests)
        if failure == "500":
            stripe_double.fail_next(1, 500)
        else:
            stripe_double.set_mode("hang")
        await publish(amqp, source, bodies[1:])
        await wait_for(lambda: value(daemon, name, "retry") >= 1, timeout=20, what="a retry")
        if failure == "timeout":
            await wait_for(lambda: value(daemon, name, "retry") == events_in(stripe_double.requests[start:]))
            end = len(stripe_double.requests)
            stripe_double.set_mode("ok")
        await wait_for(lambda: value(daemon, name, "ack") == 41, timeout=30, what="all acked")
        retried = value(daemon, name, "retry")
        assert value(daemon, name, "dead_letter") == 0
    if failure == "500":
        failed = [r for r in stripe_double.requests if r.status == 500]
        assert len(failed) == 1
        assert retried == events_in(failed)  # exactly the failed request's events
    else:
        assert retried == events_in(stripe_double.requests[start:end])  # the requests that timed out
    assert 1 <= retried < 40
    recorded = stripe_double.recorded()
    assert sorted(recorded) == sorted(meter_id(b) for b in bodies)
    assert set(recorded.values()) == {1}  # a timed-out request Stripe took anyway is not doubled


async def test_a_drain_sends_what_the_batcher_holds_and_an_abort_releases_it_unacked(amqp, redis, stripe_double):
    source = amqp.track(amqp_source("usage", prefetch=10))
    [(workspace, _)] = await customers(redis, 1)
    bodies = [usage(workspace, f"d-{i}-{workspace}") for i in range(5)]
    # a long linger: the events wait in the batcher when the drain begins; the drain lets them go
    settings = make_settings([source], stripe=stripe_settings(stripe_double, meter_linger="1500ms"))
    async with running(settings) as daemon:
        await publish(amqp, source, bodies)
        await wait_for(lambda: daemon.metrics.sources[source["name"]].running == 5, what="5 waiting in the batcher")
        assert stripe_double.stream_requests == []
    assert sorted(stripe_double.recorded()) == sorted(meter_id(b) for b in bodies)
    assert await amqp.depth(source["queue"]) == 0
    # now Stripe hangs and the drain times out: the handlers are cancelled, their messages released
    later = [usage(workspace, f"e-{i}-{workspace}") for i in range(5)]
    stripe_double.set_mode("hang")
    settings = make_settings(
        [source], stripe=stripe_settings(stripe_double, timeout="30s"), daemon={"drain_timeout": "1s"}
    )
    async with running(settings) as daemon:
        await publish(amqp, source, later)
        await wait_for(lambda: daemon.metrics.sources[source["name"]].running == 5, what="5 held by a hung request")
        acked = daemon.metrics.processed.labels(source["name"], "ack")
    stripe_double.set_mode("ok")
    assert acked._value.get() == 0
    assert await amqp.depth(source["queue"]) == 5  # released to the queue, never acked unsent


async def test_what_stripe_would_refuse_later_is_dead_lettered_before_any_call(amqp, redis, stripe_double):
    source = amqp.track(amqp_source("usage", max_attempts=2))
    [(workspace, _)] = await customers(redis, 1)
    now = int(time.time())
    bodies = [
        usage(unique("ws-unmapped"), "no-customer"),  # no Stripe customer: retried, then dead-lettered
        usage(workspace, "too-many-digits", value=1234567890123456),
        usage(workspace, "forty-days-old", timestamp=now - 40 * 86400),
        usage(workspace, "ahead", timestamp=now + 3600),
        usage(workspace, "not-a-customer", stripe_customer_id="acct_123"),
    ]
    async with running(make_settings([source], stripe=stripe_settings(stripe_double))) as daemon:
        await publish(amqp, source, bodies)
        await wait_for(lambda: value(daemon, source["name"], "dead_letter") == 5, timeout=20, what="5 dead-lettered")
    reasons = {
        m.headers["x-billingd-original-message-id"]: m.headers["x-billingd-reason"]
        for m in await amqp.drain_queue(source["queue"] + ".dlq")
    }
    assert "no Stripe customer known" in reasons["no-customer"]
    assert "at most 15 significant digits" in reasons["too-many-digits"]
    assert "Stripe takes events of the past 35 days" in reasons["forty-days-old"]
    assert "at most 300 s in the future" in reasons["ahead"]
    assert "is not a Stripe customer id" in reasons["not-a-customer"]
    ledger = UsageLedger(redis, Unguarded("redis"))
    assert (await ledger.counter(workspace, "ai_credits"))[0] == 0  # refused before any effect, Redis included
    assert not [r for r in stripe_double.requests if "meter_event" in r.path]  # no call for any of them


async def test_error_reports_of_the_stream_are_counted_per_meter_and_code_once(amqp, redis, stripe_double):
    usage_source = amqp.track(amqp_source("usage"))
    events_source = amqp.track(amqp_source("stripe_events"))
    pairs = await customers(redis, 2)
    stripe_double.known_customers = {pairs[0][1]}  # Stripe has never heard of the second customer
    good = [usage(pairs[0][0], f"ok-{i}-{pairs[0][0]}") for i in range(3)]
    lost = [usage(pairs[1][0], f"lost-{i}-{pairs[1][0]}") for i in range(4)]
    settings = make_settings([usage_source, events_source], stripe=stripe_settings(stripe_double))
    async with running(settings) as daemon:
        await publish(amqp, usage_source, good + lost)
        await wait_for(lambda: value(daemon, usage_source["name"], "ack") == 7, what="all 7 accepted by the stream")
        report = stripe_double.error_report_event("mtr_ai_credits")
        assert report is not None
        thin = {k: report[k] for k in ("id", "object", "type", "created", "related_object")}  # fetched for its data
        for body in (report, report, thin):  # a redelivered report is counted once
            await amqp.publish(events_source["exchange"], "stripe", body)
        await wait_for(lambda: value(daemon, events_source["name"], "ack") == 3, what="reports handled")
        errors = daemon.metrics.meter_errors.labels(
            events_source["name"], "mtr_ai_credits", "meter_event_customer_not_found"
        )
        assert errors._value.get() == 4
    assert sorted(stripe_double.recorded()) == sorted(meter_id(b) for b in good)
    assert [r.path for r in stripe_double.requests if r.path.startswith("/v2/core/events/")] == []  # once-ledger


async def test_v1_keeps_one_call_per_customer_and_meter_and_acks_proven_duplicates(amqp, redis, stripe_double):
    stripe_double.contract = StripeContract(latency=0.05, per_customer_concurrency=True)
    source = amqp.track(amqp_source("usage", prefetch=20))
    pairs = await customers(redis, 2)
    bodies = [usage(workspace, f"v1-{i}-{workspace}") for i in range(12) for workspace, _ in pairs]
    stripe_double.preload(
        [{"event_name": "ai_credits", "identifier": meter_id(b), "payload": {}, "timestamp": 0} for b in bodies[:4]]
    )
    settings = make_settings([source], stripe=stripe_settings(stripe_double, meter_api="v1"))
    async with running(settings) as daemon:
        await publish(amqp, source, bodies)
        await wait_for(lambda: value(daemon, source["name"], "ack") == 24, timeout=30, what="all acked")
        duplicates = daemon.metrics.stripe_duplicates.labels(source["name"])._value.get()
        assert value(daemon, source["name"], "retry") == 0
        assert value(daemon, source["name"], "dead_letter") == 0
    assert duplicates == 4
    assert stripe_double.rate_limited == 0  # never two calls in flight for one customer and meter
    recorded = stripe_double.recorded()
    assert sorted(recorded) == sorted(meter_id(b) for b in bodies)
    assert set(recorded.values()) == {1}


async def test_a_429_is_back_pressure_never_an_attempt_and_never_opens_the_breaker(amqp, redis, stripe_double):
    stripe_double.contract = StripeContract(rate_limit=5)  # a sandbox: v1 meter events count against it
    source = amqp.track(amqp_source("usage", prefetch=20, max_attempts=1, retry_initial="200ms"))
    pairs = await customers(redis, 20)
    bodies = [usage(workspace, f"t-{workspace}") for workspace, _ in pairs]
    # no budget of billingd's own: Stripe's 429s are what slows it down
    stripe = stripe_settings(stripe_double, meter_api="v1", max_requests_per_second=0)
    async with running(make_settings([source], stripe=stripe)) as daemon:
        breaker = daemon.board.get("stripe")
        states: set[BreakerState] = set()

        async def watch() -> None:
            while True:
                states.add(breaker.state)
                await anyio.sleep(0.005)

        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            await publish(amqp, source, bodies)
            await wait_for(lambda: value(daemon, source["name"], "ack") == 20, timeout=40, what="all acked")
            tg.cancel_scope.cancel()
        limited = daemon.metrics.stripe_rate_limited.labels("meter_events")._value.get()
        assert value(daemon, source["name"], "dead_letter") == 0  # max_attempts = 1, yet nothing dead-lettered
    assert stripe_double.rate_limited > 0
    assert limited == stripe_double.rate_limited
    assert states == {BreakerState.CLOSED}
    assert set(stripe_double.recorded().values()) == {1}


async def test_three_replicas_share_one_stripe_budget(amqp, redis, stripe_double):
    stripe_double.contract = StripeContract(latency=0.02, rate_limit=10)  # Stripe allows 10/s
    source = amqp.track(amqp_source("usage", prefetch=10))
    pairs = await customers(redis, 30)
    bodies = [usage(workspace, f"r-{workspace}") for workspace, _ in pairs]
    stripe = stripe_settings(stripe_double, meter_api="v1", max_requests_per_second=10)
    async with (
        running(make_settings([source], stripe=stripe)) as a,
        running(make_settings([source], stripe=stripe)) as b,
        running(make_settings([source], stripe=stripe)) as c,
    ):
        replicas = (a, b, c)
        await publish(amqp, source, bodies)
        await wait_for(
            lambda: sum(value(d, source["name"], "ack") for d in replicas) == 30, timeout=30, what="all acked"
        )
        waited = sum(d.metrics.stripe_throttled.labels("all")._value.get() for d in replicas)
        assert sum(value(d, source["name"], "dead_letter") for d in replicas) == 0
        assert sum(value(d, source["name"], "ack") > 0 for d in replicas) >= 2  # the work was shared
    assert stripe_double.rate_limited == 0
    assert stripe_double.max_per_second(("/v1/billing/meter_events",)) <= 11
    assert waited > 1.0  # 30 requests at 10/s: most of them waited their turn
    assert set(stripe_double.recorded().values()) == {1}


async def test_hostile_meter_fields_dead_letter_alone_and_their_neighbours_are_metered(amqp, redis, stripe_double):
    source = amqp.track(amqp_source("usage", prefetch=20))
    [(workspace, _)] = await customers(redis, 1)
    hostile = {
        "ts-25-digits": b'"timestamp": 9999999999999999999999999',
        "ts-5000-digits": b'"timestamp": ' + b"9" * 5000,
        "value-5000-digits": b'"value": ' + b"9" * 5000,
        "value-tiny": b'"value": 1e-999999999',
        "value-nan": b'"value": "NaN"',
        "value-negative": b'"value": -3',
        "customer-number": b'"stripe_customer_id": 12345',
        "customer-huge": b'"stripe_customer_id": "cus_' + b"x" * 600 + b'"',
    }
    async with running(make_settings([source], stripe=stripe_settings(stripe_double))) as daemon:
        for key, field in hostile.items():
            body = b'{"event_type": "ai_credits", "workspace_id": "' + workspace.encode() + b'", "value": 1, '
            body += b'"idempotency_key": "' + key.encode() + b'", ' + field + b"}"
            await amqp.publish(source["exchange"], "usage", body, message_id=key)
        good = [usage(workspace, f"good-{i}-{workspace}") for i in range(5)]
        await publish(amqp, source, good)
        name = source["name"]
        await wait_for(lambda: value(daemon, name, "dead_letter") == len(hostile), timeout=20, what="each alone")
        await wait_for(lambda: value(daemon, name, "ack") == 5, what="the neighbours metered")
        assert value(daemon, name, "retry") == 0
        assert daemon.metrics.restarts.labels(name)._value.get() == 0
    letters = {m.message_id: m.headers["x-billingd-reason"] for m in await amqp.drain_queue(source["queue"] + ".dlq")}
    assert set(letters) == set(hostile)
    assert all(len(reason) <= 2000 for reason in letters.values())
    assert sorted(stripe_double.recorded()) == sorted(meter_id(b) for b in good)
