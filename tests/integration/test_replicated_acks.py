"""`[redis] min_replicas_acked`: an acked message's effect is on a replica before the ack, so the
death of a master loses nothing acked. A private master with one replica (WAIT answers, then a
stopped replica makes writes fail transiently), and the test Redis Cluster with a master
SIGKILLed mid-load (no graceful failover)."""

from __future__ import annotations

import contextlib

import anyio
import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from billingd.clients import DownstreamUnavailable, Unguarded
from billingd.clients.ledger import SmsLedger, UsageLedger
from billingd.clients.ledger.batch import CommandBatcher
from tests.seed002 import bill_event, dlr
from tests.support import RedisServer, amqp_source, cdr_ids, free_port, make_settings, running, wait_for

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(120)]


async def test_writes_wait_for_the_replica_and_fail_transiently_without_it(tmp_path):
    master = RedisServer(str(tmp_path / "m"), "--repl-diskless-sync-delay", "0")
    (tmp_path / "m").mkdir()
    (tmp_path / "r").mkdir()
    await master.start()
    replica = RedisServer(str(tmp_path / "r"), "--replicaof", "127.0.0.1", str(master.port), "--appendonly", "no")
    await replica.start()
    client = aioredis.Redis.from_url(master.url)
    reader = aioredis.Redis.from_url(replica.url)
    try:
        await wait_for(lambda: _streaming(client), what="the master streams writes to its replica")
        batcher = CommandBatcher(client, replicas=1, replica_timeout=0.5)
        ledger = SmsLedger(client, Unguarded("redis"), batcher)
        usage = UsageLedger(client, Unguarded("redis"), batcher)
        async with anyio.create_task_group() as tg:  # one batch of 20 effects, then one WAIT
            for i in range(20):
                tg.start_soon(record, ledger, f"w-{i}")
        assert await cdr_ids(reader) == {f"w-{i}" for i in range(20)}  # on the replica when the call returned
        await usage.set_customer("ws_1", "cus_1")  # a plain SET waits for the replica too (issue 24, item 15)
        assert await reader.get("billingd:customer:{ws_1}") == b"cus_1"
        await replica.stop()
        with pytest.raises(DownstreamUnavailable) as refused:
            await record(ledger, "w-late")
        assert "NOREPLICAS" in str(refused.value)
        assert isinstance(refused.value.__cause__, ResponseError)
        with pytest.raises(DownstreamUnavailable, match="NOREPLICAS"):  # before: acked on the master alone
            await usage.set_customer("ws_2", "cus_2")
    finally:
        await client.aclose()
        await reader.aclose()
        await master.stop()


async def record(ledger: SmsLedger, message_id: str) -> None:
    await ledger.record_dlr(
        message_id, "delivered", jasmin_status="DELIVRD", pdu_type="deliver_sm", smpp_msgid="", details=b"{}"
    )


async def _streaming(master: aioredis.Redis) -> bool:
    """Whether a write now reaches the replica (after a full sync, the master streams only once the
    replica's first REPLCONF ACK arrives, up to a second later)."""
    await master.set("warm-up", 1)
    return int(await master.execute_command("WAIT", 1, 100)) >= 1


DLRS, BILLS, ACCOUNTS = 1500, 200, 20


