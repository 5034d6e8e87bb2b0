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
import ssl
from typing import Any

import structlog
from aio_pika import Connection, RobustConnection
from aiormq.connection import TransportFactory
from aiormq.exceptions import AMQPConnectionError
from yarl import URL

from billingd.config.tls import ContextSource, TlsFileError

log = structlog.get_logger("billingd.sources.amqp")


class TlsTransport(TransportFactory):
    """aiormq's transport for `amqps://`, verifying the broker as a `tls` table says: its context
    is read again when a file changed (a fixed CA or a renewed client certificate is used at the
    next connection attempt), and `server_name` is verified and sent as SNI (else the node's host).
    A plain `amqp://` node is connected in plain text."""

    def __init__(self, source: ContextSource) -> None:
        self.source = source

    async def create(self, url: URL, **kwargs: Any) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Open the TCP (and TLS) connection to `url`'s node.

        Raises:
            AMQPConnectionError: unreachable, or the TLS handshake failed (the reason says why)."""
        kwargs.pop("ssl_context_provider", None)
        tls: dict[str, Any] = {}
        if url.scheme == "amqps":
            try:
                tls = {"ssl": self.source.context(), "server_hostname": self.source.server_hostname(url.host or "")}
            except TlsFileError as exc:
                raise AMQPConnectionError(f"tls.{exc}") from None
        try:
            return await asyncio.open_connection(host=url.host, port=url.port or default_port(url), **tls, **kwargs)
        except OSError as exc:
            raise AMQPConnectionError(_explain(exc)) from exc


#: What to check for the TLS alerts a broker sends (OpenSSL's reason codes in the error's text).
TLS_HINTS = {
    "CERTIFICATE_REQUIRED": "the broker requires a client certificate: set tls.cert_file and tls.key_file",
    "UNKNOWN_CA": "the broker does not trust the client certificate's CA (its ssl_options.cacertfile)",
    "BAD_CERTIFICATE": "the broker refused the client certificate",
    "CERTIFICATE_EXPIRED": "a certificate has expired",
    "WRONG_VERSION_NUMBER": "the port does not speak TLS (amqps:// to a plain listener?)",
}


def with_tls_hint(text: str, tls: bool) -> str:
    """`text` (a connect error) and, when it carries a TLS alert — or, over TLS, the broker reset
    the connection (TLS 1.3 sends its alert after the handshake: it can lose the race with the
    reset) — what to check."""
    for code, hint in TLS_HINTS.items():
        if code in text:
            return f"{text} ({hint})"
    if tls and "reset" in text.lower():
        return (
            f"{text} (the broker closed the TLS connection: it may require a client certificate "
            "— tls.cert_file, tls.key_file — or refuse this one)"
        )
    return text


def default_port(url: URL) -> int:
    """The port of a node URL without one: 5671 for `amqps://`, 5672 for `amqp://`."""
    return 5671 if url.scheme == "amqps" else 5672


def _explain(exc: OSError) -> str:
    """An OSError of a connect as one line; a failed verification with what to check."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (
            f"TLS: the broker's certificate was not accepted: {exc.verify_message or exc.reason} "
            "(check tls.ca_file and tls.server_name against the broker's certificate)"
        )
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed: {exc.reason or exc} (is the port a TLS listener? a client certificate needed?)"
    return str(exc) or type(exc).__name__


class TlsConnection(Connection):
    """A plain (not robust) aio-pika connection whose `amqps://` nodes are verified as
    `TlsTransport` does (the `dlq` and `publish` tools)."""

    def __init__(
        self, url: URL, loop: asyncio.AbstractEventLoop | None = None, tls: ContextSource | None = None, **kwargs: Any
    ) -> None:
        super().__init__(url, loop=loop, **kwargs)
        if tls is not None:
            self.kwargs["transport_factory"] = TlsTransport(tls)


class NodeConnection(RobustConnection):
    """See module docstring. `nodes` is set after the first connect (an empty list: one node).
    `tls` (a `ContextSource`) verifies `amqps://` nodes (see `TlsTransport`)."""

    nodes: list[URL]
    source = ""

    def __init__(
        self, url: URL, loop: asyncio.AbstractEventLoop | None = None, tls: ContextSource | None = None, **kwargs: Any
    ) -> None:
        super().__init__(url, loop=loop, **kwargs)
        self.nodes = []
        if tls is not None:  # aio-pika passes its kwargs on to aiormq.connect at every (re)connect
            self.kwargs["transport_factory"] = TlsTransport(tls)

    @property
    def node(self) -> str:
        """The node in use, `host:port`."""
        return f"{self.url.host}:{self.url.port or default_port(self.url)}"

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
