"""Running Lua scripts on Redis through the `redis` guard, with failures classified.

Every billing effect is one Lua script: atomic on the server, so a retry after a timeout either
finds the effect done (and does nothing) or does it once. Keys of one subject share a hash tag
(`{subject}`) so the scripts run on Redis Cluster too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import DataError, NoScriptError, ResponseError

from billingd.clients.errors import (
    CALL_TARGET,
    CallAborted,
    DownstreamError,
    DownstreamRejected,
    DownstreamUnavailable,
    Guard,
)
from billingd.clients.ledger.batch import BatchAborted, CommandBatcher
from billingd.clients.ledger.scripts import Script
from billingd.clients.redis import TRANSIENT_REDIS_ERRORS, RedisClient, fix_for, is_transient_reply
from billingd.telemetry.tracing import child_span

#: Errors of one Redis call that `classify` turns into a downstream outcome.
_CALL_ERRORS: tuple[type[Exception], ...] = (*TRANSIENT_REDIS_ERRORS, ResponseError, DataError)
#: The same for a script call, which may also fail with the pipeline batch it rode in.
_SCRIPT_ERRORS: tuple[type[Exception], ...] = (*_CALL_ERRORS, BatchAborted)

KEY_PREFIX = "billingd"
#: Most micro-units a counter may hold: Lua numbers are IEEE doubles, exact up to 2**53 (see
#: `billingd.handlers.kit.money`, which bounds amounts before they get here).
LEDGER_MAX = 2**53 - 1


def key(*parts: str, tag: str) -> str:
    """`billingd:<parts…>` with `{tag}` as the Redis Cluster hash tag, e.g. `billingd:cdr:{m-1}`.

    The tag goes right after the first part so that every key of one subject hashes alike.
    """
    head, *rest = parts
    return ":".join((KEY_PREFIX, head, "{" + tag + "}", *rest))


class RedisLedger:
    """Base of the ledgers: owns the client and the guard, runs scripts and reads.

    Raises (from every method):
        DownstreamUnavailable: Redis unreachable, timed out, loading, read-only, out of memory,
            or the cluster is down (transient: retried, counted by the `redis` breaker).
        DownstreamRejected: Redis refused this command's data (a value that is not an integer
            or out of range, an argument that cannot be encoded, a script error): permanent for
            this message, never a breaker failure (DESIGN §8).
        CircuitOpen: the `redis` breaker is open.
    """

    def __init__(
        self, redis: RedisClient, guard: Guard, batcher: CommandBatcher | None = None, tracer: Any = None
    ) -> None:
        self.redis = redis
        self._guard = guard
        self._batcher = batcher or CommandBatcher(redis)
        self._tracer = tracer
        self._span_attributes = {"db.system.name": "redis", "db.operation.name": "EVALSHA",
                                 "billingd.ledger": type(self).__name__}  # fmt: skip
        self._cluster = isinstance(redis, RedisCluster)

    async def run(self, script: Script, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Run `script` with `keys` and `args` (pipelined with concurrent calls), through the guard
        (in a child span of the message's when traces are on)."""
        target = CALL_TARGET.set(self._node(keys[0])) if self._cluster and keys else None
        try:
            if self._tracer is None:
                return await self._guard.call(self._run_script, script, keys, args)
            with child_span(self._tracer, "redis EVALSHA", self._span_attributes):
                return await self._guard.call(self._run_script, script, keys, args)
        finally:
            if target is not None:
                CALL_TARGET.reset(target)

    def _node(self, name: str) -> str:
        """The Redis Cluster node serving key `name` (the breaker's target)."""
        try:
            node = self.redis.get_node_from_key(name)  # type: ignore[union-attr]
        except Exception:  # noqa: BLE001 — no topology yet: the whole cluster
            return ""
        return str(getattr(node, "name", "") or "")

    async def hgetall(self, name: str) -> dict[str, str]:
        """Read a hash as `str → str` (empty when absent), through the guard."""
        raw = await self._guard.call(self._call, "HGETALL", name)
        return {k.decode(): v.decode() for k, v in raw.items()}

    async def get_str(self, name: str) -> str | None:
        """Read a string (None when absent), through the guard."""
        raw = await self._guard.call(self._call, "GET", name)
        return raw.decode() if raw is not None else None

    async def set_str(self, name: str, value: str) -> None:
        """Write a string, through the guard."""
        await self._guard.call(self._call, "SET", name, value)

    async def get_int(self, name: str) -> int:
        """Read an integer counter (0 when absent), through the guard."""
        raw = await self._guard.call(self._call, "GET", name)
        return int(raw) if raw is not None else 0

    async def _run_script(self, script: Script, keys: Sequence[str], args: Sequence[Any]) -> Any:
        try:
            try:
                return await self._batcher.run_script(script, keys, args)
            except NoScriptError:  # first use, or Redis restarted and lost its script cache
                await self.redis.script_load(script.source)
                return await self._batcher.run_script(script, keys, args)
        except _SCRIPT_ERRORS as exc:
            raise classify(exc) from exc

    async def _call(self, *command: Any) -> Any:
        # pipelined with concurrent calls like the scripts: hundreds of workers share a few
        # connections instead of each taking one from the pool (and exhausting it)
        try:
            return await self._batcher.execute(*command)
        except _SCRIPT_ERRORS as exc:
            raise classify(exc) from exc


def classify(exc: BaseException) -> DownstreamError:
    """A redis-py error as transient (`DownstreamUnavailable`) or permanent (`DownstreamRejected`).

    Only a refusal of this command's data is permanent; an answer about the server's state
    (`MISCONF`, `READONLY`, `OOM`, `LOADING`, `BUSY`, `MASTERDOWN`, `NOREPLICAS`, auth, …) is
    unavailability, its detail naming the fix (`billingd.clients.redis.FIXES`)."""
    detail = f"{type(exc).__name__}: {exc}"[:500]
    fix = fix_for(exc)
    if fix is not None:
        detail = f"{detail} — fix: {fix}"
    if isinstance(exc, ResponseError) and str(exc).startswith("NOREPLICAS"):
        # the effect is on the master, not yet on enough replicas (`min_replicas_acked`): retried
        # until it is (idempotent), never an attempt — a replica outage must not dead-letter it
        return DownstreamUnavailable("redis", detail, counts=False)
    if isinstance(exc, BatchAborted):
        return CallAborted("redis", detail)
    if isinstance(exc, TRANSIENT_REDIS_ERRORS) or (isinstance(exc, ResponseError) and is_transient_reply(exc)):
        return DownstreamUnavailable("redis", detail)
    return DownstreamRejected("redis", detail)
