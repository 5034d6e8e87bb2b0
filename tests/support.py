"""Shared test helpers: settings builders, an in-process daemon, AMQP publishing, polling."""

from __future__ import annotations

import contextlib
import os
import random
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import aio_pika
import anyio
import msgspec

from billingd.config import Settings, convert
from billingd.daemon.app import Daemon
from billingd.handlers.kit.base import HandlerSpec

AMQP_URL = os.environ.get("TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


class RedisTarget:
    """Which Redis `make_settings` points billingd at: the test database of the single Redis, or
    the test cluster while the `redis_backend` fixture runs a test against it."""

    url = REDIS_URL
    cluster = False

    @classmethod
    def use(cls, url: str, cluster: bool) -> None:
        cls.url, cls.cluster = url, cluster

    @classmethod
    def client(cls) -> Any:
        """A new client of the current target (a `RedisCluster` for the cluster)."""
        import redis.asyncio as aioredis
        from redis.asyncio.cluster import RedisCluster

        return RedisCluster.from_url(cls.url) if cls.cluster else aioredis.Redis.from_url(cls.url)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def unique(prefix: str) -> str:
    """A name no other test uses (queues, exchanges)."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def make_settings(sources: list[dict[str, Any]], **sections: Any) -> Settings:
    """Settings for a test: HTTP on a free port, the test Redis, fast backoffs, given sources."""
    tree: dict[str, Any] = {
        "daemon": {"drain_timeout": "10s", "log_level": "warning"},
        "http": {"listen": f"127.0.0.1:{free_port()}"},
        "supervisor": {"backoff_initial": "50ms", "backoff_max": "1s", "max_restarts": 5, "max_seconds": 60},
        "redis": {"url": RedisTarget.url, "cluster": RedisTarget.cluster, "timeout": "500ms"},
        "breakers": {"default": {"failure_threshold": 3, "reset_timeout": "500ms", "reset_timeout_max": "2s"}},
        # no periodic reconciliation (the test Redis holds other tests' journals): tests that want it say so
        "reconcile": {"interval": "0s"},
        "sources": sources,
    }
    for key, value in sections.items():
        tree[key] = {**tree.get(key, {}), **value}
    return convert(tree, Settings)


def build_handler_for(settings: Settings, index: int = 0) -> tuple[Any, Any]:
    """The handler of `settings.sources[index]` as the daemon builds it (unguarded clients, a
    registry of its own), and its `Clients` (close with `aclose()`)."""
    from billingd.clients import Clients, Unguarded
    from billingd.handlers.kit.base import HandlerContext
    from billingd.handlers.registry import build_handler, discover
    from billingd.telemetry import Metrics

    clients = Clients(settings.redis, settings.stripe, Unguarded)
    stripe, keep = settings.stripe, float(settings.reconcile.keep)
    context = HandlerContext(settings.sources[index], clients, stripe, settings.razorpay, Metrics("test"), keep)
    return build_handler(context, discover()), clients


def amqp_source(handler: str, **overrides: Any) -> dict[str, Any]:
    """An AMQP `[[sources]]` table on a fresh exchange and queue."""
    queue = unique(f"test.{handler}")
    return {
        "name": queue,
        "type": "amqp",
        "url": AMQP_URL,
        "exchange": unique("test-exchange"),
        "exchange_type": "topic",
        "queue": queue,
        "routing_keys": ["#"],
        "handler": handler,
        "prefetch": 10,
        "retry_initial": "100ms",
        "retry_max": "1s",
        **overrides,
    }


class MaxRandom(random.Random):
    """Makes every jittered delay its ceiling: deterministic, growing backoffs in tests."""

    def uniform(self, a: float, b: float) -> float:
        return b


@contextlib.asynccontextmanager
async def running(
    settings: Settings,
    handlers: Mapping[str, HandlerSpec] | None = None,
    *,
    wait_ready: bool = True,
    rng: random.Random | None = None,
    exit_code: int = 0,
) -> AsyncIterator[Daemon]:
    """Run a daemon in-process; on exit drain it and check that it stopped with `exit_code`."""
    daemon = Daemon(settings, handlers=handlers, handle_signals=False, rng=rng)
    codes: list[int] = []
    async with anyio.create_task_group() as tg:

        async def run() -> None:
            codes.append(await daemon.run())

        tg.start_soon(run)
        if wait_ready:
            await wait_for(lambda: daemon.readiness()[0], timeout=15, what="daemon ready")
        try:
            yield daemon
        finally:
            daemon.request_drain("test finished")
    assert codes == [exit_code]


async def wait_for(
    predicate: Callable[[], bool | Awaitable[bool]],
    timeout: float = 10,
    what: str = "condition",
    interval: float = 0.02,
) -> None:
    """Poll `predicate` (sync or async) until true; fail the test after `timeout` seconds."""
    with anyio.fail_after(timeout):
        while True:
            result = predicate()
            if not isinstance(result, bool):
                result = await result
            if result:
                return
            await anyio.sleep(interval)
    raise AssertionError(what)


class Amqp:
    """A test publisher/inspector on RabbitMQ (publisher confirms on)."""

    def __init__(self, connection: aio_pika.abc.AbstractConnection, channel: aio_pika.abc.AbstractChannel) -> None:
        self.connection = connection
        self.channel = channel
        self._queues: list[str] = []
        self._exchanges: list[str] = []

    def track(self, source: dict[str, Any]) -> dict[str, Any]:
        """Delete `source`'s queues and exchange when the test ends; returns `source`."""
        queue = source["queue"]
        self._queues += [queue, f"{queue}.retry", f"{queue}.dlq"]
        if source.get("exchange"):
            self._exchanges.append(source["exchange"])
        return source

    async def cleanup(self) -> None:
        """Delete what `track` recorded (after the connection is back, if a test closed it)."""
        with anyio.move_on_after(15):
            await self.connection.connected.wait()
        await self.delete(*self._queues)
        for exchange in self._exchanges:
            channel = await self.connection.channel()
            with contextlib.suppress(aio_pika.exceptions.AMQPError):
                await channel.exchange_delete(exchange)
            if not channel.is_closed:
                await channel.close()

    async def publish(self, exchange: str, routing_key: str, body: bytes | dict[str, Any], **properties: Any) -> None:
        """Publish `body` (a dict is JSON-encoded) persistently, waiting for the confirm."""
        data = body if isinstance(body, bytes) else msgspec.json.encode(body)
        target = await self.channel.get_exchange(exchange) if exchange else self.channel.default_exchange
        await target.publish(
            aio_pika.Message(data, delivery_mode=aio_pika.DeliveryMode.PERSISTENT, **properties), routing_key
        )

    async def publish_many(self, exchange: str, routing_key: str, bodies: list[tuple[str, dict[str, Any]]]) -> None:
        """Publish `(message_id, body)` pairs, 500 confirms in flight at a time."""
        target = await self.channel.get_exchange(exchange)
        for start in range(0, len(bodies), 500):
            async with anyio.create_task_group() as tg:
                for message_id, body in bodies[start : start + 500]:
                    message = aio_pika.Message(
                        msgspec.json.encode(body), message_id=message_id, delivery_mode=aio_pika.DeliveryMode.PERSISTENT
                    )
                    tg.start_soon(target.publish, message, routing_key)

    async def depth(self, queue: str) -> int:
        """Messages ready in `queue` (0 when it does not exist)."""
        channel = await self.connection.channel()
        try:
            declared = await channel.declare_queue(queue, passive=True)
            return declared.declaration_result.message_count or 0
        except aio_pika.exceptions.ChannelClosed:
            return 0
        finally:
            if not channel.is_closed:
                await channel.close()

    async def drain_queue(self, queue: str) -> list[aio_pika.abc.AbstractIncomingMessage]:
        """Take (and ack) every ready message of `queue`."""
        channel = await self.connection.channel()
        taken = []
        try:
            declared = await channel.declare_queue(queue, passive=True)
            while (message := await declared.get(fail=False)) is not None:
                taken.append(message)
                await message.ack()
        finally:
            await channel.close()
        return taken

    async def delete(self, *queues: str) -> None:
        """Delete queues (ignoring ones that do not exist)."""
        for queue in queues:
            channel = await self.connection.channel()
            with contextlib.suppress(aio_pika.exceptions.AMQPError):
                await channel.queue_delete(queue)
            if not channel.is_closed:
                await channel.close()


def to_toml(tree: dict[str, Any]) -> str:
    """Render a config tree as TOML (tables, arrays of tables, scalars, inline tables)."""
    lines: list[str] = []

    def scalar(value: Any) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, int | float):
            return repr(value)
        if isinstance(value, str):
            return msgspec.json.encode(value).decode()
        if isinstance(value, list):
            return "[" + ", ".join(scalar(v) for v in value) + "]"
        if isinstance(value, dict):
            return "{ " + ", ".join(f"{msgspec.json.encode(k).decode()} = {scalar(v)}" for k, v in value.items()) + " }"
        raise TypeError(value)

    def table(header: str, body: dict[str, Any]) -> None:
        lines.append(header)
        for key, value in body.items():
            lines.append(f"{msgspec.json.encode(key).decode()} = {scalar(value)}")
        lines.append("")

    for key, value in tree.items():
        if isinstance(value, list) and value and isinstance(value[0], dict):
            for item in value:
                table(f"[[{key}]]", item)
        elif isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
            for name, sub in value.items():
                table(f'[{key}."{name}"]', sub)
        else:
            table(f"[{key}]", value)
    return "\n".join(lines)


