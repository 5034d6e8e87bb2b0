"""`billingd check`'s connection report: how each connection billingd makes is secured.

Per endpoint — each AMQP node, Redis (the `url`'s node, or each Sentinel), each SQS endpoint —
one line: `tls (verified: CN=…, SAN=…)` after a TLS handshake made exactly as billingd makes it
(the same `tls` table: CA, client certificate, `server_name`), `tls (NOT verified …)`, or
`plain`. A certificate the handshake refuses is an error (the check fails: the source could
never connect); a plain-text connection to a host other than this machine is a warning
(credentials and billing data cross the network in the clear). Lines never carry a URL's
credentials: only hosts and ports.
"""

from __future__ import annotations

import asyncio
import ipaddress
import ssl
from dataclasses import dataclass
from urllib.parse import urlparse

import anyio

from billingd.config.model import AmqpSourceSettings, Settings, SqsSourceSettings, TlsSettings
from billingd.config.tls import ContextSource, TlsFileError, describe


@dataclass(frozen=True)
class Endpoint:
    """One connection: what it serves, where, and its TLS table (None: plain text)."""

    what: str
    host: str
    port: int
    tls: TlsSettings | None


def endpoints(settings: Settings) -> list[Endpoint]:
    """Every endpoint `settings` connects to (see module docstring)."""
    found: list[Endpoint] = []
    redis = settings.redis
    parsed = urlparse(redis.url)
    redis_tls = (settings.tls_of(redis.tls) or TlsSettings()) if parsed.scheme == "rediss" else None
    if redis.sentinels:
        for sentinel in redis.sentinels:
            name, number = sentinel.rsplit(":", 1)
            found.append(Endpoint("redis sentinel", name.strip("[]"), int(number), redis_tls))
    else:
        found.append(Endpoint("redis", parsed.hostname or "127.0.0.1", parsed.port or 6379, redis_tls))
    for source in settings.sources:
        if isinstance(source, AmqpSourceSettings):
            tls = settings.tls_of(source.tls) or TlsSettings()
            for url in source.urls:
                node = urlparse(url)
                secure = node.scheme == "amqps"
                port = node.port or (5671 if secure else 5672)
                found.append(
                    Endpoint(f"{source.name} (amqp)", node.hostname or "localhost", port, tls if secure else None)
                )
        elif isinstance(source, SqsSourceSettings):
            where = urlparse(source.endpoint_url or source.queue_url)
            secure = where.scheme == "https"
            port = where.port or (443 if secure else 80)
            found.append(
                Endpoint(f"{source.name} (sqs)", where.hostname or "", port, TlsSettings() if secure else None)
            )
    unique: dict[tuple[str, str, int], Endpoint] = {}
    for endpoint in found:
        unique.setdefault((endpoint.what, endpoint.host, endpoint.port), endpoint)
    return list(unique.values())


async def connection_report(settings: Settings, within: float = 5.0) -> tuple[list[str], list[str], list[str]]:
    """`(lines, warnings, errors)` of every endpoint (see module docstring); endpoints are tried
    at once, each for at most `within` seconds."""
    points = endpoints(settings)
    results: dict[int, tuple[str, str | None, str | None]] = {}

    async def one(index: int, endpoint: Endpoint) -> None:
        results[index] = await _probe(endpoint, within)

    async with anyio.create_task_group() as tg:
        for index, endpoint in enumerate(points):
            tg.start_soon(one, index, endpoint)
    lines, warnings, errors = [], [], []
    for index, endpoint in enumerate(points):
        line, warning, error = results[index]
        lines.append(f"  {endpoint.what} {endpoint.host}:{endpoint.port}: {line}")
        if warning:
            warnings.append(f"  {endpoint.what} {endpoint.host}:{endpoint.port}: {warning}")
        if error:
            errors.append(f"{endpoint.what} {endpoint.host}:{endpoint.port}: {error}")
    return lines, warnings, errors


async def _probe(endpoint: Endpoint, within: float) -> tuple[str, str | None, str | None]:
    """`(line, warning, error)` for one endpoint."""
    if endpoint.tls is None:
        if _loopback(endpoint.host):
            return "plain (this machine)", None, None
        return "plain", "plain text to another host: use TLS (amqps://, rediss://, https://)", None
    source = ContextSource(endpoint.tls)
    try:
        context = source.context()
    except TlsFileError as exc:
        return "tls (unusable files)", None, f"tls.{exc}"
    try:
        with anyio.fail_after(within):
            _, writer = await asyncio.open_connection(
                endpoint.host, endpoint.port, ssl=context, server_hostname=source.server_hostname(endpoint.host)
            )
    except ssl.SSLCertVerificationError as exc:
        reason = exc.verify_message or exc.reason or str(exc)
        return (
            "tls (REFUSED)",
            None,
            f"the server's certificate was not accepted: {reason} (check tls.ca_file and tls.server_name against it)",
        )
    except ssl.SSLError as exc:
        return (
            "tls (handshake failed)",
            None,
            f"TLS handshake failed: {exc.reason or exc} (a TLS port? a client certificate needed?)",
        )
    except (OSError, TimeoutError) as exc:
        return "tls (not reached)", f"could not connect ({type(exc).__name__}): its certificate was not checked", None
    try:
        peer = writer.get_extra_info("peercert")
    finally:
        writer.close()
    return describe(peer, endpoint.tls.verify), None, None


def _loopback(host: str) -> bool:
    if host in ("localhost", "") or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
