"""The death of one RabbitMQ node (issue 17), on a live 3-node cluster started by the test: a
quorum `sms_billing` source whose `url` lists the three nodes; the node that leads the queue and
holds billingd's connection is SIGKILLed mid-load. Nothing acked is lost, nothing applied twice,
no valid message dead-lettered; consuming resumes on another node; `.retry` and `.dlq` are quorum.

`BILLINGD_CLUSTER_MESSAGES` sets the load (default 4,000; the issue's run used 20,000)."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator

import aio_pika
import anyio
import msgspec
import pytest

from billingd.clients import Unguarded
from billingd.clients.ledger import SmsLedger
from tests.rabbit_cluster import BIN, RabbitCluster
from tests.seed002 import bill_event
from tests.support import amqp_source, make_settings, running, unique, wait_for

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(300)]

MESSAGES = int(os.environ.get("BILLINGD_CLUSTER_MESSAGES", "4000"))
ACCOUNTS = 20
AMOUNT_MICROS = 10_000  # 0.01


@pytest.fixture(scope="module")
def rabbit_cluster() -> Iterator[RabbitCluster]:
    if not (BIN / "rabbitmq-server").exists() or shutil.which("epmd") is None:
        pytest.skip("Debian's rabbitmq-server is not installed")
    cluster = RabbitCluster()
    try:
        cluster.start_cluster()
        yield cluster
    finally:
        cluster.stop()


def bills() -> tuple[list[tuple[str, dict]], dict[str, int]]:
    """`MESSAGES` bills (10 % failed submissions: refunds; 1 % published twice) and the refunds
    each account must end with (micro-units)."""
    run = unique("run")
    out: list[tuple[str, dict]] = []
    refunds: dict[str, int] = {}
    for i in range(MESSAGES):
        account = f"{run}-acct-{i % ACCOUNTS}"
        failed = i % 10 == 3
        body = bill_event(f"{run}-b-{i}", account, "ESME_RTHROTTLED" if failed else "ESME_ROK", 0.01)
        out.append((f"{run}-b-{i}", body))
        if i % 100 == 7:
            out.append((f"{run}-b-{i}", body))  # a duplicate delivery of the same bill
        if failed:
            refunds[account] = refunds.get(account, 0) + AMOUNT_MICROS
    return out, refunds


async def publish(url: str, exchange: str, messages: list[tuple[str, dict]]) -> None:
    connection = await aio_pika.connect(url)
    channel = await connection.channel(publisher_confirms=True)
    target = await channel.get_exchange(exchange)
    for start in range(0, len(messages), 500):
        chunk = messages[start : start + 500]
        async with anyio.create_task_group() as tg:
            for message_id, body in chunk:
                message = aio_pika.Message(msgspec.json.encode(body), message_id=message_id, delivery_mode=2)
                tg.start_soon(target.publish, message, "bill_request.x")
    await connection.close()


async def depth(url: str, queue: str) -> int:
    connection = await aio_pika.connect(url)
    channel = await connection.channel()
    declared = await channel.declare_queue(queue, passive=True)
    await connection.close()
    return declared.declaration_result.message_count or 0


async def test_the_death_of_the_node_in_use_loses_doubles_and_dead_letters_nothing(rabbit_cluster, redis):
    c = rabbit_cluster
    source = amqp_source(
        "sms_billing", url=c.urls, queue_type="quorum", prefetch=50, retry_initial="1s", retry_max="10s"
    )
    messages, refunds = bills()
    settings = make_settings([source])
    async with running(settings) as daemon:
        name, queue = source["name"], source["queue"]
        status = daemon.statuses[name]
        assert status.node == f"127.0.0.1:{c.ports['a']}"
        assert c.leader(queue, "b") == "a"  # billingd declared it through a: a leads it
        processed = daemon.metrics.processed
        acked = processed.labels(name, "ack")
        async with anyio.create_task_group() as tg:
            tg.start_soon(publish, c.url("b"), source["exchange"], messages)
            await wait_for(lambda: acked._value.get() >= MESSAGES * 0.3, timeout=120, what="30 % handled")
            before = acked._value.get()
            killed_at = time.monotonic()
            c.kill("a")  # the leader, and billingd's node: SIGKILL, no goodbye
            await wait_for(lambda: acked._value.get() > before + 20, timeout=60, what="consuming again")
            resumed_after = time.monotonic() - killed_at
        await wait_for(lambda: acked._value.get() >= len(messages), timeout=180, what="every bill handled")
        dead = processed.labels(name, "dead_letter")._value.get()
        assert status.node != f"127.0.0.1:{c.ports['a']}"
    print(f"resumed {resumed_after:.1f}s after the kill on {status.node}; {MESSAGES} bills")
    assert resumed_after < 15
    assert dead == 0
    assert await depth(c.url("b"), f"{queue}.dlq") == 0
    ledger = SmsLedger(redis, Unguarded("redis"))
    for account, expected in refunds.items():  # every refund applied, none twice
        assert await ledger.refunds_micros(account) == expected
    unique_bills = {bid: body["user"]["uid"] for bid, body in messages}
    states = [(await ledger.charge(uid, bid)).get("state") for bid, uid in unique_bills.items()]
    assert len(states) == MESSAGES and None not in states  # every bill recorded: none lost
    queues = c.ctl("b", "list_queues", "-q", "--no-table-headers", "name", "type")
    types = dict(line.split("\t") for line in queues.splitlines() if line.startswith(queue))
    assert {k: v.strip() for k, v in types.items()} == {
        queue: "quorum",
        f"{queue}.retry": "quorum",
        f"{queue}.dlq": "quorum",
    }
    c.start("a")  # back, for the next test


async def test_a_memory_alarm_holds_retries_not_acks_and_a_drain_during_it_ends_in_bound(rabbit_cluster):
    from tests.flaky import Journal, registry
    from tests.support import http_get

    c = rabbit_cluster
    c.ctl("a", "await_startup")
    journal = Journal()
    source = amqp_source("flaky", url=c.urls, queue_type="quorum", handler_options={"fail_attempts": 1})
    settings = make_settings([source], daemon={"drain_timeout": "3s"})
    async with running(settings, registry(journal)):  # declares the queues
        pass
    ids = [unique("alarm") for _ in range(40)]
    await publish(c.url("b"), source["exchange"], [(i, {"n": 1}) for i in ids])
    c.ctl("a", "set_vm_memory_high_watermark", "0.000001")  # an alarm: the whole cluster blocks publishers
    try:
        async with running(settings, registry(journal)) as daemon:
            name = source["name"]
            await wait_for(lambda: daemon.statuses[name].blocked != "", timeout=20, what="the block seen")
            blocked = daemon.metrics.broker_blocked.labels(name)._value.get()
            _, body = await http_get(settings.http.port, "/readyz")
            await anyio.sleep(5)  # retries wait for the alarm (their messages requeued): none acked yet
            acked_during = daemon.metrics.processed.labels(name, "ack")._value.get()
            c.ctl("a", "set_vm_memory_high_watermark", "0.4")
            acked = daemon.metrics.processed.labels(name, "ack")
            await wait_for(lambda: acked._value.get() == len(ids), timeout=60, what="all acked after the alarm")
        assert blocked == 1
        assert "connection.blocked" in body["sources"][name]["blocked"]
        assert acked_during == 0  # every message needs its retry copy published first
        assert all({a for a, _ in journal.calls[i]} == {1, 2} for i in ids)  # attempt 1 failed, attempt 2 acked
        # a drain while blocked: ends within drain_timeout + the grace, releasing what it holds
        more = [unique("alarm2") for _ in range(10)]
        await publish(c.url("b"), source["exchange"], [(i, {"n": 1}) for i in more])
        c.ctl("a", "set_vm_memory_high_watermark", "0.000001")
        async with running(settings, registry(journal)) as daemon:
            await wait_for(lambda: daemon.statuses[source["name"]].blocked != "", timeout=20, what="blocked again")
            await wait_for(lambda: all(journal.calls.get(i) for i in more), timeout=20, what="handled once")
            started = time.monotonic()
        took = time.monotonic() - started
        assert took < 3 + 5, f"the drain took {took:.1f}s"
    finally:
        c.ctl("a", "set_vm_memory_high_watermark", "0.4")
    assert await depth(c.url("b"), source["queue"]) == len(more)  # released, not acked and not lost


async def test_on_the_cluster_a_message_past_the_delivery_limit_lands_in_dlq_with_its_reason(rabbit_cluster):
    from billingd.sources import queue_tools

    c = rabbit_cluster
    c.ctl("a", "await_startup")
    source = amqp_source("sms_dlr", url=c.urls, queue_type="quorum", queue_arguments={"x-delivery-limit": 1})
    settings = make_settings([source])
    async with running(settings):  # declares the three quorum queues
        pass
    message_id = unique("limit")
    await publish(c.url("b"), source["exchange"], [(message_id, {"message_id": message_id})])
    connection = await aio_pika.connect(c.url("c"))  # a consumer on another node dies holding it, twice
    channel = await connection.channel()
    queue = await channel.declare_queue(source["queue"], passive=True)
    for _ in range(2):
        message = await queue.get(no_ack=False, fail=False)
        assert message is not None
        await message.nack(requeue=True)
    await connection.close()
    await wait_for(lambda: _has(c.url("b"), f"{source['queue']}.dlq"), what="moved into .dlq")
    async with queue_tools(settings.sources[0]) as tools:
        [letter] = await tools.sample(5)
    assert letter.message_id == message_id
    assert "delivery_limit" in letter.reason
    assert await depth(c.url("b"), source["queue"]) == 0


async def _has(url: str, queue: str) -> bool:
    return await depth(url, queue) == 1
