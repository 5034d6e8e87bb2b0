"""Supervision, drain, readiness and broker-side misconfiguration, on a real RabbitMQ."""

from __future__ import annotations

import time

import anyio
import pytest
from structlog.testing import capture_logs

from billingd.daemon.app import STOP_GRACE, Daemon
from billingd.daemon.exits import EXIT_SOFTWARE
from tests.flaky import Journal, registry
from tests.support import amqp_source, free_port, http_get, make_settings, running, unique, wait_for

pytestmark = pytest.mark.anyio


async def test_crashing_actor_is_restarted_with_backoff_then_runs(amqp):
    journal = Journal()
    source = amqp.track(amqp_source("crashy", handler_options={"fail_attempts": 0}))
    async with running(make_settings([source]), registry(journal, crash_builds=2)) as daemon:
        await amqp.publish(source["exchange"], "k", b"{}", message_id="after-crashes")
        await wait_for(lambda: "after-crashes" in journal.calls, what="handled after restarts")
        assert daemon.metrics.restarts.labels(source["name"])._value.get() == 2
    assert journal.builds == 3


async def test_too_many_crashes_escalate_drain_the_others_and_exit_70(amqp):
    journal = Journal()
    crashy = amqp.track(amqp_source("crashy"))
    healthy = amqp.track(amqp_source("flaky", handler_options={"fail_attempts": 0}))
    settings = make_settings(
        [crashy, healthy], supervisor={"max_restarts": 2, "max_seconds": 30, "backoff_initial": "10ms"}
    )
    async with running(settings, registry(journal, crash_builds=99), wait_ready=False, exit_code=EXIT_SOFTWARE) as d:
        with anyio.fail_after(10):
            await d.stopped.wait()  # escalation stops the daemon by itself
    assert "crashed 3 times" in d.supervisor.escalated
    assert d.metrics.restarts.labels(crashy["name"])._value.get() == 2  # the third crash escalates
    assert d.statuses[healthy["name"]].reason == "stopped"  # drained, not left running


async def test_drain_lets_in_flight_handlers_finish_and_acks_them(amqp):
    journal = Journal()
    source = amqp.track(amqp_source("flaky", handler_options={"fail_attempts": 0, "sleep": 0.5}, prefetch=4))
    async with running(make_settings([source]), registry(journal)) as daemon:
        for i in range(10):
            await amqp.publish(source["exchange"], "k", b"{}", message_id=f"slow-{i}")
        await wait_for(lambda: len(journal.calls) == 4, what="4 handlers in flight")
        daemon.request_drain("test")
        assert not daemon.readiness()[0]
        assert daemon.metrics.draining._value.get() == 1
    acked = daemon.metrics.processed.labels(source["name"], "ack")._value.get()
    assert acked == len(journal.calls) == 4  # in-flight ones finished and were acked
    assert await amqp.depth(source["queue"]) == 6  # the unstarted ones went back to the queue


async def test_drain_timeout_cancels_handlers_and_requeues_their_messages(amqp):
    journal = Journal()
    source = amqp.track(amqp_source("flaky", handler_options={"fail_attempts": 0, "sleep": 30}, prefetch=3))
    settings = make_settings([source], daemon={"drain_timeout": "300ms"})
    started = anyio.current_time()
    async with running(settings, registry(journal)) as daemon:
        for i in range(3):
            await amqp.publish(source["exchange"], "k", b"{}", message_id=f"stuck-{i}")
        await wait_for(lambda: len(journal.calls) == 3, what="3 handlers stuck")
        daemon.request_drain("test")
    assert anyio.current_time() - started < 10
    assert daemon.metrics.processed.labels(source["name"], "ack")._value.get() == 0
    assert await amqp.depth(source["queue"]) == 3  # released, never acked


async def test_unreachable_broker_is_not_a_crash_and_readyz_names_the_source(amqp):
    port = free_port()  # nothing listens there
    down = amqp_source("sms_dlr", url=f"amqp://guest:guest@127.0.0.1:{port}/")
    up = amqp.track(amqp_source("sms_dlr"))
    settings = make_settings([down, up])
    async with running(settings, wait_ready=False) as daemon:
        await wait_for(lambda: daemon.statuses[up["name"]].up, what="healthy source up")
        await wait_for(lambda: "cannot connect" in daemon.statuses[down["name"]].reason, what="down reason")
        status, body = await http_get(settings.http.port, "/readyz")
        assert status == 503
        assert body["sources"][down["name"]]["up"] is False
        assert "cannot connect to amqp://guest:****@127.0.0.1" in body["sources"][down["name"]]["reason"]
        assert body["sources"][up["name"]] == {"up": True, "node": "127.0.0.1:5672"}
        assert (await http_get(settings.http.port, "/healthz"))[0] == 200
        assert daemon.metrics.source_up.labels(down["name"])._value.get() == 0
        assert daemon.metrics.source_up.labels(up["name"])._value.get() == 1
        assert daemon.metrics.restarts.labels(down["name"])._value.get() == 0


async def test_queue_with_other_arguments_is_reported_once_as_a_config_error(amqp):
    queue = unique("test.precondition")
    source = amqp.track(amqp_source("sms_dlr", queue=queue, queue_arguments={"x-message-ttl": 60000}))
    channel = await amqp.connection.channel()
    await channel.declare_queue(queue, durable=True, arguments={"x-message-ttl": 1000})
    await channel.close()
    settings = make_settings([source], supervisor={"backoff_max": "200ms", "backoff_initial": "10ms"})
    with capture_logs() as logs:
        async with running(settings, wait_ready=False) as daemon:
            status = daemon.statuses[source["name"]]
            await wait_for(lambda: "misconfigured" in status.reason, what="misconfiguration reported")
            await anyio.sleep(1)  # several more checks at backoff_max: still one log line
            reason = status.reason
    assert status.reason == "stopped"  # after the drain
    assert "x-message-ttl" in reason
    assert queue in reason
    assert "delete" in reason
    reports = [e for e in logs if e["event"] == "source misconfigured"]
    assert len(reports) == 1
    assert reports[0]["log_level"] == "error"


