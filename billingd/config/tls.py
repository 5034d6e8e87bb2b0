"""TLS client contexts from a `TlsSettings` table, and how a verified peer is described.

A context is built with `ssl.create_default_context` (TLS 1.2+, the chain and the host name
verified) from the table's files, read again whenever one of them changed (`ContextSource`), so a
renewed certificate or a fixed CA is used at the next connection attempt without a restart.
"""

from __future__ import annotations

import os
import ssl
import threading
from typing import Any

from billingd.config.model import TlsSettings


class TlsFileError(ValueError):
    """A file of a `tls` table cannot be used; the message names the key and the fix."""


def client_context(tls: TlsSettings) -> ssl.SSLContext:
    """A client context verifying the server as `tls` says (see module docstring).

    Raises:
        TlsFileError: a file is missing, unreadable or not the PEM it should be; the message starts
            with the key (`ca_file: …`).
    """
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls.ca_file or None)
    except (OSError, ssl.SSLError) as exc:
        raise TlsFileError(
            f"ca_file: cannot use {tls.ca_file}: {_reason(exc)} (a PEM file of CA certificates)"
        ) from None
    if tls.cert_file or tls.key_file:
        if not (tls.cert_file and tls.key_file):
            raise TlsFileError("cert_file: a client certificate needs both cert_file and key_file")
        try:
            context.load_cert_chain(tls.cert_file, tls.key_file)
        except (OSError, ssl.SSLError) as exc:
            raise TlsFileError(
                f"cert_file: cannot use {tls.cert_file} with {tls.key_file}: {_reason(exc)} "
                "(PEM certificate and its unencrypted PEM key)"
            ) from None
    if not tls.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


class ContextSource:
    """The context of one `tls` table, rebuilt when one of its files changed (size or mtime):
    `context()` is cheap when nothing did. Thread-safe (redis-py and aiormq may build contexts in
    executor threads)."""

    def __init__(self, tls: TlsSettings) -> None:
        self.tls = tls
        self._lock = threading.Lock()
        self._built: tuple[tuple[Any, ...], ssl.SSLContext] | None = None

    def context(self) -> ssl.SSLContext:
        """The current context.

        Raises:
            TlsFileError: as `client_context`."""
        stamp = tuple(_stamp(p) for p in (self.tls.ca_file, self.tls.cert_file, self.tls.key_file))
        with self._lock:
            if self._built is None or self._built[0] != stamp:
                self._built = (stamp, client_context(self.tls))
            return self._built[1]

    def server_hostname(self, host: str) -> str | None:
        """The name to verify and send as SNI when connecting to `host` (None: no SNI, for an
        address when nothing else is configured)."""
        if self.tls.server_name:
            return self.tls.server_name
        return host or None


def describe(peer: dict[str, Any] | None, verified: bool) -> str:
    """`tls (verified: CN=…, SAN=…)` for a peer certificate (`SSLSocket.getpeercert()`), or
    `tls (NOT verified)`."""
    if not verified or not peer:
        return "tls (NOT verified: verify = false)"
    subject = dict(item for rdn in peer.get("subject", ()) for item in rdn)
    names = [value for kind, value in peer.get("subjectAltName", ()) if kind in ("DNS", "IP Address")]
    parts = [f"CN={subject['commonName']}"] if "commonName" in subject else []
    if names:
        parts.append("SAN=" + ",".join(names[:5]) + ("…" if len(names) > 5 else ""))
    return f"tls (verified: {', '.join(parts) or 'no names'})"


def _stamp(path: str) -> tuple[Any, ...]:
    if not path:
        return ()
    try:
        info = os.stat(path)
    except OSError as exc:
        return ("missing", exc.errno)
    return (info.st_size, info.st_mtime_ns, info.st_ino)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)
