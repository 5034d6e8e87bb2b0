"""A small base for HTTP doubles: an aiohttp app on a loopback port, with failure modes."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class Recorded:
    """One request as the double received it."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    form: dict[str, Any] = field(default_factory=dict)
    replayed: bool = False
    status: int = 200
    at: float = field(default_factory=time.monotonic)
    """When it arrived (monotonic seconds)."""


class Double:
    """Base of the doubles: `mode` is `ok`, `error` (answer `error_status`) or `hang` (never answer
    until the mode changes); `fail_next(n, status)` fails only the next `n` requests."""

    def __init__(self) -> None:
        self.requests: list[Recorded] = []
        self.mode = "ok"
        self.error_status = 500
        self._failures_left = 0
        self._failure_status = 500
        self._unhang = asyncio.Event()
        self.port = 0
        self.poison: bytes | None = None
        """Requests whose body contains this fail with `error_status`, whatever the mode (a
        payload the endpoint cannot take)."""

    @property
    def url(self) -> str:
        """The double's base URL."""
        return f"http://127.0.0.1:{self.port}"

    def set_mode(self, mode: str, status: int = 500) -> None:
        """Switch to `ok`, `error` (with `status`) or `hang`."""
        self.mode, self.error_status = mode, status
        if mode != "hang":
            self._unhang.set()
            self._unhang = asyncio.Event()

    def fail_next(self, count: int, status: int = 500) -> None:
        """Fail the next `count` requests with `status`, then answer normally."""
        self._failures_left, self._failure_status = count, status

    async def failure(self) -> web.Response | None:
        """The failure response to give now, if any (after hanging while in `hang` mode)."""
        while self.mode == "hang":
            await self._unhang.wait()
        if self._failures_left > 0:
            self._failures_left -= 1
            return self.error_response(self._failure_status)
        if self.mode == "error":
            return self.error_response(self.error_status)
        return None

    def error_response(self, status: int) -> web.Response:
        """The body a failing request gets."""
        return web.json_response({"error": f"double failing with {status}"}, status=status)

    def app(self) -> web.Application:
        """The routes of this double."""
        raise NotImplementedError

    @contextlib.asynccontextmanager
    async def running(self, port: int = 0) -> AsyncIterator[Double]:
        """Serve on 127.0.0.1 (a free port unless `port` is given) until the block ends."""
        runner = web.AppRunner(self.app(), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        try:
            yield self
        finally:
            self.set_mode("ok")
            await runner.cleanup()


class Sink(Double):
    """Records every POST to any path and answers 200 `{"ok": true}` (a webhook or marketplace endpoint)."""

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/{tail:.*}", self._post)
        return app

    async def _post(self, request: web.Request) -> web.Response:
        body = await request.read()
        failure = await self.failure()
        if failure is None and self.poison is not None and self.poison in body:
            failure = self.error_response(self.error_status)
        status = failure.status if failure is not None else 200
        self.requests.append(Recorded(request.method, request.path, dict(request.headers), body, status=status))
        return failure if failure is not None else web.json_response({"ok": True})

    def bodies(self, path: str | None = None) -> list[bytes]:
        """Bodies of recorded requests (to `path`, when given) that were answered 2xx."""
        return [r.body for r in self.requests if path is None or r.path == path]