@pytest.mark.parametrize("redis_backend", ["cluster"], indirect=True)
async def test_a_master_killed_mid_load_loses_no_acked_effect(amqp, redis, redis_cluster):
    retries = {"retry_initial": "1s", "retry_max": "10s"}  # the defaults' scale, not the tests' 100 ms
    dlr_source = amqp.track(amqp_source("sms_dlr", prefetch=50, **retries))
    bill_source = amqp.track(amqp_source("sms_billing", prefetch=20, **retries))
    dlrs = [(f"k-{i}", dlr(f"k-{i}", "DELIVRD")) for i in range(DLRS)]
    bills = [(f"kb-{i}", bill_event(f"kb-{i}", f"kacct-{i % ACCOUNTS}", "ESME_RTHROTTLED", 0.01)) for i in range(BILLS)]
    settings = make_settings(
        [dlr_source, bill_source],
        redis={"min_replicas_acked": 1, "wait_timeout": "500ms", "timeout": "1s"},
        breakers={"default": {"failure_threshold": 3, "reset_timeout": "200ms", "reset_timeout_max": "1s"}},
    )
    killed = None
    try:
        async with running(settings) as daemon:
            processed = daemon.metrics.processed
            acked = processed.labels(dlr_source["name"], "ack")
            async with anyio.create_task_group() as tg:
                tg.start_soon(amqp.publish_many, dlr_source["exchange"], "dlr.x", dlrs)
                tg.start_soon(amqp.publish_many, bill_source["exchange"], "bill_request.x", bills)
                await wait_for(lambda: acked._value.get() >= DLRS * 0.3, timeout=60, what="30 % done")
                killed = redis_cluster.masters()[0]
                redis_cluster.kill(killed)  # SIGKILL: whatever was not replicated is gone with it
                await anyio.to_thread.run_sync(redis_cluster.wait_promoted, killed)
                # the promoted replica has no replica of its own: nothing written there can be
                # acked (retried, uncounted) until the killed node is back, as its replica
                await anyio.sleep(2)
                await anyio.to_thread.run_sync(redis_cluster.restart, killed)
            await wait_for(lambda: acked._value.get() >= DLRS, timeout=90, what="every DLR handled")
            bills_acked = processed.labels(bill_source["name"], "ack")
            await wait_for(lambda: bills_acked._value.get() >= BILLS, timeout=60, what="every bill handled")
            dead = sum(processed.labels(s["name"], "dead_letter")._value.get() for s in (dlr_source, bill_source))
        assert dead == 0
        assert await cdr_ids(redis) == {message_id for message_id, _ in dlrs}  # no acked effect lost
        ledger = SmsLedger(redis, Unguarded("redis"))
        for account in range(ACCOUNTS):  # each refund once
            assert await ledger.refunds_micros(f"kacct-{account}") == (BILLS // ACCOUNTS) * 10_000
    finally:
        if killed is not None and redis_cluster.cli(killed, "ping") != "PONG":
            await anyio.to_thread.run_sync(redis_cluster.restart, killed)


async def test_with_sentinel_a_master_killed_mid_load_loses_no_acked_effect(amqp, tmp_path):
    """Redis Sentinel and one replica, `min_replicas_acked = 1`: SIGKILL the master mid-load; the
    sentinel promotes the replica; writes there wait (uncounted retries) until the old master is
    back as its replica; every acked DLR's CDR is on the new master."""
    import os
    import signal

    from redis.asyncio.sentinel import Sentinel

    for name in ("m", "r", "s"):
        (tmp_path / name).mkdir()
    master = RedisServer(str(tmp_path / "m"), "--repl-diskless-sync-delay", "0")
    await master.start()
    replica = RedisServer(
        str(tmp_path / "r"), "--replicaof", "127.0.0.1", str(master.port), "--repl-diskless-sync-delay", "0"
    )
    await replica.start()
    sentinel_port = free_port()
    config = tmp_path / "s" / "sentinel.conf"
    config.write_text(
        f"port {sentinel_port}\nbind 127.0.0.1\ndir {tmp_path / 's'}\n"
        f"sentinel monitor billing 127.0.0.1 {master.port} 1\n"
        "sentinel down-after-milliseconds billing 1000\nsentinel failover-timeout billing 5000\n"
    )
    sentinel_process = await anyio.open_process(["redis-server", str(config), "--sentinel"])
    source = amqp.track(amqp_source("sms_dlr", prefetch=50, retry_initial="1s", retry_max="10s"))
    dlrs = [(f"s-{i}", dlr(f"s-{i}", "DELIVRD")) for i in range(1000)]
    settings = make_settings(
        [source],
        redis={
            "url": "redis://127.0.0.1:1/0",  # only the database: the sentinel names the master
            "sentinels": [f"127.0.0.1:{sentinel_port}"],
            "sentinel_master": "billing",
            "min_replicas_acked": 1,
            "wait_timeout": "500ms",
            "timeout": "1s",
        },
    )
    try:
        await wait_for(lambda: _streaming(aioredis.Redis.from_url(master.url)), what="replica streaming")
        async with running(settings) as daemon:
            acked = daemon.metrics.processed.labels(source["name"], "ack")
            async with anyio.create_task_group() as tg:
                tg.start_soon(amqp.publish_many, source["exchange"], "dlr.x", dlrs)
                await wait_for(lambda: acked._value.get() >= 300, timeout=60, what="30 % done")
                os.kill(int((tmp_path / "m" / "redis.pid").read_text()), signal.SIGKILL)
                sentinel = Sentinel([("127.0.0.1", sentinel_port)])
                await wait_for(
                    lambda: _promoted(sentinel, replica.port), timeout=30, interval=0.2, what="replica promoted"
                )
                await anyio.sleep(1)
                (tmp_path / "m" / "redis.pid").unlink(missing_ok=True)
                await master.start()  # back: the sentinel makes it the new master's replica
            await wait_for(lambda: acked._value.get() >= len(dlrs), timeout=90, what="every DLR handled")
            dead = daemon.metrics.processed.labels(source["name"], "dead_letter")._value.get()
        assert dead == 0
        promoted = aioredis.Redis.from_url(replica.url)
        assert await cdr_ids(promoted) == {message_id for message_id, _ in dlrs}
        await promoted.aclose()
    finally:
        sentinel_process.kill()
        for server in (master, replica):
            with contextlib.suppress(Exception):
                await server.stop()


async def _promoted(sentinel, port: int) -> bool:
    try:
        _, found = await sentinel.discover_master("billing")
    except Exception:  # noqa: BLE001 — not yet decided
        return False
    return found == port


async def test_check_warns_when_a_restart_of_redis_would_lose_the_ledger(tmp_path):
    from billingd.daemon.check import redis_warnings

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    durable = RedisServer(str(tmp_path / "a"))  # appendonly yes
    volatile = RedisServer(str(tmp_path / "b"), "--appendonly", "no")
    await durable.start()
    await volatile.start()
    try:
        source = amqp_source("sms_dlr")
        assert await redis_warnings(make_settings([source], redis={"url": durable.url})) == []
        [warning] = await redis_warnings(make_settings([source], redis={"url": volatile.url}))
        assert "a restart of Redis loses the ledger" in warning
        [short] = await redis_warnings(make_settings([source], redis={"url": durable.url, "min_replicas_acked": 1}))
        assert "no message can be acked" in short
    finally:
        await durable.stop()
        await volatile.stop()