def settings_tree(settings: Settings) -> dict[str, Any]:
    """`settings` back as a TOML-ready tree (durations as strings)."""
    from billingd.config.durations import Duration, format_duration

    def enc(obj: Any) -> Any:
        if isinstance(obj, Duration):
            return format_duration(obj)
        raise NotImplementedError

    raw = msgspec.to_builtins(settings, enc_hook=enc)
    return _strip_none(raw)


def _strip_none(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _strip_none(v) for k, v in node.items() if v is not None}
    if isinstance(node, list):
        return [_strip_none(v) for v in node]
    return node


async def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Fetch `/metrics` and parse it with prometheus-client's text parser: {(name, labels): value}."""
    import aiohttp
    from prometheus_client.parser import text_string_to_metric_families

    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/metrics") as response:
        text = await response.text()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def http_get(port: int, path: str) -> tuple[int, Any]:
    """GET `path` on the daemon's HTTP port: (status, JSON body or text)."""
    import aiohttp

    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}{path}") as response:
        if response.content_type == "application/json":
            return response.status, await response.json()
        return response.status, await response.text()


async def rabbitmqctl(*args: str) -> str:
    """Run `rabbitmqctl args…` and return its output (raises on failure)."""
    result = await anyio.run_process(["rabbitmqctl", *args], check=True)
    return result.stdout.decode()


