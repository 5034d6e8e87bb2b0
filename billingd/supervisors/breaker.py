"""Circuit breakers, one per downstream (DESIGN §3), shared by every source that uses it.

closed ──(failure_threshold consecutive transient failures)──▶ open
open ──(reset_timeout elapsed; the next call is the probe)──▶ half-open
half-open ──probe succeeds──▶ closed          half-open ──probe fails──▶ open, timeout doubled
                                              (up to reset_timeout_max)

Only `DownstreamUnavailable` counts as a failure; any answer from the downstream (including a
permanent 4xx, `DownstreamRejected`, and a 429, `Throttled`) is a success. While half-open,
calls other than the probe wait for its result instead of failing, so a recovered downstream
is not met with a burst of retries. Time is `anyio.current_time()` (monotonic seconds).

Whose failure is it? Each failure is judged (`DownstreamUnavailable.own`) before it is recorded:

* **own** — a call to the same part of the downstream (`CALL_TARGET`: a Redis Cluster node,
  Stripe's API or its meter event host) that began *after* it succeeded (that part serves others:
  this message, or its call, is the problem), or it failed a half-open probe while no other
  message met the breaker since the last success (a message alone on its downstream — a poison
  message — must reach its dead letter instead of opening the breaker forever);
* **shared** — anything else: an outage that other messages meet too, before or after the
  breaker opens. Its retry is never an attempt, however short the outage and whatever
  `max_attempts` is.

The message is `billingd.clients.errors.CURRENT_MESSAGE`, set by the source actor. The breaker
keeps the last failure's detail and logs it when it opens (the detail names the fix where the
downstream said why: `MISCONF`, a refused key, an unserved URL).
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable, Iterable
from typing import TypeVar

import anyio
import structlog

from billingd.clients.errors import (
    CALL_TARGET,
    CURRENT_MESSAGE,
    CallAborted,
    CircuitOpen,
    DownstreamRejected,
    DownstreamUnavailable,
    Throttled,
)
from billingd.config.model import Settings
from billingd.telemetry.metrics import Metrics

T = TypeVar("T")
log = structlog.get_logger("billingd.breaker")


class BreakerState(enum.IntEnum):
    """Exported as `billingd_circuit_breaker_state`."""

    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class CircuitBreaker:
    """One downstream's breaker; satisfies `billingd.clients.errors.Guard`."""

    def __init__(
        self,
        name: str,
        failure_threshold: int,
        reset_timeout: float,
        reset_timeout_max: float,
        on_change: Callable[[CircuitBreaker], None] | None = None,
    ) -> None:
        self.name = name
        self.failure_threshold = failure_threshold
        self.reset_timeout = reset_timeout
        self.reset_timeout_max = reset_timeout_max
        self.state = BreakerState.CLOSED
        self.failures = 0
        self.timeout = reset_timeout
        self.open_until = 0.0
        self._probing = False
        self._changed = anyio.Event()
        self._on_change = on_change
        self._calls = 0
        self._last_success: dict[str, int] = {}
        """The latest call number that succeeded, per target."""
        self._met: set[str | None] = set()
        """Messages that met a failure or a refusal since the last success (at most two kept:
        enough to know whether a probe's message is alone)."""
        self.last_failure = ""
        """The detail of the latest failure (logged when the breaker opens)."""

    # -- Guard -------------------------------------------------------------------------------

    async def call(self, fn: Callable[..., Awaitable[T]], *args: object) -> T:
        """Run `await fn(*args)` if admitted, recording the result.

        Raises:
            CircuitOpen: open and not yet due for a probe.
            DownstreamUnavailable: from `fn` (recorded as a failure).
        """
        self._calls += 1
        call, message, target = self._calls, CURRENT_MESSAGE.get(), CALL_TARGET.get()
        probe = await self._admit(message)
        try:
            result = await fn(*args)
        except CallAborted:
            if probe:  # no answer: let the next call probe
                self._probing = False
            raise
        except DownstreamUnavailable as exc:
            exc.own = self._own(call, target, probe, message)
            self._meet(message)
            self.last_failure = exc.detail
            if probe or self.state is BreakerState.CLOSED:
                self._failure()
            raise
        except (DownstreamRejected, Throttled):
            self._success(call, target)  # a refusal or a 429 is an answer: the downstream is up
            raise
        except BaseException:
            if probe:  # cancelled or a bug, not an answer: let the next call probe
                self._probing = False
            raise
        self._success(call, target)
        return result

    async def _admit(self, message: str | None) -> bool:
        while True:
            if self.state is BreakerState.CLOSED:
                return False
            if self.state is BreakerState.OPEN:
                remaining = self.open_until - anyio.current_time()
                if remaining > 0:
                    self._meet(message)
                    raise CircuitOpen(self.name, remaining)
                self._set(BreakerState.HALF_OPEN)
            if not self._probing:
                self._probing = True
                return True
            self._meet(message)  # waits on another message's probe: not alone
            await self._changed.wait()

    def _own(self, call: int, target: str, probe: bool, message: str | None) -> bool:
        """Whether a failure of call number `call` to `target` (made for `message`) is that
        message's own (see module docstring)."""
        if self._last_success.get(target, 0) > call:
            return True
        return probe and message is not None and not (self._met - {message})

    def _meet(self, message: str | None) -> None:
        if len(self._met) < 2:
            self._met.add(message)

    # -- transitions -------------------------------------------------------------------------

    def _failure(self) -> None:
        if self.state is BreakerState.HALF_OPEN:
            self.timeout = min(self.timeout * 2, self.reset_timeout_max)
            self._open()
            return
        self.failures += 1
        if self.failures >= self.failure_threshold:
            self.timeout = self.reset_timeout
            self._open()

    def _success(self, call: int = 0, target: str = "") -> None:
        if call > self._last_success.get(target, 0):
            if len(self._last_success) > 1000 and target not in self._last_success:
                self._last_success.clear()  # bounded: targets are nodes and hosts, a handful
            self._last_success[target] = call
        self._met.clear()
        self.failures = 0
        if self.state is not BreakerState.CLOSED:
            self.timeout = self.reset_timeout
            self._set(BreakerState.CLOSED)

    def _open(self) -> None:
        self.open_until = anyio.current_time() + self.timeout
        self._set(BreakerState.OPEN)

    def _set(self, state: BreakerState) -> None:
        previous, self.state = self.state, state
        self._probing = False
        self._changed.set()
        self._changed = anyio.Event()
        if state is BreakerState.OPEN:
            log.warning(
                "circuit breaker open",
                breaker=self.name,
                previous=previous.name.lower(),
                retry_in=round(self.timeout, 3),
                failures=self.failures,
                error=self.last_failure[:600],
            )
        else:
            log.info(
                f"circuit breaker {state.name.lower().replace('_', '-')}",
                breaker=self.name,
                previous=previous.name.lower(),
            )
        if state is BreakerState.CLOSED:
            self.failures = 0
        if self._on_change is not None:
            self._on_change(self)

    # -- held open from outside ----------------------------------------------------------------

    def hold_open(self, seconds: float) -> None:
        """Keep the breaker open for `seconds` from now (a downstream billingd itself knows is
        behind, e.g. the meter outbox past `max_outbox_age`); 0 closes it again."""
        if seconds > 0:
            self.open_until = anyio.current_time() + seconds
            if self.state is not BreakerState.OPEN:
                self.last_failure = "held open"
                self._set(BreakerState.OPEN)
        elif self.state is BreakerState.OPEN:
            self._set(BreakerState.CLOSED)

    # -- what sources ask --------------------------------------------------------------------

    @property
    def blocking(self) -> bool:
        """Open and not yet due for a probe: sources using it should not take messages."""
        return self.state is BreakerState.OPEN and anyio.current_time() < self.open_until

    async def changed(self) -> None:
        """Wait for the next state change."""
        await self._changed.wait()


