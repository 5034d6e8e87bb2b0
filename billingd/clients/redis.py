"""The Redis connection shared by every ledger, with bounded timeouts and no hidden retries.

A stopped Redis must fail fast so the `redis` breaker sees it (DESIGN §3); redis-py's own
retry-with-backoff is disabled for that reason.
"""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import BusyLoadingError, ReadOnlyError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from billingd.config.model import RedisSettings

#: redis-py exceptions that mean "Redis is unreachable or busy right now" (retry later).
TRANSIENT_REDIS_ERRORS: tuple[type[BaseException], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    BusyLoadingError,
    ReadOnlyError,
    TryAgainError,
    OSError,
)


def connect_redis(settings: RedisSettings) -> aioredis.Redis:
    """A pooled asyncio Redis client for `settings.url` (connects lazily on first command).

    Every connect and command is bounded by `settings.timeout` seconds; one reconnect attempt
    and no backoff, so failures reach the breaker at once.
    """
    return aioredis.Redis.from_url(
        settings.url,
        socket_timeout=settings.timeout,
        socket_connect_timeout=settings.timeout,
        max_connections=settings.max_connections,
        retry=Retry(NoBackoff(), 1),
        health_check_interval=30,
        decode_responses=False,
    )