async def cdr_ids(redis: Any) -> set[str]:
    """Message ids that have a CDR in the test Redis."""
    ids = set()
    async for key in redis.scan_iter(match="billingd:cdr:*", count=1000):
        ids.add(key.decode().split("{", 1)[1].rsplit("}", 1)[0])
    return ids


class RedisServer:
    """A private `redis-server` on a spare loopback port, for tests that stop and start Redis.

    AOF is on so that data written before a stop is there after the restart.
    """

    def __init__(self, directory: str, *extra: str) -> None:
        self.port = free_port()
        self.directory = directory
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.extra = list(extra)
        """More `redis-server` arguments (e.g. `--replicaof 127.0.0.1 <port>`)."""

    async def start(self) -> None:
        await anyio.run_process(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--daemonize",
                "yes",
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--dir",
                self.directory,
                "--pidfile",
                f"{self.directory}/redis.pid",
                "--logfile",
                f"{self.directory}/redis.log",
                *self.extra,
            ],
            check=True,
        )
        await wait_for(self._pong, timeout=10, what="redis-server up")

    async def stop(self) -> None:
        await anyio.run_process(["redis-cli", "-p", str(self.port), "shutdown"], check=False)
        await wait_for(lambda: not self._listening(), timeout=10, what="redis-server down")

    def _listening(self) -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    async def _pong(self) -> bool:
        result = await anyio.run_process(["redis-cli", "-p", str(self.port), "ping"], check=False)
        return result.stdout.strip() == b"PONG"


