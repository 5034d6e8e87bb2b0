"""TLS on every connection (issue 26), against real TLS listeners the tests start on loopback with
a CA and certificates they make: a RabbitMQ node whose TLS listener requires a client certificate,
a TLS-only `redis-server` with an ACL user, a TLS Redis Cluster whose certificate names only a
host (its nodes are reached by address), and a Sentinel over TLS. A wrong CA keeps the source
down with the reason in `/readyz` and consumes nothing, until the configuration is fixed and
billingd reloaded (SIGHUP)."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aio_pika
import anyio
import pytest
import redis.asyncio as aioredis

from billingd.clients import Unguarded
from billingd.clients.ledger import UsageLedger
from tests.rabbit_cluster import RabbitCluster
from tests.support import (
    amqp_source,
    http_get,
    make_settings,
    running,
    settings_tree,
    start_billingd,
    to_toml,
    unique,
    wait_for,
)
from tests.tls import TlsFiles, TlsRedis, TlsRedisCluster, TlsSentinel, free_ports, started

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(180)]

PASSWORD = "tls-test-password-0a9f"
MICROS = 1_000_000


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return TlsFiles(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def tls_rabbit(tls_files: TlsFiles) -> Iterator[tuple[RabbitCluster, int]]:
    """A RabbitMQ node with a plain listener and a TLS listener that requires a client certificate."""
    [port] = free_ports(1, 25671)
    conf = (
        f"listeners.ssl.default = {port}\nssl_options.cacertfile = {tls_files.ca}\n"
        f"ssl_options.certfile = {tls_files.server_cert}\nssl_options.keyfile = {tls_files.server_key}\n"
        "ssl_options.verify = verify_peer\nssl_options.fail_if_no_peer_cert = true\n"
    )
    node = RabbitCluster(("tls",), conf=conf)
    node.start("tls")
    yield node, port
    node.stop()


def tls_source(port: int, tls: dict[str, Any] | str, host: str = "localhost") -> dict[str, Any]:
    """A `usage` source on the TLS node's `amqps://` listener."""
    return {**amqp_source("usage"), "url": f"amqps://guest:guest@{host}:{port}/", "tls": tls}


def client_tls(files: TlsFiles, **overrides: Any) -> dict[str, Any]:
    return {"ca_file": files.ca, "cert_file": files.client_cert, "key_file": files.client_key, **overrides}


