"""`SourceStatus`: what `/readyz` and the logs say about one source."""

from __future__ import annotations

from dataclasses import dataclass, field

import anyio


@dataclass(slots=True)
class SourceStatus:
    """Live state of one source: connected or not (and why), and the breakers pausing its intake."""

    name: str
    up: bool = False
    reason: str = "starting"
    paused_by: list[str] = field(default_factory=list)
    node: str = ""
    """The broker node in use (AMQP), `host:port`."""
    blocked: str = ""
    """Why the broker blocks publishing (a resource alarm), or "" when it does not."""
    attempted: anyio.Event = field(default_factory=anyio.Event)
    """Set once the actor has made its first connection attempt (successful or not)."""

    def as_dict(self) -> dict[str, object]:
        """The JSON shape `/readyz` reports per source."""
        body: dict[str, object] = {"up": self.up}
        if not self.up:
            body["reason"] = self.reason
        if self.paused_by:
            body["paused_by"] = list(self.paused_by)
        if self.node:
            body["node"] = self.node
        if self.blocked:
            body["blocked"] = self.blocked
        return body