class Sqs:
    """A test client for the SQS emulator: queues (with DLQs and redrive), sends, depth."""

    def __init__(self, client: Any, endpoint: str) -> None:
        self.client = client
        self.endpoint = endpoint

    async def queue(
        self,
        name: str | None = None,
        *,
        fifo: bool = False,
        max_receive: int | None = None,
        visibility: int = 30,
    ) -> tuple[str, str]:
        """Create a queue and its DLQ; `(queue_url, dlq_url)`. With `max_receive`, the queue gets
        a redrive policy to the DLQ."""
        base = name or unique("test")
        suffix = ".fifo" if fifo else ""
        attributes = {"FifoQueue": "true", "ContentBasedDeduplication": "false"} if fifo else {}
        dlq = (await self.client.create_queue(QueueName=f"{base}-dlq{suffix}", Attributes=attributes))["QueueUrl"]
        main = {**attributes, "VisibilityTimeout": str(visibility)}
        if max_receive is not None:
            arn = (await self.client.get_queue_attributes(QueueUrl=dlq, AttributeNames=["QueueArn"]))["Attributes"][
                "QueueArn"
            ]
            main["RedrivePolicy"] = msgspec.json.encode(
                {"deadLetterTargetArn": arn, "maxReceiveCount": str(max_receive)}
            ).decode()
        url = (await self.client.create_queue(QueueName=f"{base}{suffix}", Attributes=main))["QueueUrl"]
        return url, dlq

    async def send(
        self,
        url: str,
        body: bytes | str | dict[str, Any],
        *,
        attributes: dict[str, str] | None = None,
        group: str | None = None,
        dedup: str | None = None,
    ) -> str:
        """Send one message (a dict is JSON-encoded); returns its MessageId."""
        text = (
            body
            if isinstance(body, str)
            else body.decode()
            if isinstance(body, bytes)
            else msgspec.json.encode(body).decode()
        )
        kwargs: dict[str, Any] = {"QueueUrl": url, "MessageBody": text}
        if attributes:
            kwargs["MessageAttributes"] = {k: {"DataType": "String", "StringValue": v} for k, v in attributes.items()}
        if group is not None:
            kwargs["MessageGroupId"] = group
            kwargs["MessageDeduplicationId"] = dedup or uuid.uuid4().hex
        return (await self.client.send_message(**kwargs))["MessageId"]

    async def counts(self, url: str) -> tuple[int, int]:
        """`(visible, in flight)` messages of the queue."""
        attributes = (
            await self.client.get_queue_attributes(
                QueueUrl=url,
                AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"],
            )
        )["Attributes"]
        return int(attributes["ApproximateNumberOfMessages"]), int(attributes["ApproximateNumberOfMessagesNotVisible"])

    async def depth(self, url: str) -> int:
        """Visible plus in-flight messages."""
        visible, in_flight = await self.counts(url)
        return visible + in_flight

    async def take(self, url: str, wait: int = 0) -> list[dict[str, Any]]:
        """Receive and delete every visible message (with all attributes)."""
        taken: list[dict[str, Any]] = []
        while True:
            response = await self.client.receive_message(
                QueueUrl=url,
                MaxNumberOfMessages=10,
                WaitTimeSeconds=wait,
                MessageAttributeNames=["All"],
                MessageSystemAttributeNames=["All"],
            )
            messages = response.get("Messages", [])
            if not messages:
                return taken
            taken += messages
            for m in messages:
                await self.client.delete_message(QueueUrl=url, ReceiptHandle=m["ReceiptHandle"])


def sqs_source(handler: str, queue_url: str, dlq_url: str, endpoint: str, **overrides: Any) -> dict[str, Any]:
    """An SQS `[[sources]]` table for the emulator at `endpoint`."""
    return {
        "name": unique(f"sqs-{handler}"),
        "type": "sqs",
        "queue_url": queue_url,
        "dead_letter_queue_url": dlq_url,
        "endpoint_url": endpoint,
        "region": "us-east-1",
        "handler": handler,
        "prefetch": 10,
        "wait_time": "1s",
        "visibility_timeout": "30s",
        "retry_initial": "1s",
        "retry_max": "2s",
        **overrides,
    }


