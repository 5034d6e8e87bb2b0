"""`CommandBatcher`: Redis commands issued concurrently by many workers, sent as pipelines.

Twenty workers each awaiting a script would make twenty round trips, twenty socket writes and
twenty reader wake-ups. Instead the first caller that finds no flush in progress becomes the
*leader*: it yields once so the other ready workers can queue their commands, sends everything
queued as one pipeline (one write, one read), and hands each caller its own reply. Calls made
during a flush gather in the next batch, led by its first caller once the flush ends; callers
wait on one event per batch, not one each. Within a pipeline, calls of the same Lua script go
as one call of its batched form (`billingd.clients.ledger.scripts`): one command to pack, one
reply to parse and one script call on Redis for the batch's messages, each call still getting
its own reply or error.

There is no background task: the leader is a caller's own task. If it is cancelled mid-flush,
its followers fail with `BatchAborted` (a transient error: they retry; the scripts are
idempotent, so one that did run is harmless). Each command's reply or error is its own: one
failing script does not fail the others in its pipeline, and arguments are encoded by each
caller before its command joins a pipeline, so a value Redis cannot take (a 5,000-digit number)
fails that caller alone (DESIGN §8).

With `min_replicas_acked = N` (`[redis]`), a pipeline that wrote — script calls (the effects)
and plain writes (`SET` of a customer mapping, …), every command but the reads in `READS` — is
followed, on each node it wrote to, by a probe write and `WAIT N timeout` on one connection: the
probe moves that connection's replication offset past every write the node had taken, ours
included, so `WAIT` returns once N replicas hold them. One extra round trip per node per batch,
not per message. Fewer than N replicas in time → every write of that node gets a `NOREPLICAS`
error: transient, retried (the writes are idempotent), never acked.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Sequence
from functools import partial
from typing import Any

import anyio
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import DataError, NoScriptError, ResponseError

from billingd.clients.ledger.scripts import Script, batched, pack
from billingd.clients.redis import RedisClient

#: Commands that write nothing: the only ones a pipeline sends without waiting for replicas.
READS = frozenset({"GET", "MGET", "HGET", "HMGET", "HGETALL", "EXISTS", "TTL", "PTTL", "SMEMBERS", "SCARD",
                   "SISMEMBER", "ZRANGE", "ZCARD", "ZSCORE", "LRANGE", "LLEN", "SCAN", "HSCAN", "PING"})  # fmt: skip


class BatchAborted(Exception):
    """The task leading this call's pipeline was cancelled before the reply arrived."""


class _Call:
    __slots__ = ("args", "command", "error", "keys", "script", "value")

    def __init__(
        self, command: Sequence[Any], script: Script | None = None, keys: Sequence[Any] = (), args: Sequence[Any] = ()
    ) -> None:
        self.command = command
        self.script, self.keys, self.args = script, keys, args
        self.value: Any = None
        self.error: BaseException | None = None

    def answer(self, reply: Any) -> None:
        if isinstance(reply, BaseException):
            self.error = reply
        else:
            self.value = reply


class _Batch:
    """Calls that go out in one pipeline; its first caller leads it, the others wait on `done`
    (one event per pipeline, not one per call)."""

    __slots__ = ("calls", "done")

    def __init__(self) -> None:
        self.calls: list[_Call] = []
        self.done = anyio.Event()


