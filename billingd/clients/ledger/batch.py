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
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import anyio
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import DataError, NoScriptError, ResponseError

from billingd.clients.ledger.scripts import Script, batched, pack
from billingd.clients.redis import RedisClient


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

    def __init__(self, redis: RedisClient, max_batch: int = 256) -> None:
        self._redis = redis
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
        try:
            return [self._encode(arg) for arg in args]
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
        for entry, reply in zip(entries, replies, strict=True):
            if isinstance(entry, _Call):
                entry.answer(reply)
                continue
            if isinstance(reply, NoScriptError):  # Redis lost its script cache: load the batch script once
                reply = await self._run_reloaded(entry)
            if isinstance(reply, list) and len(reply) == len(entry):
                for call, one in zip(entry, reply, strict=True):
                    call.answer(one)
            else:
                error = reply if isinstance(reply, BaseException) else ResponseError(f"batched script: {reply!r}")
                for call in entry:
                    call.answer(error)

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