def start_billingd(directory: Any, settings: Settings, **env: str) -> Any:
    """`billingd run` as a real process on `settings` (written to `directory/billingd.toml`),
    stderr captured; extra environment variables in `env`."""
    import os
    import subprocess
    import sys

    config = directory / "billingd.toml"
    config.write_text(to_toml(settings_tree(settings)))
    return subprocess.Popen(
        [sys.executable, "-m", "billingd", "run", "--config", str(config)],
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
    )


async def http_ready(port: int) -> bool:
    """Whether `/readyz` on `port` answers 200 (False while nothing listens yet)."""
    try:
        return (await http_get(port, "/readyz"))[0] == 200
    except OSError:
        return False


def start_moto() -> tuple[Any, str]:
    """A moto SQS server on a spare loopback port: `(process, endpoint URL)` once it accepts connections.

    Raises:
        RuntimeError: it did not start within 30 s.
    """
    import subprocess
    import sys

    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return process, _listening(process, port, "moto server")


def cache_dir() -> Path:
    """Where the tests keep what outlives a run (fauxqs's npm install, Hypothesis's examples):
    `$BILLINGD_CACHE_DIR`, else `$XDG_CACHE_HOME/billingd`, else `~/.cache/billingd` — never the
    work tree (`deploy/local/sqs.sh` installs fauxqs there too)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(os.environ.get("BILLINGD_CACHE_DIR") or os.path.join(base, "billingd"))


def fauxqs_cli() -> Path:
    """fauxqs 1.9.2's entry point in the cache directory (the last version that runs on Node 20)."""
    return cache_dir() / "fauxqs-1.9.2" / "node_modules" / "fauxqs" / "dist" / "cli.js"


def start_fauxqs() -> tuple[Any, str]:
    """fauxqs (the SQS emulator of the local stack and the benchmarks) on a spare loopback port:
    `(process, endpoint URL)`. Installed from npm into the cache directory (`cache_dir()`, outside
    the work tree) on first use, as `deploy/local/sqs.sh` does.

    Raises:
        RuntimeError: Node.js is missing, the install failed, or it did not start within 30 s.
    """
    import shutil
    import subprocess

    cli = fauxqs_cli()
    if shutil.which("node") is None or shutil.which("npm") is None:
        raise RuntimeError("fauxqs needs Node.js 20+ and npm (apt-get install nodejs npm)")
    if not cli.exists():
        prefix = cli.parents[3]
        prefix.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["npm", "install", "--silent", "--no-audit", "--no-fund", "--prefix", str(prefix), "fauxqs@1.9.2"],
            cwd=prefix,
            check=True,
            capture_output=True,
            timeout=300,
        )
    port = free_port()
    process = subprocess.Popen(
        ["node", str(cli)],
        env={**os.environ, "FAUXQS_PORT": str(port), "FAUXQS_LOGGER": "false"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return process, _listening(process, port, "fauxqs")


def _listening(process: Any, port: int, what: str, within: float = 30.0) -> str:
    """`http://127.0.0.1:port` once `process` accepts connections there.

    Raises:
        RuntimeError: it exited, or did not listen within `within` seconds (it is killed).
    """
    import time

    deadline = time.monotonic() + within
    while True:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return f"http://127.0.0.1:{port}"
        if time.monotonic() > deadline or process.poll() is not None:
            process.kill()
            raise RuntimeError(f"{what} did not start")
        time.sleep(0.1)


def meter_id(body: Mapping[str, Any]) -> str:
    """The meter event `identifier` billingd derives for a usage event (seed 001 or 004 shape)."""
    from billingd.clients.stripe_ids import meter_identifier

    if "userId" in body:
        return meter_identifier(body["userId"], body["entitlementKey"], body["idempotencyKey"])
    return meter_identifier(body["workspace_id"], body["event_type"], body["idempotency_key"])
