"""One Ctrl-C under `uv run` drains (issue #13): the terminal's SIGINT reaches the whole process
group and `uv run` forwards it to billingd once more; that duplicate must not stop it at once."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import anyio
import pytest

from billingd.daemon.app import DUPLICATE_SIGNAL_WINDOW
from billingd.daemon.exits import EXIT_FORCED
from tests.support import amqp_source, http_ready, make_settings, scrape, settings_tree, to_toml, unique, wait_for

pytestmark = pytest.mark.anyio

IN_FLIGHT = 4
MESSAGES = 12


async def test_one_sigint_to_the_uv_run_process_group_drains_and_exits_0(amqp, stripe_double, tmp_path):
    uv = shutil.which("uv")
    assert uv is not None, "the README's commands run billingd through uv"
    source, config, port = _usage_source(amqp, stripe_double, tmp_path)
    stripe_double.set_mode("hang")  # Stripe answers slowly: the drain outlasts uv's forwarded SIGINT
    process, lines, reader = _start([uv, "run", "--no-sync", "billingd", "run", "--config", str(config)])
    try:
        await _ready_with_messages_in_flight(process, lines, port, amqp, source, stripe_double)
        os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in the terminal does
        await wait_for(lambda: _logged(lines, "drain started"), timeout=10, what="drain started")
        with anyio.move_on_after(3):  # uv forwards its copy ~200 ms later; older uv versions do not
            await wait_for(lambda: _logged(lines, "duplicate signal ignored"), timeout=3, what="duplicate")
        stripe_double.set_mode("ok")  # the in-flight meter events complete: the drain can end
        code = await anyio.to_thread.run_sync(process.wait, 30)
        reader.join(5)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    events = [line.get("event") for line in lines]
    assert code == 0, events
    assert "stopping at once" not in events
    assert events.count("drain started") == 1
    [started] = [line for line in lines if line.get("event") == "billingd started"]
    assert started["loop"] == "uvloop"  # [daemon] uvloop defaults to true; Linux has it
    [stopped] = [line for line in lines if line.get("event") == "billingd stopped"]
    assert stopped["exit_code"] == 0
    # the in-flight messages were applied (their meter events answered), the others wait in the queue
    applied = {r.form["identifier"] for r in stripe_double.requests if r.path.endswith("meter_events")}
    assert len(applied) >= IN_FLIGHT
    assert len(applied) + await amqp.depth(source["queue"]) == MESSAGES


async def test_a_deliberate_second_sigint_after_the_window_stops_at_once_and_loses_nothing(
    amqp, stripe_double, tmp_path
):
    source, config, port = _usage_source(amqp, stripe_double, tmp_path)
    stripe_double.set_mode("hang")  # the drain cannot finish: only a second Ctrl-C ends it
    process, lines, reader = _start([sys.executable, "-m", "billingd", "run", "--config", str(config)])
    try:
        await _ready_with_messages_in_flight(process, lines, port, amqp, source, stripe_double)
        process.send_signal(signal.SIGINT)
        await wait_for(lambda: _logged(lines, "drain started"), timeout=10, what="drain started")
        process.send_signal(signal.SIGINT)  # within the window: the same Ctrl-C delivered twice
        await wait_for(lambda: _logged(lines, "duplicate signal ignored"), timeout=10, what="duplicate ignored")
        await anyio.sleep(DUPLICATE_SIGNAL_WINDOW + 0.2)  # a person pressing Ctrl-C again, later
        process.send_signal(signal.SIGINT)
        code = await anyio.to_thread.run_sync(process.wait, 30)
        reader.join(5)
    finally:
        if process.poll() is None:
            process.kill()
        stripe_double.set_mode("ok")
    events = [line.get("event") for line in lines]
    assert code == EXIT_FORCED, events
    assert events.count("stopping at once") == 1
    # nothing was applied and nothing acked: every message is back in the queue
    assert await amqp.depth(source["queue"]) == MESSAGES


def _usage_source(amqp, stripe_double, tmp_path) -> tuple[dict, Path, int]:
    """A `usage` AMQP source reporting to the Stripe double; its config file and HTTP port."""
    source = amqp.track(amqp_source("usage", prefetch=IN_FLIGHT, concurrency=IN_FLIGHT))
    settings = make_settings(
        [source],
        daemon={"drain_timeout": "20s", "log_level": "info"},
        stripe={
            "api_key": "${STRIPE_SECRET_KEY}",
            "api_base": stripe_double.url,
            "meters": {"ai_credits": "ai_credits"},
            "meter_api": "v1",  # one hanging call per message: IN_FLIGHT requests show they are in flight
            "meter_delivery": "inline",
        },
    )
    config = tmp_path / "billingd.toml"
    config.write_text(to_toml(settings_tree(settings)))
    return source, config, settings.http.port


def _start(command: list[str]) -> tuple[subprocess.Popen, list[dict], threading.Thread]:
    """`command` in its own process group (as a terminal's foreground job), stderr read as JSON lines."""
    process = subprocess.Popen(
        command,
        stderr=subprocess.PIPE,
        start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "STRIPE_SECRET_KEY": "sk_test_billingd"},
    )
    lines: list[dict] = []
    reader = threading.Thread(target=_read_json_lines, args=(process, lines), daemon=True)
    reader.start()
    return process, lines, reader


async def _ready_with_messages_in_flight(process, lines, port, amqp, source, stripe_double) -> None:
    """Wait for `/readyz`, publish `MESSAGES` metered usage events, wait until `IN_FLIGHT` of them
    are waiting on the Stripe double."""
    with anyio.fail_after(30):
        while not await http_ready(port):
            assert process.poll() is None, f"billingd exited: {lines}"
            await anyio.sleep(0.1)
    workspace = unique("ws")
    for i in range(MESSAGES):
        body = {
            "event_type": "ai_credits",
            "workspace_id": workspace,
            "value": 1,
            "idempotency_key": f"{workspace}-{i}",
            "stripe_customer_id": f"cus_ctrl_c{i}",  # v1: one call in flight per customer and meter
        }
        await amqp.publish(source["exchange"], "usage", body, message_id=f"{workspace}-{i}")
    await wait_for(lambda: _in_flight(port, source), timeout=20, what="meter events in flight")


async def _in_flight(port: int, source: dict) -> bool:
    """Whether `IN_FLIGHT` handlers wait on Stripe (on the meter catalogue, or their meter events)."""
    sample = ("billingd_messages_in_flight", (("source", source["name"]),))
    return (await scrape(port)).get(sample, 0) >= IN_FLIGHT


def _read_json_lines(process: subprocess.Popen, lines: list[dict]) -> None:
    assert process.stderr is not None
    for raw in process.stderr:
        try:
            lines.append(json.loads(raw))
        except ValueError:
            lines.append({"event": raw.decode(errors="replace").strip()})


async def _logged(lines: list[dict], event: str) -> bool:
    return any(line.get("event") == event for line in lines)
