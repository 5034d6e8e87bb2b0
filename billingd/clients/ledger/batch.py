"""`CommandBatcher`: Redis commands issued concurrently by many workers, sent as pipelines.

Twenty workers each awaiting a script would make twenty round trips, twenty socket writes and
twenty reader wake-ups. Instead the first caller that finds no flush in progress becomes the
*leader*: it yields once so the other ready workers can queue their commands, sends everything
queued as one pipeline (one write, one read), and hands each caller its own reply. Calls queued
during a flush are led by the oldest of them, promoted when the flush ends.

There is no background task: the leader is a caller's own task. If it is cancelled mid-flush,
its followers fail with `BatchAborted` (a transient error: they retry; the scripts are
idempotent, so one that did run is harmless). Each command's reply or error is its own: one
failing script does not fail the others in its pipeline.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import anyio
import redis.asyncio as aioredis


class BatchAborted(Exception):
    """The task leading this call's pipeline was cancelled before the reply arrived."""


class _Call:
    __slots__ = ("command", "error", "promoted", "value", "wake")

    def __init__(self, command: Sequence[Any]) -> None:
        self.command = command
        self.value: Any = None
        self.error: BaseException | None = None
        self.promoted = False
        self.wake = anyio.Event()


class CommandBatcher:
    """Coalesces concurrent commands into pipelines of at most `max_batch` (see module docstring)."""

    def __init__(self, redis: aioredis.Redis, max_batch: int = 256) -> None:
        self._redis = redis
        self._max_batch = max_batch
        self._queue: list[_Call] = []
        self._leading = False

    async def execute(self, *command: Any) -> Any:
        """Run one command (e.g. `"EVALSHA", sha, 1, key, arg…`) and return its reply.

        Raises:
            redis.exceptions.RedisError: this command's error, or the pipeline's connection error.
            BatchAborted: the leading task was cancelled.
        """
        call = _Call(command)
        self._queue.append(call)
        if self._leading:
            await call.wake.wait()
            if call.promoted:
                await self._lead(call)
        else:
            self._leading = True
            await self._lead(call)
        if call.error is not None:
            raise call.error
        return call.value

    async def _lead(self, mine: _Call) -> None:
        try:
            await anyio.lowlevel.checkpoint()  # let the other ready workers queue their commands
        except BaseException:
            self._queue.remove(mine)
            self._hand_off()
            raise
        batch = self._queue[: self._max_batch]
        del self._queue[: self._max_batch]
        try:
            await self._flush(batch)
        except BaseException:
            for call in batch:
                if call is not mine and not call.wake.is_set():
                    call.error = BatchAborted("the task leading this Redis pipeline was cancelled")
                    call.wake.set()
            raise
        finally:
            self._hand_off()

    def _hand_off(self) -> None:
        if self._queue:
            successor = self._queue[0]
            successor.promoted = True
            successor.wake.set()
        else:
            self._leading = False

    async def _flush(self, batch: list[_Call]) -> None:
        pipe = self._redis.pipeline(transaction=False)
        for call in batch:
            pipe.execute_command(*call.command)
        try:
            replies = await pipe.execute(raise_on_error=False)
        except Exception as exc:  # noqa: BLE001 — handed to every caller, who classifies it
            replies = [exc] * len(batch)
        for call, reply in zip(batch, replies, strict=True):
            if isinstance(reply, BaseException):
                call.error = reply
            else:
                call.value = reply
            call.wake.set()
