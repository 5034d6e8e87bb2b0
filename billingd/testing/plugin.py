"""billingd's pytest plugin (entry point `pytest11`): fixtures for testing handlers.

Loaded automatically wherever billingd is installed; the fixtures are async and run on anyio's own
pytest plugin (mark tests `@pytest.mark.anyio`). Each is documented in docs/testing.md:

* `billingd_redis_url` — the Redis the harness and `billingd_redis` use: `$BILLINGD_TEST_REDIS_URL`,
  else database 14 of `redis://127.0.0.1:6379` (a database of its own: it is emptied by the fixtures);
* `billingd_redis` — a client of that database, emptied before the test;
* `stripe_double` — the Stripe API double (`StripeDouble`) on a loopback port;
* `http_sink` — an HTTP endpoint recording what is POSTed to it (`Sink`);
* `handler_harness` — `handler_harness(name, options, **sections)` builds a `HandlerHarness` on
  that Redis (use it as `async with`).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import pytest
import redis.asyncio as aioredis

from billingd.testing.harness import HandlerHarness
from billingd.testing.server import Sink
from billingd.testing.stripe import StripeDouble

#: The Redis database the fixtures use unless `$BILLINGD_TEST_REDIS_URL` names another.
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/14"


@pytest.fixture
def anyio_backend() -> str:
    """billingd runs on asyncio (a conftest may override this)."""
    return "asyncio"


@pytest.fixture(scope="session")
def billingd_redis_url() -> str:
    """`$BILLINGD_TEST_REDIS_URL`, else database 14 of the local Redis."""
    return os.environ.get("BILLINGD_TEST_REDIS_URL", DEFAULT_REDIS_URL)


@pytest.fixture
async def billingd_redis(billingd_redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """A client of the test Redis database, emptied (`FLUSHDB`) before the test."""
    client = aioredis.Redis.from_url(billingd_redis_url)
    await client.flushdb()
    yield client
    await client.aclose()


@pytest.fixture
async def stripe_double() -> AsyncIterator[StripeDouble]:
    """The Stripe API double on a loopback port (`stripe_double.stripe_settings()` for `[stripe]`)."""
    double = StripeDouble()
    async with double.running():
        yield double


@pytest.fixture
async def http_sink() -> AsyncIterator[Sink]:
    """An HTTP endpoint on a loopback port that records every POST (`http_sink.bodies()`)."""
    sink = Sink()
    async with sink.running():
        yield sink


@pytest.fixture
def handler_harness(billingd_redis: aioredis.Redis, billingd_redis_url: str) -> Callable[..., HandlerHarness]:
    """A factory: `handler_harness(name, options=None, **sections)` → a `HandlerHarness` on the
    (emptied) test Redis."""

    def make(name: str, options: Mapping[str, Any] | None = None, **sections: Any) -> HandlerHarness:
        return HandlerHarness(name, options, redis_url=billingd_redis_url, **sections)

    return make
