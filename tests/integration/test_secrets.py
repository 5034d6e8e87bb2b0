"""Secrets never written (issue 26): the local stack — `billingd.toml`, every handler, the sample
traffic with its deliberately broken messages — run with recognisable secret values, at
`log_level = "debug"`, through a Redis outage and a forwarding target that refuses connections;
nothing billingd writes contains any of them: its log, `/metrics`, `/readyz`, the dead letters
(`billingd dlq list`), `billingd check`."""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests.support import free_port, http_get, rabbitmqctl, scrape, wait_for

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(240)]

ROOT = Path(__file__).resolve().parents[2]
QUEUES = {  # billingd.toml's variables → the local stack's queue names
    "USAGE_EVENTS": "billing-usage-events",
    "BILLING": "billing-to-posthog-us",
    "STRIPE_EVENTS": "billing-stripe-events",
    "PAYMENT_EVENTS": "billing-payment-events",
    "STRIPE_WEBHOOKS": "billing-stripe-webhooks",
}


def canary(name: str) -> str:
    return f"canary-{name}-{secrets.token_hex(6)}"


@pytest.fixture
async def stack(fauxqs_endpoint: str) -> Any:
    """Everything `deploy/local/stack.sh` starts, on spare ports, with canary secrets."""
    values = {name: canary(name) for name in ("stripe", "whsec", "rzp", "rzpwh", "redis", "amqp", "aws", "code")}
    values["stripe"] = "sk_test_" + values["stripe"]  # the double wants a key that looks like one
    user = f"canary-{secrets.token_hex(4)}"
    await rabbitmqctl("add_user", user, values["amqp"])
    await rabbitmqctl("set_permissions", "-p", "/", user, ".*", ".*", ".*")
    redis_dir = Path(tempfile.mkdtemp(prefix="billingd-secrets-redis-"))
    redis_port, stripe_port, sink_port, http_port = free_port(), free_port(), free_port(), free_port()
    redis = _start_redis(redis_dir, redis_port, values["redis"])
    doubles = subprocess.Popen(
        [sys.executable, "-m", "tests.doubles.serve", "--stripe-port", str(stripe_port), "--sink-port", str(sink_port),
         "--latency", "0.02"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    init = json.loads((ROOT / "deploy/local/fauxqs-init.json").read_text())["queues"]
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": values["aws"], "AWS_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": fauxqs_endpoint, "BILLINGD_LOG_LEVEL": "debug", "BILLINGD_LOG_FORMAT": "json",
        "BILLINGD_LISTEN": f"127.0.0.1:{http_port}", "REDIS_URL": f"redis://:{values['redis']}@127.0.0.1:{redis_port}/0",
        "AMQP_URL": f"amqp://{user}:{values['amqp']}@127.0.0.1:5672/",
        "STRIPE_SECRET_KEY": values["stripe"], "STRIPE_API_BASE": f"http://127.0.0.1:{stripe_port}",
        "STRIPE_WEBHOOK_SECRET": values["whsec"], "RAZORPAY_KEY_ID": "rzp_test_canary",
        "RAZORPAY_KEY_SECRET": values["rzp"], "RAZORPAY_WEBHOOK_SECRET": values["rzpwh"],
        # the marketplace refuses connections: its URL (with a password) is in every retry's reason
        "MARKETPLACE_URL": f"http://billingd:{values['code']}@127.0.0.1:{free_port()}/marketplace",
        "STRIPE_WEBHOOK_FORWARD_URL": f"http://127.0.0.1:{sink_port}/api/v1/Stripe/Webhook?code={values['code']}",
        "PYTHONUNBUFFERED": "1",
    }  # fmt: skip
    urls = await _load("sqs_queues").ensure_queues(fauxqs_endpoint, init)
    by_name = {url.rsplit("/", 1)[1]: url for url in urls}
    for variable, queue in QUEUES.items():
        env[f"SQS_{variable}_QUEUE_URL"], env[f"SQS_{variable}_DLQ_URL"] = by_name[queue], by_name[f"{queue}-dlq"]
    env["SQS_QUEUE_BASE"] = by_name[QUEUES["BILLING"]].rsplit("/", 1)[0] + "/"
    try:
        yield env, values, http_port, redis_dir, redis_port
    finally:
        for process in (doubles, redis):
            process.kill()
            process.wait()
        await rabbitmqctl("delete_user", user)


async def test_no_secret_is_ever_written(stack, tmp_path):
    env, values, http_port, redis_dir, redis_port = stack
    outputs: list[str] = []
    billingd = subprocess.Popen(
        [sys.executable, "-m", "billingd", "run", "--config", str(ROOT / "billingd.toml")],
        cwd=tmp_path, env=env, stderr=subprocess.PIPE, stdout=subprocess.PIPE,
    )  # fmt: skip
    try:
        await wait_for(lambda: _ready(http_port), timeout=60, what="billingd ready")
        traffic = await anyio.run_process(
            [sys.executable, str(ROOT / "deploy/local/traffic.py"), "--rate", "20", "--count", "30"],
            env=env, cwd=tmp_path, check=False,
        )  # fmt: skip
        outputs += [traffic.stdout.decode(), traffic.stderr.decode()]
        await wait_for(lambda: _processed(http_port, 200), timeout=90, what="the traffic processed")
        # Redis goes away for a moment: the breaker opens and closes, with Redis's errors in the log
        redis_pid = int((redis_dir / "redis.pid").read_text())
        os.kill(redis_pid, signal.SIGKILL)
        await wait_for(lambda: _metric(http_port, "billingd_circuit_breaker_state", breaker="redis", at_least=1),
                       timeout=30, what="the redis breaker open")  # fmt: skip
        _start_redis(redis_dir, redis_port, values["redis"])
        await wait_for(lambda: _metric(http_port, "billingd_circuit_breaker_state", breaker="redis", at_most=0),
                       timeout=60, what="the redis breaker closed again")  # fmt: skip
        for path in ("/metrics", "/readyz", "/healthz"):
            _, body = await http_get(http_port, path)
            outputs.append(body if isinstance(body, str) else json.dumps(body))
        dead = 0
        for source in ("usage-events", "billing-to-posthog", "stripe-events", "payment-events", "sms-billing"):
            listed = await anyio.run_process(
                [sys.executable, "-m", "billingd", "dlq", "list", source, "--config", str(ROOT / "billingd.toml")],
                env=env, cwd=tmp_path, check=False,
            )  # fmt: skip
            outputs += [listed.stdout.decode(), listed.stderr.decode()]
            dead += sum(int(line.split()[0]) for line in listed.stdout.decode().splitlines()[1:] if line.strip())
        check = await anyio.run_process(
            [sys.executable, "-m", "billingd", "check", "--config", str(ROOT / "billingd.toml")],
            env=env, cwd=tmp_path, check=False,
        )  # fmt: skip
        outputs += [check.stdout.decode(), check.stderr.decode()]
    finally:
        billingd.send_signal(signal.SIGTERM)
        out, err = await anyio.to_thread.run_sync(lambda: billingd.communicate(timeout=60))
        outputs += [out.decode(), err.decode()]
    log = outputs[-1]
    assert dead > 0  # the broken messages reached the dead-letter queues, with their reasons
    assert '"level": "debug"' in log and "circuit breaker open" in log and "marketplace" in log
    leaked = {name: value for name, value in values.items() if any(value in text for text in outputs)}
    assert not leaked, [line for line in log.splitlines() if any(v in line for v in leaked.values())][:5]


def _start_redis(directory: Path, port: int, password: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--requirepass", password, "--save", "",
         "--appendonly", "no", "--dir", str(directory), "--pidfile", str(directory / "redis.pid")],
        cwd=directory, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


async def _ready(port: int) -> bool:
    try:
        return (await http_get(port, "/readyz"))[0] == 200
    except OSError:
        return False


async def _processed(port: int, at_least: int) -> bool:
    samples = await scrape(port)
    return sum(v for (name, _), v in samples.items() if name == "billingd_messages_processed_total") >= at_least


async def _metric(port: int, name: str, *, at_least: float = -1, at_most: float = 1e18, **labels: str) -> bool:
    value = (await scrape(port)).get((name, tuple(sorted(labels.items()))))
    return value is not None and at_least <= value <= at_most


def _load(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(f"local_{name}", ROOT / "deploy" / "local" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