class CommandBatcher:
    """Coalesces concurrent commands into pipelines of at most `max_batch` (see module docstring)."""

    def __init__(
        self, redis: RedisClient, max_batch: int = 256, replicas: int = 0, replica_timeout: float = 1.0
    ) -> None:
        self._redis = redis
        self._replicas = replicas
        self._replica_timeout_ms = max(1, int(replica_timeout * 1000))
        self._encode = redis.get_encoder().encode
        self._max_batch = max_batch
        self._pending: _Batch | None = None  # the batch still taking calls
        self._flushing = False
        self._flush_ended = anyio.Event()
        self._cluster = isinstance(redis, RedisCluster)
        self._wrappers: dict[str, Script] = {}

    async def execute(self, *command: Any) -> Any:
        """Run one command (e.g. `"GET", key`) and return its reply.

        Raises:
            redis.exceptions.DataError: an argument cannot be encoded (raised before sending).
            redis.exceptions.RedisError: this command's error, or the pipeline's connection error.
            BatchAborted: the leading task was cancelled.
        """
        self._check(command[1:])
        return await self._submit(_Call(command))

    async def run_script(self, script: Script, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        """Run `script` with `keys` and `args` and return its reply. Concurrent calls of the same
        script (whose keys share a cluster slot) are applied by one batched script call
        (`billingd.clients.ledger.scripts`), each with its own reply or error.

        Raises: as `execute`; `NoScriptError` when Redis does not have `script` (load it, retry).
        """
        keys, args = self._encoded(keys), self._encoded(args)  # once: redis-py passes bytes through
        return await self._submit(_Call(("EVALSHA", script.sha, len(keys), *keys, *args), script, keys, args))

    def _check(self, args: Sequence[Any]) -> None:
        """Raise `DataError` if an argument cannot be encoded. `execute` sends its arguments as
        given, since redis-py parses some replies by them (a script's reply does not depend on them)."""
        self._encoded(args)

    def _encoded(self, args: Sequence[Any]) -> list[bytes]:
        """`args` as redis-py encodes them (str as UTF-8, int in decimal); the exact types bytes,
        str and int take a fast path, anything else (float, bool, None…) redis-py's encoder."""
        encode = self._encode
        try:
            return [
                arg if type(arg) is bytes else arg.encode() if type(arg) is str else str(arg).encode()
                if type(arg) is int else encode(arg)
                for arg in args
            ]  # fmt: skip
        except (DataError, ValueError, TypeError) as exc:  # e.g. an int beyond 4,300 digits, None
            raise DataError(f"cannot encode a Redis argument: {exc}"[:300]) from None

    async def _submit(self, call: _Call) -> Any:
        batch = self._pending
        if batch is None or len(batch.calls) >= self._max_batch:
            batch = self._pending = _Batch()
        batch.calls.append(call)
        if len(batch.calls) == 1:
            await self._lead(batch)
        else:
            await batch.done.wait()
        if call.error is not None:
            raise call.error
        return call.value

    async def _lead(self, batch: _Batch) -> None:
        try:
            if not self._flushing:
                await anyio.lowlevel.checkpoint()  # let the other ready workers join the batch
            while self._flushing:  # one pipeline at a time: calls gather meanwhile
                await self._flush_ended.wait()
        except BaseException:
            self._abort(batch, "the task leading this Redis pipeline was cancelled before sending it")
            raise
        if self._pending is batch:
            self._pending = None
        self._flushing, self._flush_ended = True, anyio.Event()
        try:
            await self._flush(batch.calls)
        except BaseException:
            self._abort(batch, "the task leading this Redis pipeline was cancelled")
            raise
        finally:
            self._flushing = False
            self._flush_ended.set()
            batch.done.set()

    def _abort(self, batch: _Batch, reason: str) -> None:
        """Fail the calls of `batch` that have no reply yet with `BatchAborted` (they retry)."""
        if self._pending is batch:
            self._pending = None
        for call in batch.calls:  # none has a reply: replies are handed out only once all arrived
            call.error = BatchAborted(reason)
        batch.done.set()

    async def _flush(self, calls: list[_Call]) -> None:
        entries = self._group(calls)
        pipe = self._redis.pipeline(transaction=False)
        for entry in entries:
            if isinstance(entry, _Call):
                pipe.execute_command(*entry.command)
            else:
                pipe.execute_command(*self._batched_command(entry))
        try:
            replies = await pipe.execute(raise_on_error=False)
        except Exception as exc:  # noqa: BLE001 — handed to every caller, who classifies it
            replies = [exc] * len(entries)
        for i, (entry, reply) in enumerate(zip(entries, replies, strict=True)):
            if isinstance(entry, list) and isinstance(reply, NoScriptError):
                replies[i] = await self._run_reloaded(entry)  # Redis lost its script cache: load it once
        if self._replicas:
            await self._wait_for_replicas(entries, replies)  # after every write of the batch, reloads included
        for entry, reply in zip(entries, replies, strict=True):
            if isinstance(entry, _Call):
                entry.answer(reply)
                continue
            if isinstance(reply, list) and len(reply) == len(entry):
                for call, one in zip(entry, reply, strict=True):
                    call.answer(one)
            else:
                error = reply if isinstance(reply, BaseException) else ResponseError(f"batched script: {reply!r}")
                for call in entry:
                    call.answer(error)

    async def _wait_for_replicas(self, entries: list[_Call | list[_Call]], replies: list[Any]) -> None:
        """`WAIT` on each node the script calls of this pipeline wrote to; where too few replicas
        took the writes in time, their replies become `NOREPLICAS` errors (see module docstring)."""
        by_node: dict[Any, list[int]] = {}
        probes: dict[Any, bytes] = {}
        for i, entry in enumerate(entries):
            first = entry[0] if isinstance(entry, list) else entry
            if isinstance(replies[i], BaseException):
                continue
            if first.script is not None:
                key = first.keys[0] if first.keys else b"billingd:probe"
            elif str(first.command[0]).upper() not in READS and len(first.command) > 1:
                key = self._encoded(first.command[1:2])[0]
            else:
                continue
            node = self._redis.get_node_from_key(key) if isinstance(self._redis, RedisCluster) else None  # type: ignore[arg-type]  # bytes work
            by_node.setdefault(node, []).append(i)
            probes.setdefault(node, _probe_key(key))
        if not by_node:
            return
        acked: dict[Any, int | BaseException] = {}

        async def wait(node: Any) -> None:
            acked[node] = await self._wait_on(node, probes[node])

        async with anyio.create_task_group() as tg:
            for node in by_node:
                tg.start_soon(wait, node)
        for node, indexes in by_node.items():
            replicas = acked[node]
            if isinstance(replicas, int) and replicas >= self._replicas:
                continue
            why = replicas if isinstance(replicas, BaseException) else f"{replicas} replica(s) acknowledged"
            error = ResponseError(
                f"NOREPLICAS fewer than {self._replicas} replicas took the writes within "
                f"{self._replica_timeout_ms} ms ({why}): not acked"
            )
            for i in indexes:
                entry = entries[i]
                replies[i] = [error] * len(entry) if isinstance(entry, list) else error

    async def _wait_on(self, node: Any, probe: bytes) -> int | BaseException:
        """Probe write + `WAIT` on one connection of `node` (None: the single Redis)."""
        commands = [("SET", probe, b"1", "PX", 60_000), ("WAIT", self._replicas, self._replica_timeout_ms)]
        try:
            if node is None:
                assert isinstance(self._redis, Redis)
                pool = self._redis.connection_pool
                connection = await pool.get_connection()  # type: ignore[no-untyped-call]
                release = partial(pool.release, connection)
            else:
                connection = node.acquire_connection()
                release = partial(node.release, connection)
            try:
                await connection.send_packed_command(connection.pack_commands(commands))
                await connection.read_response()
                replicas = await connection.read_response()
            except BaseException:
                await connection.disconnect()
                raise
            finally:
                result = release()
                if inspect.isawaitable(result):  # the single pool's release is a coroutine, a node's is not
                    await result
            return int(replicas)
        except Exception as exc:  # noqa: BLE001 — reported as NOREPLICAS for the node's calls
            return exc

    def _group(self, calls: list[_Call]) -> list[_Call | list[_Call]]:
        """Script calls of one script (and one cluster slot) together; everything else alone."""
        groups: dict[tuple[str, int], list[_Call]] = {}
        entries: list[_Call | list[_Call]] = []
        for call in calls:
            if call.script is None or (self._cluster and not call.keys):
                entries.append(call)
                continue
            slot = key_slot(call.keys[0]) if self._cluster else 0  # keys of a script call are encoded
            group = groups.get((call.script.sha, slot))
            if group is None:
                group = groups[call.script.sha, slot] = []
                entries.append(group)
            group.append(call)
        return [entry[0] if isinstance(entry, list) and len(entry) == 1 else entry for entry in entries]

    def _batched_command(self, group: list[_Call]) -> tuple[Any, ...]:
        script = group[0].script
        assert script is not None  # grouped calls are script calls
        wrapper = self._wrappers.get(script.sha)
        if wrapper is None:
            wrapper = self._wrappers[script.sha] = batched(script)
        keys, argv = pack([(call.keys, call.args) for call in group])
        return ("EVALSHA", wrapper.sha, len(keys), *keys, *argv)

    async def _run_reloaded(self, group: list[_Call]) -> Any:
        script = group[0].script
        assert script is not None
        try:
            await self._redis.script_load(self._wrappers[script.sha].source)
            return await self._redis.execute_command(*self._batched_command(group))
        except Exception as exc:  # noqa: BLE001 — handed to every caller of the group
            return exc


_TAG = re.compile(rb"\{([^}]+)\}")


def _probe_key(key: bytes) -> bytes:
    """A key in the same cluster slot as `key` (its hash tag, else the key itself as the tag)."""
    match = _TAG.search(key)
    return b"billingd:probe:{" + (match.group(1) if match else key) + b"}"
