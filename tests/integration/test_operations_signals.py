"""systemd notifications and SIGHUP config reload, on the real `billingd` process."""

from __future__ import annotations

import signal
import socket
import threading

import anyio
import pytest

from tests.seed002 import dlr
from tests.support import (
    amqp_source,
    http_get,
    http_ready,
    make_settings,
    scrape,
    settings_tree,
    start_billingd,
    to_toml,
    wait_for,
)

pytestmark = pytest.mark.anyio


class NotifyListener:
    """A `$NOTIFY_SOCKET` datagram listener, as systemd runs for a `Type=notify` service."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.messages: list[str] = []
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.bind(path)
        self._socket.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self._socket.recv(4096)
            except TimeoutError:
                continue
            self.messages.extend(data.decode().split("\n"))

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._socket.close()

    def first(self, prefix: str) -> int:
        return next(i for i, m in enumerate(self.messages) if m.startswith(prefix))

    def count(self, prefix: str) -> int:
        return sum(m.startswith(prefix) for m in self.messages)


async def test_ready_watchdog_and_stopping_are_sent_in_order(amqp, tmp_path):
    source = amqp.track(amqp_source("sms_dlr"))
    listener = NotifyListener(str(tmp_path / "notify.sock"))
    process = start_billingd(tmp_path, make_settings([source]), NOTIFY_SOCKET=listener.path, WATCHDOG_USEC="600000")
    try:
        await wait_for(lambda: "READY=1" in listener.messages, timeout=20, what="READY=1")
        await wait_for(lambda: listener.count("WATCHDOG=1") >= 3, timeout=10, what="watchdog pings")
        process.send_signal(signal.SIGTERM)
        assert await anyio.to_thread.run_sync(process.wait, 20) == 0
        await wait_for(lambda: "STOPPING=1" in listener.messages, timeout=5, what="STOPPING=1")
    finally:
        if process.poll() is None:
            process.kill()
        listener.close()
    ready, stopping = listener.first("READY=1"), listener.first("STOPPING=1")
    assert ready < listener.first("WATCHDOG=1") < stopping
    assert listener.first("EXTEND_TIMEOUT_USEC=") > stopping
    statuses = [m for m in listener.messages if m.startswith("STATUS=")]
    assert statuses[0] == "STATUS=running: 1/1 sources up, 0 messages processed"
    assert any(m.startswith("STATUS=draining") for m in statuses)


async def test_sighup_restarts_only_the_changed_source_and_a_broken_file_changes_nothing(amqp, tmp_path):
    a = amqp.track(amqp_source("sms_dlr", prefetch=10))
    b = amqp.track(amqp_source("sms_dlr", prefetch=10))
    settings = make_settings([a, b], daemon={"log_level": "info"})
    port = settings.http.port
    process = start_billingd(tmp_path, settings)
    config = tmp_path / "billingd.toml"

    def metric(samples, name, source, operation=None):
        labels = {"source": source, **({"operation": operation} if operation else {})}
        if name == "billingd_messages_processed_total":
            labels["outcome"] = "ack"
        return samples.get((name, tuple(sorted(labels.items()))), 0)

    flowing = {"stop": False}

    async def traffic() -> None:
        n = 0
        while not flowing["stop"]:
            for source in (a, b):
                await amqp.publish(source["exchange"], "dlr.x", dlr(f"hup-{n}", "DELIVRD"))
            n += 1
            await anyio.sleep(0.01)

    try:
        await wait_for(lambda: http_ready(port), timeout=20, what="ready")
        async with anyio.create_task_group() as tg:
            tg.start_soon(traffic)
            await wait_for(lambda: _processed_at_least(port, b["name"], 20), timeout=20, what="b flowing")
            changed = settings_tree(settings)
            changed["sources"][0]["prefetch"] = 25
            config.write_text(to_toml(changed))
            before = await scrape(port)
            process.send_signal(signal.SIGHUP)

            async def reloaded() -> bool:
                samples = await scrape(port)
                return samples.get(("billingd_config_reloads_total", (("result", "ok"),)), 0) == 1

            await wait_for(reloaded, timeout=20, what="reload applied")
            await wait_for(lambda: _consumes(port, a["name"], 2), timeout=10, what="a consuming again")
            await wait_for(
                lambda: _processed_more(
                    port, b["name"], metric(before, "billingd_messages_processed_total", b["name"])
                ),
                what="b kept flowing",
            )
            after = await scrape(port)
            assert metric(after, "billingd_broker_requests_total", b["name"], "consume") == 1  # b never re-consumed
            assert metric(after, "billingd_broker_requests_total", a["name"], "cancel") >= 1  # a was drained
            for number, broken in enumerate(["[daemon\nthis is not TOML", ""], start=1):  # "": truncated file
                config.write_text(broken)
                process.send_signal(signal.SIGHUP)

                async def rejected(number: int = number) -> bool:
                    samples = await scrape(port)
                    return samples.get(("billingd_config_reloads_total", (("result", "error"),)), 0) == number

                await wait_for(rejected, timeout=20, what=f"broken reload {number} counted")
            samples = await scrape(port)
            assert metric(samples, "billingd_broker_requests_total", a["name"], "consume") == 2
            assert metric(samples, "billingd_broker_requests_total", b["name"], "consume") == 1
            assert (await http_get(port, "/readyz"))[0] == 200
            flowing["stop"] = True
        process.send_signal(signal.SIGTERM)
        assert await anyio.to_thread.run_sync(process.wait, 20) == 0
    finally:
        if process.poll() is None:
            process.kill()
    stderr = process.stderr.read().decode()
    assert '"config reloaded"' in stderr and f'"restarted": ["{a["name"]}"]' in stderr
    assert '"config reload rejected: still running the previous config"' in stderr


async def _processed_at_least(port, source, n) -> bool:
    key = ("billingd_messages_processed_total", (("outcome", "ack"), ("source", source)))
    return (await scrape(port)).get(key, 0) >= n


async def _processed_more(port, source, n) -> bool:
    return await _processed_at_least(port, source, n + 10)


async def _consumes(port, source, n) -> bool:
    key = ("billingd_broker_requests_total", (("operation", "consume"), ("source", source)))
    return (await scrape(port)).get(key, 0) >= n
