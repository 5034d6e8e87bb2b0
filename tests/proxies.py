"""Proxies that misbehave on command, for drain tests: an HTTP proxy in front of the SQS emulator
that holds the answers of chosen operations, and a TCP proxy in front of RabbitMQ that stops
forwarding (a blackholed connection: sockets stay open, no byte passes)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

HOP_HEADERS = {"host", "content-length", "transfer-encoding", "connection", "keep-alive"}


class HoldingProxy:
    """Forwards every request to `upstream`; the answers of operations named in `held` (SQS's
    `X-Amz-Target` without its `AmazonSQS.` prefix, or `*` for all) are held until `release()`;
    every answer is delayed by `delay` seconds. `received` counts requests by operation."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.held: set[str] = set()
        self.received: dict[str, int] = {}
        self.delay = 0.0
        self._released = asyncio.Event()
        self.port = 0
        self._session: aiohttp.ClientSession | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def hold(self, *operations: str) -> None:
        """Hold the answers of `operations` (`"*"`: every operation) from now on."""
        self.held = set(operations)
        self._released = asyncio.Event()

    def release(self) -> None:
        """Answer everything held, and hold nothing more."""
        self.held = set()
        self._released.set()

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        operation = request.headers.get("X-Amz-Target", "").rsplit(".", 1)[-1] or "other"
        self.received[operation] = self.received.get(operation, 0) + 1
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        assert self._session is not None
        async with self._session.request(
            request.method, self.upstream + request.path_qs, data=body, headers=headers
        ) as answer:
            payload = await answer.read()
            status, answer_headers = (
                answer.status,
                {k: v for k, v in answer.headers.items() if k.lower() not in HOP_HEADERS},
            )
        if self.delay:
            await asyncio.sleep(self.delay)
        if "*" in self.held or operation in self.held:
            await self._released.wait()
        return web.Response(body=payload, status=status, headers=answer_headers)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[HoldingProxy]:
        app = web.Application(client_max_size=4 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._forward)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120))
        try:
            yield self
        finally:
            self.release()
            await self._session.close()
            await runner.cleanup()


class BlackholeProxy:
    """A TCP proxy to `host:port`; `blackhole()` stops forwarding in both directions while the
    sockets stay open (as a dead network path looks to both ends); `close()` drops them all."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.port = 0
        self.forwarding = True
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None

    def blackhole(self) -> None:
        self.forwarding = False

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.CancelledError):
            while data := await reader.read(65536):
                if self.forwarding:
                    writer.write(data)
                    await writer.drain()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self._writers += [writer, up_writer]
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[BlackholeProxy]:
        self._server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        try:
            yield self
        finally:
            self._server.close()
            for writer in self._writers:
                writer.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
