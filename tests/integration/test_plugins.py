"""Handlers from installed packages: the example plugin (examples/ai-tokens, installed into the
environment as a user would) run by `billingd run` with no change to billingd, listed by
`billingd check` with its version; a plugin that fails to import and two packages claiming one
name are configuration errors naming the package."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest

from tests.support import amqp_source, http_ready, make_settings, settings_tree, start_billingd, to_toml, wait_for

pytestmark = pytest.mark.anyio

PRICES = {"gpt-4o": {"input": "2.50", "output": "10.00"}}


def check(config: Path, *, pythonpath: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ}
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(pythonpath), env.get("PYTHONPATH", "")]))
    return subprocess.run(
        [sys.executable, "-m", "billingd", "check", "--offline", "--config", str(config)],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip


def fake_distribution(root: Path, name: str, entries: dict[str, str], module: str = "", code: str = "") -> None:
    """An installed distribution as importlib.metadata finds it on sys.path: a .dist-info with its
    entry points (and, optionally, a module)."""
    info = root / f"{name.replace('-', '_')}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    lines = "".join(f"{k} = {v}\n" for k, v in entries.items())
    (info / "entry_points.txt").write_text(f"[billingd.handlers]\n{lines}")
    if module:
        (root / f"{module}.py").write_text(code)


def write_config(directory: Path, sources: list[dict]) -> Path:
    config = directory / "billingd.toml"
    config.write_text(to_toml(settings_tree(make_settings(sources))))
    return config


async def test_the_example_plugin_runs_from_its_entry_point_exactly_once(amqp, redis, tmp_path):
    source = amqp.track(amqp_source("ai_tokens", handler_options={"prices": PRICES}))
    settings = make_settings([source], daemon={"log_level": "info"})
    listed = check(write_config(tmp_path, [source]))
    assert listed.returncode == 0, listed.stderr
    [line] = [x for x in listed.stdout.splitlines() if x.strip().startswith("ai_tokens")]
    assert "billingd-ai-tokens 0.1.0" in line and f"used by {source['name']}" in line
    assert any(x.strip().startswith("usage ") and "billingd 0.1.0" in x for x in listed.stdout.splitlines())
    process = start_billingd(tmp_path, settings)
    try:
        await wait_for(lambda: http_ready(settings.http.port), timeout=30, what="billingd ready")
        ws = f"ws-{time.time_ns()}"
        body = {"request_id": "r-1", "workspace_id": ws, "model": "gpt-4o", "input_tokens": 1200,
                "output_tokens": 300}  # fmt: skip
        for _ in range(3):  # a producer's retries: one request
            await amqp.publish(source["exchange"], "tokens", body)
        await amqp.publish(source["exchange"], "tokens", {**body, "request_id": "r-2", "model": "gpt-9"})
        await wait_for(lambda: _depth(amqp, f"{source['queue']}.dlq", 1), timeout=20, what="one dead letter")
        month = time.strftime("%Y-%m", time.gmtime())
        counters = f"billingd:aitokens:{{{ws}}}:usage:{month}"
        await wait_for(lambda: _acked(amqp, source["queue"]), timeout=20, what="the queue drained")
        process.send_signal(signal.SIGTERM)
        assert await anyio.to_thread.run_sync(process.wait, 30) == 0
    finally:
        if process.poll() is None:
            process.kill()
    assert await redis.hgetall(counters) == {
        b"gpt-4o:input": b"1200",
        b"gpt-4o:output": b"300",
        b"cost_micros": b"6000",
    }
    [letter] = await amqp.drain_queue(f"{source['queue']}.dlq")
    assert str(letter.headers["x-billingd-reason"]).startswith("no price for model 'gpt-9'")


async def _depth(amqp, queue: str, count: int) -> bool:
    return await amqp.depth(queue) >= count


async def _acked(amqp, queue: str) -> bool:
    return await amqp.depth(queue) == 0


def test_a_plugin_that_fails_to_import_stops_only_the_configs_that_use_it(tmp_path):
    packages = tmp_path / "site"
    fake_distribution(packages, "broken-plugin", {"broken": "broken_plugin:SPEC"}, "broken_plugin",
                      "import not_installed_anywhere\n")  # fmt: skip
    unused = write_config(tmp_path, [amqp_source("sms_dlr")])
    fine = check(unused, pythonpath=packages)
    assert fine.returncode == 0, fine.stderr
    assert any(x.strip().startswith("broken") and "broken-plugin 1.0" in x for x in fine.stdout.splitlines())
    used = write_config(tmp_path, [amqp_source("broken")])
    refused = check(used, pythonpath=packages)
    assert refused.returncode == 78
    assert 'sources[0].handler: handler "broken" of broken-plugin 1.0 failed to import' in refused.stderr
    assert "ModuleNotFoundError" in refused.stderr and "reinstall or fix that package" in refused.stderr
    # a plugin that calls sys.exit() while importing is a failed plugin, not a passing check
    fake_distribution(packages, "exiting-plugin", {"exiting": "exiting_plugin:SPEC"}, "exiting_plugin",
                      "import sys\nsys.exit(0)\n")  # fmt: skip
    exiting = check(write_config(tmp_path, [amqp_source("exiting")]), pythonpath=packages)
    assert exiting.returncode == 78 and 'handler "exiting" of exiting-plugin 1.0 failed to import' in exiting.stderr


def test_two_packages_registering_one_handler_name_are_refused(tmp_path):
    packages = tmp_path / "site"
    fake_distribution(packages, "usage-clone", {"usage": "usage_clone:SPEC"})
    result = check(write_config(tmp_path, [amqp_source("sms_dlr")]), pythonpath=packages)
    assert result.returncode == 78
    assert 'handler "usage" is registered by 2 packages (billingd 0.1.0, usage-clone 1.0)' in result.stderr
