"""A robust AMQP connection over the nodes of a RabbitMQ cluster.

aio-pika's robust connection reconnects to the one URL it was given, forever: if that node is
dead, so is the source. `NodeConnection` keeps the node list of a source (`url` as a list) and
moves to the next node when the connection to the current one is lost and whenever an attempt
to reconnect fails, so consuming resumes on another node; aio-pika then restores the channels
and billingd's consumer watchdog consumes again. Every node of a cluster serves every queue
(RabbitMQ forwards to the queue's leader), so any node will do.

It hooks aio-pika's `RobustConnection` at two points: its connection-closed callback and its
per-attempt transport connect (a name-mangled private method: aio-pika is pinned in uv.lock and
`tests/integration/test_rabbitmq_cluster.py` proves the rotation on a live cluster).
"""

from __future__ import annotations

import asyncio
from typing import Any

import structlog
from aio_pika import RobustConnection
from yarl import URL

log = structlog.get_logger("billingd.sources.amqp")


class NodeConnection(RobustConnection):
    """See module docstring. `nodes` is set after the first connect (an empty list: one node)."""

    nodes: list[URL]
    source = ""

    def __init__(self, url: URL, loop: asyncio.AbstractEventLoop | None = None, **kwargs: Any) -> None:
        super().__init__(url, loop=loop, **kwargs)
        self.nodes = []

    @property
    def node(self) -> str:
        """The node in use, `host:port`."""
        return f"{self.url.host}:{self.url.port or 5672}"

    def next_node(self) -> None:
        """Use the next node of `nodes` from the next connection attempt on."""
        if len(self.nodes) < 2:
            return
        position = next((i for i, n in enumerate(self.nodes) if (n.host, n.port) == (self.url.host, self.url.port)), -1)
        self.url = self.nodes[(position + 1) % len(self.nodes)]
        log.info("amqp moving to the next node", source=self.source, node=self.node)

    def unblocked(self) -> asyncio.Event | None:
        """aiormq's own flag, set while RabbitMQ lets this connection publish (cleared by a
        `connection.blocked` frame the moment it arrives: a memory or disk alarm); None when
        not connected. aiormq keeps it private and offers no callback, so it is read here."""
        transport = self.transport
        if transport is None:
            return None
        flag = getattr(transport.connection, "_Connection__connection_unblocked", None)
        return flag if isinstance(flag, asyncio.Event) else None

    @property
    def blocked(self) -> bool:
        """Whether RabbitMQ blocks this connection's publishing now."""
        flag = self.unblocked()
        return flag is not None and not flag.is_set()

    async def _on_connection_close(self, closing: asyncio.Future[Any]) -> None:
        if not self._close_called and not self.is_closed:
            self.next_node()  # the node in use is gone or unreachable: reconnect elsewhere
        await super()._on_connection_close(closing)

    async def _RobustConnection__connect_transport(self) -> None:  # aio-pika's private hook
        try:
            await super()._RobustConnection__connect_transport()  # type: ignore[misc]
        except BaseException:
            self.next_node()
            raise