@pytest.mark.parametrize("delay", [0.0, 0.005, 0.02])
async def test_stopping_at_once_mid_retries_is_not_a_crash_and_loses_nothing(amqp, delay):
    journal = Journal()
    source = amqp.track(
        amqp_source(
            "flaky", retry_initial="10ms", retry_max="20ms", max_attempts=50, handler_options={"fail_attempts": 40}
        )
    )
    ids = {f"m{i}" for i in range(30)}
    with capture_logs() as logs:
        async with running(make_settings([source]), registry(journal), exit_code=1) as daemon:
            for message_id in sorted(ids):
                await amqp.publish(source["exchange"], "k", b"{}", message_id=message_id)
            await wait_for(lambda: len(journal.bodies) >= 60, timeout=20, what="retries in flight")
            await anyio.sleep(delay)
            daemon.stop_now("second SIGTERM")
    assert not [e for e in logs if "crash" in e["event"]]
    # Each one is back in its queue or its retry copy. A retry copy (TTL 10-20 ms) moves from
    # `.retry` to the queue on its own, possibly between two drains: collect until all are seen.
    seen: set[str] = set()

    async def every_message_seen() -> bool:
        for queue in (source["queue"], source["queue"] + ".retry"):
            seen.update(m.message_id for m in await amqp.drain_queue(queue))
        return seen >= ids

    await wait_for(every_message_seen, timeout=5, what="every message back in its queue or its retry copy")
    assert seen == ids


async def test_a_message_that_crashes_its_actor_is_dead_lettered_after_two_crashes_without_escalation(amqp):
    """DESIGN §8: even a genuine bug triggered by one message must not take the source down."""
    journal = Journal()
    source = amqp.track(amqp_source("flaky", handler_options={"fail_attempts": 0, "bogus": "poison"}, prefetch=5))
    settings = make_settings([source], supervisor={"max_restarts": 3, "backoff_initial": "10ms"})
    async with running(settings, registry(journal)) as daemon:
        await amqp.publish(source["exchange"], "k", b'{"poison": 1}', message_id="the-poison")
        for i in range(10):
            await amqp.publish(source["exchange"], "k", b"{}", message_id=f"fine-{i}")
        dead = daemon.metrics.processed.labels(source["name"], "dead_letter")
        await wait_for(lambda: dead._value.get() == 1, timeout=15, what="poison dead-lettered")
        await wait_for(lambda: all(f"fine-{i}" in journal.calls for i in range(10)), what="the others handled")
        assert daemon.metrics.restarts.labels(source["name"])._value.get() == 2
        assert daemon.supervisor.escalated is None
        assert daemon.health()[0]
    assert len(journal.calls["the-poison"]) == 2  # the third delivery never reached the handler
    [letter] = await amqp.drain_queue(f"{source['queue']}.dlq")
    assert letter.message_id == "the-poison"
    assert "poison message: its actor crashed 2 times" in letter.headers["x-billingd-reason"]


async def test_a_stop_that_cannot_finish_ends_the_process_at_its_deadline(amqp):
    """A handler that ignores cancellation: the orderly path cannot finish, so the watchdog
    thread calls `exit_process` at drain_timeout + STOP_GRACE, and /healthz says so first."""
    journal = Journal()
    options = {"fail_attempts": 0, "sleep": 10, "stuck": "shielded"}
    source = amqp.track(amqp_source("flaky", handler_options=options, prefetch=2))
    settings = make_settings([source], daemon={"drain_timeout": "500ms"})
    exits: list[tuple[int, float]] = []

    def exit_process(code: int) -> None:  # runs on the watchdog thread: no event loop there
        exits.append((code, time.monotonic()))

    daemon = Daemon(settings, handlers=registry(journal), handle_signals=False, exit_process=exit_process)
    async with anyio.create_task_group() as tg:
        tg.start_soon(daemon.run)
        await wait_for(lambda: daemon.readiness()[0], what="ready")
        await amqp.publish(source["exchange"], "k", b"{}", message_id="stuck")
        await wait_for(lambda: "stuck" in journal.calls, what="handler stuck")
        started = time.monotonic()
        daemon.request_drain("test")
        assert daemon.health()[0]  # draining within its deadline is alive
        await wait_for(lambda: bool(exits), timeout=STOP_GRACE + 3, what="watchdog fired")
        alive, body = daemon.health()
    [(code, at)] = exits
    assert code == 1
    assert 0.5 + STOP_GRACE - 0.5 <= at - started <= 0.5 + STOP_GRACE + 1.5
    assert not alive
    assert "stop_overdue_seconds" in body


async def test_escalation_fails_healthz_and_uses_the_drain_deadline(amqp):
    journal = Journal()
    crashy = amqp.track(amqp_source("crashy"))
    settings = make_settings([crashy], supervisor={"max_restarts": 1, "max_seconds": 30, "backoff_initial": "10ms"})
    async with running(settings, registry(journal, crash_builds=99), wait_ready=False, exit_code=EXIT_SOFTWARE) as d:
        await wait_for(lambda: d.supervisor.escalated is not None, what="escalated")
        alive, body = d.health()
        assert not alive
        assert "crashed 2 times" in body["escalated"]
        assert d.draining  # the daemon's drain, with its deadline, not the supervisor's own
        with anyio.fail_after(10):
            await d.stopped.wait()
