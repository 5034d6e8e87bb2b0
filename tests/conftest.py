"""Fixtures: the anyio backend, the test Redis database, a RabbitMQ helper that cleans up."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aio_pika
import hypothesis  # imported early: a lazy import in pytest's summary hits a CPython 3.11.7 compile bug
import hypothesis.configuration
import hypothesis.database
import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from billingd.daemon.logging import configure_logging
from billingd.testing.server import Sink
from tests.cluster import RedisClusterServer
from tests.support import AMQP_URL, REDIS_URL, Amqp, RedisTarget, Sqs, cache_dir, start_fauxqs, start_moto

configure_logging("warning", "console")

# Hypothesis keeps the examples it found (and its cache of the code's constants) in the cache
# directory, never in the work tree
hypothesis.configuration.set_hypothesis_home_dir(cache_dir() / "hypothesis")
hypothesis.settings.register_profile(
    "billingd", database=hypothesis.database.DirectoryBasedExampleDatabase(str(cache_dir() / "hypothesis"))
)
hypothesis.settings.load_profile("billingd")

# the SQS emulator accepts any credentials; billingd finds these through the standard AWS chain
for _name, _value in (
    ("AWS_ACCESS_KEY_ID", "test"),
    ("AWS_SECRET_ACCESS_KEY", "test"),
    ("AWS_DEFAULT_REGION", "us-east-1"),
):
    os.environ.setdefault(_name, _value)


@pytest.fixture
def anyio_backend() -> str:
    """billingd runs on asyncio (aio-pika, aiobotocore and aiohttp need it)."""
    return "asyncio"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Tests marked `redis_backends` run twice: on the single Redis and on the test cluster."""
    if metafunc.definition.get_closest_marker("redis_backends") and "redis_backend" in metafunc.fixturenames:
        metafunc.parametrize("redis_backend", ["single", "cluster"], indirect=True)


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterServer]:
    """A 3-master Redis Cluster (with a replica each) on loopback ports, for the session."""
    cluster = RedisClusterServer()
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture
def redis_backend(request: pytest.FixtureRequest) -> Iterator[str]:
    """`single` (db 15 of the machine's Redis) or `cluster`; billingd's settings follow it."""
    kind = getattr(request, "param", "single")
    if kind == "cluster":
        RedisTarget.use(request.getfixturevalue("redis_cluster").url, cluster=True)
    try:
        yield kind
    finally:
        RedisTarget.use(REDIS_URL, cluster=False)


@pytest.fixture
async def redis(redis_backend: str) -> AsyncIterator[Any]:
    """A client of the Redis the test's billingd uses (see `redis_backend`), emptied first."""
    if redis_backend == "cluster":
        client: Any = RedisCluster.from_url(RedisTarget.url)
        await client.flushall(target_nodes=RedisCluster.PRIMARIES)
    else:
        client = aioredis.Redis.from_url(REDIS_URL)
        await client.flushdb()
    yield client
    await client.aclose()


@pytest.fixture
async def amqp() -> AsyncIterator[Amqp]:
    """A RabbitMQ connection for publishing and inspecting queues."""
    connection = await aio_pika.connect_robust(AMQP_URL)  # survives the close_all_connections drill
    channel = await connection.channel(publisher_confirms=True)
    helper = Amqp(connection, channel)
    yield helper
    await helper.cleanup()
    await connection.close()


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """A moto SQS server (the real SQS wire protocol) on a spare loopback port, for the session."""
    process, endpoint = start_moto()
    yield endpoint
    process.terminate()
    process.wait(10)


@pytest.fixture(scope="session")
def fauxqs_endpoint() -> Iterator[str]:
    """fauxqs (the fast SQS emulator, for tests that send thousands of messages), for the session."""
    process, endpoint = start_fauxqs()
    yield endpoint
    process.terminate()
    process.wait(10)


@pytest.fixture
async def sqs(moto_endpoint: str) -> AsyncIterator[Sqs]:
    """A client of the moto SQS server."""
    import aioboto3

    async with aioboto3.Session().client("sqs", region_name="us-east-1", endpoint_url=moto_endpoint) as client:
        yield Sqs(client, moto_endpoint)


@pytest.fixture
def sink(http_sink: Sink) -> Sink:
    """An HTTP endpoint that records POSTs (a marketplace or webhook receiver): the test kit's
    `http_sink` (`stripe_double` comes from the test kit too: billingd.testing.plugin)."""
    return http_sink
