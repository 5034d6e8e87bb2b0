"""`billingd dlq list|replay` and `billingd publish` (seed 001: "fix or replay messages"), AMQP and SQS."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter

import anyio
import msgspec
import pytest

from tests.flaky import Journal, registry
from tests.support import amqp_source, make_settings, running, settings_tree, sqs_source, to_toml, wait_for

pytestmark = pytest.mark.anyio

N = 6


async def billingd(*args: str) -> subprocess.CompletedProcess[str]:
    return await anyio.to_thread.run_sync(
        lambda: subprocess.run([sys.executable, "-m", "billingd", *args], capture_output=True, text=True, timeout=60)
    )


async def replay_after_a_fix(tmp_path, source: dict, send) -> None:
    """Dead-letter N messages with a buggy handler, fix it, replay with the CLI: each handled once."""
    buggy = {**source, "handler_options": {"fail_attempts": 99, "error": "bug"}, "max_attempts": 1}
    fixed = {**source, "handler_options": {"fail_attempts": 0}}
    config = tmp_path / "billingd.toml"
    config.write_text(to_toml(settings_tree(make_settings([fixed]))))
    before = Journal()
    async with running(make_settings([buggy]), registry(before)) as daemon:
        for i in range(N):
            await send({"n": i})
        dead = daemon.metrics.processed.labels(source["name"], "dead_letter")
        await wait_for(lambda: dead._value.get() == N, timeout=30, what="all dead-lettered")
    listing = await billingd("dlq", "list", source["name"], "--config", str(config))
    assert listing.returncode == 0, listing.stderr
    assert f"{source['name']}: {N} dead letter(s)" in listing.stdout
    assert f"{N}  gave up after 1 attempts: unexpected RuntimeError: scripted bug on attempt 1" in listing.stdout
    after = Journal()
    async with running(make_settings([fixed]), registry(after)) as daemon:
        replay = await billingd("dlq", "replay", source["name"], "--config", str(config))
        assert replay.returncode == 0, replay.stderr
        assert f"replayed {N} dead letter(s)" in replay.stdout
        acked = daemon.metrics.processed.labels(source["name"], "ack")
        await wait_for(lambda: acked._value.get() == N, timeout=30, what="every replayed message handled")
        await anyio.sleep(1)  # a duplicate, if any, would arrive now
    handled = Counter(msgspec.json.decode(body)["n"] for body in after.bodies)
    assert handled == Counter(range(N))  # every dead letter processed, none twice
    assert all(attempt == 1 for calls in after.calls.values() for attempt, _ in calls)  # attempts start afresh
    empty = await billingd("dlq", "list", source["name"], "--config", str(config))
    assert f"{source['name']}: 0 dead letter(s)" in empty.stdout


async def test_amqp_dlq_replay_after_a_fixed_handler_bug(amqp, tmp_path):
    source = amqp.track(amqp_source("flaky"))
    await replay_after_a_fix(tmp_path, source, lambda body: amqp.publish(source["exchange"], "k", body))


async def test_sqs_dlq_replay_after_a_fixed_handler_bug(sqs, tmp_path):
    url, dlq = await sqs.queue()
    source = sqs_source("flaky", url, dlq, sqs.endpoint)
    await replay_after_a_fix(tmp_path, source, lambda body: sqs.send(url, body))


async def test_publish_sends_a_json_file_encoded_as_asked(sqs, amqp, tmp_path):
    url, dlq = await sqs.queue()
    queue_source = sqs_source("flaky", url, dlq, sqs.endpoint, handler_options={"fail_attempts": 0})
    rabbit = amqp.track(amqp_source("flaky", handler_options={"fail_attempts": 0}))
    message = tmp_path / "event.json"
    message.write_text('{"type": "invoice_finalized", "organization_id": "org_123", "invoice_id": "inv_456"}')
    config = tmp_path / "billingd.toml"
    config.write_text(to_toml(settings_tree(make_settings([queue_source, rabbit]))))
    sent = await billingd("publish", queue_source["name"], str(message), "--encoding", "gzip", "--config", str(config))
    assert sent.returncode == 0, sent.stderr
    journal = Journal()
    async with running(make_settings([queue_source, rabbit]), registry(journal)) as daemon:
        published = await billingd("publish", rabbit["name"], str(message), "--config", str(config))
        assert published.returncode == 0, published.stderr
        for name in (queue_source["name"], rabbit["name"]):
            acked = daemon.metrics.processed.labels(name, "ack")
            await wait_for(lambda acked=acked: acked._value.get() == 1, timeout=20, what="delivered and acked")
    assert journal.bodies == [message.read_bytes()] * 2  # decoded from gzip+base64 before the handler
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    refused = await billingd("publish", rabbit["name"], str(bad), "--config", str(config))
    assert refused.returncode == 65
    assert "is not JSON" in refused.stderr
