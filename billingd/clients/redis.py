"""The Redis connection shared by every ledger, with bounded timeouts and no hidden retries.

A stopped Redis must fail fast so the `redis` breaker sees it (DESIGN §3); redis-py's own
retry-with-backoff is disabled for that reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse, urlunparse

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import Connection, SSLConnection
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

from billingd.config.model import RedisSettings, TlsSettings
from billingd.config.tls import ContextSource

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
    """What to do about Redis being unavailable with `exc`, when Redis (or the TLS handshake)
    said why."""
    text = str(exc).lstrip()
    if "CERTIFICATE_VERIFY_FAILED" in text:
        return "Redis's certificate was not accepted: check [redis] tls.ca_file and tls.server_name against it"
    if "SSL" in text and ("WRONG_VERSION_NUMBER" in text or "record layer failure" in text):
        return "Redis does not speak TLS on that port (rediss:// to a plain port?)"
    return FIXES.get(text.split(" ", 1)[0])


#: A single Redis or a Redis Cluster: the ledgers use only what both offer (commands, scripts,
#: non-transactional pipelines).
RedisClient = aioredis.Redis | RedisCluster


def connect_redis(settings: RedisSettings, tls: TlsSettings | None = None) -> RedisClient:
    """A pooled asyncio client for `settings.url` (connects lazily on first command): a single
    Redis, or with `settings.cluster` a Redis Cluster (slots discovered from that node; MOVED/ASK
    followed; after a failover the topology is read again), or with `settings.sentinels` the
    master the Sentinels name.

    `rediss://` connects every connection over TLS — every Cluster node, discovered or
    redirected to, and the Sentinels and the master — verified as `tls` says (default: the
    system's trust store, the URL's host; see `redis_tls`). `settings.username` and `password`
    take the place of the URL's.

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
    url, tls = _without_credentials(settings), redis_tls(settings, tls)
    if settings.username or settings.password:
        options.update(username=settings.username or None, password=settings.password or None)
    connection = _tls_connection(ContextSource(tls), SSLConnection) if tls is not None else None
    if settings.cluster:
        cluster = RedisCluster.from_url(url, **options)
        if connection is not None:  # every node's connections, the discovered ones too
            cluster.nodes_manager.connection_kwargs["connection_class"] = connection
            for node in cluster.nodes_manager.startup_nodes.values():
                node.connection_class = connection
        return cluster
    if settings.sentinels:
        return _sentinel_master(settings, options, url, tls)
    single = aioredis.Redis.from_url(url, **options)
    if connection is not None:
        single.connection_pool.connection_class = connection
    return single


def redis_tls(settings: RedisSettings, tls: TlsSettings | None) -> TlsSettings | None:
    """How a `rediss://` URL's connections are verified: the `tls` table, else redis-py's URL
    options (`ssl_ca_certs`, `ssl_certfile`, `ssl_keyfile`, `ssl_cert_reqs=none`), else the
    system's trust store; None for `redis://`."""
    parsed = urlparse(settings.url)
    if parsed.scheme != "rediss":
        return None
    if tls is not None:
        return tls
    query = parse_qs(parsed.query)

    def one(name: str) -> str:
        return query.get(name, [""])[0]

    verify = one("ssl_cert_reqs").lower() not in ("none", "optional")
    return TlsSettings(ca_file=one("ssl_ca_certs"), cert_file=one("ssl_certfile"), key_file=one("ssl_keyfile"),
                       verify=verify)  # fmt: skip


def _tls_connection(source: ContextSource, base: type[Connection]) -> type[Connection]:
    """A connection class of `base` whose TLS context comes from `source` (read again when its
    files change) and verifies `server_name` (else the host connected to)."""

    class TlsConnection(base):  # type: ignore[valid-type,misc]
        def _connection_arguments(self) -> Mapping[str, Any]:
            return {"host": self.host, "port": self.port, "ssl": source.context(),
                    "server_hostname": source.server_hostname(self.host)}  # fmt: skip

    return TlsConnection


def _without_credentials(settings: RedisSettings) -> str:
    """`settings.url`, without its user and password when `username`/`password` replace them,
    and without redis-py's TLS options (`redis_tls` reads them)."""
    parsed = urlparse(settings.url)
    query = "&".join(p for p in parsed.query.split("&") if p and not p.startswith("ssl_"))
    netloc = parsed.netloc
    if settings.username or settings.password:
        netloc = netloc.rpartition("@")[2]
    return urlunparse(parsed._replace(netloc=netloc, query=query))


def _sentinel_master(
    settings: RedisSettings, options: dict[str, Any], url: str, tls: TlsSettings | None
) -> aioredis.Redis:
    """A client of the master the sentinels name (`settings.sentinel_master`), found again
    after a failover; database, user and password from `settings.url` (or `username` and
    `password`); over TLS to the Sentinels and the master with a `rediss://` URL."""
    from redis.asyncio.sentinel import Sentinel, SentinelManagedConnection

    parsed = urlparse(url)
    database = int((parsed.path or "/0").lstrip("/") or 0)
    sentinels = [(h.rsplit(":", 1)[0].strip("[]"), int(h.rsplit(":", 1)[1])) for h in settings.sentinels]
    timeouts = {"socket_timeout": settings.timeout, "socket_connect_timeout": settings.timeout}
    sentinel = Sentinel(sentinels, sentinel_kwargs=timeouts, **timeouts)  # type: ignore[no-untyped-call]
    connection: dict[str, Any] = {**options, "db": database}
    if parsed.password and not settings.password:
        connection.update(username=unquote(parsed.username or "") or None, password=unquote(parsed.password))
    if tls is not None:
        source = ContextSource(tls)
        for client in sentinel.sentinels:
            client.connection_pool.connection_class = _tls_connection(source, SSLConnection)
        connection["connection_class"] = _tls_connection(source, SentinelManagedConnection)
    master: aioredis.Redis = sentinel.master_for(settings.sentinel_master, **connection)
    return master
