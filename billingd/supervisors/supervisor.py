"""A one_for_one supervisor on an anyio task group (Erlang/OTP semantics, DESIGN §3).

Each child is an actor factory. A crashed child (its `run()` raised) is restarted with a fresh
actor after a full-jitter backoff (`backoff_initial` → `backoff_max`, reset after a run healthy
for `backoff_max`). More than `max_restarts` restarts within `max_seconds` is escalation: `escalated` is set and
`on_escalate` is called (the daemon starts its drain, with the same deadline as a SIGTERM, and
exits 70 so systemd or Kubernetes restarts the process); without it the supervisor drains its
children itself and `run()` returns.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import anyio
import structlog

from billingd.config.model import SupervisorSettings
from billingd.supervisors.backoff import full_jitter

log = structlog.get_logger("billingd.supervisor")


class Actor(Protocol):
    """What the supervisor runs: `SourceActor` is one."""

    async def run(self) -> None:
        """Run until drained; raise on crash."""
        ...

    def drain(self) -> None:
        """Stop gracefully."""
        ...

    def abort(self) -> None:
        """Stop now: cancel in-flight work."""
        ...


@dataclass(eq=False)
class Child:
    """One supervised actor slot: its factory, current actor and restart history."""

    name: str
    factory: Callable[[], Actor]
    on_restart: Callable[[], None] = lambda: None
    actor: Actor | None = None
    stopping: bool = False
    restarts: deque[float] = field(default_factory=deque)
    stopped: anyio.Event = field(default_factory=anyio.Event)
    wake: anyio.Event = field(default_factory=anyio.Event)

    def is_stopping(self) -> bool:
        """Whether `stop` was called (a method, read afresh after every await)."""
        return self.stopping

    def stop(self, abort: bool = False) -> None:
        """Drain (or abort) the current actor and do not restart it."""
        self.stopping = True
        self.wake.set()
        if self.actor is not None:
            self.actor.abort() if abort else self.actor.drain()


class Supervisor:
    """Supervises named children; see the module docstring."""

    def __init__(
        self,
        settings: SupervisorSettings,
        rng: random.Random | None = None,
        on_escalate: Callable[[str], None] | None = None,
    ) -> None:
        self.settings = settings
        self.escalated: str | None = None
        self._on_escalate = on_escalate
        self.children: dict[str, Child] = {}
        self._rng = rng or random.Random()
        self._tg: anyio.abc.TaskGroup | None = None
        self._draining = anyio.Event()
        self.alive = False

    async def run(self, children: list[Child]) -> None:
        """Run `children` until a drain is requested and every child has stopped. The supervisor
        stays up with no children (a reload may stop one and start another)."""
        async with anyio.create_task_group() as tg:
            self._tg = tg
            self.alive = True
            tg.start_soon(self._draining.wait)  # holds the group open until drain()
            for child in children:
                self.start_child(child)
        self.alive = False
        self._tg = None

    def start_child(self, child: Child) -> None:
        """Start supervising `child` (also used by config reload to add a source)."""
        assert self._tg is not None, "the supervisor is not running"
        self.children[child.name] = child
        self._tg.start_soon(self._supervise, child, name=f"child {child.name}")

    async def stop_child(self, name: str) -> None:
        """Drain child `name` and wait until it has stopped."""
        child = self.children.get(name)
        if child is None:
            return
        child.stop()
        await child.stopped.wait()
        self.children.pop(name, None)

    def drain(self) -> None:
        """Drain every child (graceful stop); `run()` returns once they have stopped."""
        self._draining.set()
        for child in list(self.children.values()):
            child.stop()

    def abort(self) -> None:
        """Abort every child (cancel in-flight handlers)."""
        self._draining.set()
        for child in list(self.children.values()):
            child.stop(abort=True)

    async def _supervise(self, child: Child) -> None:
        s = self.settings
        failures = 0
        try:
            while not child.stopping:
                started = anyio.current_time()
                try:
                    child.actor = child.factory()  # building it can fail too (its handler, its client)
                    await child.actor.run()
                    return
                except Exception as exc:
                    if child.is_stopping():
                        log.error("actor crashed while stopping", source=child.name, exc_info=exc)
                        return
                    log.error("actor crashed", source=child.name, exc_info=exc)
                now = anyio.current_time()
                if now - started >= s.backoff_max:
                    failures = 0
                child.restarts.append(now)
                while child.restarts and now - child.restarts[0] > s.max_seconds:
                    child.restarts.popleft()
                if len(child.restarts) > s.max_restarts:
                    self._escalate(child)
                    return
                delay = full_jitter(failures, s.backoff_initial, s.backoff_max, self._rng)
                failures += 1
                log.warning("actor restarting", source=child.name, delay=round(delay, 3), restarts=len(child.restarts))
                child.on_restart()
                with anyio.move_on_after(delay):
                    await child.wake.wait()
        finally:
            child.actor = None
            child.stopped.set()

    def _escalate(self, child: Child) -> None:
        s = self.settings
        self.escalated = (
            f"{child.name} crashed {len(child.restarts)} times within "
            f"{s.max_seconds:g}s (max_restarts = {s.max_restarts})"
        )
        log.critical("supervisor escalation: draining and exiting", reason=self.escalated)
        if self._on_escalate is not None:
            self._on_escalate(self.escalated)
        else:
            self.drain()
