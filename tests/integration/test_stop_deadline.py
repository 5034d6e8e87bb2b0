"""The hard stop deadline on a real process (DESIGN §8 "deadlines are hard"): SIGTERM while a
handler ignores cancellation → the process is gone within drain_timeout + STOP_GRACE, and its
unsettled message is back in the queue."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest

from billingd.daemon.app import STOP_GRACE
from tests.support import amqp_source, http_ready, make_settings, settings_tree, to_toml, wait_for

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parents[2]
RUNNER = """
import os, sys
import anyio
sys.path.insert(0, {root!r})
from billingd.config import load_config
from billingd.daemon.app import Daemon
from billingd.daemon.logging import configure_logging
from tests.flaky import Journal, registry

settings = load_config(sys.argv[1])
configure_logging("info", "json")
daemon = Daemon(settings, config_path=sys.argv[1], handlers=registry(Journal()), exit_process=os._exit)
sys.exit(anyio.run(daemon.run, backend="asyncio"))
"""


async def test_sigterm_with_a_handler_that_ignores_cancellation_exits_at_the_deadline(amqp, tmp_path):
    options = {"fail_attempts": 0, "sleep": 120, "stuck": "shielded"}
    source = amqp.track(amqp_source("flaky", handler_options=options, prefetch=1))
    settings = make_settings([source], daemon={"drain_timeout": "1s", "log_level": "info"})
    config = tmp_path / "billingd.toml"
    config.write_text(to_toml(settings_tree(settings)))
    runner = tmp_path / "runner.py"
    runner.write_text(RUNNER.format(root=str(ROOT)))
    process = subprocess.Popen([sys.executable, str(runner), str(config)], stderr=subprocess.PIPE)
    try:
        await wait_for(lambda: http_ready(settings.http.port), timeout=20, what="ready")
        await amqp.publish(source["exchange"], "k", b"{}", message_id="wedged")
        await wait_for(lambda: _taken(amqp, source["queue"]), what="the message is in the stuck handler")
        process.send_signal(signal.SIGTERM)
        started = time.monotonic()
        code = await anyio.to_thread.run_sync(process.wait, 30)
        took = time.monotonic() - started
    finally:
        if process.poll() is None:
            process.kill()
        stderr = process.stderr.read().decode() if process.stderr else ""
    assert code == 1, stderr[-2000:]
    assert took <= 1 + STOP_GRACE + 1, f"exit took {took:.1f}s"
    assert "stop deadline passed" in stderr
    [back] = await amqp.drain_queue(source["queue"])  # unacked: returned by the broker, not lost
    assert back.message_id == "wedged"


async def _taken(amqp, queue: str) -> bool:
    return await amqp.depth(queue) == 0