class BreakerBoard:
    """The breakers of one daemon by downstream name, created on first use with the settings of
    `[breakers.<name>]` over `[breakers.default]`."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self._settings = settings
        self._metrics = metrics
        self._breakers: dict[str, CircuitBreaker] = {}

    def get(self, name: str) -> CircuitBreaker:
        """The breaker of downstream `name` (`redis`, `stripe`, `forward:<x>`)."""
        breaker = self._breakers.get(name)
        if breaker is None:
            s = self._settings.breaker(name)
            breaker = CircuitBreaker(name, s.failure_threshold, s.reset_timeout, s.reset_timeout_max, self._export)
            self._breakers[name] = breaker
            self._export(breaker)
        return breaker

    def _export(self, breaker: CircuitBreaker) -> None:
        self._metrics.breaker_state.labels(breaker.name).set(int(breaker.state))

    def blocking(self, names: Iterable[str]) -> list[CircuitBreaker]:
        """The breakers among `names` that are open and not yet due for a probe."""
        return [b for b in map(self.get, names) if b.blocking]

    async def wait_blocking(self, names: Iterable[str]) -> list[CircuitBreaker]:
        """Wait until one of `names` blocks; return the blocking ones."""
        breakers = [self.get(n) for n in names]
        if not breakers:
            await anyio.sleep_forever()
        while True:
            blocking = [b for b in breakers if b.blocking]
            if blocking:
                return blocking
            async with anyio.create_task_group() as tg:
                for breaker in breakers:
                    tg.start_soon(_cancel_when_changed, breaker, tg.cancel_scope)

    async def wait_admitting(self, names: Iterable[str]) -> None:
        """Wait until none of `names` blocks (each closed, half-open, or due for a probe)."""
        breakers = [self.get(n) for n in names]
        while True:
            blocking = [b for b in breakers if b.blocking]
            if not blocking:
                return
            until = min(b.open_until for b in blocking)
            with anyio.move_on_after(max(0.0, until - anyio.current_time())):
                async with anyio.create_task_group() as tg:
                    for breaker in blocking:
                        tg.start_soon(_cancel_when_changed, breaker, tg.cancel_scope)


async def _cancel_when_changed(breaker: CircuitBreaker, scope: anyio.CancelScope) -> None:
    await breaker.changed()
    scope.cancel()
