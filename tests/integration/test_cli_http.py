"""The `billingd` command and the HTTP surface, as an operator meets them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.seed002 import dlr
from tests.support import amqp_source, http_get, make_settings, running, scrape, wait_for

ROOT = Path(__file__).resolve().parents[2]

DESIGN_METRICS = {
    "billingd_messages_received_total",
    "billingd_messages_processed_total",
    "billingd_message_duration_seconds_bucket",
    "billingd_message_duration_seconds_count",
    "billingd_messages_in_flight",
    "billingd_source_up",
    "billingd_actor_restarts_total",
    "billingd_circuit_breaker_state",
    "billingd_broker_requests_total",
    "billingd_draining",
    "billingd_config_reloads_total",
    "billingd_build_info",
    "process_resident_memory_bytes",
}


def billingd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "billingd", *args], capture_output=True, text=True, timeout=30)


def test_check_prints_every_error_with_its_path_and_exits_78(tmp_path):
    config = tmp_path / "broken.toml"
    config.write_text(
        '[http]\nlisten = "nowhere"\n'
        '[[sources]]\nname = "x"\ntype = "amqp"\nhandler = "nope"\nexchange = "e"\nqueue = "q"\nprefetch = 0\n'
    )
    result = billingd("check", "--config", str(config))
    assert result.returncode == 78
    assert 'http.listen: expected a "host:port" address' in result.stderr
    assert "sources[0].prefetch: expected int >= 1, got 0" in result.stderr
    result = billingd("run", "--config", str(config))
    assert result.returncode == 78


def test_check_reports_unknown_handlers_and_accepts_the_default_config(tmp_path):
    config = tmp_path / "h.toml"
    config.write_text('[[sources]]\nname = "x"\ntype = "amqp"\nhandler = "nope"\nexchange = "e"\nqueue = "q"\n')
    result = billingd("check", "--config", str(config))
    assert result.returncode == 78
    assert 'sources[0].handler: unknown handler "nope"' in result.stderr
    ok = billingd("check", "--config", str(ROOT / "billingd.toml"))
    assert ok.returncode == 0, ok.stderr
    assert "sms-billing" in ok.stdout
    assert billingd("version").stdout.startswith("billingd ")


@pytest.mark.anyio
async def test_metrics_parse_and_carry_the_design_names_and_other_paths_404(amqp):
    source = amqp.track(amqp_source("sms_dlr"))
    settings = make_settings([source])
    port = settings.http.port
    async with running(settings) as daemon:
        await amqp.publish(source["exchange"], "dlr.x", dlr("metric-1", "DELIVRD"))
        await amqp.publish(source["exchange"], "dlr.x", b"garbage")
        processed = daemon.metrics.processed
        await wait_for(lambda: processed.labels(source["name"], "ack")._value.get() == 1, what="acked")
        await wait_for(lambda: amqp.depth(source["queue"] + ".dlq"), what="dead-lettered")
        samples = await scrape(port)
        assert (await http_get(port, "/healthz"))[0] == 200
        assert (await http_get(port, "/readyz")) == (
            200,
            {"ready": True, "draining": False, "sources": {source["name"]: {"up": True, "node": "127.0.0.1:5672"}}},
        )
        assert (await http_get(port, "/"))[0] == 404
        assert (await http_get(port, "/api/v1/usage"))[0] == 404
    names = {name for name, _ in samples}
    assert names >= DESIGN_METRICS
    src = ("source", source["name"])
    assert samples[("billingd_messages_received_total", (src,))] == 2
    assert samples[("billingd_messages_processed_total", (("outcome", "ack"), src))] == 1
    assert samples[("billingd_messages_processed_total", (("outcome", "dead_letter"), src))] == 1
    assert samples[("billingd_message_duration_seconds_count", (src,))] == 2
    assert samples[("billingd_source_up", (src,))] == 1
    assert samples[("billingd_circuit_breaker_state", (("breaker", "redis"),))] == 0
    assert samples[("billingd_broker_requests_total", (("operation", "publish_dead_letter"), src))] == 1
    # no per-user labels: every label is one of the design's
    for _, labels in samples:
        assert {key for key, _ in labels} <= {
            "source",
            "outcome",
            "breaker",
            "operation",
            "result",
            "version",
            "le",
            "generation",
            "implementation",
            "major",
            "minor",
            "patchlevel",
            "system",
        }