async def publish(url: str, source: dict[str, Any], bodies: list[dict[str, Any]]) -> None:
    """Publish to the source's exchange through the node's plain listener."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.get_exchange(source["exchange"])
        for body in bodies:
            await exchange.publish(aio_pika.Message(json.dumps(body).encode(), content_type="application/json"), "u")


def usage(workspace: str, n: int) -> dict[str, Any]:
    return {"event_type": "ai_credits", "workspace_id": workspace, "value": 2, "idempotency_key": f"tls-{n}"}


async def test_amqps_verifies_the_broker_and_a_client_certificate_is_presented(tls_rabbit, tls_files, redis):
    node, port = tls_rabbit
    workspace = unique("ws-tls")
    shared = "rabbit"  # the same TLS configuration through a shared [tls.<name>] table
    with_cert, without_cert = tls_source(port, shared), tls_source(port, {"ca_file": tls_files.ca})
    settings = make_settings([with_cert, without_cert], tls={shared: client_tls(tls_files)})
    async with running(settings, wait_ready=False) as daemon:
        await wait_for(lambda: daemon.statuses[with_cert["name"]].up, timeout=30, what="the source with a certificate")
        refused = daemon.statuses[without_cert["name"]]
        await wait_for(lambda: bool(refused.attempted.is_set() and not refused.up and refused.reason), timeout=30,
                       what="the source without one refused")  # fmt: skip
        await publish(node.url("tls"), with_cert, [usage(workspace, n) for n in range(5)])
        ledger = UsageLedger(redis, Unguarded("redis"))
        await wait_for(lambda: _counter(ledger, workspace, 10 * MICROS), timeout=30, what="5 events applied")
        ready, body = daemon.readiness()
        reason = body["sources"][without_cert["name"]]["reason"]  # type: ignore[index]
    assert not ready and "certificate" in reason.lower(), reason
    assert "guest:guest" not in reason


async def test_a_wrong_ca_keeps_the_source_down_until_the_config_is_fixed_and_reloaded(tls_rabbit, tls_files, redis,
                                                                                         tmp_path):  # fmt: skip
    node, port = tls_rabbit
    workspace = unique("ws-ca")
    source = tls_source(port, client_tls(tls_files, ca_file=tls_files.wrong_ca))
    wrong = make_settings([source], daemon={"log_level": "info"})
    process = start_billingd(tmp_path, wrong)
    try:
        _, body = await _readyz(wrong.http.port, lambda s, b: "certificate" in b["sources"][source["name"]]["reason"])
        reason = body["sources"][source["name"]]["reason"]
        assert "certificate" in reason and "ca_file" in reason, reason
        fixed = make_settings(
            [{**source, "tls": client_tls(tls_files)}], http={"listen": wrong.http.listen}, daemon={"log_level": "info"}
        )
        (tmp_path / "billingd.toml").write_text(to_toml(settings_tree(fixed)))
        process.send_signal(signal.SIGHUP)
        await _readyz(wrong.http.port, lambda s, b: s == 200)
        await publish(node.url("tls"), source, [usage(workspace, 0)])
        ledger = UsageLedger(redis, Unguarded("redis"))
        await wait_for(lambda: _counter(ledger, workspace, 2 * MICROS), timeout=30, what="applied after the fix")
    finally:
        process.terminate()
        await anyio.to_thread.run_sync(process.wait, 30)
    stderr = process.stderr.read().decode()
    assert "the broker's certificate was not accepted" in stderr and '"restarted": [' in stderr, stderr[-3000:]


async def test_redis_over_tls_with_an_acl_user_whose_password_is_a_file(tls_files, amqp, tmp_path):
    """A TLS-only Redis (no plain port); the ACL user's password from `${file:…}`; a wrong CA pauses
    intake with the reason, and a fixed CA file is used at the next connection."""
    server = TlsRedis(tls_files, PASSWORD)
    (tmp_path / "redis-password").write_text(PASSWORD + "\n")
    ca_in_use = tmp_path / "redis-ca.pem"
    shutil.copy(tls_files.wrong_ca, ca_in_use)
    source = amqp.track(amqp_source("usage"))
    password_file = tmp_path / "redis-password"
    redis_section = {"url": f"rediss://localhost:{server.tls_port}/0", "cluster": False, "username": "billingd",
                     "password": f"${{file:{password_file}}}", "tls": {"ca_file": str(ca_in_use)}}  # fmt: skip
    settings = make_settings([source], redis=redis_section, daemon={"log_level": "info"})
    workspace = unique("ws-rediss")
    with started(server):
        process = start_billingd(tmp_path, settings)
        try:
            await _readyz(settings.http.port, lambda s, b: s == 200)
            await amqp.publish(source["exchange"], "u", usage(workspace, 0))
            await _readyz(settings.http.port, lambda s, b: "redis" in b["sources"][source["name"]].get("paused_by", []))
            shutil.copy(tls_files.ca, ca_in_use)  # the CA fixed in place (a renewed secret mount)
            process.send_signal(signal.SIGHUP)
            client = aioredis.Redis(host="localhost", port=server.tls_port, ssl=True, ssl_ca_certs=tls_files.ca,
                                    username="billingd", password=PASSWORD)  # fmt: skip
            async with client:
                await wait_for(lambda: _counter(UsageLedger(client, Unguarded("redis")), workspace, 2 * MICROS),
                               timeout=60, what="applied over TLS once the CA is fixed")  # fmt: skip
        finally:
            process.terminate()
            await anyio.to_thread.run_sync(process.wait, 30)
    stderr = process.stderr.read().decode()
    assert "tls.ca_file" in stderr  # the breaker's log says what to fix
    assert PASSWORD not in stderr


async def test_a_tls_redis_cluster_verifies_every_node_against_server_name(tmp_path, amqp):
    """The certificate names only `redis.test`; the nodes announce 127.0.0.1: every node —
    discovered through CLUSTER SLOTS, redirected to — is verified against `server_name`."""
    files = TlsFiles(tmp_path / "tls", names=("redis.test",))
    cluster = TlsRedisCluster(files, PASSWORD)
    source = amqp.track(amqp_source("usage", prefetch=20))
    redis_section = {"url": f"rediss://127.0.0.1:{cluster.ports[0]}", "cluster": True, "password": PASSWORD,
                     "tls": {"ca_file": files.ca, "server_name": "redis.test"}}  # fmt: skip
    workspaces = [unique("ws-cl") for _ in range(12)]  # spread over the cluster's slots
    with started(cluster):
        async with running(make_settings([source], redis=redis_section)):
            for n, workspace in enumerate(workspaces):
                await amqp.publish(source["exchange"], "u", usage(workspace, n))
            client = aioredis.RedisCluster(host="127.0.0.1", port=cluster.ports[0], ssl=True, ssl_ca_certs=files.ca,
                                           ssl_check_hostname=False, password=PASSWORD)  # fmt: skip
            async with client:
                ledger = UsageLedger(client, Unguarded("redis"))
                for workspace in workspaces:
                    await wait_for(lambda w=workspace: _counter(ledger, w, 2 * MICROS), timeout=30, what="applied")
                keys_per_node = [int(cluster.cli(p, "dbsize") or 0) for p in cluster.ports]
    assert all(count > 0 for count in keys_per_node), keys_per_node  # every node was written to


async def test_sentinel_over_tls_reaches_the_master_it_names(tls_files, amqp):
    sentinel = TlsSentinel(tls_files, PASSWORD)
    source = amqp.track(amqp_source("usage"))
    workspace = unique("ws-sent")
    with started(sentinel):
        redis_section = {"url": "rediss://localhost:1/0", "cluster": False, "password": PASSWORD,
                         "sentinels": [f"localhost:{sentinel.sentinel_port}"], "sentinel_master": "billing",
                         "tls": {"ca_file": tls_files.ca}}  # fmt: skip
        async with running(make_settings([source], redis=redis_section)):
            await amqp.publish(source["exchange"], "u", usage(workspace, 0))
            client = aioredis.Redis(host="localhost", port=sentinel.master_port, ssl=True, ssl_ca_certs=tls_files.ca,
                                    password=PASSWORD)  # fmt: skip
            async with client:
                await wait_for(lambda: _counter(UsageLedger(client, Unguarded("redis")), workspace, 2 * MICROS),
                               timeout=30, what="applied on the master through the sentinel")  # fmt: skip


async def test_check_says_how_each_connection_is_secured(tls_rabbit, tls_files, tmp_path):
    """`billingd check` (online): `tls (verified: CN=…, SAN=…)` per TLS connection, `plain` for the
    others (a warning when the host is not this machine), and a refused certificate fails it."""
    _, port = tls_rabbit
    server = TlsRedis(tls_files, PASSWORD)
    secure = tls_source(port, client_tls(tls_files))
    remote = {**amqp_source("usage"), "url": "amqp://guest:guest@192.0.2.10:5672/"}  # TEST-NET-1: never reached
    with started(server):
        redis_section = {"url": f"rediss://localhost:{server.tls_port}/0", "cluster": False, "username": "billingd",
                         "password": "${REDIS_PASSWORD}", "tls": {"ca_file": tls_files.ca}}  # fmt: skip
        good = await _check(tmp_path, make_settings([secure, remote], redis=redis_section))
        wrong_ca = tls_source(port, client_tls(tls_files, ca_file=tls_files.wrong_ca))
        bad = await _check(tmp_path, make_settings([wrong_ca], redis=redis_section))
    assert good.returncode == 0, good.stderr
    assert f"redis localhost:{server.tls_port}: tls (verified: CN=localhost, SAN=localhost,127.0.0.1)" in good.stdout
    assert f"{secure['name']} (amqp) localhost:{port}: tls (verified: CN=localhost" in good.stdout
    assert f"{remote['name']} (amqp) 192.0.2.10:5672: plain" in good.stdout
    assert "plain text to another host" in good.stdout
    assert bad.returncode == 78 and "certificate was not accepted" in bad.stderr, bad.stderr
    assert PASSWORD not in good.stdout + good.stderr + bad.stdout + bad.stderr


async def _check(tmp_path: Path, settings: Any) -> subprocess.CompletedProcess[str]:
    config = tmp_path / f"check-{unique('c')}.toml"
    config.write_text(to_toml(settings_tree(settings)))
    env = {"REDIS_PASSWORD": PASSWORD, "PATH": "/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE": "1"}  # no .pyc in the tree
    command = [sys.executable, "-m", "billingd", "check", "--config", str(config)]
    return await anyio.to_thread.run_sync(
        lambda: subprocess.run(command, capture_output=True, text=True, timeout=60, env=env)
    )


async def _readyz(port: int, predicate: Any, timeout: float = 45) -> tuple[int, Any]:
    seen: list[tuple[int, Any]] = []

    async def probe() -> bool:
        try:
            status, body = await http_get(port, "/readyz")
        except OSError:
            return False
        seen[:] = [(status, body)]
        try:
            return bool(predicate(status, body))
        except (KeyError, TypeError):
            return False

    await wait_for(probe, timeout=timeout, what=f"/readyz (last: {seen})")
    return seen[0]


async def _counter(ledger: UsageLedger, workspace: str, micros: int) -> bool:
    return (await ledger.counter(workspace, "ai_credits"))[0] == micros
