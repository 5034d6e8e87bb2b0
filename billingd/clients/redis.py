"""The Redis connection shared by every ledger, with bounded timeouts and no hidden retries.

A stopped Redis must fail fast so the `redis` breaker sees it (DESIGN §3); redis-py's own
retry-with-backoff is disabled for that reason.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlparse

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    BusyLoadingError,
    ClusterDownError,
    MasterDownError,
    NoPermissionError,
    OutOfMemoryError,
    ReadOnlyError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from billingd.config.model import RedisSettings

#: redis-py exceptions that mean "Redis is unreachable or busy right now" (retry later).
TRANSIENT_REDIS_ERRORS: tuple[type[Exception], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    BusyLoadingError,
    ReadOnlyError,
    TryAgainError,
    ClusterDownError,
    MasterDownError,
    OutOfMemoryError,
    NoPermissionError,  # an ACL problem is ours, not the message's (like Stripe's 401)
    OSError,
)

#: Error-reply prefixes that mean "not now" rather than "not this data" (Redis's own codes:
#: a script still running, memory full, persistence failing, replicas missing, cluster down or
#: resharding, auth). Each is about the server, never about the command's data (DESIGN §10).
TRANSIENT_REPLY_PREFIXES = (
    "MISCONF",
    "BUSY",
    "OOM",
    "MASTERDOWN",
    "NOREPLICAS",
    "CLUSTERDOWN",
    "TRYAGAIN",
    "LOADING",
    "READONLY",
    "MOVED",
    "ASK",
    "NOAUTH",
    "WRONGPASS",
    "NOPERM",
)


#: Error replies without a code of their own that are about the server too.
_TRANSIENT_REPLY_TEXT = ("max number of clients reached",)

#: What an operator does about each unavailable state (logged with the breaker's failures, so the
#: log that says intake paused also says why and what to fix).
FIXES = {
    "MISCONF": "Redis cannot persist (disk full or its dir not writable) and refuses writes: fix its storage; "
    "writes resume after a successful BGSAVE",
    "OOM": "Redis is at maxmemory: raise maxmemory (billingd's keys must not be evicted: use noeviction)",
    "READONLY": "billingd is talking to a replica: point [redis].url at the master, or use sentinels or cluster",
    "MASTERDOWN": "the replica lost its master: check the master and the failover",
    "NOREPLICAS": "fewer replicas than [redis].min_replicas_acked answer: check the replicas",
    "LOADING": "Redis is loading its dataset after a restart: it answers once loaded",
    "BUSY": "a script is running too long on Redis: check SLOWLOG",
    "CLUSTERDOWN": "the Redis Cluster lost slots: check its nodes",
    "NOAUTH": "Redis wants a password: set it in [redis].url",
    "WRONGPASS": "Redis refused the user or password of [redis].url",
    "NOPERM": "the Redis ACL user of [redis].url lacks a permission billingd needs (+@all on billingd:* keys)",
}


def is_transient_reply(exc: ResponseError) -> bool:
    """Whether an error reply says Redis is unavailable now (retry) rather than refusing the data."""
    text = str(exc).lstrip()
    return (
        isinstance(exc, TRANSIENT_REDIS_ERRORS)
        or text.startswith(TRANSIENT_REPLY_PREFIXES)
        or any(part in text for part in _TRANSIENT_REPLY_TEXT)
    )


def fix_for(exc: BaseException) -> str | None:
    """What to do about Redis being unavailable with `exc`, when Redis said why (its error code)."""
    code = str(exc).lstrip().split(" ", 1)[0]
    return FIXES.get(code)


#: A single Redis or a Redis Cluster: the ledgers use only what both offer (commands, scripts,
#: non-transactional pipelines).
RedisClient = aioredis.Redis | RedisCluster


def connect_redis(settings: RedisSettings) -> RedisClient:
    """A pooled asyncio client for `settings.url` (connects lazily on first command): a single
    Redis, or with `settings.cluster` a Redis Cluster (slots discovered from that node; MOVED/ASK
    followed; after a failover the topology is read again).

    Every connect and command is bounded by `settings.timeout` seconds; one reconnect attempt
    and no backoff, so failures reach the breaker at once.
    """
    options: dict[str, Any] = {
        "socket_timeout": settings.timeout,
        "socket_connect_timeout": settings.timeout,
        "max_connections": settings.max_connections,
        "retry": Retry(NoBackoff(), 1),
        "health_check_interval": 30,
        "decode_responses": False,
    }
    if settings.cluster:
        return RedisCluster.from_url(settings.url, **options)
    if settings.sentinels:
        return _sentinel_master(settings, options)
    return aioredis.Redis.from_url(settings.url, **options)


def _sentinel_master(settings: RedisSettings, options: dict[str, Any]) -> aioredis.Redis:
    """A client of the master the sentinels name (`settings.sentinel_master`), found again
    after a failover; database, user and password from `settings.url`."""
    from redis.asyncio.sentinel import Sentinel

    parsed = urlparse(settings.url)
    database = int((parsed.path or "/0").lstrip("/") or 0)
    sentinels = [(h.rsplit(":", 1)[0].strip("[]"), int(h.rsplit(":", 1)[1])) for h in settings.sentinels]
    timeouts = {"socket_timeout": settings.timeout, "socket_connect_timeout": settings.timeout}
    sentinel = Sentinel(sentinels, sentinel_kwargs=timeouts, **timeouts)  # type: ignore[no-untyped-call]
    connection: dict[str, Any] = {**options, "db": database}
    if parsed.password:
        connection.update(username=parsed.username, password=parsed.password)
    master: aioredis.Redis = sentinel.master_for(settings.sentinel_master, **connection)
    return master
