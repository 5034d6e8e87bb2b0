"""Running Lua scripts on Redis through the `redis` guard, with failures classified.

Every billing effect is one Lua script: atomic on the server, so a retry after a timeout either
finds the effect done (and does nothing) or does it once. Keys of one subject share a hash tag
(`{subject}`) so the scripts run on Redis Cluster too.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

from billingd.clients.errors import DownstreamUnavailable, Guard
from billingd.clients.ledger.batch import BatchAborted, CommandBatcher
from billingd.clients.redis import TRANSIENT_REDIS_ERRORS

KEY_PREFIX = "billingd"


def key(*parts: str, tag: str) -> str:
    """`billingd:<parts…>` with `{tag}` as the Redis Cluster hash tag, e.g. `billingd:cdr:{m-1}`.

    The tag goes right after the first part so that every key of one subject hashes alike.
    """
    head, *rest = parts
    return ":".join((KEY_PREFIX, head, "{" + tag + "}", *rest))


@dataclass(frozen=True, slots=True)
class Script:
    """A Lua script and its SHA1 (for EVALSHA)."""

    source: str
    sha: str

    @classmethod
    def of(cls, source: str) -> Script:
        """The script `source` with its digest computed."""
        return cls(source, hashlib.sha1(source.encode()).hexdigest())


class RedisLedger:
    """Base of the ledgers: owns the client and the guard, runs scripts and reads.

    Raises (from every method):
        DownstreamUnavailable: Redis unreachable, timed out, loading or read-only.
        CircuitOpen: the `redis` breaker is open.
    """

    def __init__(self, redis: aioredis.Redis, guard: Guard, batcher: CommandBatcher | None = None) -> None:
        self.redis = redis
        self._guard = guard
        self._batcher = batcher or CommandBatcher(redis)

    async def run(self, script: Script, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Run `script` with `keys` and `args` (pipelined with concurrent calls), through the guard."""
        return await self._guard.call(self._run_script, script, keys, args)

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
        command = ("EVALSHA", script.sha, len(keys), *keys, *args)
        try:
            try:
                return await self._batcher.execute(*command)
            except NoScriptError:  # first use, or Redis restarted and lost its script cache
                await self.redis.script_load(script.source)
                return await self._batcher.execute(*command)
        except (*TRANSIENT_REDIS_ERRORS, BatchAborted) as exc:
            raise DownstreamUnavailable("redis", f"{type(exc).__name__}: {exc}") from exc

    async def _call(self, *command: Any) -> Any:
        try:
            return await self.redis.execute_command(*command)
        except TRANSIENT_REDIS_ERRORS as exc:
            raise DownstreamUnavailable("redis", f"{type(exc).__name__}: {exc}") from exc
