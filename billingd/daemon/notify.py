"""The systemd notification protocol (sd_notify(3)): datagrams to `$NOTIFY_SOCKET`.

billingd sends `READY=1` once every actor has started (made its first connection attempt),
`STATUS=<one line>` as things change, `WATCHDOG=1` every half `$WATCHDOG_USEC` while it is
healthy, `STOPPING=1` when a drain begins and `EXTEND_TIMEOUT_USEC=<µs>` while a long drain is
still progressing. Without `NOTIFY_SOCKET` every call is a no-op.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping


class Notifier:
    """Sends sd_notify messages; `enabled` is False outside systemd (`Type=notify`)."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        environ = os.environ if environ is None else environ
        address = environ.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):  # Linux abstract namespace
            address = "\0" + address[1:]
        self._address = address
        self._socket: socket.socket | None = None
        usec = environ.get("WATCHDOG_USEC", "")
        pid = environ.get("WATCHDOG_PID", "")
        mine = not pid or pid == str(os.getpid())
        self.watchdog_interval = int(usec) / 2_000_000 if usec.isdigit() and int(usec) > 0 and mine else None
        """Seconds between WATCHDOG=1 pings (half of `$WATCHDOG_USEC`), or None."""

    @property
    def enabled(self) -> bool:
        """Whether `$NOTIFY_SOCKET` is set."""
        return bool(self._address)

    def send(self, *lines: str) -> None:
        """Send `lines` as one notification (e.g. `"READY=1", "STATUS=…"`). Errors are ignored:
        notifications are advisory, and a missing socket must never stop the daemon."""
        if not self._address:
            return
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._socket.sendto("\n".join(lines).encode(), self._address)
        except OSError:
            pass

    def close(self) -> None:
        """Close the socket."""
        if self._socket is not None:
            self._socket.close()
            self._socket = None
